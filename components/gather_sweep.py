from typing import List

from kfp import dsl
from kfp.dsl import HTML, Artifact, Dataset, Input, Markdown, Metrics, Output

from dfka.pipeline_config import STAGE_CPU_IMAGE


@dsl.component(base_image=STAGE_CPU_IMAGE, install_kfp_package=False)
def gather_sweep(
    variants: List[dict],
    results: Input[List[Artifact]],
    experiment: str,
    mlflow_tracking_uri: str,
    bucket: str,
    comparison: Output[Artifact],
    table: Output[Markdown],
    plot: Output[HTML],
    table_csv: Output[Dataset],
    metrics: Output[Metrics],
):
    """One comparison of the variants: table, CSV, score against wall-clock; closes the sweep's run."""
    from dfka.stages.component_io import component_context, describe, write_metrics, write_text
    from dfka.stages.sweep import gather_sweep as stage

    ctx = component_context(experiment, mlflow_tracking_uri, bucket, comparison.path)
    result = stage(variants, [r.path for r in results], comparison.path, context=ctx)
    describe(comparison, result, variants=len(result["rows"]))
    write_metrics(metrics, result["metrics"])
    write_text(table, result["markdown"])
    write_text(plot, result["html"])
    write_text(table_csv, result["csv"])
