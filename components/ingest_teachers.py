from typing import List

from kfp import dsl
from kfp.dsl import Artifact, Markdown, Metrics, Output

from dfka.pipeline_config import STAGE_CPU_IMAGE


@dsl.component(base_image=STAGE_CPU_IMAGE, install_kfp_package=False)
def ingest_teachers(
    teachers: List[str],
    target_labels: str,
    amalgamation: dict,
    seed: int,
    samples: int,
    evaluation_dataset: str,
    experiment: str,
    mlflow_tracking_uri: str,
    bucket: str,
    teacher_set: Output[Artifact],
    report: Output[Markdown],
    metrics: Output[Metrics],
    variant: str = "",  # the sweep variant (pipelines/dfka_sweep.py); "" in a single run
):
    """Verify the teacher bundles, resolve Y_cst, validate the config; write the teacher set."""
    from dfka.stages import ingest_teachers as stage
    from dfka.stages.component_io import component_context, describe, write_metrics, write_text

    ctx = component_context(experiment, mlflow_tracking_uri, bucket, teacher_set.path, variant)
    result = stage(
        teachers,
        teacher_set.path,
        target_labels=target_labels,
        amalgamation=amalgamation,
        seed=int(seed),
        samples=int(samples),
        evaluation_dataset=evaluation_dataset or None,
        context=ctx,
    )
    describe(teacher_set, result, target_labels=result["target_labels"], config_hash=result["config_hash"])
    write_text(report, result["report_markdown"])
    write_metrics(metrics, result["metrics"])
