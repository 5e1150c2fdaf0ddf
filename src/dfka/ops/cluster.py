"""``dfka cluster doctor``: is this cluster ready to run the dfka pipeline?

The decisions are pure functions over kubernetes client model objects (``V1Node``, ``V1Taint``,
``V1Secret``, ``V1Service``, ``V1EndpointSlice``) that return a :class:`CheckResult`, so they are
tested without a cluster. :func:`run_doctor` is the thin part that reads the live objects.

The resource names (:mod:`dfka.settings`) are the contract between ``k8s/`` (which creates these
objects), the pipeline (which refers to them) and the doctor (which checks them);
``tests/test_k8s.py`` holds the manifests to them.
"""

from __future__ import annotations

import base64
import binascii
import json
import os
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from dfka.errors import ConfigError
from dfka.ops.placement import DEFAULT_GPU_PLACEMENT, GpuPlacement, Toleration
from dfka.settings import (
    KFP_HEALTH_PATH,
    KFP_SERVICE,
    KFP_SERVICE_PORT,
    MLFLOW_PORT,
    MLFLOW_SERVICE,
    PIPELINE_CONFIG_KEYS,
    PIPELINE_CONFIGMAP,
    PIPELINE_SERVICE_ACCOUNT,
    S3_SECRET,
    S3_SECRET_KEYS,
)

if TYPE_CHECKING:  # the checks only read attributes; the client is imported where it is used
    from kubernetes.client import (
        ApiClient,
        V1EndpointSlice,
        V1Node,
        V1Secret,
        V1Service,
        V1Taint,
    )

#: Kubernetes minor versions the manifests are validated against (oldest, newest), inclusive.
SUPPORTED_K8S = ((1, 28), (1, 37))
#: Marker of a template value that must be replaced before use.
PLACEHOLDER = "CHANGE_ME"

_HARD_EFFECTS = ("NoSchedule", "NoExecute")


def mlflow_tracking_uri(namespace: str, service: str = MLFLOW_SERVICE, port: int = MLFLOW_PORT) -> str:
    """The in-cluster MLflow URI that pipeline pods use (the ConfigMap's MLFLOW_TRACKING_URI)."""
    return f"http://{service}.{namespace}.svc.cluster.local:{port}"


def supported_range_text() -> str:
    (lo_major, lo_minor), (hi_major, hi_minor) = SUPPORTED_K8S
    return f"{lo_major}.{lo_minor}–{hi_major}.{hi_minor}"


@dataclass(frozen=True)
class CheckResult:
    """One doctor check: ``fix`` says what to do when ``ok`` is false."""

    name: str
    ok: bool
    detail: str
    fix: str | None = None

    def line(self) -> str:
        text = f"{'ok  ' if self.ok else 'FAIL'} {self.name}: {self.detail}"
        if not self.ok and self.fix:
            text += f" -> fix: {self.fix}"
        return text


# --------------------------------------------------------------------------------------------
# GPU node pool
# --------------------------------------------------------------------------------------------


def tolerates(toleration: Toleration, taint: V1Taint) -> bool:
    """Kubernetes' rule (``Toleration.ToleratesTaint``): the effect matches or is empty, the key matches
    or is empty (the key-less ``Exists`` wildcard), and operator Exists, or Equal with the same value."""
    if toleration.effect and toleration.effect != taint.effect:
        return False
    if toleration.key and toleration.key != taint.key:
        return False
    if toleration.operator == "Exists":
        return True
    return (toleration.value or "") == (taint.value or "")


def taint_text(key: str, value: str | None, effect: str) -> str:
    return f"{key}={value}:{effect}" if value else f"{key}:{effect}"


def toleration_as_taint(toleration: Toleration) -> str:
    """The taint to put on a pool so that this toleration is needed (``present`` for Exists); a
    key-less toleration asks for none (it tolerates whatever the pool carries)."""
    if not toleration.key:
        return f"any taint{':' + toleration.effect if toleration.effect else ''} (key-less Exists)"
    return taint_text(toleration.key, toleration.value or "present", toleration.effect or "NoSchedule")


