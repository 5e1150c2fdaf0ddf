"""Stage 0: fetch and verify the teacher bundles, resolve Y_cst, validate the config, write the teacher set."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from dfka import storage
from dfka.amalgamation.config import AmalgamationConfig
from dfka.amalgamation.run import teacher_set_from_bundles
from dfka.amalgamation.teacher_set import TeacherSet
from dfka.bundles import MANIFEST_NAME, WEIGHTS_NAME, TeacherBundle, load_bundle
from dfka.data import data_free
from dfka.data.folder import is_folder_spec, open_folder
from dfka.data.labels import check_dataset, resolve_target_labels
from dfka.errors import BundleError, CompatibilityError, ConfigError, DfkaError, LabelError
from dfka.pipeline_config import (
    ExperimentConfig,
    config_hash,
    resolve_method_config,
)
from dfka.stages import report as reports
from dfka.stages._common import TEACHER_SET_FILE, TEACHER_SET_FORMAT, ensure_dir, finish
from dfka.stages.context import RunContext

STAGE = "ingest-teachers"


def ingest_teachers(
    teachers: Sequence[str],
    out: str,
    *,
    target_labels: str | Sequence[str] | None = None,
    amalgamation: Mapping[str, Any] | AmalgamationConfig | None = None,
    seed: int | None = None,
    samples: int | None = None,
    evaluation_dataset: str | None = None,
    context: RunContext | None = None,
) -> dict[str, Any]:
    """Verify the bundles (``s3://`` or folders), check that their block structures fit together, resolve
    the customised label set by name and write one teacher-set artifact to ``out``:

    ``teacher_set.json`` (the whole validated config, its hash, the report) and ``teachers/<name>/`` (a
    verified copy of each bundle that owns a target label), plus ``report.md``. ``seed`` and ``samples``
    override the ``amalgamation`` mapping; ``evaluation_dataset`` defaults to the teachers' training
    dataset when they all name the same one.
    """
    started = time.perf_counter()
    ensure_dir(out)
    with data_free("ingest teachers"):
        uris = [str(u) for u in teachers]
        checked = validate_inputs(
            uris,
            target_labels=target_labels,
            amalgamation=amalgamation,
            seed=seed,
            samples=samples,
            evaluation_dataset=evaluation_dataset,
        )
        bundles, cfg, teacher_set, dataset = (
            checked.bundles,
            checked.cfg,
            checked.teacher_set,
            checked.evaluation_dataset,
        )
        kept = [b for b in bundles if b.name in teacher_set.names]
        source = {b.name: uri for b, uri in zip(bundles, uris)}
        config = {
            "experiment": context.experiment if context else None,
            "teachers": [source[b.name] for b in kept],
            "target_labels": list(cfg.target_labels),
            "evaluation": {"dataset": dataset},
            "amalgamation": cfg.model_dump(mode="json"),
        }
        digest = config_hash(
            {**config, "experiment": None, "teachers": [b.manifest.weights.sha256 for b in kept]}
        )
        report = teacher_set.report()
        report["dropped"] = [b.name for b in bundles if b.name not in teacher_set.names]
        for b in kept:
            report["teachers"][b.name]["source"] = source[b.name]
            report["teachers"][b.name]["metrics"] = dict(b.manifest.metrics)
        doc = {
            "format": TEACHER_SET_FORMAT,
            "config": config,
            "config_hash": digest,
            "teachers": [
                {"name": b.name, "source": source[b.name], "bundle": f"teachers/{b.name}"} for b in kept
            ],
            "report": report,
        }
        for b in kept:
            for name in (MANIFEST_NAME, WEIGHTS_NAME):
                storage.put_bytes(
                    storage.get_bytes(storage.join(source[b.name], name)),
                    storage.join(out, "teachers", b.name, name),
                )
        markdown = reports.teacher_report_markdown(report, digest)
        storage.put_bytes(markdown.encode(), storage.join(out, "report.md"))
        storage.put_bytes(json.dumps(doc, indent=2).encode(), storage.join(out, TEACHER_SET_FILE))

    metrics = {
        "teachers.count": float(len(kept)),
        "labels.target": float(len(cfg.target_labels)),
        "labels.shared": float(len(report["shared_labels"])),
        "teachers.params": float(report["params_total"]),
        "teachers.flops": float(report["flops_total"]),
    }
    if context is not None and (parent := context.parent(digest, config)) is not None:
        parent.log_params(config)
        parent.set_tags(context.tags(digest))
    with (context or RunContext(track=False, publish=False)).stage_run(STAGE, config, digest) as tracker:
        tracker.log_metrics(metrics)
        tracker.log_text(markdown, "report.md")
        tracker.log_dict(report, "teacher_set_report.json")
        result = {
            "outputs": {"teacher_set": out},
            "metrics": metrics,
            "target_labels": list(cfg.target_labels),
            "evaluation_dataset": dataset,
            "config_hash": digest,
            "report_markdown": markdown,
        }
        return finish(STAGE, out, context, tracker, result, started)


@dataclass
class CheckedInputs:
    """Everything ingestion validated: the verified bundles, the method config, the teacher set."""

    bundles: list[TeacherBundle]
    cfg: AmalgamationConfig
    teacher_set: TeacherSet
    evaluation_dataset: str | None


def validate_inputs(
    teachers: Sequence[str],
    *,
    target_labels: str | Sequence[str] | None = None,
    amalgamation: Mapping[str, Any] | AmalgamationConfig | None = None,
    seed: int | None = None,
    samples: int | None = None,
    evaluation_dataset: str | None = None,
) -> CheckedInputs:
    """Every check that can fail before training, in the order a user would fix them: the bundles
    (files, sha256, shapes, NaN/Inf, architecture), the label request, the method config, the teachers
    against each other (blocks, levels, input size, pixel range) and the method config against the
    teachers (student, widths, block weights, λ names, batch sizes). Each failure is a
    :class:`~dfka.errors.DfkaError` naming the problem and the fix. Nothing is written.
    """
    uris = [str(u) for u in teachers]
    if len(uris) < 2:
        raise CompatibilityError(
            f"amalgamation needs at least 2 teachers, got {len(uris)}", "pass two or more bundle URIs"
        )
    with _with_fix():
        return _validate(uris, target_labels, amalgamation, seed, samples, evaluation_dataset)


#: The fix to show for an error raised without one (every ingestion error names a fix).
DEFAULT_FIXES: dict[type[DfkaError], str] = {
    BundleError: "re-export the teacher with `dfka teachers train` or dfka.bundles.save_bundle, "
    "and check it with `dfka teachers show URI`",
    CompatibilityError: "amalgamate teachers with the same input shape, block count and per-level spatial "
    "shapes (compare them with `dfka teachers show URI`)",
    ConfigError: "fix the amalgamation settings named above",
    LabelError: "name labels the teachers own (`dfka teachers show URI` lists them)",
}


@contextmanager
def _with_fix() -> Iterator[None]:
    try:
        yield
    except DfkaError as err:
        if err.fix:
            raise
        fix = next((f for cls, f in DEFAULT_FIXES.items() if isinstance(err, cls)), None)
        if fix is None:
            raise
        raise type(err)(err.problem, fix) from None


def _validate(
    uris: list[str],
    target_labels: str | Sequence[str] | None,
    amalgamation: Mapping[str, Any] | AmalgamationConfig | None,
    seed: int | None,
    samples: int | None,
    evaluation_dataset: str | None,
) -> CheckedInputs:
    bundles = [load_bundle(uri) for uri in uris]
    union_labels = list(dict.fromkeys(label for b in bundles for label in b.labels))
    y_cst = resolve_target_labels(target_labels, union_labels)
    cfg = resolve_method_config(amalgamation, target_labels=y_cst, seed=seed, samples=samples)
    check_pixel_ranges(bundles)
    teacher_set = teacher_set_from_bundles(bundles, cfg.target_labels)
    cfg.target_labels = list(teacher_set.target_labels)  # explicit from here on, even for "the union"
    check_method_fits(cfg, teacher_set)
    dataset = _evaluation_dataset(evaluation_dataset, bundles)
    return CheckedInputs(bundles, cfg, teacher_set, dataset)


def preflight(cfg: ExperimentConfig) -> CheckedInputs:
    """:func:`validate_inputs` on exactly the parameters the pipeline will get: what ``dfka pipeline
    run`` checks before any stage starts, so bad input fails in seconds with one clear line."""
    args = cfg.pipeline_arguments()
    checked = validate_inputs(
        args["teachers"],
        target_labels=args["target_labels"],
        amalgamation=args["amalgamation"],
        seed=args["seed"],
        samples=args["samples"],
        evaluation_dataset=args["evaluation_dataset"] or None,
    )
    if checked.evaluation_dataset and is_folder_spec(checked.evaluation_dataset):
        # a user's test set is checked whole here (outside every data-free stage), before any stage runs
        ts = checked.teacher_set
        open_folder(checked.evaluation_dataset, ts.target_labels, ts.input_shape, ts.task)
    return checked


def preflight_variants(variants: Sequence[Mapping[str, Any]]) -> None:
    """:func:`validate_inputs` on each distinct sweep variant (``ExperimentConfig.sweep_variants``), the
    error naming the variant: what ``dfka pipeline sweep`` checks before any stage starts."""
    seen: set[str] = set()
    for v in variants:
        args = {k: v[k] for k in ("teachers", "target_labels", "amalgamation", "seed", "samples")}
        key = json.dumps(args, sort_keys=True, default=str)
        if key in seen:
            continue
        seen.add(key)
        try:
            validate_inputs(**args, evaluation_dataset=v.get("evaluation_dataset") or None)
        except DfkaError as err:
            raise type(err)(f"sweep variant {v['variant']!r}: {err.problem}", err.fix) from None


#: The pixel range the generator produces and the TargetNet takes; teachers must take the same.
PIXEL_RANGE = (0.0, 1.0)


def check_pixel_ranges(bundles: Sequence[TeacherBundle]) -> None:
    """Every teacher must take pixels in [0, 1] (its mean/std normalisation is inside the model)."""
    for b in bundles:
        got = tuple(float(v) for v in b.manifest.input.pixel_range)
        if got != PIXEL_RANGE:
            others = [o.name for o in bundles if o is not b]
            raise CompatibilityError(
                f"teacher {b.name} expects pixels in {list(got)}, but dfka's generator and the other "
                f"teachers ({', '.join(others)}) work on pixels in {list(PIXEL_RANGE)}",
                f"re-export {b.name} for inputs in [0, 1]: fold the scaling into its normalisation "
                f"(mean and std divided by {got[1] - got[0]:g}) and set input.pixel_range to [0, 1]",
            )


def check_method_fits(cfg: AmalgamationConfig, teachers: TeacherSet) -> None:
    """The method config against the teachers: what would otherwise fail minutes into training."""
    from dfka.amalgamation.run import build_student
    from dfka.amalgamation.stage1 import group_widths
    from dfka.amalgamation.teacher_set import check_student

    blocks = teachers.num_blocks
    try:
        student = build_student(cfg.student, teachers)
    except ConfigError as err:
        raise ConfigError(f"amalgamation.student {cfg.student!r}: {err.problem}", err.fix) from None
    check_student(student, teachers)
    group_widths(cfg.gan.widths, blocks)
    weights = cfg.blocks.block_weights
    if weights is not None:
        if len(weights) != blocks:
            raise ConfigError(
                f"blocks.block_weights lists {len(weights)} shares but the teachers have {blocks} blocks",
                f"give {blocks} shares (one per block), or omit it for equal shares",
            )
        if any(not w > 0 for w in weights):
            raise ConfigError(
                f"blocks.block_weights {weights} has a share <= 0: every block needs some budget",
                "use positive shares, e.g. [1, 1, 2]",
            )
    unknown = sorted(set(cfg.blocks.lambda_teachers) - set(teachers.names))
    if unknown:
        raise ConfigError(
            f"blocks.lambda_teachers names {unknown}, which are not teachers of this set",
            f"use the teachers' names: {', '.join(teachers.names)}",
        )
    batch_sizes = {"blocks.batch_size": cfg.blocks.batch_size}
    if cfg.regroup.finetune is not None:
        batch_sizes["regroup.batch_size"] = cfg.regroup.batch_size
    for key, size in batch_sizes.items():
        if cfg.export.samples < size:
            raise ConfigError(
                f"export.samples ({cfg.export.samples}) is smaller than {key} ({size}): "
                "not even one batch could be drawn",
                f"raise export.samples to at least {size}, or lower {key}",
            )
    if cfg.device != "auto":
        import torch

        try:
            torch.device(cfg.device)
        except RuntimeError:
            raise ConfigError(
                f"amalgamation.device {cfg.device!r} is not a device", "use auto, cpu, cuda or cuda:N"
            ) from None


def _evaluation_dataset(explicit: str | None, bundles: Sequence[Any]) -> str | None:
    if explicit and is_folder_spec(explicit):
        return explicit  # the user's own test set: opened by preflight and the evaluate stage, never here
    if explicit:
        return check_dataset(explicit)
    named = {b.manifest.training.get("dataset") for b in bundles}
    if len(named) == 1 and (only := named.pop()):
        try:
            return check_dataset(str(only))
        except ConfigError:
            return None
    return None
