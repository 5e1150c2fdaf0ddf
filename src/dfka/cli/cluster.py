"""``dfka cluster doctor``: check a Kubernetes cluster against what the dfka pipeline needs;
``dfka cluster check-secrets``: check an overlay's secret env files before ``kubectl apply -k``."""

from __future__ import annotations

import argparse

from dfka.errors import ConfigError
from dfka.ops.cluster import (
    CheckResult,
    check_kfp_direct,
    load_api_client,
    placement_from_options,
    run_doctor,
    supported_range_text,
)
from dfka.ops.placement import DEFAULT_GPU_PLACEMENT
from dfka.settings import MLFLOW_SERVICE, S3_SECRET


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("cluster", help="Kubernetes cluster checks", description=__doc__)
    sub = parser.add_subparsers(dest="cluster_command", required=True, metavar="COMMAND")
    selector = ",".join(f"{k}={v}" for k, v in DEFAULT_GPU_PLACEMENT.node_selector.items())
    tolerations = ", ".join(
        f"{t.key}{'=' + t.value if t.value else ''}:{t.effect}" for t in DEFAULT_GPU_PLACEMENT.tolerations
    )
    doctor = sub.add_parser(
        "doctor",
        help="check GPU pool, S3 secret, MLflow service and KFP API",
        description=(
            "Checks, one line each: the API server version (validated range "
            f"{supported_range_text()}); a GPU node pool that matches the pipeline's GPU placement "
            f"(labels {selector}, taint for toleration {tolerations}, allocatable "
            f"{DEFAULT_GPU_PLACEMENT.accelerator_type}); the S3 secret, the MLflow service (with Ready "
            "pods), the dfka ConfigMap and ServiceAccount in the namespace; and that the KFP API answers. "
            "Exit status 1 if any check fails."
        ),
    )
    doctor.add_argument(
        "-n",
        "--namespace",
        default="kubeflow",
        help="where pipelines run and MLflow lives (default: kubeflow)",
    )
    doctor.add_argument(
        "--kubeconfig", help="kubeconfig file (default: $KUBECONFIG, ~/.kube/config, or in-cluster)"
    )
    doctor.add_argument("--context", help="kubeconfig context (default: the current context)")
    doctor.add_argument(
        "--kfp-host",
        help="KFP API base URL, e.g. http://127.0.0.1:8888 (default: service ml-pipeline in "
        "--kfp-namespace, through the API server proxy)",
    )
    doctor.add_argument(
        "--kfp-namespace", default="kubeflow", help="namespace of the KFP API server (default: kubeflow)"
    )
    doctor.add_argument(
        "--mlflow-service", default=MLFLOW_SERVICE, help=f"MLflow Service name (default: {MLFLOW_SERVICE})"
    )
    doctor.add_argument(
        "--s3-secret", default=S3_SECRET, help=f"S3 credentials secret (default: {S3_SECRET})"
    )
    doctor.add_argument(
        "--node-selector",
        action="append",
        metavar="KEY=VALUE",
        help=f"GPU pool label; repeat for several; replaces the default {selector}",
    )
    doctor.add_argument(
        "--toleration",
        action="append",
        metavar="KEY[=VALUE]:EFFECT",
        help=f"toleration of the GPU stages; repeat for several; replaces the default {tolerations}; "
        "':EFFECT' tolerates every key with that effect, '*' every taint (Kubernetes' key-less Exists)",
    )
    doctor.add_argument("--no-tolerations", action="store_true", help="the GPU pool is not tainted")
    doctor.add_argument(
        "--gpus",
        type=int,
        default=None,
        help=f"GPUs one stage requests (default: {DEFAULT_GPU_PLACEMENT.accelerator_count})",
    )
    doctor.set_defaults(func=_doctor)
    secrets = sub.add_parser(
        "check-secrets",
        help="check an overlay's secret env files before kubectl apply -k",
        description=(
            "One line per secretGenerator file of the overlay and the folders it includes: the file "
            "exists (kustomize's own error names neither the template nor the README step), has every "
            "key of its .env.example template, and no value is still CHANGE_ME. Values are never "
            "printed. Exit status 1 if any check fails. Needs no cluster."
        ),
    )
    secrets.add_argument("overlay", nargs="+", help="overlay folder(s), e.g. k8s/overlays/standalone")
    secrets.set_defaults(func=_check_secrets)


def _check_secrets(args: argparse.Namespace) -> int:
    from pathlib import Path

    from dfka.ops.kustomize_secrets import check_overlay_secrets

    results = [r for overlay in args.overlay for r in check_overlay_secrets(Path(overlay))]
    return _print(list(dict.fromkeys(results)))  # overlays share base/: each file once


def _print(results: list[CheckResult]) -> int:
    for result in results:
        print(result.line())
    failed = sum(not r.ok for r in results)
    print(f"{len(results)} checks, {failed} failed")
    return 1 if failed else 0


def _doctor(args: argparse.Namespace) -> int:
    placement = placement_from_options(args.node_selector, args.toleration, args.no_tolerations, args.gpus)
    try:
        api = load_api_client(args.kubeconfig, args.context)
    except ConfigError as err:
        results = [CheckResult("kubeconfig", False, err.problem, err.fix)]
        if args.kfp_host:
            results.append(check_kfp_direct(args.kfp_host, None))
    else:
        with api:
            results = run_doctor(
                api,
                args.namespace,
                placement=placement,
                mlflow_service=args.mlflow_service,
                s3_secret=args.s3_secret,
                kfp_host=args.kfp_host,
                kfp_namespace=args.kfp_namespace,
            )
    return _print(results)