def parse_quantity_int(value: Any) -> int:
    """An extended-resource quantity ("4", 4, "1k") as a whole count, by the client's own Kubernetes
    quantity parser; unparseable values count as 0 (a node that advertises nothing usable)."""
    from kubernetes.utils import parse_quantity

    try:
        return int(parse_quantity(value))
    except (TypeError, ValueError):
        return 0


@dataclass(frozen=True)
class NodeFit:
    """How one node compares with a GPU placement."""

    name: str
    labels_match: bool
    untolerated: tuple[str, ...]  # hard taints on the node that the placement does not tolerate
    missing_taints: tuple[str, ...]  # placement tolerations that no taint on the node needs
    gpus: int  # allocatable GPU resource
    ready: bool
    cordoned: bool
    gpus_needed: int

    @property
    def fits(self) -> bool:
        return (
            self.labels_match
            and not self.untolerated
            and not self.missing_taints
            and self.gpus >= max(self.gpus_needed, 1)
            and self.ready
            and not self.cordoned
        )

    def problems(self, resource: str) -> list[str]:
        out = []
        if self.missing_taints:
            out.append(f"missing taint {', '.join(self.missing_taints)}")
        if self.untolerated:
            out.append(f"taint {', '.join(self.untolerated)} not tolerated by the pipeline")
        if self.gpus < max(self.gpus_needed, 1):
            out.append(f"{self.gpus} {resource} allocatable, {max(self.gpus_needed, 1)} needed")
        if not self.ready:
            out.append("not Ready")
        if self.cordoned:
            out.append("cordoned")
        return out


def node_fit(node: V1Node, placement: GpuPlacement = DEFAULT_GPU_PLACEMENT) -> NodeFit:
    labels = node.metadata.labels or {}
    taints = list((node.spec.taints if node.spec else None) or [])
    hard = [t for t in taints if t.effect in _HARD_EFFECTS]
    untolerated = tuple(
        taint_text(t.key, t.value, t.effect)
        for t in hard
        if not any(tolerates(tol, t) for tol in placement.tolerations)
    )
    missing = tuple(
        toleration_as_taint(tol)
        for tol in placement.tolerations
        if tol.key and not any(tolerates(tol, t) for t in taints)  # a wildcard reserves nothing
    )
    allocatable = (node.status.allocatable if node.status else None) or {}
    conditions = (node.status.conditions if node.status else None) or []
    ready = any(c.type == "Ready" and c.status == "True" for c in conditions)
    return NodeFit(
        name=node.metadata.name,
        labels_match=all(labels.get(k) == v for k, v in placement.node_selector.items()),
        untolerated=untolerated,
        missing_taints=missing,
        gpus=parse_quantity_int(allocatable.get(placement.accelerator_type, 0)),
        ready=ready,
        cordoned=bool(node.spec and node.spec.unschedulable),
        gpus_needed=placement.accelerator_count,
    )


def _selector_text(placement: GpuPlacement) -> str:
    return ",".join(f"{k}={v}" for k, v in placement.node_selector.items()) or "(no node selector)"


def _names(fits: Sequence[NodeFit], limit: int = 5) -> str:
    names = [f.name for f in fits]
    return " ".join(names[:limit]) + (f" (+{len(names) - limit} more)" if len(names) > limit else "")


