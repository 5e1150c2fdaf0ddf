"""Training throughput against the machine: samples per second and the fraction of the float32 matmul
peak that each training step reaches.

* **Peak**: one large ``torch.matmul`` (2048², float32), the median of several runs, at the thread count
  under test: :math:`2n^3 / t`.
* **Work**: the FLOPs of one training step (forward and backward: conv, matmul, …) counted by
  ``torch.utils.flop_counter.FlopCounterMode``; elementwise work is not counted, so the fraction of peak
  is what the step achieves on the work that a matmul unit could do.
* **Speed**: the median wall-clock of single steps, timed after a warm-up.

Steps measured: stage 1 (a generator step with the trajectory collector attached, as ``train_gan``
runs it), the sample export (no gradients), stage 2 for each block, and the end-to-end fine-tune.
The fast and the reference paths (:mod:`dfka.engine.fast`) are built side by side in one
process and timed in interleaved rounds, so a change in the machine's load hits both alike. The machine
is shared: every report carries the load average before and after.
"""

from __future__ import annotations

import math
import os
import platform
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch.utils.flop_counter import FlopCounterMode

from dfka.amalgamation.config import AmalgamationConfig
from dfka.bundles import TeacherBundle, TeacherManifest
from dfka.engine import fast
from dfka.models import build_model, parse_arch

PATHS = ("reference", "fast")
Step = Callable[[], Any]


