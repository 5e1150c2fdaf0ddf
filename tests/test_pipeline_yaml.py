"""The compiled pipeline: committed YAML in sync with the code, placement, secrets, retries, submission.

No cluster here: the YAML is checked as data, and ``dfka pipeline submit`` runs against a loopback
stand-in of the KFP v2beta1 REST API that records what the real ``kfp.Client`` sends (never a real KFP).
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, ClassVar

import pytest
import yaml

from dfka.errors import ConfigError
from dfka.ops.placement import DEFAULT_CPU_PLACEMENT, DEFAULT_GPU_PLACEMENT, Toleration
from dfka.pipeline_config import (
    CPU_STAGES,
    DEMO_TEACHERS,
    GPU_STAGES,
    STAGE_CPU_IMAGE,
    STAGE_IMAGE,
    STAGES,
    ExperimentConfig,
)
from dfka.settings import (
    PIPELINE_CONFIG_KEYS,
    PIPELINE_CONFIG_OPTIONAL_KEYS,
    PIPELINE_CONFIGMAP,
    S3_SECRET,
    S3_SECRET_TO_ENV,
)

ROOT = Path(__file__).resolve().parents[1]
COMMITTED = ROOT / "pipelines" / "dfka_pipeline.yaml"
FAKE_SECRETS = {
    "AWS_ACCESS_KEY_ID": "AKIA-dfka-test-access-7f3a",
    "AWS_SECRET_ACCESS_KEY": "dfka-test-secret-value-9c1e2b",
    "MLFLOW_TRACKING_PASSWORD": "dfka-test-mlflow-password-41d",
    "MLFLOW_TRACKING_TOKEN": "dfka-test-mlflow-token-8e0",
}


def compile_to(path: Path, config: ExperimentConfig | None = None) -> Path:
    from pipelines.compile import compile_pipeline

    return compile_pipeline(path, config)


def load(path: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    spec, platform = yaml.safe_load_all(path.read_text())
    return spec, platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"]


@pytest.fixture(scope="module")
def compiled(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Compiled with credentials in the environment, which must not leak into the YAML."""
    with pytest.MonkeyPatch.context() as mp:
        for key, value in FAKE_SECRETS.items():
            mp.setenv(key, value)
        return compile_to(tmp_path_factory.mktemp("compiled") / "dfka_pipeline.yaml")


def executor_of(spec: dict[str, Any], task: str) -> str:
    ref = spec["root"]["dag"]["tasks"][task]["componentRef"]["name"]
    return spec["components"][ref]["executorLabel"]


def test_committed_yaml_matches_the_code(compiled: Path) -> None:
    assert COMMITTED.is_file(), "run `dfka pipeline compile` and commit pipelines/dfka_pipeline.yaml"
    assert compiled.read_text() == COMMITTED.read_text(), (
        "pipelines/dfka_pipeline.yaml is out of date: run `dfka pipeline compile` and commit the result"
    )


def test_no_credential_values_anywhere(compiled: Path) -> None:
    text = compiled.read_text()
    for value in FAKE_SECRETS.values():
        assert value not in text
    spec, _executors = load(compiled)
    # credentials reach the pods only as secret references
    assert "accesskey:" not in text and "secretkey:" not in text.replace("secretKey: secretkey", "")
    for env in (c["container"].get("env", []) for c in spec["deploymentSpec"]["executors"].values()):
        assert not {e["name"] for e in env} & set(FAKE_SECRETS)


def test_stages_in_order_with_their_artifacts(compiled: Path) -> None:
    spec, _ = load(compiled)
    tasks = spec["root"]["dag"]["tasks"]
    assert list(STAGES) == sorted(tasks, key=STAGES.index) and set(tasks) == set(STAGES)
    after = {name: set(t.get("dependentTasks", [])) for name, t in tasks.items()}
    assert after["ingest-teachers"] == set()
    assert after["train-amalgamating-gan"] == {"ingest-teachers"}
    assert after["export-synthetic-samples"] == {"ingest-teachers", "train-amalgamating-gan"}
    assert after["train-dual-generator-blocks"] == {"ingest-teachers", "export-synthetic-samples"}
    assert after["regroup-target-net"] == {
        "ingest-teachers",
        "export-synthetic-samples",
        "train-dual-generator-blocks",
    }
    assert after["evaluate"] == {"ingest-teachers", "export-synthetic-samples", "regroup-target-net"}
    outputs = spec["components"]["comp-evaluate"]["outputDefinitions"]["artifacts"]
    kinds = {name: o["artifactType"]["schemaTitle"] for name, o in outputs.items()}
    assert kinds == {
        "results": "system.Artifact",
        "metrics": "system.Metrics",
        "confusion": "system.ClassificationMetrics",
        "table": "system.Markdown",
        "report": "system.HTML",
    }
    params = spec["root"]["inputDefinitions"]["parameters"]
    assert params["teachers"]["defaultValue"] == list(DEMO_TEACHERS)
    assert {"target_labels", "amalgamation", "seed", "samples", "experiment", "mlflow_tracking_uri"} <= set(
        params
    )
    # no root compiled in: each run takes its namespace's kfp-launcher root (tests/test_k8s.py)
    assert "defaultPipelineRoot" not in spec


