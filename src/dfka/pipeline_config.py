"""The experiment config: one YAML file that says what to amalgamate and how the pipeline runs it.

``dfka pipeline run --config configs/demo.yaml`` runs it locally; ``dfka pipeline compile --config``
bakes its ``pipeline:`` section (placement, retries, images, root) into the compiled YAML and its values
into the parameter defaults. Unknown keys are rejected at every level, so a typo fails before any work.

.. code-block:: yaml

    experiment: dfka-demo                 # MLflow experiment (the registered model is <experiment>-targetnet)
    teachers: [s3://dfka/teachers/demo/mnist-0-4, s3://dfka/teachers/demo/mnist-5-9]
    target_labels: digit_0..digit_9       # names or ranges; omit for the union of the teachers' labels
    evaluation: {dataset: mnist}          # omit: the teachers' training dataset, when they agree
    amalgamation: {budget_minutes: 4}     # an AmalgamationConfig mapping (dfka.amalgamation.config)
    pipeline: {caching: false, gpu: {accelerator_count: 1}}
    sweep:                                # only for `dfka pipeline sweep` (pipelines/dfka_sweep.py)
      seeds: [0, 1]
      configs: {default: {}, no-bn: {gan: {loss: {bn: 0}}}}   # named overrides of amalgamation:
      teacher_sets: {demo: [s3://…/mnist-0-4, s3://…/mnist-5-9]}  # optional; default: teachers
      parallelism: 2                      # variants at a time (compiled in)

Pure data and plain Python: no kfp import (``pipelines/`` turns this into KFP calls).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    ValidationError,
    field_validator,
    model_validator,
)

from dfka import __version__
from dfka.amalgamation.config import AmalgamationConfig
from dfka.errors import ConfigError, describe_validation
from dfka.ops.placement import CpuPlacement, GpuPlacement
from dfka.settings import CHECKPOINT_EVERY_ENV, DEFAULT_CHECKPOINT_EVERY, PIPELINE_CONFIGMAP, S3_SECRET

#: The stage images (images/stage.Dockerfile, images/stage-cpu.Dockerfile); tags follow dfka's version.
STAGE_IMAGE = f"ghcr.io/dfka/dfka-stage:{__version__}"
STAGE_CPU_IMAGE = f"ghcr.io/dfka/dfka-stage:{__version__}-cpu"
#: The demo teachers (configs/demo-teachers.yaml): the compiled pipeline's default ``teachers``.
DEMO_TEACHERS = ("s3://dfka/teachers/demo/mnist-0-4", "s3://dfka/teachers/demo/mnist-5-9")
#: The six stages, in pipeline order (task names in the compiled YAML, folders under runs/<run-id>/).
STAGES = (
    "ingest-teachers",
    "train-amalgamating-gan",
    "export-synthetic-samples",
    "train-dual-generator-blocks",
    "regroup-target-net",
    "evaluate",
)
GPU_STAGES = ("train-amalgamating-gan", "train-dual-generator-blocks", "regroup-target-net")
CPU_STAGES = tuple(s for s in STAGES if s not in GPU_STAGES)


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


class EvaluationSettings(_Strict):
    """The real test split the last stage scores on (the only real images the pipeline reads)."""

    dataset: str | None = Field(
        None,
        description="mnist, fashion, mnist+fashion or mosaic, or your own labelled test set (a folder or "
        "s3:// prefix laid out LABEL/IMAGE.png, see dfka.data.folder); default: the teachers' training dataset",
    )


class RetrySettings(_Strict):
    """Retries of the GPU training stages, so a preempted node does not fail the run."""

    num_retries: int = Field(3, ge=0)
    backoff_duration: str = Field("60s", pattern=r"^\d+s$")
    backoff_factor: float = Field(2.0, ge=1)
    backoff_max_duration: str = Field("3600s", pattern=r"^\d+s$")


class PipelineSettings(_Strict):
    """How the pipeline runs: compile-time settings (cluster) and the local runner's."""

    name: str = Field("dfka", pattern=r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
    # No root by default: KFP's UI copies a compiled-in defaultPipelineRoot into each run's
    # runtime_config, which then overrides the namespace's kfp-launcher (README "Compile").
    pipeline_root: str | None = Field(
        None,
        description="a cluster pipeline root to compile in as defaultPipelineRoot; default none, so each "
        "run takes the kfp-launcher defaultPipelineRoot of its namespace (k8s/overlays/*/kfp-launcher.yaml)",
    )
    local_root: str | None = Field(
        None, description="kfp.local output folder; default $DFKA_HOME/pipeline-runs"
    )
    bucket: str = Field(
        "", description="bucket for runs/<run-id>/<stage>/; empty: DFKA_BUCKET (default dfka)"
    )
    mlflow_tracking_uri: str = Field("", description="empty: MLFLOW_TRACKING_URI from the environment")
    image: str = Field(STAGE_IMAGE, description="image of the GPU stages (CUDA build)")
    cpu_image: str = Field(STAGE_CPU_IMAGE, description="image of the CPU-only stages")
    gpu: GpuPlacement = GpuPlacement()
    cpu: CpuPlacement = CpuPlacement()
    retries: RetrySettings = RetrySettings()
    caching: bool = Field(False, description="KFP step caching (cluster tasks and kfp.local)")
    s3_secret: str = S3_SECRET
    config_map: str = PIPELINE_CONFIGMAP
    threads: int | None = Field(
        None,
        ge=1,
        description="OMP_NUM_THREADS of the local stage processes; default: the environment's, else 2",
    )
    checkpoint_every: int = Field(
        DEFAULT_CHECKPOINT_EVERY,
        ge=0,
        description="steps between checkpoints of the GAN and block-training stages (0: only at the end "
        f"of each block); set as {CHECKPOINT_EVERY_ENV} on the training stages",
    )

    @field_validator("pipeline_root")
    @classmethod
    def _root(cls, v: str | None) -> str | None:
        if not v:
            return None
        if not v.startswith(("s3://", "minio://", "gs://")):
            raise ValueError("the cluster pipeline_root must be an object-store URI (s3://, minio://, gs://)")
        return v


#: A variant's name is part of its run id, S3 prefix and MLflow run name.
VARIANT_NAME = r"^[a-z0-9]([a-z0-9-]{0,38}[a-z0-9])?$"
VARIANT_NAME_RULE = "1-40 lower-case letters, digits or '-', not starting or ending with '-'"


class SweepSettings(_Strict):
    """A grid of variants run as one pipeline run: teacher sets × method configs × seeds."""

    seeds: list[int] | None = Field(
        None, min_length=1, description="seeds of every config; default: amalgamation.seed alone"
    )
    configs: dict[str, dict[str, Any]] = Field(
        default_factory=lambda: {"base": {}},
        min_length=1,
        description="named method-config overrides, each merged key by key over amalgamation:",
    )
    teacher_sets: dict[str, list[str]] | None = Field(
        None, min_length=1, description="named teacher lists; default: the experiment's teachers"
    )
    parallelism: int = Field(
        2, ge=1, le=64, description="variants run at a time (compiled in; kfp.local runs at most 2)"
    )

    @field_validator("configs", "teacher_sets")
    @classmethod
    def _names(cls, v: dict[str, Any] | None) -> dict[str, Any] | None:
        import re

        for name in v or {}:
            if not re.fullmatch(VARIANT_NAME, name):
                raise ValueError(f"name {name!r} is not a valid variant name: use {VARIANT_NAME_RULE}")
        return v

    @field_validator("seeds")
    @classmethod
    def _distinct(cls, v: list[int] | None) -> list[int] | None:
        if v is not None and len(set(v)) != len(v):
            raise ValueError(f"seeds {v} repeat a seed; each seed names a variant once")
        return v

    @field_validator("teacher_sets")
    @classmethod
    def _two_teachers(cls, v: dict[str, list[str]] | None) -> dict[str, list[str]] | None:
        for name, teachers in (v or {}).items():
            if len(teachers) < 2:
                raise ValueError(
                    f"teacher set {name!r} has {len(teachers)} teacher(s); amalgamation needs 2 or more"
                )
        return v


class ExperimentConfig(_Strict):
    experiment: str = Field("dfka", min_length=1, description="MLflow experiment")
    teachers: list[str] = Field(min_length=2, description="teacher bundle URIs (s3:// or local folders)")
    target_labels: str | list[str] | None = Field(
        None, description="Y_cst by name (ranges allowed); omit for the union of the teachers' labels"
    )
    evaluation: EvaluationSettings = EvaluationSettings()
    amalgamation: AmalgamationConfig = AmalgamationConfig()
    pipeline: PipelineSettings = PipelineSettings()
    sweep: SweepSettings | None = Field(None, description="the variants of `dfka pipeline sweep`")
    #: the mapping as written (a sweep merges its overrides over that, before budgets are derived)
    _raw: dict[str, Any] | None = PrivateAttr(None)

    @field_validator("target_labels")
    @classmethod
    def _not_empty(cls, v: str | list[str] | None) -> str | list[str] | None:
        if v is not None and not _as_list(v):
            raise ValueError(
                "the target label set is empty; omit target_labels to use the union of the teachers' labels"
            )
        return v

    @model_validator(mode="after")
    def _one_label_set(self) -> ExperimentConfig:
        inner = self.amalgamation.target_labels
        if inner is not None and not inner:
            raise ValueError(
                "amalgamation.target_labels is empty; omit it to use the union of the teachers' labels"
            )
        if (
            inner is not None
            and self.target_labels is not None
            and list(inner) != _as_list(self.target_labels)
        ):
            raise ValueError("target_labels is set twice (top level and amalgamation) with different values")
        return self

    @classmethod
    def load(cls, path: str | Path) -> ExperimentConfig:
        from dfka.config_files import load_yaml

        return cls.parse(load_yaml(path), where=str(path))

    @classmethod
    def parse(cls, raw: Mapping[str, Any], where: str = "config") -> ExperimentConfig:
        try:
            cfg = cls.model_validate(raw)
        except ValidationError as err:
            problems = describe_validation(err, "config")
            raise ConfigError(f"{where} is invalid: {problems}", "fix the keys named above") from None
        cfg._raw = json.loads(json.dumps(dict(raw), default=str))
        return cfg

    def target_spec(self) -> str:
        """Y_cst as one pipeline parameter string ("" = the union)."""
        labels = self.target_labels if self.target_labels is not None else self.amalgamation.target_labels
        return ",".join(_as_list(labels)) if labels is not None else ""

    def pipeline_arguments(self, run: bool = True) -> dict[str, Any]:
        """The runtime parameters of ``pipelines.dfka_pipeline`` for this experiment (without the
        :data:`RUN_PARAMETERS` if not ``run``)."""
        arguments = {
            "teachers": list(self.teachers),
            "target_labels": self.target_spec(),
            "amalgamation": method_parameters(self.amalgamation),
            "seed": self.amalgamation.seed,
            "samples": self.amalgamation.export.samples,
            "evaluation_dataset": self.evaluation.dataset or "",
            "experiment": self.experiment,
            "mlflow_tracking_uri": self.pipeline.mlflow_tracking_uri,
            "bucket": self.pipeline.bucket,
        }
        return arguments if run else {k: v for k, v in arguments.items() if k not in RUN_PARAMETERS}

    def sweep_variants(self) -> list[dict[str, Any]]:
        """The sweep pipeline's ``variants`` parameter: one dict of stage inputs per teacher set × config ×
        seed, named ``[<teacher set>-]<config>-s<seed>``, each validated like a config of its own."""
        sweep = self.sweep or SweepSettings()
        doc = dict(self._raw or self.model_dump(mode="json", exclude_defaults=True))
        doc.pop("sweep", None)
        base = doc.get("amalgamation") or {}
        sets = sweep.teacher_sets or {"": list(self.teachers)}
        variants = []
        for set_name, teachers in sets.items():
            for config_name, overrides in sweep.configs.items():
                for seed in sweep.seeds or [self.amalgamation.seed]:
                    name = "-".join(p for p in (set_name, config_name, f"s{seed}") if p)
                    raw = {**doc, "teachers": teachers}
                    raw["amalgamation"] = {**deep_merge(base, overrides), "seed": seed}
                    variant = ExperimentConfig.parse(raw, where=f"sweep variant {name!r}")
                    meta = {"variant": name, "teacher_set": set_name, "config": config_name}
                    variants.append({**meta, **variant.pipeline_arguments(run=False)})
        return variants

    def sweep_arguments(self) -> dict[str, Any]:
        """The runtime parameters of ``pipelines.dfka_sweep`` for this experiment."""
        run = {k: v for k, v in self.pipeline_arguments().items() if k in RUN_PARAMETERS}
        return {"variants": self.sweep_variants(), **run}


#: The parameters every stage gets that say where the run is recorded, not what it computes.
RUN_PARAMETERS = ("experiment", "mlflow_tracking_uri", "bucket")


def deep_merge(base: Mapping[str, Any], overrides: Mapping[str, Any]) -> dict[str, Any]:
    """``base`` with ``overrides`` applied key by key (nested mappings merge, anything else replaces)."""
    merged = dict(base)
    for key, value in overrides.items():
        if isinstance(value, Mapping) and isinstance(merged.get(key), Mapping):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def _as_list(labels: str | Sequence[str]) -> list[str]:
    items = [labels] if isinstance(labels, str) else list(labels)
    return [t.strip() for item in items for t in item.split(",") if t.strip()]


def method_parameters(cfg: AmalgamationConfig) -> dict[str, Any]:
    """The ``amalgamation`` pipeline parameter: the config without what has its own parameter.

    Only values that differ from the defaults are kept, so the KFP UI shows what the experiment changed.
    Re-validating the result gives the same config (the budget and preset rules are idempotent).
    """
    data = cfg.model_dump(mode="json", exclude_defaults=True)
    data.pop("target_labels", None)
    data.pop("seed", None)
    export = data.get("export", {})
    export.pop("samples", None)
    if not export:
        data.pop("export", None)
    return data


def resolve_method_config(
    amalgamation: Mapping[str, Any] | AmalgamationConfig | None,
    *,
    target_labels: Sequence[str] | None,
    seed: int | None = None,
    samples: int | None = None,
) -> AmalgamationConfig:
    """Validate the method config with the explicit pipeline parameters applied on top."""
    raw: dict[str, Any] = (
        amalgamation.model_dump(mode="json")
        if isinstance(amalgamation, AmalgamationConfig)
        else json.loads(json.dumps(dict(amalgamation or {})))
    )
    raw["target_labels"] = list(target_labels) if target_labels is not None else None
    if seed is not None:
        raw["seed"] = int(seed)  # KFP hands ints over as floats
    if samples is not None and int(samples) > 0:
        raw.setdefault("export", {})["samples"] = int(samples)
    try:
        return AmalgamationConfig.model_validate(raw)
    except ValidationError as err:
        problems = describe_validation(err, "amalgamation")
        raise ConfigError(
            f"the amalgamation config is invalid: {problems}", "fix the keys named above"
        ) from None


def config_hash(document: Mapping[str, Any]) -> str:
    """A short content hash of a validated config document (sorted JSON), for tags and comparisons."""
    payload = json.dumps(document, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(payload.encode()).hexdigest()[:16]
