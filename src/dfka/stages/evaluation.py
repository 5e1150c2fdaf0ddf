"""The last stage: score the TargetNet, the teacher ensemble and each teacher on the real test split.

This is the only stage that reads real images, and it reads only the test split. Protocol
(``shared/method/README.md``): each teacher on its own labels, the teacher ensemble on Y_cst, the
TargetNet on Y_cst and on each teacher's labels, parameters and FLOPs side by side; the final model,
never a checkpoint picked on the test set.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from dfka import storage
from dfka.amalgamation.regroup import load_targetnet
from dfka.data import load_split
from dfka.data.folder import ImageFolderSet, is_folder_spec, open_folder
from dfka.errors import ConfigError
from dfka.evaluation import (
    build_eval_set,
    confusion_matrix,
    score,
    score_subtasks,
    score_teachers,
    task_key,
    teacher_key,
)
from dfka.models import count_flops, count_params
from dfka.settings import mlflow_browser_url
from dfka.stages import report as reports
from dfka.stages._common import (
    GRID_FILE,
    ensure_dir,
    finish,
    load_teacher_set,
    restore_routing,
    sample_grid_file,
    samples_location,
    scratch,
)
from dfka.stages.context import TAG_COMMIT, TAG_RUN_ID, ParentRun, RunContext, run_url
from dfka.stages.registry import TAG_DATASET, read_logged, register_evaluated
from dfka.tracking import experiment_id

log = logging.getLogger(__name__)

STAGE = "evaluate"
RESULTS_JSON = "results.json"
RESULTS_MD = "results.md"
REPORT_HTML = "report.html"
CONFUSION_PNG = "confusion.png"


@torch.no_grad()
def _predict(
    fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, device: torch.device, bs: int = 1000
) -> torch.Tensor:
    return torch.cat([fn(x[i : i + bs].to(device)).float().cpu() for i in range(0, len(x), bs)])


@torch.no_grad()
def _predict_folder(
    net: torch.nn.Module, teachers: Any, folder: ImageFolderSet, device: torch.device
) -> tuple[torch.Tensor, dict[str, torch.Tensor], torch.Tensor]:
    """TargetNet scores, each teacher's logits and the targets of a folder test set; only scores are kept."""
    student, targets, logits = [], [], {name: [] for name, _ in teachers}
    for images, labels in folder.batches():
        images = images.to(device)
        student.append(net(images).float().cpu())
        for name, model in teachers:
            logits[name].append(model(images).float().cpu())
        targets.append(labels)
    return torch.cat(student), {k: torch.cat(v) for k, v in logits.items()}, torch.cat(targets)


