"""Ops tooling around the library: the local SeaweedFS + MLflow stack (:mod:`~dfka.ops.stack`), one
runner per run id (:mod:`~dfka.ops.run_lock`), the local pipeline runner's process plumbing
(:mod:`~dfka.ops.pipeline_runner`), GPU placement defaults (:mod:`~dfka.ops.placement`) and the cluster
checks (:mod:`~dfka.ops.cluster`: ``dfka cluster doctor``; :mod:`~dfka.ops.kustomize_secrets`:
``dfka cluster check-secrets``). The method and the engine never import it.
"""
