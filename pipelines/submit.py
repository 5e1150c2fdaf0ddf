"""Submit the compiled pipeline to a KFP API: ``python -m pipelines.submit --host URL [--experiment E]``.

It loads ``pipelines/dfka_pipeline.yaml`` (or ``--package``), checks the run parameters against the
pipeline's inputs, and creates a run with ``kfp.Client.create_run_from_pipeline_package``. Parameters
come from ``--config`` (an experiment config's values) and/or ``--param key=value`` (JSON values
allowed: ``teachers='["s3://a","s3://b"]'``). ``--dry-run`` prints the request body instead.

Tested against a loopback stand-in of the KFP v2beta1 REST API only, never a real KFP server.
"""

import argparse
import json
import os
import socket
import sys
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import yaml

from dfka.errors import ConfigError, DfkaError
from dfka.pipeline_config import ExperimentConfig
from dfka.settings import KFP_TOKEN_ENV, network_timeout, redact

DEFAULT_PACKAGE = Path(__file__).with_name("dfka_pipeline.yaml")
_KINDS = {
    "STRING": str,
    "NUMBER_INTEGER": int,
    "NUMBER_DOUBLE": float,
    "BOOLEAN": bool,
    "LIST": list,
    "STRUCT": dict,
}


def load_package(package: Path) -> dict[str, Any]:
    """The compiled YAML: the pipeline spec, and the kubernetes platform spec when present."""
    if not package.is_file():
        raise ConfigError(f"pipeline package {package} not found", "run `dfka pipeline compile` first")
    docs = [d for d in yaml.safe_load_all(package.read_text()) if d]
    spec = docs[0]
    if "root" not in spec or "deploymentSpec" not in spec:
        raise ConfigError(
            f"{package} is not a compiled KFP pipeline", "compile it with `dfka pipeline compile`"
        )
    platform = docs[1] if len(docs) > 1 else None
    return {"pipeline_spec": spec, "platform_spec": platform}


def is_sweep(package: Path) -> bool:
    """A sweep package (``pipelines/dfka_sweep.yaml``) takes ``variants``, not one run's parameters."""
    spec = load_package(package)["pipeline_spec"]
    return "variants" in spec["root"].get("inputDefinitions", {}).get("parameters", {})


def check_parameters(spec: dict[str, Any], params: dict[str, Any]) -> dict[str, Any]:
    """Reject unknown names and values of the wrong type (ints may be given for doubles)."""
    inputs = spec["root"].get("inputDefinitions", {}).get("parameters", {})
    unknown = sorted(set(params) - set(inputs))
    if unknown:
        raise ConfigError(f"unknown pipeline parameter(s) {unknown}", f"valid: {', '.join(sorted(inputs))}")
    for name, value in params.items():
        kind = inputs[name]["parameterType"]
        want = _KINDS.get(kind)
        ok = want is None or isinstance(value, want) or (want is float and isinstance(value, int))
        if want is int and isinstance(value, bool):
            ok = False
        if not ok:
            raise ConfigError(f"parameter {name} must be {kind}, got {type(value).__name__} {value!r}")
    return params


def run_request(
    package: Path,
    *,
    params: dict[str, Any],
    experiment_id: str,
    run_name: str,
    pipeline_root: str | None = None,
    service_account: str | None = None,
) -> dict[str, Any]:
    """The body of ``POST /apis/v2beta1/runs`` that a submission sends (what ``--dry-run`` prints)."""
    loaded = load_package(package)
    spec = loaded["pipeline_spec"]
    body: dict[str, Any] = {
        "display_name": run_name,
        "experiment_id": experiment_id,
        "pipeline_spec": {k: v for k, v in loaded.items() if v is not None},
        "runtime_config": {"parameters": check_parameters(spec, params)},
    }
    # What the KFP UI sends too (frontend NewRunV2.tsx): no root means the KFP driver falls back to
    # the namespace's kfp-launcher defaultPipelineRoot (backend/src/v2/driver, RootDAG).
    root = pipeline_root or spec.get("defaultPipelineRoot")
    if root:
        body["runtime_config"]["pipeline_root"] = root
    if service_account:
        body["service_account"] = service_account
    return body


