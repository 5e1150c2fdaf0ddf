"""Where dfka keeps local state, and how it finds its object store and tracking server.

Everything is read from the environment first, so a cluster (KFP env vars, Kubernetes secrets) and a
laptop (``$DFKA_HOME/stack.env`` written by ``dfka stack up``) configure dfka the same way.

============================  ==================================================================
``DFKA_HOME``                 local state: stack processes, credentials, offline metrics, bench teacher
                              cache (``$XDG_STATE_HOME/dfka``, else ``~/.local/state/dfka``: per user, the
                              same from every directory)
``DFKA_DATA_DIR``             dataset cache (``~/.cache/dfka/data``)
``DFKA_S3_ENDPOINT``          S3 endpoint URL, e.g. ``http://127.0.0.1:8333``
``AWS_ACCESS_KEY_ID``         S3 access key
``AWS_SECRET_ACCESS_KEY``     S3 secret key
``DFKA_BUCKET``               default bucket for bundles and run outputs (``dfka``)
``MLFLOW_TRACKING_URI``       MLflow tracking server
``DFKA_MLFLOW_EXTERNAL_URL``  MLflow as a person's browser reaches it (an Ingress, or
                              ``http://localhost:5000`` behind a port-forward), for the links in
                              reports; unset: the tracking URI, which on a cluster is an in-cluster name
``DFKA_NETWORK_TIMEOUT``      seconds before an unanswering S3, MLflow or KFP endpoint is an error (30)
``DFKA_ARCH_MODULES``         module prefixes you trust, whose factories an ``arch: module:factory``
                              spec may name (none: only built-ins and installed entry points)
============================  ==================================================================

The names other parts share (environment variables the pipeline sets on a stage, the Kubernetes
resources the manifests create and the doctor checks) are defined here too, so the training core, the
stages, the pipeline and the cluster doctor agree on them without importing one another.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from urllib.parse import urlsplit

# ---- environment variables the pipeline (or pipelines/run_local.py) sets on every stage ----
#: The pipeline run id (see dfka.stages.context) and the git commit of the code that runs.
RUN_ID_ENV = "DFKA_KFP_RUN_ID"
GIT_COMMIT_ENV = "DFKA_GIT_COMMIT"
#: Steps between the training stages' checkpoints (``dfka.engine.checkpoint``; the pipeline sets the variable).
CHECKPOINT_EVERY_ENV = "DFKA_CHECKPOINT_EVERY"
DEFAULT_CHECKPOINT_EVERY = 500
#: Set by ``dfka pipeline run`` (dfka.ops.pipeline_runner) on pipelines/run_local.py: the runner dies with it.
PARENT_PID_ENV = "DFKA_PARENT_PID"
#: Module prefixes whose architecture factories a spec may name by import path (dfka.models.registry).
ARCH_MODULES_ENV = "DFKA_ARCH_MODULES"
#: Bearer token for an authenticated KFP endpoint (``dfka pipeline submit --token``, pipelines/submit.py).
KFP_TOKEN_ENV = "DFKA_KFP_TOKEN"

# ---- Kubernetes resources (k8s/), shared by the pipeline, the manifests' tests and the cluster doctor ----
#: ServiceAccount for pipeline runs (k8s/base/pipeline-rbac.yaml).
PIPELINE_SERVICE_ACCOUNT = "dfka-pipeline-runner"
#: ConfigMap with the pipeline defaults (k8s/base/pipeline-config.yaml) and its keys.
PIPELINE_CONFIGMAP = "dfka-pipeline-config"
PIPELINE_CONFIG_KEYS = ("MLFLOW_TRACKING_URI", "DFKA_S3_ENDPOINT", "DFKA_BUCKET", "DFKA_PIPELINE_ROOT")
#: The browser-facing MLflow URL for report links (see mlflow_browser_url).
MLFLOW_EXTERNAL_URL_ENV = "DFKA_MLFLOW_EXTERNAL_URL"
#: Keys of the same ConfigMap that may be absent or empty: mapped with optional=True, so a
#: ConfigMap applied before the key existed does not stop the pods (CreateContainerConfigError).
PIPELINE_CONFIG_OPTIONAL_KEYS = (MLFLOW_EXTERNAL_URL_ENV,)
#: KFP's launcher config in the runs' namespace (defaultPipelineRoot, providers); k8s/overlays/*.
KFP_LAUNCHER_CONFIGMAP = "kfp-launcher"
#: S3 credentials: Kubeflow's secret name and keys, also created by the standalone overlay.
S3_SECRET = "mlpipeline-minio-artifact"
S3_SECRET_KEYS = ("accesskey", "secretkey")
#: Env vars that pipeline pods get the S3 keys as (kfp.kubernetes.use_secret_as_env).
S3_SECRET_TO_ENV = {"accesskey": "AWS_ACCESS_KEY_ID", "secretkey": "AWS_SECRET_ACCESS_KEY"}
#: MLflow tracking server Service and port (the port is part of MLflow's --allowed-hosts entries).
MLFLOW_SERVICE = "mlflow"
MLFLOW_PORT = 5000
#: KFP API server: health path, and the in-cluster Service the doctor reaches through the API proxy.
KFP_HEALTH_PATH = "/apis/v2beta1/healthz"
KFP_SERVICE = "ml-pipeline"
KFP_SERVICE_PORT = 8888

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


def mlflow_browser_url(tracking_uri: str, environ: Mapping[str, str] | None = None) -> str:
    """The MLflow base URL to put in links a person opens: ``DFKA_MLFLOW_EXTERNAL_URL`` when it is
    set (trailing ``/`` removed), else ``tracking_uri`` itself. A cluster's tracking URI is an
    in-cluster Service name that no browser resolves; the ConfigMap carries the external one."""
    from dfka.errors import ConfigError

    env = os.environ if environ is None else environ
    external = env.get(MLFLOW_EXTERNAL_URL_ENV, "").strip()
    if not external:
        return tracking_uri
    parts = urlsplit(external)
    if parts.scheme not in ("http", "https") or not parts.netloc or parts.query or parts.fragment:
        raise ConfigError(
            f"{MLFLOW_EXTERNAL_URL_ENV}={external!r} is not an http(s) base URL",
            "set it to the address your browser opens MLflow at, e.g. https://mlflow.example.com "
            "or http://localhost:5000, or leave it empty to link the tracking URI",
        )
    return external.rstrip("/")


def data_dir() -> Path:
    default = Path.home() / ".cache" / "dfka" / "data"
    return Path(os.environ.get("DFKA_DATA_DIR", str(default))).absolute()


def stack_env_file() -> Path:
    return dfka_home() / "stack.env"


def read_env_file(path: Path) -> dict[str, str]:
    """A ``KEY=VALUE`` file as python-dotenv reads it (``#`` comments, ``export`` prefix, quotes), with
    no ``${VAR}`` expansion: a secret that holds a ``$`` stays as written. Keys without a value are left out."""
    from dotenv import dotenv_values

    return {k: v for k, v in dotenv_values(path, interpolate=False).items() if v is not None}


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