def evaluate(
    teacher_set: str,
    target_net: str,
    samples: str,
    out: str,
    *,
    dataset: str | None = None,
    context: RunContext | None = None,
) -> dict[str, Any]:
    """Score on the test split of ``dataset`` (default: the one ingestion resolved) and write
    ``results.json``, ``results.md``, ``report.html`` (self-contained), ``confusion.png`` and the sample grid.

    The result's ``metrics`` are flat floats (same names in every run), ``results`` the table's numbers,
    ``confusion`` the TargetNet's confusion matrix (multi-class only).
    """
    started = time.perf_counter()
    ctx = context or RunContext(track=False, publish=False)
    ensure_dir(out)
    ts = load_teacher_set(teacher_set, device="auto")  # a CPU-only stage
    dataset = dataset or ts.doc["config"]["evaluation"]["dataset"]
    if not dataset:
        raise ConfigError(
            "no evaluation dataset: the teachers do not name one common training dataset",
            "set evaluation.dataset in the experiment config (mnist, fashion, mnist+fashion, mosaic, or a "
            "folder / s3:// prefix of your own labelled images: LABEL/IMAGE.png)",
        )
    task = ts.teachers.task
    if task == "mixed":
        raise ConfigError(
            "evaluating a mix of multi-class and multi-label teachers is not supported", "use one task type"
        )
    parent = None
    with ctx.stage_run(STAGE, ts.params, ts.config_hash) as tracker:
        restore_routing(ts, samples_location(samples))
        net, manifest = load_targetnet(target_net)
        net = net.to(ts.device).eval()
        labels = list(ts.teachers.target_labels)
        if manifest.labels != labels:
            raise ConfigError(f"the TargetNet predicts {manifest.labels}, the teacher set targets {labels}")
        if is_folder_spec(dataset):  # the user's own labelled set, decoded a batch at a time
            folder = open_folder(dataset, labels, ts.teachers.input_shape, task)
            student, teacher_logits, y = _predict_folder(net, ts.teachers, folder, ts.device)
            n_images = len(folder)
        else:
            test = load_split(dataset, "test", labels=labels, task=task)
            x, y = test.tensors()
            student = _predict(net, x, ts.device)
            teacher_logits = {name: _predict(model, x, ts.device) for name, model in ts.teachers}
            n_images = len(x)
        ensemble = ts.union({k: v.to(ts.device) for k, v in teacher_logits.items()}).cpu()

        metrics: dict[str, float] = {}
        metrics.update(score(student, y, task, labels, prefix="test.student."))
        metrics.update(score(ensemble, y, task, labels, prefix="test.ensemble."))
        key = "acc" if task == "multiclass" else "map"
        report = ts.doc["report"]
        results: dict[str, Any] = {
            "dataset": dataset,
            "images": n_images,
            "metric": "top-1 accuracy" if task == "multiclass" else "mAP",
            "labels": labels,
            "teachers": {},
            "ensemble": {"params": report["params_total"], "flops": report["flops_total"], "tasks": {}},
            "student": {
                "spec": ts.cfg.student,
                "params": count_params(net),
                "flops": count_flops(net, net.input_shape),
                "tasks": {},
            },
        }
        ev = build_eval_set(None, y, labels, task, ts.teachers)  # the benchmarks' sub-tasks, same code
        tasks = {"student": score_subtasks(student, ev), "ensemble": score_subtasks(ensemble, ev)}
        owns = score_teachers(teacher_logits, ev)
        for name in ts.teachers.infos:
            own = metrics[f"test.{teacher_key(name, key)}"] = owns[teacher_key(name, key)]
            for who in ("student", "ensemble"):
                value = tasks[who][task_key(name, key)]
                metrics[f"test.{who}.{task_key(name, key)}"] = results[who]["tasks"][name] = value
            t = report["teachers"][name]
            results["teachers"][name] = {"params": t["params"], "flops": t["flops"], "own": own}
        results["student"]["union"] = metrics[f"test.student.{key}"]
        results["ensemble"]["union"] = metrics[f"test.ensemble.{key}"]
        per = "acc" if task == "multiclass" else "ap"
        results["per_label"] = {
            who: {label: metrics[f"test.{who}.{per}.{label}"] for label in labels}
            for who in ("student", "ensemble")
        }
        metrics.update(
            {
                "student.params": float(results["student"]["params"]),
                "student.flops": float(results["student"]["flops"]),
                "teachers.params": float(report["params_total"]),
                "teachers.flops": float(report["flops_total"]),
                "student.params_ratio": results["student"]["params"] / max(1, report["params_total"]),
            }
        )
        confusion = None
        if task == "multiclass":
            confusion = {"labels": labels, "matrix": confusion_matrix(student, y, len(labels))}
        results["confusion"] = confusion

        links = _links(ctx)
        markdown = reports.results_markdown(results, links)
        with scratch() as tmp:
            local = Path(out) if not storage.is_s3(out) else Path(tmp)
            grid = _copy_grid(ts, samples, local)
            cm_png = (
                reports.confusion_png(confusion["matrix"], labels, local / CONFUSION_PNG)
                if confusion
                else None
            )
            page = reports.results_html(results, grid=grid, confusion=cm_png, links=links)
            (local / RESULTS_MD).write_text(markdown)
            (local / REPORT_HTML).write_text(page)
            (local / RESULTS_JSON).write_text(json.dumps(results, indent=2))
            if storage.is_s3(out):
                storage.put_dir(local, out)
            tracker.log_metrics(metrics)
            for path in (local / RESULTS_MD, local / REPORT_HTML, local / RESULTS_JSON, cm_png, grid):
                if path is not None and path.is_file():
                    tracker.log_artifact(path, "results")
            parent = ctx.parent(ts.config_hash)
            registered, verdict = None, reports.verdict(results)
            if parent is not None:
                headline = reports.headline_scores(results)
                parent.log_metrics(metrics | headline)
                for path in (local / RESULTS_MD, local / REPORT_HTML, cm_png, grid):
                    if path is not None and path.is_file():
                        parent.log_artifact(path, "results")
                registered = _register(parent, ctx, ts.config_hash, target_net, results, headline, verdict)
        result = {
            "outputs": {"results": out},
            "metrics": metrics,
            "results": results,
            "confusion": confusion,
            "markdown": markdown,
            "html": page,
            "links": links,
            "verdict": verdict,
            "registered_model": registered,
        }
        result = finish(STAGE, out, context, tracker, result, started)
    if parent is not None:
        parent.set_tags({"dfka.results": result["published"] or out})
        parent.end("FINISHED")
    return result


