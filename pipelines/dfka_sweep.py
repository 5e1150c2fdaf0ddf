"""The sweep pipeline: many variants of one experiment as one run, compared at the end.

    open sweep -> for each variant (ParallelFor, `parallelism` at a time):
                      the six stages of pipelines/dfka_pipeline.py
               -> gather: one table, CSV and plot (score against wall-clock); the sweep's MLflow run

``variants`` is a list of dicts, one per variant, made from an experiment config's ``sweep:`` section by
``dfka pipeline sweep --config X --print-variants`` (seeds × method-config overrides × teacher sets;
``ExperimentConfig.sweep_variants``). Each variant runs as ``<run id>-<variant>``: its own S3 prefix and
MLflow parent run, nested under the sweep's. ``parallelism`` is a compile-time setting (the config's
``sweep.parallelism``); kfp.local runs at most 2 iterations at a time whatever it says.
"""

from kfp import dsl
from kfp.dsl.graph_component import GraphComponent

from components import gather_sweep, open_sweep
from dfka.pipeline_config import PipelineSettings, SweepSettings
from pipelines.dfka_pipeline import cpu_stage, six_stages


def build_sweep(
    settings: PipelineSettings | None = None, sweep: SweepSettings | None = None
) -> GraphComponent:
    """The sweep pipeline with an experiment config's pipeline settings and ``sweep.parallelism``."""
    s = settings or PipelineSettings()
    parallelism = (sweep or SweepSettings()).parallelism

    @dsl.pipeline(
        name=f"{s.name}-sweep",
        description="dfka sweep: the six stages for each variant (seeds × configs × teacher sets), "
        "then one comparison table and plot.",
        pipeline_root=s.pipeline_root,
    )
    def dfka_sweep(
        variants: list[dict] = [],  # noqa: B006  # a KFP parameter default, never mutated
        experiment: str = "dfka",
        mlflow_tracking_uri: str = "",
        bucket: str = "",
    ):
        run = {"experiment": experiment, "mlflow_tracking_uri": mlflow_tracking_uri, "bucket": bucket}

        opened = cpu_stage(s, open_sweep(variants=variants, **run))

        with dsl.ParallelFor(variants, parallelism=parallelism) as v:
            # `v.variant`, not `v.name`: a loop item's `name` is its own channel name
            evaluation = six_stages(
                s,
                teachers=v.teachers,
                target_labels=v.target_labels,
                amalgamation=v.amalgamation,
                seed=v.seed,
                samples=v.samples,
                evaluation_dataset=v.evaluation_dataset,
                run=run,
                variant=v.variant,
                after=opened,  # the variants' MLflow runs nest under the sweep's, which must exist
            )

        cpu_stage(
            s,
            gather_sweep(variants=variants, results=dsl.Collected(evaluation.outputs["results"]), **run),
            data_free=False,
        )

    return dfka_sweep


dfka_sweep = build_sweep()
