"""``dfka cluster doctor``: decisions on constructed kubernetes model objects, then the CLI end to end
against a loopback stand-in of the Kubernetes API (no cluster needed)."""

from __future__ import annotations

import base64
import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import urlsplit

import pytest
from kubernetes.client import (
    ApiClient,
    DiscoveryV1EndpointPort,
    V1ConfigMap,
    V1Endpoint,
    V1EndpointConditions,
    V1EndpointSlice,
    V1Node,
    V1NodeCondition,
    V1NodeList,
    V1NodeSpec,
    V1NodeStatus,
    V1ObjectMeta,
    V1Secret,
    V1Service,
    V1ServiceAccount,
    V1ServicePort,
    V1ServiceSpec,
    V1Taint,
)

from dfka.cli import main
from dfka.errors import ConfigError
from dfka.ops.cluster import (
    CheckResult,
    check_gpu_pool,
    check_kfp_health,
    check_mlflow_service,
    check_pipeline_config,
    check_s3_secret,
    check_server_version,
    mlflow_tracking_uri,
    node_fit,
    parse_quantity_int,
    parse_toleration,
    placement_from_options,
    tolerates,
)
from dfka.ops.placement import (
    DEFAULT_GPU_PLACEMENT,
    GPU_POOL_LABEL_KEY,
    GPU_POOL_LABEL_VALUE,
    GPU_RESOURCE,
    Toleration,
)
from dfka.settings import MLFLOW_PORT, PIPELINE_CONFIGMAP, PIPELINE_SERVICE_ACCOUNT, S3_SECRET

POOL_LABELS = {GPU_POOL_LABEL_KEY: GPU_POOL_LABEL_VALUE, "kubernetes.io/os": "linux"}
GPU_TAINT = V1Taint(key=GPU_RESOURCE, value="present", effect="NoSchedule")


def make_node(
    name: str,
    labels: dict[str, str] | None = None,
    taints: list[V1Taint] | None = None,
    gpus: int | None = 1,
    ready: bool = True,
    cordoned: bool = False,
) -> V1Node:
    allocatable = {"cpu": "8", "memory": "32Gi"}
    if gpus is not None:
        allocatable[GPU_RESOURCE] = str(gpus)
    return V1Node(
        metadata=V1ObjectMeta(name=name, labels=labels or {}),
        spec=V1NodeSpec(taints=taints, unschedulable=cordoned or None),
        status=V1NodeStatus(
            allocatable=allocatable,
            conditions=[V1NodeCondition(type="Ready", status="True" if ready else "False")],
        ),
    )


def cpu_node(name: str = "cpu-1") -> V1Node:
    return make_node(name, {"kubernetes.io/os": "linux"}, gpus=None)


# ---------------------------------------------------------------------------------------------
# GPU pool decisions
# ---------------------------------------------------------------------------------------------


def test_matching_pool_passes() -> None:
    result = check_gpu_pool([cpu_node(), make_node("gpu-1", POOL_LABELS, [GPU_TAINT], gpus=2)])
    assert result.ok, result.line()
    assert "1 node(s)" in result.detail and f"2 {GPU_RESOURCE}" in result.detail
    assert result.line().startswith("ok ")


def test_missing_taint_fails_with_taint_command() -> None:
    result = check_gpu_pool([cpu_node(), make_node("gpu-1", POOL_LABELS, taints=None)])
    assert not result.ok
    assert "missing taint nvidia.com/gpu=present:NoSchedule" in result.detail
    assert "kubectl taint nodes gpu-1 nvidia.com/gpu=present:NoSchedule" in result.fix
    assert result.line().startswith("FAIL gpu-pool:") and "-> fix:" in result.line()


def test_no_allocatable_gpu_fails_with_device_plugin_fix() -> None:
    for gpus in (None, 0):
        result = check_gpu_pool([make_node("gpu-1", POOL_LABELS, [GPU_TAINT], gpus=gpus)])
        assert not result.ok
        assert f"0 {GPU_RESOURCE} allocatable" in result.detail
        assert "device plugin" in result.fix