def check_gpu_pool(nodes: Sequence[V1Node], placement: GpuPlacement = DEFAULT_GPU_PLACEMENT) -> CheckResult:
    """Is there at least one node that the pipeline's GPU stages can use, and is the pool reserved?

    A usable node has the placement's labels, carries a taint for each of the placement's
    tolerations (so other workloads stay off the GPU pool), has no other hard taint, is Ready and
    not cordoned, and has enough allocatable GPUs.
    """
    name = "gpu-pool"
    resource = placement.accelerator_type
    selector = _selector_text(placement)
    taints = ", ".join(toleration_as_taint(t) for t in placement.tolerations) or "no taint"
    fits = [node_fit(n, placement) for n in nodes]
    good = [f for f in fits if f.fits]
    if good:
        return CheckResult(
            name,
            True,
            f"{len(good)} node(s) with {selector}, tainted {taints}, "
            f"{sum(f.gpus for f in good)} {resource} allocatable",
        )
    pool = [f for f in fits if f.labels_match]
    label_cmd = " ".join(f"{k}={v}" for k, v in placement.node_selector.items())
    if not pool:
        gpu_nodes = [f for f in fits if f.gpus > 0]
        if gpu_nodes:
            return CheckResult(
                name,
                False,
                f"no node has {selector}; node(s) with {resource} but other labels: {_names(gpu_nodes)}",
                f"label the GPU pool (kubectl label nodes {_names(gpu_nodes)} {label_cmd}, or the cloud's "
                "pool labels: k8s/examples/gpu-pools/), or give the pipeline and --node-selector the "
                "label that pool already has",
            )
        return CheckResult(
            name,
            False,
            f"no node has {selector} and no node has allocatable {resource}"
            " (a pool that scales to zero shows up once a node is running)",
            f"create a GPU node pool labelled {label_cmd} and tainted {taints} "
            "(k8s/examples/gpu-pools/{gke,eks,aks}.md)",
        )
    fixes: list[str] = []
    if any(f.missing_taints for f in pool):
        missing = sorted({t for f in pool for t in f.missing_taints})
        bad = [f for f in pool if f.missing_taints]
        fixes.append(
            f"kubectl taint nodes {_names(bad)} {' '.join(missing)} (or the cloud CLI's --node-taints)"
        )
    if any(f.untolerated for f in pool):
        extra = sorted({t for f in pool for t in f.untolerated})
        fixes.append(
            f"remove taint {', '.join(extra)} from the pool, or add that toleration to the pipeline's "
            "GPU placement and pass it here with --toleration"
        )
    if any(f.gpus < max(f.gpus_needed, 1) for f in pool):
        fixes.append(
            f"make the pool advertise {resource}: install the NVIDIA device plugin or GPU Operator "
            "(or the cloud's GPU driver option), then check `kubectl describe node`"
        )
    if any(not f.ready or f.cordoned for f in pool):
        fixes.append("bring the node(s) back: `kubectl describe node`, `kubectl uncordon`")
    problems = "; ".join(f"{f.name}: {', '.join(f.problems(resource))}" for f in pool[:5])
    return CheckResult(
        name,
        False,
        f"{len(pool)} node(s) with {selector}, none usable ({problems})",
        "; ".join(fixes),
    )


# --------------------------------------------------------------------------------------------
# Secret, ConfigMap, Services
# --------------------------------------------------------------------------------------------


def _decode(value: str | None) -> str:
    if not value:
        return ""
    try:
        return base64.b64decode(value, validate=True).decode("utf-8", "replace")
    except (binascii.Error, ValueError):
        return value


def secret_values(secret: V1Secret) -> dict[str, str]:
    """Decoded values of a secret as read from the API (``data`` is base64, ``string_data`` plain)."""
    values = {k: _decode(v) for k, v in (secret.data or {}).items()}
    values.update(secret.string_data or {})
    return values


def is_unset(value: str | None) -> bool:
    """A secret value still to be filled in: empty, or holding the templates' ``CHANGE_ME``."""
    return not (value or "").strip() or PLACEHOLDER in (value or "")


