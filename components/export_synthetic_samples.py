from kfp import dsl
from kfp.dsl import Artifact, Dataset, Input, Metrics, Model, Output

from dfka.pipeline_config import STAGE_CPU_IMAGE


@dsl.component(base_image=STAGE_CPU_IMAGE, install_kfp_package=False)
def export_synthetic_samples(
    teacher_set: Input[Artifact],
    gan: Input[Model],
    experiment: str,
    mlflow_tracking_uri: str,
    bucket: str,
    samples: Output[Dataset],
    metrics: Output[Metrics],
    variant: str = "",  # the sweep variant (pipelines/dfka_sweep.py); "" in a single run
):
    """Sharded, checksummed synthetic samples in the object store (``samples`` records where)."""
    from dfka.stages import export_synthetic_samples as stage
    from dfka.stages.component_io import component_context, describe, write_metrics

    ctx = component_context(experiment, mlflow_tracking_uri, bucket, samples.path, variant)
    result = stage(teacher_set.path, gan.path, samples.path, context=ctx)
    describe(
        samples, result, samples_uri=result["outputs"]["samples"], count=result["metrics"]["samples.count"]
    )
    write_metrics(metrics, result["metrics"])