def test_wrong_label_names_the_gpu_nodes_and_the_label_command() -> None:
    wrong = {"cloud.google.com/gke-accelerator": "nvidia-l4", GPU_POOL_LABEL_KEY: "gpu-a100"}
    result = check_gpu_pool([cpu_node(), make_node("gke-gpu-1", wrong, [GPU_TAINT])])
    assert not result.ok
    assert f"no node has {GPU_POOL_LABEL_KEY}={GPU_POOL_LABEL_VALUE}" in result.detail
    assert "gke-gpu-1" in result.detail
    assert f"kubectl label nodes gke-gpu-1 {GPU_POOL_LABEL_KEY}={GPU_POOL_LABEL_VALUE}" in result.fix
    assert "--node-selector" in result.fix


def test_wrong_label_but_cloud_native_selector_matches() -> None:
    node = make_node("gke-gpu-1", {"cloud.google.com/gke-accelerator": "nvidia-l4"}, [GPU_TAINT])
    placement = placement_from_options(["cloud.google.com/gke-accelerator=nvidia-l4"], None)
    assert placement.tolerations == DEFAULT_GPU_PLACEMENT.tolerations
    assert check_gpu_pool([node], placement).ok


def test_no_gpu_nodes_at_all() -> None:
    result = check_gpu_pool([cpu_node("a"), cpu_node("b")])
    assert not result.ok
    assert "no node has allocatable" in result.detail
    assert "k8s/examples/gpu-pools" in result.fix
    assert not check_gpu_pool([]).ok


def test_untolerated_extra_taint_fails() -> None:
    extra = V1Taint(key="sku", value="gpu", effect="NoSchedule")
    result = check_gpu_pool([make_node("gpu-1", POOL_LABELS, [GPU_TAINT, extra])])
    assert not result.ok
    assert "sku=gpu:NoSchedule not tolerated" in result.detail
    assert "--toleration" in result.fix
    # ... and passes once the placement tolerates it
    placement = placement_from_options(None, ["nvidia.com/gpu:NoSchedule", "sku=gpu:NoSchedule"])
    assert check_gpu_pool([make_node("gpu-1", POOL_LABELS, [GPU_TAINT, extra])], placement).ok


def test_soft_taint_is_ignored_and_untainted_pool_can_be_declared() -> None:
    soft = V1Taint(key="spot", value="true", effect="PreferNoSchedule")
    assert check_gpu_pool([make_node("gpu-1", POOL_LABELS, [GPU_TAINT, soft])]).ok
    untainted = make_node("gpu-1", POOL_LABELS, None)
    assert check_gpu_pool([untainted], placement_from_options(None, None, no_tolerations=True)).ok


def test_not_ready_or_cordoned_nodes_do_not_count() -> None:
    for node in (
        make_node("gpu-1", POOL_LABELS, [GPU_TAINT], ready=False),
        make_node("gpu-1", POOL_LABELS, [GPU_TAINT], cordoned=True),
    ):
        result = check_gpu_pool([node])
        assert not result.ok and "uncordon" in result.fix
    mixed = [
        make_node("gpu-1", POOL_LABELS, [GPU_TAINT], ready=False),
        make_node("gpu-2", POOL_LABELS, [GPU_TAINT]),
    ]
    assert check_gpu_pool(mixed).ok


def test_gpu_count_must_cover_the_request() -> None:
    node = make_node("gpu-1", POOL_LABELS, [GPU_TAINT], gpus=1)
    assert not check_gpu_pool([node], placement_from_options(None, None, gpus=2)).ok
    assert check_gpu_pool([node], placement_from_options(None, None, gpus=1)).ok


def test_toleration_semantics() -> None:
    exists = Toleration(key=GPU_RESOURCE, operator="Exists", effect="NoSchedule")
    equal = Toleration(key=GPU_RESOURCE, operator="Equal", value="present", effect="NoSchedule")
    assert tolerates(exists, GPU_TAINT) and tolerates(equal, GPU_TAINT)
    assert not tolerates(equal, V1Taint(key=GPU_RESOURCE, value="other", effect="NoSchedule"))
    assert not tolerates(exists, V1Taint(key=GPU_RESOURCE, value="present", effect="NoExecute"))
    assert not tolerates(exists, V1Taint(key="other", effect="NoSchedule"))
    fit = node_fit(make_node("n", POOL_LABELS, [GPU_TAINT]))
    assert fit.fits and fit.gpus == 1 and not fit.missing_taints
    # Kubernetes' wildcards: a key-less Exists matches every key, an empty effect every effect
    everything = Toleration(key="", operator="Exists", effect="")
    any_key = Toleration(key="", operator="Exists", effect="NoExecute")
    any_effect = Toleration(key=GPU_RESOURCE, operator="Exists", effect="")
    odd = V1Taint(key="team", value="ml", effect="NoExecute")
    assert tolerates(everything, GPU_TAINT) and tolerates(everything, odd)
    assert tolerates(any_key, odd) and not tolerates(any_key, GPU_TAINT)
    assert tolerates(any_effect, GPU_TAINT) and not tolerates(any_effect, odd)
    with pytest.raises(ValueError, match="operator Exists"):
        Toleration(key="", operator="Equal", value="x")
    wild = placement_from_options(None, ["*"])
    fit = node_fit(make_node("n", POOL_LABELS, [GPU_TAINT, odd]), wild)
    assert fit.fits and not fit.untolerated and not fit.missing_taints  # a wildcard reserves no pool


