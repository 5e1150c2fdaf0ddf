"""Cost growth (issue #16): the scaling grid and fits, a measured run in fresh processes, and a teacher
set of eight amalgamated end to end."""

from __future__ import annotations

import json
import math
from dataclasses import asdict
from pathlib import Path

import pytest
import torch

from dfka.amalgamation.origin import OriginSlots
from dfka.amalgamation.run import amalgamate
from dfka.bench import scaling
from dfka.errors import ConfigError
from tests.test_amalgamation import tiny_config
from tests.toys import toy_teacher


def test_the_grid_varies_one_factor_at_a_time_and_measures_the_base_once() -> None:
    points = scaling.grid()
    assert points[0] == scaling.BASE and len(points) == len(set(points))
    for p in points[1:]:
        differs = [
            k
            for k in ("teachers", "teacher_width", "student_width", "batch")
            if getattr(p, k) != getattr(scaling.BASE, k)
        ]
        assert len(differs) == 1, p
    # every factor value appears, the base's own values only once (as the base)
    assert sorted(
        p.teachers for p in points if p.teacher_width == 1 and p.student_width == 1 and p.batch == 64
    ) == [2, 3, 5, 8]
    assert len(points) == 1 + 3 + 2 + 2 + 3
    assert scaling.grid(["teachers"], {"teachers": [2, 4]}) == [scaling.BASE, scaling.Point(teachers=4)]
    with pytest.raises(ConfigError, match="unknown scaling factor"):
        scaling.grid(["depth"])
    for factor, bad in (("teachers", 1), ("batch", 0), ("teachers", 2.5), ("student_width", -1.0)):
        with pytest.raises(ConfigError, match=f"{factor} = .* cannot be measured"):
            scaling.grid([factor], {factor: [bad]})


def _result(point: scaling.Point, seconds: float, memory: float) -> dict:
    return {
        "point": asdict(point),
        "seconds": dict.fromkeys(scaling.STAGES, seconds),
        "peak_memory_mb": memory,
    }


def test_fits_recover_a_line_in_m_and_a_power_law_in_the_batch() -> None:
    results = [_result(scaling.Point(teachers=m), 0.010 + 0.004 * m, 100 + 20 * m) for m in (2, 3, 5, 8)]
    results += [_result(scaling.Point(batch=b), 0.018 * (b / 64) ** 0.8, 140.0) for b in (32, 128, 256)]
    fits = scaling.fit_growth(results)
    gan = fits["teachers"]["gan"]
    assert (
        gan["b"] == pytest.approx(0.004)
        and gan["a"] == pytest.approx(0.010)
        and gan["r2"] == pytest.approx(1.0)
    )
    assert gan["ratio"] == pytest.approx((0.010 + 0.032) / (0.010 + 0.008))
    assert fits["teachers"]["memory"]["b"] == pytest.approx(20.0)
    assert fits["batch"]["finetune"]["k"] == pytest.approx(0.8) and fits["batch"]["memory"][
        "k"
    ] == pytest.approx(0.0)
    assert "teacher_width" not in fits  # only the base point: nothing to fit


@pytest.mark.slow
def test_a_measured_scaling_run_writes_its_table_plot_and_fits(tmp_path: Path) -> None:
    points = scaling.grid(["teachers"], {"teachers": [2, 3]})
    data = scaling.run_scaling(points, threads=1, rounds=2, steps_per_round=1)
    paths = scaling.write_outputs(data, tmp_path)
    assert [r["point"]["teachers"] for r in data["points"]] == [2, 3]
    for r in data["points"]:
        assert r["labels"] == scaling.LABELS_PER_TEACHER * r["point"]["teachers"]
        assert all(0 < s < 60 and math.isfinite(s) for s in r["seconds"].values()), r
        assert r["peak_memory_mb"] > 1, r  # the teachers, the bank and the activations take real memory
    assert data["points"][1]["teacher_params"] > data["points"][0]["teacher_params"]
    assert set(data["fits"]) == {"teachers"} and set(data["fits"]["teachers"]) == {*scaling.STAGES, "memory"}
    assert json.loads(paths["json"].read_text())["points"] == data["points"]
    table = paths["markdown"].read_text()
    assert "M=3 teachers" in table and "ms/teacher" in table
    assert paths["plot"].stat().st_size > 10_000


def test_eight_teachers_with_shared_labels_amalgamate_end_to_end() -> None:
    # teacher i owns toy labels i and i+1 (mod 8): eight teachers, every label shared by two of them
    bundles = [toy_teacher([i, (i + 1) % 8], name=f"t{i}", seed=i, steps=30) for i in range(8)]
    cfg = tiny_config(export={"samples": 320}, regroup={"finetune": {"steps": 10}})
    result = amalgamate(bundles, cfg, progress=False)
    teachers = result.teachers
    assert len(teachers) == 8 and len(teachers.target_labels) == 8
    assert teachers.owners.tolist() == [2.0] * 8
    slots = OriginSlots.of(teachers)
    assert slots is not None and slots.size == 16
    origin = slots.teacher_of[slots.decode(result.bank.tensors["z"].float())]
    shares = torch.bincount(origin, minlength=8).float() / len(origin)
    assert torch.allclose(shares, torch.full((8,), 1 / 8), atol=0.02), shares  # equal teacher shares
    scores = result.targetnet.eval()(result.bank.batch(torch.arange(64)).image)
    assert scores.shape == (64, 8) and torch.isfinite(scores).all()
    assert {"gan", "export", "blocks", "regroup"} <= set(result.stages)
    assert all(result.stages[s].steps > 0 for s in ("gan", "blocks", "regroup")), result.stages
    assert result.stages["export"].extra["bank"] == 320 and len(result.bank) == 320