def test_gpu_placement_and_retries_on_training_stages_only(compiled: Path) -> None:
    spec, platform = load(compiled)
    tasks = spec["root"]["dag"]["tasks"]
    gpu = DEFAULT_GPU_PLACEMENT
    expected_tolerations = [
        {k: v for k, v in t.model_dump().items() if v is not None} for t in gpu.tolerations
    ]
    for stage in GPU_STAGES:
        ex = executor_of(spec, stage)
        container = spec["deploymentSpec"]["executors"][ex]["container"]
        res = container["resources"]
        assert res["accelerator"]["resourceType"] == gpu.accelerator_type
        assert res["accelerator"]["resourceCount"] == str(gpu.accelerator_count)
        assert (
            res["resourceCpuRequest"] == gpu.cpu_request
            and res["resourceMemoryRequest"] == gpu.memory_request
        )
        assert res["resourceCpuLimit"] == gpu.cpu_limit and res["resourceMemoryLimit"] == gpu.memory_limit
        assert container["image"] == STAGE_IMAGE
        assert platform[ex]["nodeSelector"]["labels"] == gpu.node_selector  # == dfka.ops.placement == k8s/
        assert platform[ex]["tolerations"] == expected_tolerations
        retry = tasks[stage]["retryPolicy"]
        assert retry["maxRetryCount"] == 3 and retry["backoffDuration"] == "60s"
    for stage in CPU_STAGES:
        ex = executor_of(spec, stage)
        container = spec["deploymentSpec"]["executors"][ex]["container"]
        res = container["resources"]
        assert "accelerator" not in res
        assert res["resourceCpuRequest"] == DEFAULT_CPU_PLACEMENT.cpu_request
        assert res["resourceMemoryLimit"] == DEFAULT_CPU_PLACEMENT.memory_limit
        assert container["image"] == STAGE_CPU_IMAGE
        assert "nodeSelector" not in platform[ex] and "tolerations" not in platform[ex]
        assert "retryPolicy" not in tasks[stage]


def test_every_stage_gets_secret_config_map_and_run_id(compiled: Path) -> None:
    spec, platform = load(compiled)
    for stage in STAGES:
        ex = executor_of(spec, stage)
        (secret,) = platform[ex]["secretAsEnv"]
        assert secret["secretName"] == S3_SECRET
        assert {k["secretKey"]: k["envVar"] for k in secret["keyToEnv"]} == S3_SECRET_TO_ENV
        required, optional = platform[ex]["configMapAsEnv"]
        assert required["configMapName"] == optional["configMapName"] == PIPELINE_CONFIGMAP
        assert {k["configMapKey"] for k in required["keyToEnv"]} == set(PIPELINE_CONFIG_KEYS)
        assert required["optional"] is False
        # an older ConfigMap without these keys must not keep the pod from starting
        assert {k["configMapKey"] for k in optional["keyToEnv"]} == set(PIPELINE_CONFIG_OPTIONAL_KEYS)
        assert optional["optional"] is True
        assert platform[ex]["fieldPathAsEnv"] == [
            {"fieldPath": "metadata.labels['pipeline/runid']", "name": "DFKA_KFP_RUN_ID"}
        ]
        container = spec["deploymentSpec"]["executors"][ex]["container"]
        env = {e["name"]: e["value"] for e in container.get("env", [])}
        assert ("DFKA_DATA_FREE" in env) == (stage != "evaluate")  # only evaluation may read real images
        command = " ".join(container["command"])
        assert "pip install" not in command  # install_kfp_package=False: kfp is in the image
        assert spec["root"]["dag"]["tasks"][stage]["cachingOptions"] == {}  # caching off by default