def test_gpu_quantities_are_read_as_kubernetes_quantities() -> None:
    assert [parse_quantity_int(v) for v in ("4", 4, "1k", "2Ki", "x", None)] == [4, 4, 1000, 2048, 0, 0]


def test_option_parsing() -> None:
    assert parse_toleration("nvidia.com/gpu:NoSchedule") == DEFAULT_GPU_PLACEMENT.tolerations[0]
    assert parse_toleration("sku=gpu:NoExecute") == Toleration(
        key="sku", operator="Equal", value="gpu", effect="NoExecute"
    )
    assert parse_toleration(":NoExecute") == Toleration(key="", operator="Exists", effect="NoExecute")
    assert parse_toleration("*") == Toleration(key="", operator="Exists", effect="")
    for bad in ("nvidia.com/gpu", "x:NoSchedul", "=gpu:NoSchedule", "*:"):
        with pytest.raises(ConfigError):
            parse_toleration(bad)
    with pytest.raises(ConfigError):
        placement_from_options(["no-equals-sign"], None)
    assert placement_from_options(None, None) is DEFAULT_GPU_PLACEMENT


# ---------------------------------------------------------------------------------------------
# Secret, Service, ConfigMap, versions, KFP
# ---------------------------------------------------------------------------------------------


def b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


def s3_secret(access: str = "dfka-admin", secret: str = "s3cr3t-value-0123") -> V1Secret:
    return V1Secret(
        metadata=V1ObjectMeta(name=S3_SECRET), data={"accesskey": b64(access), "secretkey": b64(secret)}
    )


def test_s3_secret_present_absent_incomplete_placeholder() -> None:
    assert check_s3_secret(s3_secret(), "kubeflow").ok
    absent = check_s3_secret(None, "kubeflow")
    assert not absent.ok and "kubeflow/mlpipeline-minio-artifact not found" in absent.detail
    assert "k8s/overlays/standalone" in absent.fix
    partial = V1Secret(metadata=V1ObjectMeta(name=S3_SECRET), data={"accesskey": b64("a")})
    assert "lacks key(s) secretkey" in check_s3_secret(partial, "kubeflow").detail
    placeholder = check_s3_secret(s3_secret(secret="CHANGE_ME"), "dfka")
    assert not placeholder.ok and "CHANGE_ME" in placeholder.detail
    assert not check_s3_secret(s3_secret(access=""), "dfka").ok


def mlflow_service(port: int = MLFLOW_PORT) -> V1Service:
    return V1Service(
        metadata=V1ObjectMeta(name="mlflow"),
        spec=V1ServiceSpec(ports=[V1ServicePort(name="http", port=port, target_port="http")]),
    )


def endpoint_slice(*ready: bool | None) -> V1EndpointSlice:
    return V1EndpointSlice(
        address_type="IPv4",
        endpoints=[
            V1Endpoint(addresses=[f"10.0.0.{i}"], conditions=V1EndpointConditions(ready=r))
            for i, r in enumerate(ready)
        ],
        ports=[DiscoveryV1EndpointPort(name="http", port=5000)],
    )


