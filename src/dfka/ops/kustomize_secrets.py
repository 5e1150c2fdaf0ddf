"""``dfka cluster check-secrets``: the secret env files a kustomize overlay needs, checked before
``kubectl apply -k``.

Kustomize stops on a missing env file with ``evalsymlink failure … mlflow-db.env``, which names
neither the template to copy nor the README step. This walks the overlay the way kustomize does
(``resources`` and ``components`` that are folders, recursively), collects every ``secretGenerator``
file (``envs``, ``env``, ``files``) and checks each one: it exists, it has every key of the committed
``<file>.example`` template, and no value is still the template's ``CHANGE_ME``. Values are never
printed.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from dotenv import dotenv_values

from dfka.config_files import load_yaml
from dfka.errors import ConfigError
from dfka.ops.cluster import PLACEHOLDER, CheckResult, is_unset

KUSTOMIZATION_NAMES = ("kustomization.yaml", "kustomization.yml", "Kustomization")
README_STEP = "k8s/README.md, step 3: Secrets"


@dataclass(frozen=True)
class SecretFile:
    """One file a ``secretGenerator`` reads: which secret, which kind of entry, where."""

    secret: str
    kind: str  # envs | files
    path: Path

    @property
    def template(self) -> Path:
        return self.path.with_name(self.path.name + ".example")


def kustomization_file(folder: Path) -> Path | None:
    return next((folder / n for n in KUSTOMIZATION_NAMES if (folder / n).is_file()), None)


def secret_files(overlay: Path) -> list[SecretFile]:
    """Every secretGenerator file of ``overlay`` and the folders it includes, in kustomize's order."""
    if kustomization_file(overlay) is None:
        raise ConfigError(
            f"{overlay} has no kustomization.yaml",
            "pass an overlay folder, e.g. k8s/overlays/standalone or k8s/overlays/kubeflow",
        )
    return list(dict.fromkeys(_walk(overlay.resolve(), set())))


def _walk(folder: Path, seen: set[Path]) -> Iterator[SecretFile]:
    if folder in seen:
        return
    seen.add(folder)
    path = kustomization_file(folder)
    if path is None:
        return
    doc = load_yaml(path, what="kustomization")
    for entry in [*(doc.get("resources") or []), *(doc.get("components") or [])]:
        if isinstance(entry, str) and "://" not in entry and (folder / entry).is_dir():
            yield from _walk((folder / entry).resolve(), seen)
    for generator in doc.get("secretGenerator") or []:
        name = str(generator.get("name", "?"))
        envs = list(generator.get("envs") or []) + ([generator["env"]] if generator.get("env") else [])
        for env in envs:
            yield SecretFile(name, "envs", folder / str(env))
        for item in generator.get("files") or []:
            yield SecretFile(name, "files", folder / str(item).split("=", 1)[-1])


def _shown(path: Path, base: Path) -> str:
    try:
        return str(path.relative_to(base))
    except ValueError:
        return str(path)


def check_secret_file(item: SecretFile, base: Path | None = None) -> CheckResult:
    """One line: the file is there, has the template's keys and no ``CHANGE_ME`` left (values unread)."""
    base = base or Path.cwd()
    shown, template = _shown(item.path, base), _shown(item.template, base)
    name = f"secret {item.secret}"
    if not item.path.is_file():
        copy = f"cp {template} {shown}" if item.template.is_file() else f"create {shown}"
        return CheckResult(
            name,
            False,
            f"{shown} is missing (kustomize would stop with 'evalsymlink failure')",
            f"{copy}, then replace every {PLACEHOLDER} ({README_STEP})",
        )
    if item.kind != "envs":
        return CheckResult(name, True, f"{shown} is there")
    values = dotenv_values(item.path, interpolate=False)
    expected = list(dotenv_values(item.template, interpolate=False)) if item.template.is_file() else []
    missing = [k for k in expected if k not in values]
    if missing:
        return CheckResult(
            name,
            False,
            f"{shown} lacks {', '.join(missing)} (keys of {template})",
            f"add {', '.join(f'{k}=...' for k in missing)} to {shown} ({README_STEP})",
        )
    unset = [k for k, v in values.items() if is_unset(v)]
    if unset:
        return CheckResult(
            name,
            False,
            f"{shown} still has {PLACEHOLDER} or an empty value in {', '.join(unset)}",
            f"set real values (e.g. openssl rand -hex 24) in {shown} ({README_STEP})",
        )
    return CheckResult(name, True, f"{shown} has {', '.join(values) or 'no keys'}")


def check_overlay_secrets(overlay: Path, base: Path | None = None) -> list[CheckResult]:
    return [check_secret_file(item, base) for item in secret_files(overlay)]
