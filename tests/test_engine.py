"""The training loop (dfka.engine.loop): wall-clock probes that cost the training nothing, and
a loss that turns NaN stopping the loop before anything diverged is checkpointed."""

from __future__ import annotations

import subprocess
import sys
import time

import pytest
import torch
from torch import nn

from dfka.amalgamation.config import Budget
from dfka.engine.loop import run_loop
from dfka.engine.probe import TimeProbe, active_probe, probing, time_to_reach


def _toy() -> tuple[nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Linear(8, 2))
    return model, torch.optim.SGD(model.parameters(), lr=0.1)


def _step(model: nn.Module, opt: torch.optim.Optimizer, set_train: bool = True):
    x = torch.randn(16, 4, generator=torch.Generator().manual_seed(1))

    def step(i: int, total: int) -> dict[str, torch.Tensor]:
        if set_train:
            model.train()
        loss = model(x).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        time.sleep(0.002)
        return {"loss": loss.detach()}

    return step


def test_probe_scores_on_its_ticks_and_restores_every_module_mode() -> None:
    model, opt = _toy()
    model[1].eval()  # a deliberately frozen BN must stay in eval mode after a probe
    seen_training: list[bool] = []

    def score(m: nn.Module) -> float:
        seen_training.append(m.training)
        return 0.5

    probe = TimeProbe(0.02, score)
    with probing(probe):
        assert active_probe() is probe
        step = _step(model, opt, set_train=False)
        run_loop(step, Budget(steps=40), desc="t", prefix="t", progress=False, model=model)
    assert active_probe() is None
    assert 2 <= len(probe.values) <= 40 and probe.seconds == sorted(probe.seconds)
    assert not any(seen_training)  # scored in eval mode ...
    assert model.training and not model[1].training  # ... and every module's mode came back
    assert torch.is_grad_enabled()  # no_grad ended with the probe


def test_probe_time_is_not_taken_from_a_time_budget() -> None:
    """A slow probe (50 ms a tick, ticks every 20 ms) may not shorten the training a time budget buys."""
    model, opt = _toy()
    probe = TimeProbe(0.02, lambda m: time.sleep(0.05) or 0.0)
    started = time.perf_counter()
    with probing(probe):
        result = run_loop(
            _step(model, opt), Budget(seconds=0.5), desc="t", prefix="t", progress=False, model=model
        )
    wall = time.perf_counter() - started
    assert probe.spent > 0.3  # the probe really took time ...
    assert result.seconds == pytest.approx(0.5, abs=0.1)  # ... which the loop did not count as training
    assert wall == pytest.approx(result.seconds + probe.spent, abs=0.15)
    assert probe.elapsed() == pytest.approx(result.seconds, abs=0.1)


def test_loops_without_a_model_are_not_probed_and_probes_do_not_change_training() -> None:
    model, opt = _toy()
    calls: list[int] = []
    with probing(TimeProbe(1e-6, lambda m: calls.append(1) or 0.0)):
        run_loop(_step(model, opt), Budget(steps=5), desc="t", prefix="t", progress=False)
    assert calls == []
    plain, opt_plain = _toy()
    run_loop(_step(plain, opt_plain), Budget(steps=20), desc="t", prefix="t", progress=False)
    probed, opt_probed = _toy()
    with probing(TimeProbe(1e-6, lambda m: float(m(torch.ones(3, 4)).sum()))):
        run_loop(
            _step(probed, opt_probed), Budget(steps=20), desc="t", prefix="t", progress=False, model=probed
        )
    for a, b in zip(plain.state_dict().values(), probed.state_dict().values(), strict=True):
        assert torch.equal(a, b)  # the probe's forward passes left weights and BN statistics alone


def test_time_to_reach_reads_the_first_crossing() -> None:
    curve = {"seconds": [1.0, 2.0, 3.0, 4.0], "values": [0.2, 0.7, 0.6, 0.9]}
    assert time_to_reach(curve, 0.65) == 2.0
    assert time_to_reach(curve, 0.95) is None
    assert time_to_reach({}, 0.1) is None
    with pytest.raises(ValueError, match="positive"):
        TimeProbe(0.0, lambda m: 0.0)


def test_a_loss_that_turns_nan_stops_the_loop_naming_the_step_and_the_intact_checkpoint() -> None:
    from dfka.errors import TrainingDiverged

    model, opt = _toy()
    plain = _step(model, opt)
    saved: list[int] = []

    def step(i: int, total: int) -> dict[str, torch.Tensor]:
        out = plain(i, total)
        return {"loss": out["loss"] * (float("nan") if i >= 33 else 1.0)}

    with pytest.raises(TrainingDiverged, match=r"GAN: the loss became NaN or infinite at step 34 ") as err:
        run_loop(
            step,
            Budget(steps=200),
            desc="GAN",
            prefix="gan",
            progress=False,
            log_every=25,
            checkpoint=saved.append,
            checkpoint_every=10,
        )
    assert saved == [10, 20, 30]  # nothing written after the NaN
    assert "step 30 of this loop is intact" in err.value.problem and "resumes" in err.value.fix


def test_a_log_file_gets_no_progress_bar_redraws(tmp_path) -> None:
    """Written to a file (kfp.local, CI, ``> log``), tqdm's carriage-return redraws would pile up into
    one line of many KB: with stderr not a terminal, the loop draws no bar at all."""
    script = (
        "import torch\n"
        "from dfka.amalgamation.config import Budget\n"
        "from dfka.engine.loop import run_loop\n"
        "run_loop(lambda i, n: {'loss': torch.tensor(1.0)}, Budget(steps=300), desc='toy', prefix='t',"
        " progress=True, log_every=10)\n"
    )
    log = tmp_path / "stderr.log"
    with log.open("w") as err:
        subprocess.run([sys.executable, "-c", script], stderr=err, check=True, timeout=120)
    text = log.read_text()
    assert "\r" not in text and "toy" not in text, text[:500]