def test_mlflow_service_present_absent_not_ready() -> None:
    ok = check_mlflow_service(mlflow_service(), [endpoint_slice(True, False)], "kubeflow")
    assert ok.ok and "1 Ready endpoint(s)" in ok.detail
    assert check_mlflow_service(mlflow_service(), [endpoint_slice(None)], "kubeflow").ok  # unknown = ready
    absent = check_mlflow_service(None, [], "kubeflow")
    assert not absent.ok and "kubectl apply -k" in absent.fix
    not_ready = check_mlflow_service(mlflow_service(), [endpoint_slice(False)], "kubeflow")
    assert not not_ready.ok and "no Ready pod" in not_ready.detail and "describe pod" in not_ready.fix
    assert not check_mlflow_service(mlflow_service(), [], "kubeflow").ok
    assert not check_mlflow_service(mlflow_service(port=80), [endpoint_slice(True)], "kubeflow").ok


def pipeline_config(namespace: str) -> dict[str, str]:
    return {
        "MLFLOW_TRACKING_URI": mlflow_tracking_uri(namespace),
        "DFKA_S3_ENDPOINT": "http://minio-service.kubeflow.svc.cluster.local:9000",
        "DFKA_BUCKET": "dfka",
        "DFKA_PIPELINE_ROOT": "minio://dfka/pipeline-root",
    }


def test_pipeline_config() -> None:
    assert check_pipeline_config(pipeline_config("kubeflow"), "kubeflow").ok
    wrong = check_pipeline_config(pipeline_config("dfka"), "kubeflow")
    assert not wrong.ok and "namespace dfka" in wrong.detail
    assert not check_pipeline_config(None, "kubeflow").ok
    assert not check_pipeline_config({"MLFLOW_TRACKING_URI": "http://x"}, "kubeflow").ok


def test_server_version_range() -> None:
    assert check_server_version("v1.30.4-gke.1", "1", "30+").ok
    assert check_server_version("v1.37.0", "1", "37").ok
    old = check_server_version("v1.27.9", "1", "27")
    assert not old.ok and "1.28–1.37" in old.detail


def test_kfp_health() -> None:
    body = json.dumps({"commit_sha": "abc", "tag_name": "2.15.0", "multi_user": True})
    ok = check_kfp_health("http://kfp", 200, body)
    assert ok.ok and "KFP 2.15.0" in ok.detail and "multi-user" in ok.detail
    assert check_kfp_health("http://kfp", 200, "not json").ok
    assert not check_kfp_health("http://kfp", 503, "upstream connect error").ok
    refused = check_kfp_health("http://kfp", None, error="connection refused")
    assert not refused.ok and "--kfp-host" in refused.fix


def test_check_result_line() -> None:
    assert CheckResult("x", True, "fine", "unused").line() == "ok   x: fine"
    assert CheckResult("x", False, "broken", "do y").line() == "FAIL x: broken -> fix: do y"


# ---------------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------------


