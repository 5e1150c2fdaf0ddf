from kfp import dsl
from kfp.dsl import Artifact, Dataset, Input, Metrics, Model, Output

from dfka.pipeline_config import STAGE_IMAGE


@dsl.component(base_image=STAGE_IMAGE, install_kfp_package=False)
def regroup_target_net(
    teacher_set: Input[Artifact],
    samples: Input[Dataset],
    dual: Input[Model],
    experiment: str,
    mlflow_tracking_uri: str,
    bucket: str,
    target_net: Output[Model],
    metrics: Output[Metrics],
    variant: str = "",  # the sweep variant (pipelines/dfka_sweep.py); "" in a single run
):
    """Stage 3: the TargetNet (safetensors, TorchScript), logged in MLflow (evaluate registers it)."""
    from dfka.stages import regroup_target_net as stage
    from dfka.stages.component_io import component_context, describe, write_metrics

    ctx = component_context(experiment, mlflow_tracking_uri, bucket, target_net.path, variant)
    result = stage(teacher_set.path, samples.path, dual.path, target_net.path, context=ctx)
    logged = result["registered_model"] or {}
    describe(target_net, result, labels=result["labels"], mlflow_model=logged.get("model_uri", ""))
    write_metrics(metrics, result["metrics"])