def _register(
    parent: ParentRun,
    ctx: RunContext,
    config_hash: str,
    target_net: str,
    results: dict[str, Any],
    headline: dict[str, float],
    verdict: str,
) -> dict[str, Any] | None:
    """Register the regroup stage's logged TargetNet with its test scores, and describe the parent run
    (the runs list's description column): the verdict, the steps each stage took, the model version."""
    steps = {}
    try:
        logged_metrics = parent.client.get_run(parent.run_id).data.metrics
        steps = {
            k[len("stage.") : -len(".steps")]: v for k, v in logged_metrics.items() if k.endswith(".steps")
        }
    except Exception:  # a description without the steps is still a description
        pass
    lines = [verdict, ""]
    for name, teacher in results["teachers"].items():
        lines.append(
            f"- {name}: TargetNet {reports.pct(results['student']['tasks'][name])} on its labels, "
            f"the teacher {reports.pct(teacher['own'])}"
        )
    if steps:
        lines.append("- steps: " + ", ".join(f"{stage} {int(n)}" for stage, n in sorted(steps.items())))
    lines.append(f"- run `{ctx.run_id}`, commit `{ctx.git_commit}`, config `{config_hash}`")
    logged = read_logged(target_net)
    registered = None
    if logged is not None:
        tags = {k: f"{v:.6g}" for k, v in headline.items()}
        tags |= {TAG_DATASET: results["dataset"], TAG_RUN_ID: ctx.run_id, TAG_COMMIT: ctx.git_commit}
        registered = register_evaluated(parent.client, logged, tags, "\n".join(lines))
    if registered is not None:
        model = f"models:/{registered['name']}/{registered['version']}"
        lines.append(f"- model: `{model}` (aliases: {', '.join(registered['aliases'])})")
        parent.set_tags({"dfka.model": model})
    parent.set_tags({"mlflow.note.content": "\n".join(lines)})
    return registered


def _copy_grid(ts: Any, samples: str, local: Path) -> Path | None:
    """The export stage's sample grid, or one drawn from the first shard if the export has none."""
    src = storage.join(samples, GRID_FILE)
    if storage.exists(src):
        storage.get_file(src, local / GRID_FILE)
        return local / GRID_FILE
    from dfka.amalgamation.samples import iter_shards

    shard = next(iter_shards(samples_location(samples)))
    logits = {k.removeprefix("logits."): v for k, v in shard.items() if k.startswith("logits.")}
    return sample_grid_file(ts, shard["image"], logits, str(local))


def _links(ctx: RunContext) -> dict[str, str]:
    links: dict[str, str] = {}
    if ctx.track and ctx.tracking_uri and (parent := ctx.parent()) is not None:
        try:  # a person opens the report: the browser-facing URL, not the in-cluster one
            browser = mlflow_browser_url(ctx.tracking_uri)
        except ConfigError as err:  # the evaluation is worth more than the link: warn, keep going
            log.warning("%s (%s); the report links %s instead", err.problem, err.fix, ctx.tracking_uri)
            browser = ctx.tracking_uri
        try:
            exp = experiment_id(parent.client, ctx.experiment)
            links["MLflow run"] = run_url(browser, exp, parent.run_id)
        except Exception:  # a link is not worth failing for
            pass
    if (bucket_uri := ctx.publish_uri(STAGE)) is not None:
        links["outputs"] = bucket_uri.rsplit("/", 1)[0] + "/"
    return links