def check_s3_secret(
    secret: V1Secret | None,
    namespace: str,
    name: str = S3_SECRET,
    keys: Sequence[str] = S3_SECRET_KEYS,
) -> CheckResult:
    check = "s3-secret"
    where = f"{namespace}/{name}"
    create = (
        "on Kubeflow it is created by KFP (in `kubeflow` and in each profile namespace); for the "
        "standalone overlay fill in k8s/overlays/standalone/secrets/s3.env and "
        "`kubectl apply -k k8s/overlays/standalone`"
    )
    if secret is None:
        return CheckResult(check, False, f"secret {where} not found", create)
    values = secret_values(secret)
    missing = [k for k in keys if k not in values]
    if missing:
        return CheckResult(
            check,
            False,
            f"secret {where} lacks key(s) {', '.join(missing)}",
            f"recreate it with keys {', '.join(keys)}",
        )
    unset = [k for k in keys if is_unset(values[k])]
    if unset:
        bad = ", ".join(unset)
        return CheckResult(
            check,
            False,
            f"secret {where} has empty or {PLACEHOLDER} placeholder value(s) for {bad}",
            "put the real S3 keys in it (k8s/README.md, 'Secrets')",
        )
    return CheckResult(check, True, f"secret {where} has {', '.join(keys)}")


def ready_endpoints(slices: Sequence[V1EndpointSlice]) -> int:
    """Endpoints that are ready (an unset ``ready`` condition means ready, as Kubernetes documents)."""
    count = 0
    for endpoint_slice in slices:
        for endpoint in endpoint_slice.endpoints or []:
            ready = endpoint.conditions.ready if endpoint.conditions else None
            if ready is None or ready:
                count += 1
    return count


def check_mlflow_service(
    service: V1Service | None,
    slices: Sequence[V1EndpointSlice],
    namespace: str,
    name: str = MLFLOW_SERVICE,
    port: int = MLFLOW_PORT,
) -> CheckResult:
    check = "mlflow-service"
    where = f"{namespace}/{name}"
    if service is None:
        return CheckResult(
            check,
            False,
            f"service {where} not found",
            f"deploy MLflow into {namespace}: `kubectl apply -k k8s/overlays/<kubeflow|standalone>` "
            "(k8s/README.md), or pass --mlflow-service/--namespace",
        )
    ports = [p.port for p in (service.spec.ports if service.spec else None) or []]
    if port not in ports:
        return CheckResult(
            check,
            False,
            f"service {where} exposes port(s) {ports}, not {port}",
            f"clients and MLflow's --allowed-hosts use port {port}: restore the Service from k8s/base",
        )
    ready = ready_endpoints(slices)
    if not ready:
        return CheckResult(
            check,
            False,
            f"service {where}:{port} has no Ready pod (its readiness probe makes a real API call "
            "with the in-cluster Host header)",
            f"kubectl -n {namespace} describe pod -l app.kubernetes.io/name=mlflow; "
            f"kubectl -n {namespace} logs deploy/mlflow -c preflight",
        )
    return CheckResult(check, True, f"service {where}:{port} with {ready} Ready endpoint(s)")


def check_pipeline_config(config: dict[str, str] | None, namespace: str) -> CheckResult:
    """The ConfigMap exists, has every key, and its MLflow URI names the MLflow of this namespace."""
    check = "pipeline-config"
    where = f"{namespace}/{PIPELINE_CONFIGMAP}"
    if config is None:
        return CheckResult(
            check, False, f"configmap {where} not found", "kubectl apply -k k8s/overlays/<overlay>"
        )
    missing = [k for k in PIPELINE_CONFIG_KEYS if not config.get(k)]
    if missing:
        return CheckResult(
            check, False, f"configmap {where} lacks {', '.join(missing)}", "re-apply it from k8s/base"
        )
    uri = config["MLFLOW_TRACKING_URI"]
    host = urlsplit(uri).hostname or ""
    if host.split(".")[0] == MLFLOW_SERVICE and host.count(".") >= 1 and host.split(".")[1] != namespace:
        return CheckResult(
            check,
            False,
            f"MLFLOW_TRACKING_URI {uri} points at namespace {host.split('.')[1]}, not {namespace}",
            "apply the overlay with the right `namespace:`; its replacement rewrites the URI",
        )
    return CheckResult(check, True, f"configmap {where}: MLFLOW_TRACKING_URI={uri}")


