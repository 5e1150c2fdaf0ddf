from kfp import dsl
from kfp.dsl import HTML, Artifact, ClassificationMetrics, Dataset, Input, Markdown, Metrics, Model, Output

from dfka.pipeline_config import STAGE_CPU_IMAGE


@dsl.component(base_image=STAGE_CPU_IMAGE, install_kfp_package=False)
def evaluate(
    teacher_set: Input[Artifact],
    target_net: Input[Model],
    samples: Input[Dataset],
    evaluation_dataset: str,
    experiment: str,
    mlflow_tracking_uri: str,
    bucket: str,
    results: Output[Artifact],
    metrics: Output[Metrics],
    confusion: Output[ClassificationMetrics],
    table: Output[Markdown],
    report: Output[HTML],
    variant: str = "",  # the sweep variant (pipelines/dfka_sweep.py); "" in a single run
):
    """The real test split: results table, per-label scores, confusion matrix, sample grids."""
    from dfka.stages import evaluate as stage
    from dfka.stages.component_io import component_context, describe, write_metrics, write_text

    ctx = component_context(experiment, mlflow_tracking_uri, bucket, results.path, variant)
    result = stage(
        teacher_set.path,
        target_net.path,
        samples.path,
        results.path,
        dataset=evaluation_dataset or None,
        context=ctx,
    )
    registered = result["registered_model"] or {}
    describe(
        results,
        result,
        verdict=result["verdict"],
        registered_model=registered.get("name", ""),
        registered_version=registered.get("version") or "",
        **result["links"],
    )
    write_metrics(metrics, result["metrics"])
    if result["confusion"] is not None:
        confusion.log_confusion_matrix(result["confusion"]["labels"], result["confusion"]["matrix"])
    write_text(table, result["markdown"])
    write_text(report, result["html"])
