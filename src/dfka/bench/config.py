"""The benchmark YAML schema (``benchmarks/<name>.yaml``), validated before anything trains.

A benchmark fixes everything a comparison needs: the teacher zoo (recipes, trained once and cached by
recipe hash), the customised label set Y_cst, the student, the evaluation dataset, the methods, the
seeds, the wall-clock budget, dfka's configuration and the baselines' options. Unknown keys, unknown
method names, unknown labels and impossible values are rejected with a message naming the key.

.. code-block:: yaml

    description: MNIST 0-4 and 5-9, two LeNet-5 teachers, a 10-way student
    dataset: mnist                  # test split = evaluation; train split = kd-real/layerwise images
                                    # (or a folder dataset: $DFKA_DATA_DIR/rgb-mnist-32, dfka.data.folder)
    teachers:                       # dfka.teachers.ZooTeacher entries
      - {name: mnist-0-4, dataset: mnist, labels: digit_0..digit_4, arch: lenet5, epochs: 3}
      - {name: mnist-5-9, dataset: mnist, labels: digit_5..digit_9, arch: lenet5, epochs: 3}
    target_labels: null             # Y_cst; null = the union of the teachers' labels
    student: lenet5:0.5
    methods: [ensemble, dfka, dafl, dfad, noise, kd-real, layerwise]
    seeds: [0, 1, 2]
    budget_minutes: 5               # per (data-free method, seed)
    reference_budget_minutes: null  # kd-real / layerwise; null = budget_minutes
    eval_split: test                # dev: score on a fixed subset of the training split (for tuning)
    amalgamation: {}                # AmalgamationConfig overrides (not student/seed/threads/budget)
    baselines: {dafl: {}, dfad: {}, noise: {}, kd-real: {}, layerwise: {}}
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from dfka.amalgamation.config import AmalgamationConfig
from dfka.baselines.dafl import DaflConfig
from dfka.baselines.dfad import DfadConfig
from dfka.baselines.kd_real import KDRealConfig
from dfka.baselines.layerwise import LayerwiseConfig
from dfka.baselines.noise import NoiseConfig
from dfka.config_files import load_yaml
from dfka.errors import ConfigError, DfkaError
from dfka.teachers import ZooTeacher, recipe_for

MethodName = Literal["ensemble", "dfka", "dfka-paper", "dafl", "dfad", "noise", "kd-real", "layerwise"]
#: Every method, in table order.
METHODS: tuple[str, ...] = ("ensemble", "dfka", "dfka-paper", "dafl", "dfad", "noise", "kd-real", "layerwise")
#: Methods that may not read training images; they run inside ``data_free`` with equal budgets.
DATA_FREE: tuple[str, ...] = ("dfka", "dfka-paper", "dafl", "dfad", "noise")
#: Methods that learn from real unlabeled training images (references, not competitors).
WITH_DATA: tuple[str, ...] = ("kd-real", "layerwise")
KIND: dict[str, str] = {
    "ensemble": "reference (teachers)",
    "dfka": "data-free",
    "dfka-paper": "data-free, the paper's method alone (preset: paper)",
    "dafl": "data-free",
    "dfad": "data-free",
    "noise": "data-free, lower bound",
    "kd-real": "real data, upper bound",
    "layerwise": "real data",
}
#: Keys of ``amalgamation:`` that the benchmark sets itself, per seed and per run.
OWNED_KEYS = ("student", "target_labels", "seed", "threads", "budget_minutes")
BENCH_ENV = "DFKA_BENCHMARKS"


class BaselineOptions(BaseModel):
    """Per-baseline options (DAFL shares the rest of dfka's ``amalgamation:`` configuration)."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    dafl: DaflConfig = DaflConfig()
    dfad: DfadConfig = DfadConfig()
    noise: NoiseConfig = NoiseConfig()
    kd_real: KDRealConfig = Field(default_factory=KDRealConfig, alias="kd-real")
    layerwise: LayerwiseConfig = LayerwiseConfig()


class BenchmarkConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    name: str = Field(pattern=r"^[A-Za-z0-9._-]+$")
    description: str = ""
    dataset: str
    task: Literal["multiclass", "multilabel"] | None = Field(
        None, description="default: multilabel for mosaic, else multiclass"
    )
    teachers: list[ZooTeacher] = Field(min_length=2)
    teacher_cache: str | None = Field(None, description="default: $DFKA_HOME/bench/teachers")
    target_labels: str | list[str] | None = None
    student: str = "lenet5:0.5"
    methods: list[MethodName] = Field(default_factory=lambda: list(METHODS), min_length=1)
    seeds: list[Annotated[int, Field(ge=0, lt=2**63)]] = Field(
        default_factory=lambda: [0, 1, 2], min_length=1
    )
    budget_minutes: float = Field(gt=0, description="wall-clock per data-free (method, seed)")
    reference_budget_minutes: float | None = Field(
        None, gt=0, description="kd-real and layerwise; default: budget_minutes"
    )
    threads: int | None = Field(None, ge=1, description="torch threads per job (default 1)")
    eval_split: Literal["test", "dev"] = Field(
        "test",
        description="test: the reported numbers; dev: a fixed subset of the training split, for tuning",
    )
    amalgamation: dict[str, Any] = Field(default_factory=dict)
    baselines: BaselineOptions = BaselineOptions()

    @field_validator("dataset")
    @classmethod
    def _dataset(cls, v: str) -> str:
        from dfka.data.labels import check_dataset

        try:
            return check_dataset(v)
        except DfkaError as err:
            raise ValueError(f"{err.problem}; {err.fix}") from None

    @field_validator("student")
    @classmethod
    def _student(cls, v: str) -> str:
        from dfka.models import parse_arch

        try:
            parse_arch(v)
        except DfkaError as err:
            raise ValueError(f"{err.problem}; {err.fix}") from None
        return v

    @field_validator("methods", "seeds")
    @classmethod
    def _unique(cls, v: list) -> list:
        dupes = sorted({str(x) for x in v if v.count(x) > 1})
        if dupes:
            raise ValueError(f"duplicates {dupes}")
        return v

    @model_validator(mode="after")
    def _consistent(self) -> BenchmarkConfig:
        names = [t.name for t in self.teachers]
        if len(set(names)) != len(names):
            raise ValueError(f"teacher names must be unique, got {names}")
        task = self.task or ("multilabel" if self.dataset == "mosaic" else "multiclass")
        self.task = task
        for t in self.teachers:
            if t.task != task:
                raise ValueError(f"teacher {t.name} is {t.task} but the benchmark is {task}")
            try:
                recipe_for(t)
            except DfkaError as err:
                raise ValueError(f"teacher {t.name}: {err.problem}") from None
        owned = [k for k in OWNED_KEYS if k in self.amalgamation]
        if owned:
            raise ValueError(
                f"amalgamation.{owned[0]} is set by the benchmark itself; use the top-level keys "
                "student/target_labels/seeds/threads/budget_minutes"
            )
        try:
            labels = self.label_set()
        except DfkaError as err:
            raise ValueError(f"target_labels: {err.problem}; {err.fix}") from None
        try:
            self.amalgamation_config(seed=self.seeds[0], threads=self.threads)
        except ValidationError as err:
            raise ValueError(f"amalgamation: {_problems(err)}") from None
        from dfka.data.labels import label_names

        missing = [y for y in labels if y not in label_names(self.dataset)]
        if missing:
            raise ValueError(f"dataset {self.dataset} has no test images for labels {missing}")
        return self

    # --- derived ------------------------------------------------------------------------------------
    def teacher_labels(self) -> dict[str, list[str]]:
        return {t.name: list(recipe_for(t).labels) for t in self.teachers}

    def label_set(self) -> list[str]:
        """Y_cst in order: ``target_labels`` if given, else the union of the teachers' labels."""
        from dfka.data import parse_labels
        from dfka.data.labels import is_folder_dataset
        from dfka.errors import LabelError

        union: list[str] = []
        for labels in self.teacher_labels().values():
            union += [y for y in labels if y not in union]
        if self.target_labels is None:
            return union
        chosen = parse_labels(self.target_labels, self.dataset if is_folder_dataset(self.dataset) else None)
        unknown = [y for y in chosen if y not in union]
        if unknown:
            raise LabelError(f"{unknown} are owned by no teacher", f"choose from {', '.join(union)}")
        return chosen

    @property
    def metric(self) -> str:
        """``acc`` (top-1, multi-class) or ``map`` (mean average precision, multi-label)."""
        return "map" if self.task == "multilabel" else "acc"

    @property
    def reference_minutes(self) -> float:
        return self.reference_budget_minutes or self.budget_minutes

    def amalgamation_config(
        self, seed: int, threads: int | None, budget_minutes: float | None = None
    ) -> AmalgamationConfig:
        """dfka's configuration for one seed (the baselines share its batch sizes, rates and weights)."""
        return AmalgamationConfig.model_validate(
            {
                **self.amalgamation,
                "student": self.student,
                "target_labels": self.label_set(),
                "seed": seed,
                "threads": threads,
                "budget_minutes": budget_minutes or self.budget_minutes,
            }
        )


def _problems(err: ValidationError) -> str:
    return "; ".join(f"{'.'.join(map(str, e['loc'])) or 'benchmark'}: {e['msg']}" for e in err.errors())


def benchmarks_dir() -> Path:
    """``$DFKA_BENCHMARKS``, else ``./benchmarks``, else the checkout's ``benchmarks/``."""
    if os.environ.get(BENCH_ENV):
        return Path(os.environ[BENCH_ENV])
    local = Path("benchmarks")
    if local.is_dir():
        return local
    return Path(__file__).resolve().parents[3] / "benchmarks"


def available_benchmarks() -> list[Path]:
    root = benchmarks_dir()
    return sorted(root.glob("*.yaml")) if root.is_dir() else []


def resolve_benchmark(name_or_path: str | Path) -> Path:
    """A YAML path as given, or ``<benchmarks_dir>/<name>.yaml``."""
    text = str(name_or_path)
    path = Path(text)
    if path.suffix in (".yaml", ".yml") or os.sep in text or path.is_file():
        if not path.is_file():
            raise ConfigError(f"benchmark file {path} not found", "check the path")
        return path
    candidate = benchmarks_dir() / f"{text}.yaml"
    if candidate.is_file():
        return candidate
    names = ", ".join(p.stem for p in available_benchmarks()) or "none found"
    raise ConfigError(
        f"unknown benchmark {text!r} (looked for {candidate})",
        f"use one of: {names}; or give a YAML path; `dfka bench list` shows them",
    )


def load_benchmark(name_or_path: str | Path) -> BenchmarkConfig:
    """Load and validate a benchmark by name (``digits``) or path; ``name`` defaults to the file stem."""
    path = resolve_benchmark(name_or_path)
    raw = load_yaml(path, what="benchmark file")
    raw.setdefault("name", path.stem)
    return parse_benchmark(raw, source=str(path))


def parse_benchmark(raw: dict[str, Any], source: str = "benchmark") -> BenchmarkConfig:
    try:
        return BenchmarkConfig.model_validate(raw)
    except ValidationError as err:
        raise ConfigError(
            f"{source} is invalid: {_problems(err)}", "fix the YAML (schema: dfka.bench.config)"
        ) from None