def check_service_account(exists: bool, namespace: str, name: str = PIPELINE_SERVICE_ACCOUNT) -> CheckResult:
    if not exists:
        return CheckResult(
            "pipeline-serviceaccount",
            False,
            f"serviceaccount {namespace}/{name} not found",
            "kubectl apply -k k8s/overlays/<overlay> (runs use it via service_account=...)",
        )
    return CheckResult("pipeline-serviceaccount", True, f"serviceaccount {namespace}/{name} exists")


# --------------------------------------------------------------------------------------------
# API server and KFP
# --------------------------------------------------------------------------------------------


def parse_minor(major: str, minor: str) -> tuple[int, int] | None:
    """``("1", "30+")`` -> (1, 30); providers add suffixes such as ``+``."""
    try:
        return int(re.sub(r"\D", "", major)), int(re.sub(r"\D", "", minor))
    except ValueError:
        return None


def check_server_version(git_version: str, major: str, minor: str) -> CheckResult:
    version = parse_minor(major, minor)
    lo, hi = SUPPORTED_K8S
    if version is None:
        return CheckResult(
            "kubernetes",
            True,
            f"server {git_version} (version not parseable; manifests cover {supported_range_text()})",
        )
    if not lo <= version <= hi:
        return CheckResult(
            "kubernetes",
            False,
            f"server {git_version} is outside the validated range {supported_range_text()}",
            f"upgrade the cluster, or validate the rendered manifests for it: "
            f"kubernetes-validate --strict -k {version[0]}.{version[1]}.0",
        )
    return CheckResult("kubernetes", True, f"server {git_version} (validated range {supported_range_text()})")


def check_kfp_health(where: str, status: int | None, body: str = "", error: str | None = None) -> CheckResult:
    """Decide from the answer to ``GET <kfp>/apis/v2beta1/healthz``."""
    fix = (
        "check that KFP is installed (`kubectl -n kubeflow get deploy ml-pipeline`) or pass --kfp-host "
        "(e.g. after `kubectl -n kubeflow port-forward svc/ml-pipeline 8888:8888`: --kfp-host http://127.0.0.1:8888)"
    )
    if error is not None:
        return CheckResult("kfp-api", False, f"{where}: {error}", fix)
    if status != 200:
        return CheckResult("kfp-api", False, f"{where} answered HTTP {status}: {body[:120].strip()}", fix)
    info: dict[str, Any] = {}
    try:
        parsed = json.loads(body) if body else {}
        info = parsed if isinstance(parsed, dict) else {}
    except ValueError:
        pass
    bits = [f"KFP {info['tag_name']}" if info.get("tag_name") else "KFP API answers"]
    if "multi_user" in info:
        bits.append("multi-user: runs execute in profile namespaces" if info["multi_user"] else "single-user")
    return CheckResult("kfp-api", True, f"{where}: {', '.join(bits)}")


# --------------------------------------------------------------------------------------------
# Option parsing (CLI) and the live run
# --------------------------------------------------------------------------------------------


def parse_node_selector(items: Sequence[str]) -> dict[str, str]:
    selector = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key or not value:
            raise ConfigError(f"bad --node-selector {item!r}", "use KEY=VALUE, e.g. dfka.io/node-pool=gpu")
        selector[key] = value
    return selector


def parse_toleration(text: str) -> Toleration:
    """``key[=value]:Effect`` -> a Toleration (Exists without a value, Equal with one); ``:Effect``
    tolerates every key with that effect and ``*`` every taint (Kubernetes' key-less Exists)."""
    if text == "*":
        return Toleration(key="", operator="Exists", effect="")
    head, sep, effect = text.rpartition(":")
    if not sep or head.startswith("=") or effect not in ("NoSchedule", "PreferNoSchedule", "NoExecute"):
        raise ConfigError(
            f"bad --toleration {text!r}",
            "use KEY[=VALUE]:EFFECT with EFFECT NoSchedule, PreferNoSchedule or NoExecute, e.g. "
            "nvidia.com/gpu:NoSchedule (:EFFECT for every key, * for every taint)",
        )
    key, eq, value = head.partition("=")
    if eq:
        return Toleration(key=key, operator="Equal", value=value, effect=effect)
    return Toleration(key=key, operator="Exists", effect=effect)


