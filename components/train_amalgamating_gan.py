from kfp import dsl
from kfp.dsl import Artifact, Input, Metrics, Model, Output

from dfka.pipeline_config import STAGE_IMAGE


@dsl.component(base_image=STAGE_IMAGE, install_kfp_package=False)
def train_amalgamating_gan(
    teacher_set: Input[Artifact],
    experiment: str,
    mlflow_tracking_uri: str,
    bucket: str,
    gan: Output[Model],
    metrics: Output[Metrics],
    variant: str = "",  # the sweep variant (pipelines/dfka_sweep.py); "" in a single run
):
    """Stage 1: the group-stack generator against the frozen teachers."""
    from dfka.stages import train_amalgamating_gan as stage
    from dfka.stages.component_io import component_context, describe, write_metrics

    ctx = component_context(experiment, mlflow_tracking_uri, bucket, gan.path, variant)
    result = stage(teacher_set.path, gan.path, context=ctx)
    describe(gan, result)
    write_metrics(metrics, result["metrics"])