def test_cli_bad_kubeconfig_is_one_line_not_a_traceback(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    broken = tmp_path / "kubeconfig"
    broken.write_text("this: is: not: yaml: [")
    for path in (tmp_path / "missing", broken):
        assert main(["cluster", "doctor", "--kubeconfig", str(path)]) == 1
        out, err = capsys.readouterr()
        lines = out.strip().splitlines()
        assert lines[0].startswith("FAIL kubeconfig: cannot load the Kubernetes config"), out
        assert "Traceback" not in out + err
        assert lines[-1] == "1 checks, 1 failed"


class FakeKubeApi:
    """A loopback stand-in for the few Kubernetes API paths the doctor reads."""

    def __init__(self, namespace: str, objects: dict[str, object]):
        self.namespace = namespace
        self.objects = objects
        self.requests: list[str] = []
        serialize = ApiClient().sanitize_for_serialization
        ns = f"/api/v1/namespaces/{namespace}"
        self.routes = {
            "/version": {"major": "1", "minor": "31", "gitVersion": "v1.31.2"},
            "/api/v1/nodes": serialize(V1NodeList(items=objects.get("nodes", []))),
            f"{ns}/secrets/{S3_SECRET}": serialize(objects.get("secret")),
            f"{ns}/services/mlflow": serialize(objects.get("service")),
            f"/apis/discovery.k8s.io/v1/namespaces/{namespace}/endpointslices": {
                "apiVersion": "discovery.k8s.io/v1",
                "kind": "EndpointSliceList",
                "metadata": {},
                "items": serialize(objects.get("slices", [])),
            },
            f"{ns}/configmaps/{PIPELINE_CONFIGMAP}": serialize(objects.get("configmap")),
            f"{ns}/serviceaccounts/{PIPELINE_SERVICE_ACCOUNT}": serialize(objects.get("serviceaccount")),
            "/api/v1/namespaces/kubeflow/services/ml-pipeline:8888/proxy/apis/v2beta1/healthz": objects.get(
                "kfp"
            ),
        }
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                path = urlsplit(self.path).path.rstrip("/")
                fake.requests.append(self.path)
                body = fake.routes.get(path)
                status = 200 if body is not None else 404
                if body is None:
                    body = {
                        "kind": "Status",
                        "apiVersion": "v1",
                        "status": "Failure",
                        "reason": "NotFound",
                        "code": 404,
                    }
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.server.block_on_close = False
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"

    def kubeconfig(self, path: Path) -> Path:
        path.write_text(
            json.dumps(
                {
                    "apiVersion": "v1",
                    "kind": "Config",
                    "clusters": [{"name": "fake", "cluster": {"server": self.url}}],
                    "users": [{"name": "fake", "user": {"token": "not-a-real-token"}}],
                    "contexts": [{"name": "fake", "context": {"cluster": "fake", "user": "fake"}}],
                    "current-context": "fake",
                }
            )
        )
        return path


@pytest.fixture
def fake_api() -> Iterator[callable]:
    servers: list[FakeKubeApi] = []

    def start(namespace: str, **objects: object) -> FakeKubeApi:
        api = FakeKubeApi(namespace, objects)
        threading.Thread(target=api.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
        servers.append(api)
        return api

    yield start
    for api in servers:
        api.server.shutdown()
        api.server.server_close()


def healthy_objects(namespace: str) -> dict[str, object]:
    return {
        "nodes": [cpu_node(), make_node("gpu-1", POOL_LABELS, [GPU_TAINT])],
        "secret": s3_secret(),
        "service": mlflow_service(),
        "slices": [endpoint_slice(True)],
        "configmap": V1ConfigMap(
            metadata=V1ObjectMeta(name=PIPELINE_CONFIGMAP), data=pipeline_config(namespace)
        ),
        "serviceaccount": V1ServiceAccount(metadata=V1ObjectMeta(name=PIPELINE_SERVICE_ACCOUNT)),
        "kfp": {"commit_sha": "abc", "tag_name": "2.15.0", "multi_user": False},
    }


def test_cli_end_to_end_healthy_cluster(fake_api, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    api = fake_api("kubeflow", **healthy_objects("kubeflow"))
    kubeconfig = api.kubeconfig(tmp_path / "kubeconfig")
    assert main(["cluster", "doctor", "--kubeconfig", str(kubeconfig), "-n", "kubeflow"]) == 0
    out = capsys.readouterr().out
    names = [line.split()[1].rstrip(":") for line in out.strip().splitlines()[:-1]]
    assert names == [
        "kubernetes",
        "gpu-pool",
        "s3-secret",
        "mlflow-service",
        "pipeline-config",
        "pipeline-serviceaccount",
        "kfp-api",
    ], out
    assert all(line.startswith("ok ") for line in out.strip().splitlines()[:-1]), out
    assert "KFP 2.15.0" in out
    assert any("labelSelector=kubernetes.io%2Fservice-name%3Dmlflow" in r for r in api.requests), api.requests


def test_cli_end_to_end_broken_cluster(fake_api, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    objects = healthy_objects("dfka")
    objects.pop("secret")
    objects.pop("kfp")
    objects["nodes"] = [make_node("gpu-1", POOL_LABELS, None)]  # untainted pool
    api = fake_api("dfka", **objects)
    kubeconfig = api.kubeconfig(tmp_path / "kubeconfig")
    assert main(["cluster", "doctor", "--kubeconfig", str(kubeconfig), "-n", "dfka"]) == 1
    out = capsys.readouterr().out
    failed = {line.split()[1].rstrip(":") for line in out.splitlines() if line.startswith("FAIL")}
    assert failed == {"gpu-pool", "s3-secret", "kfp-api"}, out
    assert "kubectl taint nodes gpu-1 nvidia.com/gpu=present:NoSchedule" in out
    assert out.strip().splitlines()[-1] == "7 checks, 3 failed"
    # the same cluster with the pool declared untainted: the pool passes
    assert main(["cluster", "doctor", "--kubeconfig", str(kubeconfig), "-n", "dfka", "--no-tolerations"]) == 1
    assert "ok   gpu-pool" in capsys.readouterr().out
