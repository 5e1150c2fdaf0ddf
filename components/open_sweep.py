from typing import List

from kfp import dsl

from dfka.pipeline_config import STAGE_CPU_IMAGE


@dsl.component(base_image=STAGE_CPU_IMAGE, install_kfp_package=False)
def open_sweep(
    variants: List[dict],
    experiment: str,
    mlflow_tracking_uri: str,
    bucket: str,
) -> str:
    """Check the variants and open the sweep's MLflow parent run; returns its id ("" offline)."""
    from dfka.stages.component_io import component_context
    from dfka.stages.sweep import open_sweep as stage

    ctx = component_context(experiment, mlflow_tracking_uri, bucket, "")
    return stage(variants, context=ctx)["mlflow_run_id"] or ""