def placement_from_options(
    node_selector: Sequence[str] | None,
    tolerations: Sequence[str] | None,
    no_tolerations: bool = False,
    gpus: int | None = None,
    base: GpuPlacement = DEFAULT_GPU_PLACEMENT,
) -> GpuPlacement:
    update: dict[str, Any] = {}
    if node_selector:
        update["node_selector"] = parse_node_selector(node_selector)
    if no_tolerations:
        update["tolerations"] = ()
    elif tolerations:
        update["tolerations"] = tuple(parse_toleration(t) for t in tolerations)
    if gpus is not None:
        update["accelerator_count"] = gpus
    return base.model_copy(update=update) if update else base


def load_api_client(kubeconfig: str | None = None, context: str | None = None) -> ApiClient:
    """An API client from --kubeconfig/--context, $KUBECONFIG or ~/.kube/config, else in-cluster."""
    from kubernetes import client, config

    try:
        if kubeconfig or context or not os.environ.get("KUBERNETES_SERVICE_HOST"):
            cfg = client.Configuration()
            config.load_kube_config(config_file=kubeconfig, context=context, client_configuration=cfg)
        else:
            cfg = client.Configuration()
            config.load_incluster_config(client_configuration=cfg)
    except Exception as err:  # ConfigException, OSError, yaml errors, bad base64 ... all mean "unusable"
        source = kubeconfig or os.environ.get("KUBECONFIG") or "~/.kube/config"
        raise ConfigError(
            f"cannot load the Kubernetes config ({source}{', context ' + context if context else ''}): "
            f"{str(err).splitlines()[0] if str(err) else type(err).__name__}",
            "pass --kubeconfig/--context, or set KUBECONFIG",
        ) from err
    cfg.retries = 1
    return client.ApiClient(cfg)


def _api_error(err: Exception) -> str:
    status = getattr(err, "status", None)
    reason = getattr(err, "reason", None)
    if status:
        return f"HTTP {status} {reason or ''}".strip()
    return str(err).splitlines()[0][:200] if str(err) else type(err).__name__


