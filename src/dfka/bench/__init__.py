"""The benchmark harness (issue #6): dfka and its baselines on the same teachers, budgets and evaluation.

``dfka bench run NAME`` → :func:`run_benchmark`; ``dfka bench report`` → :func:`write_report`.
Benchmarks are YAML files in ``benchmarks/`` (schema: :class:`BenchmarkConfig`).
"""

from __future__ import annotations

from dfka.bench.config import (
    DATA_FREE,
    METHODS,
    WITH_DATA,
    BenchmarkConfig,
    available_benchmarks,
    load_benchmark,
    parse_benchmark,
)
from dfka.bench.report import write_benchmark_outputs, write_report
from dfka.bench.runner import BenchmarkRun, run_benchmark

__all__ = [
    "DATA_FREE",
    "METHODS",
    "WITH_DATA",
    "BenchmarkConfig",
    "BenchmarkRun",
    "available_benchmarks",
    "load_benchmark",
    "parse_benchmark",
    "run_benchmark",
    "write_benchmark_outputs",
    "write_report",
]