def test_config_overrides_placement_and_parameter_defaults(tmp_path: Path) -> None:
    cfg = ExperimentConfig.load(ROOT / "configs" / "cluster-example.yaml")
    spec, platform = load(compile_to(tmp_path / "x.yaml", cfg))
    ex = executor_of(spec, "train-amalgamating-gan")
    assert platform[ex]["nodeSelector"]["labels"] == {"cloud.google.com/gke-nodepool": "gpu-pool"}
    params = spec["root"]["inputDefinitions"]["parameters"]
    assert params["experiment"]["defaultValue"] == "dfka-mnist"
    # a root set in a config is still compiled in (a deliberate per-cluster YAML)
    assert spec["defaultPipelineRoot"] == cfg.pipeline.pipeline_root
    assert params["target_labels"]["defaultValue"] == "digit_0..digit_9"
    assert params["amalgamation"]["defaultValue"]["gan"]["budget"]["steps"] == 4000


def test_wildcard_tolerations_compile_as_kubernetes_reads_them(tmp_path: Path) -> None:
    """A key-less Exists (every taint) and an effect-less one leave those fields out of the pod spec,
    which is how Kubernetes spells its wildcards."""
    cfg = ExperimentConfig.load(ROOT / "configs" / "cluster-example.yaml")
    cfg.pipeline.gpu = cfg.pipeline.gpu.model_copy(
        update={
            "tolerations": (
                Toleration(key="", operator="Exists", effect=""),
                Toleration(key="nvidia.com/gpu", operator="Exists", effect=""),
            )
        }
    )
    spec, platform = load(compile_to(tmp_path / "x.yaml", cfg))
    tolerations = platform[executor_of(spec, "train-amalgamating-gan")]["tolerations"]
    assert tolerations == [{"operator": "Exists"}, {"key": "nvidia.com/gpu", "operator": "Exists"}]


def test_dfka_never_imports_kfp() -> None:
    code = (
        "import sys, dfka, dfka.cli, dfka.stages, dfka.pipeline_config, dfka.ops.pipeline_runner, "
        "dfka.stages.component_io; dfka.cli.build_parser(); "
        "assert not [m for m in sys.modules if m == 'kfp' or m.startswith('kfp.')], 'dfka imported kfp'"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)


def test_cli_compile_reproduces_the_committed_yaml(tmp_path: Path) -> None:
    out = tmp_path / "p.yaml"
    subprocess.run(
        [sys.executable, "-m", "dfka.cli", "pipeline", "compile", "--out", str(out)], check=True, cwd=tmp_path
    )
    assert out.read_text() == COMMITTED.read_text()


# ---------------------------------------------------------------- submission


_CREATED = "2026-01-01T00:00:00Z"  # the kfp CLI prints it


class _FakeKfp(BaseHTTPRequestHandler):
    """Just enough of /apis/v2beta1 for kfp.Client.create_run_from_pipeline_package; records requests."""

    records: ClassVar[list[tuple[str, str, Any]]] = []

    def _send(self, body: dict[str, Any]) -> None:
        data = json.dumps(body).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _body(self) -> Any:
        length = int(self.headers.get("Content-Length") or 0)
        return json.loads(self.rfile.read(length) or b"null")

    def do_GET(self) -> None:
        self.records.append(("GET", self.path, None))
        if self.path.startswith("/apis/v2beta1/healthz"):
            self._send({"commit_sha": "test", "tag_name": "2.17.0", "multi_user": False})
        elif self.path.startswith("/apis/v2beta1/experiments"):
            self._send({"experiments": [], "total_size": 0})
        elif self.path.startswith("/apis/v2beta1/runs/"):
            self._send(
                {"run_id": "run-123", "display_name": "dfka-test", "state": "PENDING", "created_at": _CREATED}
            )
        else:
            self._send({})

    def do_POST(self) -> None:
        body = self._body()
        self.records.append(("POST", self.path, body))
        if self.path.startswith("/apis/v2beta1/experiments"):
            self._send(
                {"experiment_id": "exp-1", "display_name": body.get("display_name"), "created_at": _CREATED}
            )
        elif self.path.startswith("/apis/v2beta1/runs"):
            self._send(
                {
                    "run_id": "run-123",
                    "display_name": body.get("display_name"),
                    "experiment_id": "exp-1",
                    "created_at": _CREATED,
                }
            )
        else:
            self._send({})

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture
def fake_kfp():
    _FakeKfp.records = []
    server = ThreadingHTTPServer(("127.0.0.1", 0), _FakeKfp)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}", _FakeKfp.records
    server.shutdown()
    server.server_close()