def run_doctor(
    api: ApiClient,
    namespace: str,
    placement: GpuPlacement = DEFAULT_GPU_PLACEMENT,
    mlflow_service: str = MLFLOW_SERVICE,
    s3_secret: str = S3_SECRET,
    kfp_host: str | None = None,
    kfp_namespace: str = "kubeflow",
    http_get: Callable[..., Any] | None = None,
) -> list[CheckResult]:
    """Read the live objects and run every check (the decisions are the pure functions above)."""
    from kubernetes import client
    from kubernetes.client.exceptions import ApiException

    timeout = 10
    core = client.CoreV1Api(api)
    results: list[CheckResult] = []

    try:
        raw = client.VersionApi(api).get_code(_preload_content=False, _request_timeout=timeout)
        version = json.loads(raw.data)
    except Exception as err:  # any failure here means the API server is unusable
        results.append(
            CheckResult(
                "kubernetes",
                False,
                f"API server {api.configuration.host} unreachable: {_api_error(err)}",
                "check the kubeconfig context (`kubectl cluster-info`), VPN and credentials",
            )
        )
        if kfp_host:
            results.append(check_kfp_direct(kfp_host, http_get))
        return results
    results.append(
        check_server_version(
            str(version.get("gitVersion")), str(version.get("major")), str(version.get("minor"))
        )
    )

    def forbidden(name: str, what: str, err: Exception) -> CheckResult:
        return CheckResult(
            name,
            False,
            f"cannot read {what}: {_api_error(err)}",
            "run the doctor with an identity that may read it (nodes are cluster-scoped: a cluster admin)",
        )

    def read(name: str, what: str, fn: Callable[[], Any]) -> tuple[Any, CheckResult | None]:
        try:
            return fn(), None
        except ApiException as err:
            if err.status == 404:
                return None, None
            return None, forbidden(name, what, err)
        except Exception as err:
            return None, forbidden(name, what, err)

    nodes, failure = read("gpu-pool", "nodes", lambda: core.list_node(_request_timeout=timeout).items)
    results.append(failure or check_gpu_pool(nodes or [], placement))

    secret, failure = read(
        "s3-secret",
        f"secret {namespace}/{s3_secret}",
        lambda: core.read_namespaced_secret(s3_secret, namespace, _request_timeout=timeout),
    )
    results.append(failure or check_s3_secret(secret, namespace, s3_secret))

    service, failure = read(
        "mlflow-service",
        f"service {namespace}/{mlflow_service}",
        lambda: core.read_namespaced_service(mlflow_service, namespace, _request_timeout=timeout),
    )
    if failure is None and service is not None:
        slices, failure = read(
            "mlflow-service",
            f"endpointslices of {namespace}/{mlflow_service}",
            lambda: (
                client.DiscoveryV1Api(api)
                .list_namespaced_endpoint_slice(
                    namespace,
                    label_selector=f"kubernetes.io/service-name={mlflow_service}",
                    _request_timeout=timeout,
                )
                .items
            ),
        )
    else:
        slices = []
    results.append(failure or check_mlflow_service(service, slices or [], namespace, mlflow_service))

    configmap, failure = read(
        "pipeline-config",
        f"configmap {namespace}/{PIPELINE_CONFIGMAP}",
        lambda: core.read_namespaced_config_map(PIPELINE_CONFIGMAP, namespace, _request_timeout=timeout),
    )
    results.append(failure or check_pipeline_config(configmap.data or {} if configmap else None, namespace))

    account, failure = read(
        "pipeline-serviceaccount",
        f"serviceaccount {namespace}/{PIPELINE_SERVICE_ACCOUNT}",
        lambda: core.read_namespaced_service_account(
            PIPELINE_SERVICE_ACCOUNT, namespace, _request_timeout=timeout
        ),
    )
    results.append(failure or check_service_account(account is not None, namespace))

    if kfp_host:
        results.append(check_kfp_direct(kfp_host, http_get))
    else:
        where = f"service {kfp_namespace}/{KFP_SERVICE}:{KFP_SERVICE_PORT} (via the API server proxy)"
        try:
            # call_api directly: connect_get_namespaced_service_proxy_with_path would percent-encode
            # the ':' and '/' of the proxied path.
            response = api.call_api(
                f"/api/v1/namespaces/{kfp_namespace}/services/{KFP_SERVICE}:{KFP_SERVICE_PORT}/proxy{KFP_HEALTH_PATH}",
                "GET",
                auth_settings=["BearerToken"],
                _return_http_data_only=True,
                _preload_content=False,
                _request_timeout=timeout,
            )
            results.append(check_kfp_health(where, response.status, response.data.decode("utf-8", "replace")))
        except ApiException as err:
            body = err.body.decode("utf-8", "replace") if isinstance(err.body, bytes) else str(err.body or "")
            results.append(check_kfp_health(where, err.status, body))
        except Exception as err:
            results.append(check_kfp_health(where, None, error=_api_error(err)))
    return results


def check_kfp_direct(host: str, http_get: Callable[..., Any] | None) -> CheckResult:
    if http_get is None:
        import requests

        http_get = requests.get
    url = host.rstrip("/") + KFP_HEALTH_PATH
    try:
        response = http_get(url, timeout=5)
    except Exception as err:
        text = str(err)
        reason = (
            "connection refused"
            if "refused" in text.lower()
            else "timed out"
            if "timed out" in text.lower()
            else text[:160]
        )
        return check_kfp_health(url, None, error=f"cannot connect ({type(err).__name__}: {reason})")
    return check_kfp_health(url, response.status_code, response.text)