def submit(
    host: str,
    package: Path,
    *,
    params: dict[str, Any],
    experiment: str,
    run_name: str,
    namespace: str | None = None,
    pipeline_root: str | None = None,
    service_account: str | None = None,
    token: str | None = None,
) -> dict[str, str]:
    import kfp

    check_parameters(load_package(package)["pipeline_spec"], params)
    limit = network_timeout()
    reachable(host, limit)
    previous = socket.getdefaulttimeout()
    socket.setdefaulttimeout(limit)  # kfp's API client sets no timeout of its own
    try:
        client = kfp.Client(host=host, namespace=namespace or "kubeflow", existing_token=token)
        result = client.create_run_from_pipeline_package(
            str(package),
            arguments=params,
            run_name=run_name,
            experiment_name=experiment,
            namespace=namespace,
            pipeline_root=pipeline_root,
            service_account=service_account,
        )
    except Exception as err:  # urllib3 MaxRetryError, kfp_server_api ApiException, timeouts, ...
        if isinstance(err, DfkaError):
            raise
        first = redact(str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__)
        raise DfkaError(
            f"the KFP API at {host} refused or failed the run request ({type(err).__name__}: {first[:300]})",
            "check --host, --namespace and --token (an authenticated endpoint needs one); "
            "`dfka cluster doctor` checks the cluster",
        ) from None
    finally:
        socket.setdefaulttimeout(previous)
    return {"run_id": result.run_id, "url": f"{host.rstrip('/')}/#/runs/details/{result.run_id}"}


def reachable(host: str, timeout: float) -> None:
    """Fail in ``timeout`` seconds, naming ``host``, when the KFP API does not answer at all."""
    url = f"{host.rstrip('/')}/apis/v2beta1/healthz"
    try:
        urllib.request.urlopen(url, timeout=timeout).close()
    except urllib.error.HTTPError:
        return  # it answers (auth or routing may still refuse the run: reported with its own message)
    except (OSError, ValueError) as err:
        reason = getattr(err, "reason", err)
        raise DfkaError(
            f"the KFP API at {host} does not answer ({type(err).__name__}: {reason}; waited up to {timeout:g} s)",
            "check --host (e.g. `kubectl -n kubeflow port-forward svc/ml-pipeline-ui 8888:80`, then "
            "--host http://127.0.0.1:8888); DFKA_NETWORK_TIMEOUT sets the wait",
        ) from None


def parse_params(items: list[str]) -> dict[str, Any]:
    from kfp.cli.utils.parsing import parse_parameter_value  # the same rules as `kfp run create k=v`

    params = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"bad --param {item!r}", "write --param key=value")
        params[key] = parse_parameter_value(value)
    return params


def main(argv: list | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipelines.submit", description=__doc__.splitlines()[0])
    parser.add_argument("--host", required=True, help="KFP API endpoint, e.g. http://127.0.0.1:8888")
    parser.add_argument("--experiment", default="dfka", help="KFP experiment (default %(default)s)")
    parser.add_argument("--run-name", help="default: dfka-<experiment config name or 'run'>")
    parser.add_argument("--package", default=str(DEFAULT_PACKAGE), help="compiled YAML (default %(default)s)")
    parser.add_argument("--config", help="take the run parameters from this experiment config")
    parser.add_argument("--param", action="append", default=[], metavar="KEY=VALUE", help="a run parameter")
    parser.add_argument("--namespace", help="KFP namespace (multi-user: your profile namespace)")
    parser.add_argument(
        "--pipeline-root",
        help="override the root for this run; default: the package's defaultPipelineRoot if it has one, "
        "else the kfp-launcher defaultPipelineRoot of the run's namespace",
    )
    parser.add_argument("--service-account", help="e.g. dfka-pipeline-runner (k8s/base/pipeline-rbac.yaml)")
    parser.add_argument("--token", help="bearer token for an authenticated KFP endpoint (or DFKA_KFP_TOKEN)")
    parser.add_argument("--dry-run", action="store_true", help="print the run request instead of sending it")
    args = parser.parse_args(argv)
    try:
        params: dict[str, Any] = {}
        package = Path(args.package)
        if args.config:
            cfg = ExperimentConfig.load(args.config)
            params.update(cfg.sweep_arguments() if is_sweep(package) else cfg.pipeline_arguments())
        params.update(parse_params(args.param))
        run_name = args.run_name or f"dfka-{Path(args.config).stem if args.config else 'run'}"
        if args.dry_run:
            body = run_request(
                package,
                params=params,
                experiment_id=f"<id of KFP experiment {args.experiment}>",
                run_name=run_name,
                pipeline_root=args.pipeline_root,
                service_account=args.service_account,
            )
            body["pipeline_spec"] = (
                f"<{package}: {len(body['pipeline_spec']['pipeline_spec']['root']['dag']['tasks'])} tasks>"
            )
            print(json.dumps(body, indent=2))
            return 0
        out = submit(
            args.host,
            package,
            params=params,
            experiment=args.experiment,
            run_name=run_name,
            namespace=args.namespace,
            pipeline_root=args.pipeline_root,
            service_account=args.service_account,
            token=args.token or os.environ.get(KFP_TOKEN_ENV) or None,
        )
    except DfkaError as err:
        print(redact(f"error: {err}"), file=sys.stderr)
        return 2
    print(f"submitted run {out['run_id']}: {out['url']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
