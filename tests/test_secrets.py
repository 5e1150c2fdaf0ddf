"""Secrets and exposure (issue #7, part 6).

Where each requirement is tested:

* no credential in the compiled YAML: ``tests/test_pipeline_yaml.py::test_no_credential_values_anywhere``
  (fake values) and, with the live stack's values, the whole-run scan below;
* no credential in the logs, MLflow params/tags, stage results or kfp.local outputs of a whole local
  run: ``tests/test_pipeline_e2e.py`` calls :func:`assert_run_leaks_no_credentials` after its run;
* no credential in error messages: ``tests/test_storage.py::test_wrong_secret_is_clear_and_not_leaked``,
  ``tests/test_reliability.py`` (the store-down error), :func:`test_params_and_errors_are_redacted`;
* the local stack binds to 127.0.0.1 and writes its generated secrets 0600:
  ``tests/test_stack.py::test_services_listen_on_loopback_only`` and ``::test_secret_files_are_private``;
* MLflow runs with allowed hosts: :func:`test_mlflow_refuses_a_foreign_host_header` (the live server)
  and ``tests/test_k8s.py::test_namespace_wiring`` (the cluster Deployment's ``--allowed-hosts``).
"""

from __future__ import annotations

import urllib.error
import urllib.request
from collections.abc import Iterable, Mapping
from pathlib import Path

import pytest

from dfka import storage
from dfka.errors import StorageError
from dfka.settings import redact
from dfka.tracking import clean_params

TEXT_SUFFIXES = (".json", ".jsonl", ".md", ".html", ".txt", ".yaml", ".yml", ".log", "")


def leaks(texts: Mapping[str, str], secrets: Iterable[str]) -> list[str]:
    """Names of the texts that contain any of ``secrets`` (the values themselves are never printed)."""
    values = [s for s in secrets if s]
    assert values, "no credential values to look for"
    return sorted(name for name, text in texts.items() if any(v in text for v in values))


def local_texts(root: Path) -> dict[str, str]:
    """Every text-like file under ``root`` (binary files are read too, as latin-1: a secret is ASCII)."""
    return {
        str(p): p.read_bytes().decode("latin-1")
        for p in root.rglob("*")
        if p.is_file() and "stack" not in p.relative_to(root).parts  # the stack's own credential files
    }


def store_texts(prefix: str) -> dict[str, str]:
    return {
        f"{prefix}/{rel}": storage.get_bytes(storage.join(prefix, rel)).decode("latin-1")
        for rel in storage.listdir(prefix)
        if Path(rel).suffix in TEXT_SUFFIXES
    }


def mlflow_texts(tracking_uri: str, experiment: str) -> dict[str, str]:
    """Params, tags and metric names of every run of the experiment, as text."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri)
    exp = client.get_experiment_by_name(experiment)
    assert exp is not None
    texts = {}
    for run in client.search_runs([exp.experiment_id], max_results=1000):
        data = run.data
        texts[f"mlflow:{run.info.run_name}"] = repr((data.params, data.tags, sorted(data.metrics)))
    assert texts, "the experiment has no runs"
    return texts


def assert_run_leaks_no_credentials(
    secrets: Iterable[str],
    *,
    outputs: Mapping[str, str],
    folders: Iterable[Path],
    prefixes: Iterable[str] = (),
    compiled_yaml: Path | None = None,
    tracking_uri: str | None = None,
    experiment: str | None = None,
) -> int:
    """Scan everything a run produced; return how many texts were scanned."""
    texts = dict(outputs)
    for folder in folders:
        texts.update(local_texts(folder))
    for prefix in prefixes:
        texts.update(store_texts(prefix))
    if compiled_yaml is not None:
        texts[str(compiled_yaml)] = compiled_yaml.read_text()
    if tracking_uri and experiment:
        texts.update(mlflow_texts(tracking_uri, experiment))
    leaked = leaks(texts, list(secrets))
    assert not leaked, f"credential values found in: {leaked}"
    return len(texts)


def test_leak_scanner_finds_what_it_looks_for(tmp_path: Path) -> None:
    (tmp_path / "a.log").write_text("put s3://b/k with key AKIA-123456 failed")
    (tmp_path / "b.bin").write_bytes(b"\x00\x01secret-xyz\xff")
    (tmp_path / "ok.txt").write_text("nothing here")
    assert leaks(local_texts(tmp_path), ["AKIA-123456", "secret-xyz"]) == [
        str(tmp_path / "a.log"),
        str(tmp_path / "b.bin"),
    ]


def test_params_and_errors_are_redacted(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "dfka-access-1234")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "dfka-secret-value-5678")
    params = clean_params({"endpoint": "x", "s3": {"key": "dfka-access-1234", "secret_key": "anything"}})
    assert params == {"endpoint": "x", "s3.key": "***", "s3.secret_key": "***"}
    assert redact("auth dfka-secret-value-5678 for dfka-access-1234") == "auth *** for ***"
    # an endpoint that refuses connections: the error names the endpoint, never the credentials
    monkeypatch.setenv("DFKA_S3_ENDPOINT", "http://127.0.0.1:9")
    monkeypatch.setattr(storage, "retry_policy", storage.RetryPolicy(retries=0))
    with pytest.raises(StorageError) as info:
        storage.get_bytes("s3://dfka/anything")
    text = str(info.value)
    assert "http://127.0.0.1:9" in text and "dfka stack status" in text
    assert "dfka-access-1234" not in text and "dfka-secret-value-5678" not in text


def _status(url: str, host: str) -> int:
    request = urllib.request.Request(url, headers={"Host": host})
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status
    except urllib.error.HTTPError as err:
        return err.code


@pytest.mark.integration
def test_mlflow_refuses_a_foreign_host_header(stack) -> None:
    """The stack's MLflow runs with --allowed-hosts: a DNS-rebinding style Host header gets 403."""
    api = f"{stack.mlflow_uri}/api/2.0/mlflow/experiments/search?max_results=1"
    port = stack.mlflow_uri.rsplit(":", 1)[1]
    assert _status(api, f"127.0.0.1:{port}") == 200
    assert _status(api, f"localhost:{port}") == 200
    assert _status(api, f"attacker.example:{port}") == 403
    assert _status(api, "mlflow.mlflow.svc:5000") == 403  # not on the local stack's list


@pytest.mark.integration
def test_stack_credentials_are_generated(stack) -> None:
    """Generated per home (never a well-known default like minioadmin), long, and kept out of reprs."""
    assert stack.access_key.startswith("dfka-") and len(stack.secret_key) >= 32
    assert "minioadmin" not in (stack.access_key, stack.secret_key)
    assert stack.secret_key not in repr(stack)
