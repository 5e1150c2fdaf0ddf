"""Where dfka keeps local state, and how it finds its object store and tracking server.

Everything is read from the environment first, so a cluster (KFP env vars, Kubernetes secrets) and a
laptop (``$DFKA_HOME/stack.env`` written by ``dfka stack up``) configure dfka the same way.

=========================  ==================================================================
``DFKA_HOME``              local state: stack processes, credentials, offline metrics, bench teacher
                           cache (``$XDG_STATE_HOME/dfka``, else ``~/.local/state/dfka``: per user, the
                           same from every directory)
``DFKA_DATA_DIR``          dataset cache (``~/.cache/dfka/data``)
``DFKA_S3_ENDPOINT``       S3 endpoint URL, e.g. ``http://127.0.0.1:8333``
``AWS_ACCESS_KEY_ID``      S3 access key
``AWS_SECRET_ACCESS_KEY``  S3 secret key
``DFKA_BUCKET``            default bucket for bundles and run outputs (``dfka``)
``MLFLOW_TRACKING_URI``    MLflow tracking server
``DFKA_NETWORK_TIMEOUT``   seconds before an unanswering S3, MLflow or KFP endpoint is an error (30)
=========================  ==================================================================
"""

from __future__ import annotations

import os
from pathlib import Path

#: Environment keys whose values are secrets: never logged, never written to MLflow params or YAML.
SECRET_ENV_KEYS = (
    "AWS_SECRET_ACCESS_KEY",
    "AWS_ACCESS_KEY_ID",
    "MLFLOW_TRACKING_PASSWORD",
    "MLFLOW_TRACKING_TOKEN",
)


_legacy_noted = False


def dfka_home() -> Path:
    """``$DFKA_HOME``, else the per-user state folder (never the current directory: `dfka stack status`
    from another folder must see the same stack)."""
    if os.environ.get("DFKA_HOME"):
        return Path(os.environ["DFKA_HOME"]).expanduser().absolute()
    state = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    home = Path(state).expanduser().absolute() / "dfka"
    _note_legacy_home(home)
    return home


def _note_legacy_home(home: Path) -> None:
    """dfka once kept its state in ``./.dfka``: say where it went, once, if such a folder is here."""
    global _legacy_noted
    legacy = Path(".dfka").absolute()
    if not _legacy_noted and legacy != home and (legacy / "stack.env").is_file():
        _legacy_noted = True
        import logging

        logging.getLogger(__name__).warning(
            "dfka keeps its state in %s now; %s is not read any more (set DFKA_HOME=%s to keep using it)",
            home,
            legacy,
            legacy,
        )


DEFAULT_NETWORK_TIMEOUT = 30.0


def network_timeout() -> float:
    """Seconds one S3, MLflow or KFP operation may wait on an endpoint that does not answer, retries
    included (``DFKA_NETWORK_TIMEOUT``, default 30)."""
    from dfka.errors import ConfigError

    raw = os.environ.get("DFKA_NETWORK_TIMEOUT", "")
    if not raw:
        return DEFAULT_NETWORK_TIMEOUT
    try:
        value = float(raw)
    except ValueError:
        value = float("nan")
    if not 0 < value < 86400:
        raise ConfigError(
            f"DFKA_NETWORK_TIMEOUT={raw!r} is not a number of seconds in (0, 86400)",
            "set it to e.g. 30, or unset it",
        )
    return value


def data_dir() -> Path:
    default = Path.home() / ".cache" / "dfka" / "data"
    return Path(os.environ.get("DFKA_DATA_DIR", str(default))).absolute()


def stack_env_file() -> Path:
    return dfka_home() / "stack.env"


def read_env_file(path: Path) -> dict[str, str]:
    """Parse a ``KEY=VALUE`` file (``#`` comments, optional ``export`` prefix, no shell expansion)."""
    values: dict[str, str] = {}
    for line in path.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        line = line.removeprefix("export ").strip()
        key, sep, value = line.partition("=")
        if sep:
            values[key.strip()] = value.strip().strip("'\"")
    return values


def load_stack_env(path: Path | None = None) -> dict[str, str]:
    """Apply ``$DFKA_HOME/stack.env`` to ``os.environ`` for keys the user has not set; return what was applied."""
    path = path or stack_env_file()
    if not path.is_file():
        return {}
    applied = {k: v for k, v in read_env_file(path).items() if k not in os.environ}
    os.environ.update(applied)
    return applied


def default_bucket() -> str:
    return os.environ.get("DFKA_BUCKET", "dfka")


def redact(text: str) -> str:
    """Replace the values of secret environment variables in ``text`` with ``***``."""
    for key in SECRET_ENV_KEYS:
        value = os.environ.get(key)
        if value and len(value) >= 4:
            text = text.replace(value, "***")
    return text
