from kfp import dsl
from kfp.dsl import Artifact, Dataset, Input, Metrics, Model, Output

from dfka.pipeline_config import STAGE_IMAGE


@dsl.component(base_image=STAGE_IMAGE, install_kfp_package=False)
def train_dual_generator_blocks(
    teacher_set: Input[Artifact],
    samples: Input[Dataset],
    experiment: str,
    mlflow_tracking_uri: str,
    bucket: str,
    dual: Output[Model],
    metrics: Output[Metrics],
    variant: str = "",  # the sweep variant (pipelines/dfka_sweep.py); "" in a single run
):
    """Stage 2: the student, block by block, on the exported samples."""
    from dfka.stages import train_dual_generator_blocks as stage
    from dfka.stages.component_io import component_context, describe, write_metrics

    ctx = component_context(experiment, mlflow_tracking_uri, bucket, dual.path, variant)
    result = stage(teacher_set.path, samples.path, dual.path, context=ctx)
    describe(dual, result)
    write_metrics(metrics, result["metrics"])
