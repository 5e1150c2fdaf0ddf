"""The teacher zoo: train a classifier on a label subset of a real dataset and save it as a bundle.

Teachers are the one place dfka trains on real labelled images; in production they arrive from
elsewhere as bundles. The zoo exists so benchmarks and the demo have honest, reproducible teachers.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from dfka.bundles import SAFE_NAME, Task, TeacherManifest, save_bundle
from dfka.config_files import load_yaml
from dfka.data import load_split
from dfka.errors import ConfigError, DfkaError, describe_validation
from dfka.evaluation import predict, score
from dfka.models import build_model, count_flops, count_params
from dfka.progress import bar as progress_bar
from dfka.runtime import seed_everything, set_threads

log = logging.getLogger(__name__)
MetricsCallback = Callable[[dict[str, float], int], None]


@dataclass
class TeacherRecipe:
    """Everything that determines a teacher; also what goes into ``teacher.json`` under ``training``."""

    dataset: str
    labels: Sequence[str]
    task: Task = "multiclass"
    arch: dict[str, Any] = field(default_factory=lambda: {"arch": "lenet5", "width": 1.0, "blocks": 3})
    epochs: int = 3
    batch_size: int = 128
    lr: float = 1e-3
    weight_decay: float = 0.0
    seed: int = Field(0, ge=0, lt=2**63)
    name: str | None = None


def train_teacher(
    recipe: TeacherRecipe,
    out: str,
    *,
    threads: int | None = None,
    progress: bool = True,
    on_metrics: MetricsCallback | None = None,
) -> TeacherManifest:
    """Train, evaluate on the matching test subset, and write the bundle to ``out`` (dir or ``s3://``)."""
    set_threads(threads)
    generator = seed_everything(recipe.seed)
    train = load_split(recipe.dataset, "train", labels=recipe.labels, task=recipe.task)
    test = load_split(recipe.dataset, "test", labels=recipe.labels, task=recipe.task)
    x_train, y_train = train.tensors()
    x_test, y_test = test.tensors()
    channels = x_train.shape[1]
    mean = x_train.mean(dim=(0, 2, 3)).tolist()
    std = x_train.std(dim=(0, 2, 3)).clamp_min(1e-3).tolist()

    spec = {**recipe.arch, "num_outputs": len(train.label_names), "input_shape": list(x_train.shape[1:])}
    model = build_model(spec, mean=mean, std=std)
    opt = torch.optim.Adam(model.parameters(), lr=recipe.lr, weight_decay=recipe.weight_decay)
    steps_per_epoch = (len(x_train) + recipe.batch_size - 1) // recipe.batch_size
    sched = torch.optim.lr_scheduler.OneCycleLR(
        opt, max_lr=recipe.lr, total_steps=recipe.epochs * steps_per_epoch
    )
    loss_fn = F.cross_entropy if recipe.task == "multiclass" else F.binary_cross_entropy_with_logits

    name = recipe.name or f"{recipe.dataset}-{'-'.join(_short(recipe.labels))}"
    log.info(
        "training teacher %s on %d images (%d labels, %s)",
        name,
        len(x_train),
        len(train.label_names),
        recipe.task,
    )
    started = time.perf_counter()
    step = 0
    for epoch in range(recipe.epochs):
        model.train()
        order = torch.randperm(len(x_train), generator=generator)
        bar = progress_bar(
            range(steps_per_epoch), desc=f"{name} epoch {epoch + 1}/{recipe.epochs}", progress=progress
        )
        running = torch.zeros(())
        for i in bar:
            idx = order[i * recipe.batch_size : (i + 1) * recipe.batch_size]
            loss = loss_fn(model(x_train[idx]), y_train[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            step += 1
            running = 0.98 * running + 0.02 * loss.detach() if step > 1 else loss.detach()
            if i % 50 == 0:
                value = float(running)
                bar.set_postfix(loss=f"{value:.4f}")
                if on_metrics:
                    on_metrics({"train.loss": value}, step)
    train_seconds = time.perf_counter() - started

    metrics = score(predict(model, x_test), y_test, recipe.task, test.label_names, prefix="test_")
    headline = {k: v for k, v in metrics.items() if "." not in k}
    headline["train_seconds"] = train_seconds
    if on_metrics:  # MLflow's keys follow the pipeline's dotted scheme (the manifest keeps its own)
        tracked = {f"test.{k.removeprefix('test_')}": v for k, v in metrics.items()}
        on_metrics(tracked | {"train.seconds": train_seconds}, step)
    training = {
        "dataset": recipe.dataset,
        "epochs": recipe.epochs,
        "batch_size": recipe.batch_size,
        "lr": recipe.lr,
        "seed": recipe.seed,
        "train_images": len(x_train),
        "test_images": len(x_test),
        "params": count_params(model),
        "flops": count_flops(model, tuple(x_train.shape[1:])),
        "channels": channels,
        "recipe_sha256": recipe_sha(recipe),
    }
    manifest = save_bundle(
        model, out, name=name, labels=train.label_names, task=recipe.task, metrics=headline, training=training
    )
    log.debug("teacher %s: %s -> %s", name, _fmt(headline), out)  # the CLI prints its own row
    return manifest


def _short(labels: Sequence[str]) -> list[str]:
    if len(labels) <= 2:
        return list(labels)
    return [labels[0], labels[-1]]


def _fmt(metrics: dict[str, float]) -> str:
    return ", ".join(f"{k}={v:.4f}" for k, v in metrics.items())


# --- the zoo: a teacher set defined in a config file, built once and cached --------------------------


class ZooTeacher(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    name: str = Field(min_length=1, pattern=SAFE_NAME)
    dataset: str
    labels: str | list[str]
    task: Task = "multiclass"
    arch: str = "lenet5"
    epochs: int = Field(3, ge=1)
    batch_size: int = Field(128, ge=1)
    lr: float = Field(1e-3, gt=0)
    seed: int = 0


class ZooConfig(BaseModel):
    """A teacher set: where the bundles go (``out/<name>``) and how each teacher is trained."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    experiment: str = "dfka-teachers"
    out: str
    teachers: list[ZooTeacher] = Field(min_length=1)

    @classmethod
    def load(cls, path: str | Path) -> ZooConfig:
        try:
            return cls.model_validate(load_yaml(path, what="teacher-zoo file"))
        except ValidationError as err:
            problems = describe_validation(err, "file")
            raise ConfigError(
                f"{path} is invalid: {problems}", "fix the keys named above (see configs/)"
            ) from None


def recipe_for(teacher: ZooTeacher) -> TeacherRecipe:
    from dfka.data import parse_labels
    from dfka.data.labels import is_folder_dataset
    from dfka.models import parse_arch

    arch = parse_arch(teacher.arch)
    folder = teacher.dataset if is_folder_dataset(teacher.dataset) else None  # names: the folder's own
    return TeacherRecipe(
        dataset=teacher.dataset,
        labels=parse_labels(teacher.labels, folder),
        task=teacher.task,
        arch={k: v for k, v in arch.items()},
        epochs=teacher.epochs,
        batch_size=teacher.batch_size,
        lr=teacher.lr,
        seed=teacher.seed,
        name=teacher.name,
    )


def recipe_sha(recipe: TeacherRecipe) -> str:
    """Content hash of a recipe: a cached bundle is reused only if it was trained from the same one."""
    payload = json.dumps(asdict(recipe) | {"labels": list(recipe.labels)}, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()


def cached_manifest(out: str, recipe: TeacherRecipe) -> TeacherManifest | None:
    """The manifest at ``out`` if it exists and was trained from ``recipe``, else ``None``."""
    from dfka import storage
    from dfka.bundles import MANIFEST_NAME

    key = storage.join(out, MANIFEST_NAME)
    if not storage.exists(key):
        return None
    try:
        manifest = TeacherManifest.model_validate(json.loads(storage.get_bytes(key)))
    except (ValueError, DfkaError):
        return None
    return manifest if manifest.training.get("recipe_sha256") == recipe_sha(recipe) else None
