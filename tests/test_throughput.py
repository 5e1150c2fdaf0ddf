"""The throughput report: every stage is timed on both paths, FLOPs are counted, and the fraction of the
matmul peak follows from them; the CLI prints the table and writes the JSON."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from dfka.amalgamation.config import AmalgamationConfig
from dfka.bench import throughput
from dfka.cli import main as cli


def test_measure_times_every_stage_on_both_paths() -> None:
    bundles = throughput.synthetic_teachers("lenet5:0.5")
    cfg = AmalgamationConfig(
        student="lenet5:0.5", target_labels=[x for b in bundles for x in b.manifest.labels]
    )
    report = throughput.measure(
        bundles, cfg, threads=1, warmup=1, rounds=1, steps_per_round=1, bank_samples=128, peak_size=256
    )
    stages = {r.stage for r in report.rows}
    assert stages == {"stage1", "export", "stage2.b1", "stage2.b2", "stage2.b3", "finetune"}
    assert {r.path for r in report.rows} == {"reference", "fast"}
    for r in report.rows:
        assert r.flops > 0 and r.seconds > 0
        assert abs(r.fraction_of_peak - r.flops / r.seconds / 1e9 / report.peak_gflops) < 1e-9
    # the fast path does the same work (FLOPs agree up to the BN that folding removes)
    for stage in stages:
        ref, fast = report.row(stage, "reference"), report.row(stage, "fast")
        assert abs(fast.flops - ref.flops) <= 0.01 * ref.flops
    assert "of peak" in report.table()


def test_step_flops_counts_a_matmul() -> None:
    a, b = torch.randn(32, 64), torch.randn(64, 16)
    assert throughput.step_flops(lambda: a @ b) == 2 * 32 * 64 * 16


def test_cli_writes_the_report(tmp_path: Path, capsys) -> None:
    out = tmp_path / "tp.json"
    code = cli(
        [
            "bench",
            "throughput",
            "--arch",
            "lenet5:0.5",
            "--student",
            "lenet5:0.5",
            "--threads",
            "1",
            "--rounds",
            "1",
            "--steps-per-round",
            "1",
            "--json",
            str(out),
        ]
    )
    assert code == 0
    data = json.loads(out.read_text())
    assert data["threads"] == 1 and data["peak_gflops"] > 0
    assert {row["stage"] for row in data["rows"]} >= {"stage1", "finetune"}
    assert "samples/s" in capsys.readouterr().out