def load_average() -> list[float]:
    """The 1, 5 and 15 minute load averages (empty where the OS has none)."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return []


def set_threads(threads: int) -> int:
    """Pin torch (and any OpenMP pool started later) to ``threads`` threads."""
    os.environ["OMP_NUM_THREADS"] = str(threads)
    os.environ["MKL_NUM_THREADS"] = str(threads)
    torch.set_num_threads(threads)
    return torch.get_num_threads()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def matmul_peak(
    size: int = 2048, repeats: int = 7, device: torch.device | None = None
) -> tuple[float, list[float]]:
    """Median float32 GFLOP/s of one ``size``×``size`` matmul (and every run's GFLOP/s)."""
    device = device or torch.device("cpu")
    a = torch.randn(size, size, device=device)
    b = torch.randn(size, size, device=device)
    out = torch.empty(size, size, device=device)
    torch.matmul(a, b, out=out)  # warm-up: MKL/oneDNN initialisation
    rates = []
    for _ in range(repeats):
        _sync(device)
        start = time.perf_counter()
        torch.matmul(a, b, out=out)
        _sync(device)
        rates.append(2 * size**3 / (time.perf_counter() - start) / 1e9)
    return statistics.median(rates), rates


def step_flops(step: Step) -> int:
    """FLOPs of one call of ``step`` (forward and backward), as FlopCounterMode counts them."""
    counter = FlopCounterMode(display=False)
    with counter:
        step()
    return int(counter.get_total_flops())


@dataclass
class StageThroughput:
    """One measured step: median seconds, samples/s, FLOPs and the fraction of the matmul peak."""

    stage: str
    path: str
    batch_size: int
    seconds: float
    flops: int
    peak_gflops: float
    steps: int
    p25: float = 0.0
    p75: float = 0.0

    @property
    def samples_per_second(self) -> float:
        return self.batch_size / self.seconds

    @property
    def gflops_per_second(self) -> float:
        return self.flops / self.seconds / 1e9

    @property
    def fraction_of_peak(self) -> float:
        return self.gflops_per_second / self.peak_gflops

    def as_dict(self) -> dict[str, Any]:
        return {
            **asdict(self),
            "ms_per_step": 1e3 * self.seconds,
            "samples_per_second": self.samples_per_second,
            "gflop_per_step": self.flops / 1e9,
            "gflops_per_second": self.gflops_per_second,
            "fraction_of_peak": self.fraction_of_peak,
        }


@dataclass
class ThroughputReport:
    threads: int
    device: str
    peak_gflops: float
    peak_runs: list[float]
    load_before: list[float]
    load_after: list[float]
    setup: dict[str, Any]
    rows: list[StageThroughput] = field(default_factory=list)

    def row(self, stage: str, path: str) -> StageThroughput | None:
        return next((r for r in self.rows if r.stage == stage and r.path == path), None)

    def as_dict(self) -> dict[str, Any]:
        return {
            "threads": self.threads,
            "device": self.device,
            "peak_gflops": self.peak_gflops,
            "peak_runs": self.peak_runs,
            "load_before": self.load_before,
            "load_after": self.load_after,
            "machine": {
                "cpus": os.cpu_count(),
                "processor": platform.processor(),
                "torch": torch.__version__,
            },
            "setup": self.setup,
            "rows": [r.as_dict() for r in self.rows],
        }

    def table(self) -> str:
        lines = [
            f"threads {self.threads} on {self.device}; float32 matmul peak {self.peak_gflops:.0f} GFLOP/s "
            f"(median of {len(self.peak_runs)}); load average {_load(self.load_before)} before, "
            f"{_load(self.load_after)} after",
            f"{'stage':<11} {'path':<10} {'batch':>5} {'ms/step':>9} {'(p25-p75)':>13} {'samples/s':>10} "
            f"{'GFLOP/step':>10} {'GFLOP/s':>8} {'of peak':>8} {'speed-up':>8}",
        ]
        for r in self.rows:
            ref = self.row(r.stage, "reference")
            speedup = f"{ref.seconds / r.seconds:.2f}x" if ref is not None and r.path != "reference" else ""
            lines.append(
                f"{r.stage:<11} {r.path:<10} {r.batch_size:>5} {1e3 * r.seconds:>9.1f} "
                f"{f'({1e3 * r.p25:.0f}-{1e3 * r.p75:.0f})':>13} {r.samples_per_second:>10.0f} "
                f"{r.flops / 1e9:>10.3f} {r.gflops_per_second:>8.1f} {100 * r.fraction_of_peak:>7.1f}% "
                f"{speedup:>8}"
            )
        return "\n".join(lines)


def _load(values: Sequence[float]) -> str:
    return "/".join(f"{v:.2f}" for v in values) if values else "n/a"


# --- what is measured ---------------------------------------------------------------------------------


def synthetic_teachers(
    arch: str = "lenet5", count: int = 2, classes: int = 10, seed: int = 0
) -> list[TeacherBundle]:
    """Untrained teachers of ``arch`` splitting ``classes`` digits, with plausible BN statistics. Speed does
    not depend on the weights, so the benchmark needs no trained bundles (``--teachers`` uses real ones)."""
    spec = parse_arch(arch)
    spec.setdefault("blocks", 3)
    g = torch.Generator().manual_seed(seed)
    bundles = []
    split = [list(range(classes))[i::count] for i in range(count)]
    for i, own in enumerate(split):
        labels = [f"digit_{c}" for c in own]
        model = build_model(
            {**spec, "num_outputs": len(labels), "input_shape": [1, 28, 28]}, mean=[0.1307], std=[0.3081]
        )
        for m in model.modules():
            if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
                m.running_mean.uniform_(-0.5, 0.5, generator=g)
                m.running_var.uniform_(0.5, 2.0, generator=g)
                m.weight.data.uniform_(0.5, 1.5, generator=g)
                m.bias.data.uniform_(-0.2, 0.2, generator=g)
        model.eval()
        manifest = TeacherManifest(
            name=f"synthetic-{i}",
            arch=model.spec,
            block_count=model.num_blocks,
            level_shapes=[list(s) for s in model.level_shapes()],
            input={"shape": [1, 28, 28], "mean": [0.1307], "std": [0.3081]},
            labels=labels,
            task="multiclass",
            weights={"sha256": "0" * 64, "bytes": 1},
        )
        bundles.append(TeacherBundle(manifest=manifest, model=model, source="synthetic"))
    return bundles


def build_steps(
    bundles: Sequence[TeacherBundle],
    cfg: AmalgamationConfig,
    device: torch.device,
    bank_samples: int = 1024,
    stages: Sequence[str] | None = None,
    path: fast.ComputePath = fast.FAST,
) -> dict[str, tuple[int, Step]]:
    """``{stage: (batch size, step)}`` for the training steps, built on ``path`` (fast or reference)."""
    from dfka.amalgamation.regroup import FinetuneTrainer, TargetNet
    from dfka.amalgamation.run import build_student, teacher_set_from_bundles
    from dfka.amalgamation.samples import SampleBank, Sampler, TrajectoryCollector
    from dfka.amalgamation.stage1 import AmalgamatingGAN, GanTrainer
    from dfka.amalgamation.stage2 import BlockTrainer, DualGenerator
    from dfka.amalgamation.union import UnionRule

    torch.manual_seed(cfg.seed)
    teachers = teacher_set_from_bundles(bundles, cfg.target_labels, path).to(device)
    union = UnionRule(teachers, cfg.union.rule).to(device)
    gan = AmalgamatingGAN(teachers, union, cfg.gan)
    trainer = GanTrainer(gan, cfg.seed, device)
    dtype = torch.float16 if cfg.export.dtype == "float16" else torch.float32
    trainer.collector = TrajectoryCollector(cfg.export.samples, start=0.0, seed=cfg.seed + 1, dtype=dtype)
    counter = {"gan": 0}

    def gan_step() -> Any:
        counter["gan"] += 1
        return trainer.step(counter["gan"], 10**6)

    steps: dict[str, tuple[int, Step]] = {"stage1": (cfg.gan.batch_size, gan_step)}
    sampler = Sampler(gan, seed=cfg.seed + 1, batch_size=512, device=device)
    steps["export"] = (sampler.batch_size, sampler.sample)
    bank = SampleBank.generate(sampler, bank_samples, dtype=dtype, progress=False)
    channels = {level: shape[0] for level, shape in enumerate(gan.generator_level_shapes())}
    dual = None
    for b in range(1, teachers.num_blocks + 1):
        # one dual generator per block, so that blocks can be timed in any order
        dual = DualGenerator(build_student(cfg.student, teachers), teachers, channels)
        rng = torch.Generator().manual_seed(cfg.seed + 2)
        block = BlockTrainer(
            dual, union, cfg.blocks, bank.batches(cfg.blocks.batch_size, rng, device), device
        )
        block.start_block(b)
        steps[f"stage2.b{b}"] = (cfg.blocks.batch_size, lambda block=block: block.step(0, 10**6))
    net = TargetNet.from_dual(dual, teachers.label_tasks).to(device)
    batches = bank.batches(cfg.regroup.batch_size, torch.Generator(), device)
    finetune = FinetuneTrainer(net, union, cfg.regroup, batches, device, path=path)
    steps["finetune"] = (cfg.regroup.batch_size, lambda: finetune.step(0, 10**6))
    if stages is not None:
        steps = {k: v for k, v in steps.items() if k in stages or k.split(".")[0] in stages}
    return steps


def measure(
    bundles: Sequence[TeacherBundle] | None = None,
    cfg: AmalgamationConfig | None = None,
    *,
    threads: int = 1,
    device: str | torch.device = "cpu",
    paths: Sequence[str] = PATHS,
    stages: Sequence[str] | None = None,
    warmup: int = 5,
    rounds: int = 5,
    steps_per_round: int = 6,
    bank_samples: int = 1024,
    peak_size: int = 2048,
    progress: Callable[[str], None] | None = None,
) -> ThroughputReport:
    """Time every stage's step on each path in interleaved rounds; median of single steps."""
    from dfka.runtime import pick_device

    set_threads(threads)
    dev = pick_device(device) if isinstance(device, str) else device
    cfg = cfg or AmalgamationConfig()
    bundles = list(bundles) if bundles is not None else synthetic_teachers()
    say = progress or (lambda _msg: None)
    load_before = load_average()
    built: dict[tuple[str, str], tuple[int, Step]] = {}
    for path in paths:
        compute = fast.REFERENCE if path == "reference" else fast.FAST
        for stage, entry in build_steps(bundles, cfg, dev, bank_samples, stages, compute).items():
            built[(stage, path)] = entry
    say(f"built {len(built)} steps; warming up")
    flops: dict[tuple[str, str], int] = {}
    for key, (_, step) in built.items():
        for _ in range(warmup):
            step()
        flops[key] = step_flops(step)
    _, peak_runs = matmul_peak(peak_size, device=dev)
    times: dict[tuple[str, str], list[float]] = {key: [] for key in built}
    for r in range(rounds):
        say(f"round {r + 1}/{rounds}")
        for key, (_, step) in built.items():
            for _ in range(steps_per_round):
                _sync(dev)
                start = time.perf_counter()
                step()
                _sync(dev)
                times[key].append(time.perf_counter() - start)
    _, runs_after = matmul_peak(peak_size, device=dev)
    report = ThroughputReport(
        threads=torch.get_num_threads(),
        device=str(dev),
        peak_gflops=statistics.median([*peak_runs, *runs_after]),
        peak_runs=[round(x, 1) for x in [*peak_runs, *runs_after]],
        load_before=load_before,
        load_after=load_average(),
        setup={
            "teachers": [f"{b.name}:{_arch(b)}" for b in bundles],
            "student": cfg.student,
            "gan_batch": cfg.gan.batch_size,
            "blocks_batch": cfg.blocks.batch_size,
            "finetune_batch": cfg.regroup.batch_size,
            "bn_term": cfg.gan.loss.bn > 0,
            "rounds": rounds,
            "steps_per_round": steps_per_round,
        },
    )
    order = list(dict.fromkeys(stage for stage, _ in built))
    for stage in order:
        for path in paths:
            if (stage, path) not in built:
                continue
            ts = sorted(times[(stage, path)])
            report.rows.append(
                StageThroughput(
                    stage=stage,
                    path=path,
                    batch_size=built[(stage, path)][0],
                    seconds=statistics.median(ts),
                    flops=flops[(stage, path)],
                    peak_gflops=report.peak_gflops,
                    steps=len(ts),
                    p25=_quantile(ts, 0.25),
                    p75=_quantile(ts, 0.75),
                )
            )
    return report


def _quantile(sorted_values: list[float], q: float) -> float:
    pos = q * (len(sorted_values) - 1)
    lo, hi = math.floor(pos), math.ceil(pos)
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (pos - lo)


def _arch(bundle: TeacherBundle) -> str:
    spec = bundle.manifest.arch
    return f"{spec.get('arch')}:{spec.get('width', 1)}:blocks={spec.get('blocks', bundle.model.num_blocks)}"
