"""One rank (or the single-process reference) of the data-parallel tests (tests/test_distributed.py).

Started by ``torchrun --nproc-per-node 2`` it runs data-parallel; started by ``python``, it is the
one-process reference. Rank 0 writes the results to ``OUT``.

* ``steps OUT``: stages 1-3 on two toy teachers with tiny step budgets; every training step of every
  stage records its (global) loss and its gradient (the three trainers' ``step`` are wrapped here, in
  the test). ``frozen OUT``: the same with the optimisers' updates skipped, so that every step of both
  runs sees the same weights.
* ``resume OUT CKPT [STOP]``: stage 1 for 30 steps, checkpointing every 5 steps into ``CKPT``; with
  ``STOP`` every rank exits abruptly after that step (a crash), and a second run resumes.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dfka.amalgamation.config import AmalgamationConfig
from dfka.amalgamation.regroup import FinetuneTrainer
from dfka.amalgamation.run import amalgamate, teacher_set_from_bundles, train_gan
from dfka.amalgamation.stage1 import GanTrainer
from dfka.amalgamation.stage2 import BlockTrainer
from dfka.amalgamation.union import UnionRule
from dfka.engine import distributed as dist
from dfka.engine.checkpoint import Checkpoints
from tests.toys import toy_teacher

CPU = torch.device("cpu")


def config(gan_steps: int, block_steps: int, finetune_steps: int) -> AmalgamationConfig:
    return AmalgamationConfig.model_validate(
        {
            "seed": 0,
            "threads": 1,
            "student": "lenet5:0.5",
            "gan": {"budget": {"steps": gan_steps}, "batch_size": 32, "widths": 8},
            "export": {"samples": 256},
            "blocks": {"budget": {"steps": block_steps}, "batch_size": 32},
            "regroup": {"finetune": {"steps": finetune_steps}, "batch_size": 32},
        }
    )


def teachers():
    return [toy_teacher([0, 1, 2, 3], seed=0), toy_teacher([4, 5, 6, 7], seed=1)]


def recorded_steps(out: Path, frozen: bool) -> None:
    """Loss and gradient of every step of every stage."""
    records: list[dict] = []

    def wrap(cls, name, params):
        step = cls.step

        def recording(self, i, total):
            result = step(self, i, total)
            grads = [p.grad.reshape(-1) for p in params(self) if p.grad is not None]
            loss = dist.reduce_metrics({"loss": result["loss"]})["loss"]  # the ranks' mean: the global loss
            records.append({"stage": name, "loss": float(loss), "grad": torch.cat(grads).clone()})
            return result

        cls.step = recording

    wrap(GanTrainer, "gan", lambda t: t.gan.trainable_parameters())
    wrap(BlockTrainer, "blocks", lambda t: t.dual.block_parameters(t.block))
    wrap(FinetuneTrainer, "finetune", lambda t: t.net.parameters())
    bundles = teachers()
    if frozen:  # every step sees the same weights: the arithmetic of one step, batch after batch
        torch.optim.Adam.step = lambda self, closure=None: None
    result = amalgamate(bundles, config(3, 6, 3), progress=False)
    if dist.process().main:
        out.mkdir(parents=True, exist_ok=True)
        (out / "losses.json").write_text(json.dumps([(r["stage"], r["loss"]) for r in records]))
        save_file({f"{i}": r["grad"] for i, r in enumerate(records)}, str(out / "grads.safetensors"))
        state = {k: v.detach().float().contiguous() for k, v in result.targetnet.state_dict().items()}
        save_file(state, str(out / "targetnet.safetensors"))


def resumed_gan(out: Path, ckpt: Path, stop: int | None) -> None:
    """Stage 1 with checkpoints; ``stop``: every rank dies right after that step (no clean exit)."""
    torch.set_num_threads(1)
    dist.init_from_env(CPU)
    cfg = config(30, 3, 3)
    ts = teacher_set_from_bundles(teachers(), None)
    union = UnionRule(ts, cfg.union.rule)
    if stop is not None:
        step = GanTrainer.step

        def crashing(self, i, total):
            result = step(self, i, total)
            if i + 1 == stop:
                os._exit(3)
            return result

        GanTrainer.step = crashing
    checkpoints = Checkpoints(str(ckpt), stage="gan", config_hash="test", every=5)
    gan, _, report = train_gan(ts, union, cfg, device=CPU, progress=False, checkpoints=checkpoints)
    if dist.process().main:
        out.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().contiguous() for k, v in gan.generator.state_dict().items()}
        save_file(state, str(out / "generator.safetensors"))
        resumed = checkpoints.resumed_from.step if checkpoints.resumed_from else None
        (out / "report.json").write_text(json.dumps({"steps": report.steps, "resumed_from": resumed}))
    dist.shutdown()


def main() -> None:
    torch.set_num_threads(1)
    mode, out = sys.argv[1], Path(sys.argv[2])
    if mode in ("steps", "frozen"):
        recorded_steps(out, frozen=mode == "frozen")
        dist.shutdown()
    elif mode == "resume":
        resumed_gan(out, Path(sys.argv[3]), int(sys.argv[4]) if len(sys.argv) > 4 else None)
    else:
        raise SystemExit(f"unknown mode {mode}")


if __name__ == "__main__":
    main()