def test_submit_sends_the_committed_spec(fake_kfp) -> None:
    from pipelines.submit import submit

    host, records = fake_kfp
    params = {
        "target_labels": "digit_0..digit_9",
        "seed": 3,
        "experiment": "dfka-ci",
        "amalgamation": {"budget_minutes": 2},
    }
    out = submit(
        host,
        COMMITTED,
        params=params,
        experiment="dfka-ci",
        run_name="ci-run",
        service_account="dfka-pipeline-runner",
    )
    assert out["run_id"] == "run-123"
    (run,) = [
        body for method, path, body in records if method == "POST" and path.startswith("/apis/v2beta1/runs")
    ]
    spec, platform = yaml.safe_load_all(COMMITTED.read_text())
    assert run["display_name"] == "ci-run" and run["experiment_id"] == "exp-1"
    assert run["pipeline_spec"]["pipeline_spec"] == spec
    assert run["pipeline_spec"]["platform_spec"] == platform
    assert run["runtime_config"]["parameters"] == params
    assert "pipeline_root" not in run["runtime_config"]  # the namespace's kfp-launcher decides
    assert run["service_account"] == "dfka-pipeline-runner"
    assert ("POST", "/apis/v2beta1/experiments") in [(m, p) for m, p, _ in records]


def test_submit_checks_parameters_before_sending(fake_kfp) -> None:
    from pipelines.submit import run_request, submit

    host, records = fake_kfp
    with pytest.raises(ConfigError, match="unknown pipeline parameter"):
        submit(host, COMMITTED, params={"sede": 1}, experiment="e", run_name="r")
    with pytest.raises(ConfigError, match="seed must be NUMBER_INTEGER"):
        submit(host, COMMITTED, params={"seed": "one"}, experiment="e", run_name="r")
    assert records == []  # nothing was sent
    body = run_request(
        COMMITTED,
        params={"seed": 1},
        experiment_id="e",
        run_name="r",
        pipeline_root="minio://dfka/pipeline-root",
    )
    assert body["runtime_config"] == {
        "parameters": {"seed": 1},
        "pipeline_root": "minio://dfka/pipeline-root",
    }
    no_root = run_request(COMMITTED, params={}, experiment_id="e", run_name="r")
    assert no_root["runtime_config"] == {"parameters": {}}


def test_kfp_cli_run_create_sends_no_pipeline_root(fake_kfp) -> None:
    """`kfp run create -f pipelines/dfka_pipeline.yaml` (the real kfp CLI) sends the spec without a
    runtime pipeline_root, so the KFP driver uses the namespace's kfp-launcher defaultPipelineRoot;
    tests/test_k8s.py resolves that against each overlay."""
    host, records = fake_kfp
    kfp_cli = Path(sys.executable).parent / "kfp"
    proc = subprocess.run(
        [str(kfp_cli), "--endpoint", host, "run", "create", "-e", "dfka-ci", "-r", "ci-run",
         "-f", str(COMMITTED), "seed=1"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    (run,) = [body for method, path, body in records if method == "POST" and path == "/apis/v2beta1/runs"]
    assert run["runtime_config"]["parameters"] == {"seed": 1}
    assert not run["runtime_config"].get("pipeline_root")
    assert "defaultPipelineRoot" not in run["pipeline_spec"]["pipeline_spec"]


def test_submit_dry_run_from_the_cli(tmp_path: Path) -> None:
    proc = subprocess.run(
        [
            sys.executable, "-m", "dfka.cli", "pipeline", "submit", "--host", "http://127.0.0.1:9",
            "--config", str(ROOT / "configs" / "demo.yaml"), "--param", "seed=7", "--dry-run",
        ],
        check=True, capture_output=True, text=True, cwd=tmp_path,
    )  # fmt: skip
    body = json.loads(proc.stdout)
    assert body["runtime_config"]["parameters"]["seed"] == 7
    assert body["runtime_config"]["parameters"]["experiment"] == "dfka-demo"
    assert "6 tasks" in body["pipeline_spec"]
