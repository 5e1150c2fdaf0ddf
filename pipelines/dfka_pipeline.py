"""The dfka pipeline: data-free knowledge amalgamation in six stages, top to bottom.

    ingest teachers -> train amalgamating GAN -> export synthetic samples
                    -> train dual-generator blocks -> regroup TargetNet -> evaluate

``dfka_pipeline`` is the pipeline with the default settings; ``build(settings)`` makes one with the
placement, images, retries and root of an experiment config's ``pipeline:`` section. Compile with
``dfka pipeline compile`` (the committed ``pipelines/dfka_pipeline.yaml`` must match it).

On a cluster every stage gets the object-store credentials from the Secret ``mlpipeline-minio-artifact``
and the MLflow URIs, S3 endpoint and bucket from the ConfigMap ``dfka-pipeline-config`` (both as env
vars, never values in this file), and the KFP run id from its pod label ``pipeline/runid``. The GPU
stages (1, 2, 3) request accelerators on the GPU pool and retry after a preemption; the CPU-only stages
(ingestion, export, evaluation) have no GPU toleration, so they stay off the tainted GPU nodes.
"""

from typing import Any

from kfp import dsl, kubernetes
from kfp.dsl import PipelineTask
from kfp.dsl.graph_component import GraphComponent

from components import (
    evaluate,
    export_synthetic_samples,
    ingest_teachers,
    regroup_target_net,
    train_amalgamating_gan,
    train_dual_generator_blocks,
)
from dfka.amalgamation.config import AmalgamationConfig
from dfka.pipeline_config import DEMO_TEACHERS, PipelineSettings
from dfka.settings import (
    CHECKPOINT_EVERY_ENV,
    PIPELINE_CONFIG_KEYS,
    PIPELINE_CONFIG_OPTIONAL_KEYS,
    RUN_ID_ENV,
    S3_SECRET_TO_ENV,
)

#: The pod label that carries the KFP run id (read through the downward API).
RUN_ID_FIELD = "metadata.labels['pipeline/runid']"
DEFAULT_SAMPLES = AmalgamationConfig().export.samples


def build(settings: PipelineSettings | None = None) -> GraphComponent:
    """The pipeline, with the compile-time settings of an experiment config (defaults if ``None``)."""
    s = settings or PipelineSettings()

    @dsl.pipeline(
        name=s.name,
        description="Data-free knowledge amalgamation (Group-Stack Dual-GAN): teachers in, TargetNet out.",
        # None unless a config sets one: no defaultPipelineRoot in the YAML, so the KFP driver takes
        # the kfp-launcher defaultPipelineRoot of the run's namespace (k8s/README.md, "Pipeline root").
        pipeline_root=s.pipeline_root,
    )
    def dfka_pipeline(
        teachers: list[str] = list(DEMO_TEACHERS),  # noqa: B006
        target_labels: str = "",
        amalgamation: dict = {},  # noqa: B006  # a KFP parameter default, never mutated
        seed: int = 0,
        samples: int = DEFAULT_SAMPLES,
        evaluation_dataset: str = "",
        experiment: str = "dfka",
        mlflow_tracking_uri: str = "",
        bucket: str = "",
    ):
        run = {"experiment": experiment, "mlflow_tracking_uri": mlflow_tracking_uri, "bucket": bucket}
        six_stages(
            s,
            teachers=teachers,
            target_labels=target_labels,
            amalgamation=amalgamation,
            seed=seed,
            samples=samples,
            evaluation_dataset=evaluation_dataset,
            run=run,
        )

    return dfka_pipeline


def six_stages(
    s: PipelineSettings,
    *,
    teachers: Any,
    target_labels: Any,
    amalgamation: Any,
    seed: Any,
    samples: Any,
    evaluation_dataset: Any,
    run: dict[str, Any],
    variant: Any = None,
    after: PipelineTask | None = None,
) -> PipelineTask:
    """The six stages of one amalgamation, in order; returns the evaluate task. The inputs are pipeline
    parameters or loop items (``pipelines/dfka_sweep.py``); ``run`` holds the recording parameters;
    ingestion waits for ``after``."""
    if variant is not None:  # a sweep's loop item; a single run leaves the components' default ("")
        run = {**run, "variant": variant}
    ingest = cpu_stage(
        s,
        ingest_teachers(
            teachers=teachers,
            target_labels=target_labels,
            amalgamation=amalgamation,
            seed=seed,
            samples=samples,
            evaluation_dataset=evaluation_dataset,
            **run,
        ),
    )
    if after is not None:
        ingest.after(after)
    teacher_set = ingest.outputs["teacher_set"]

    gan = gpu_stage(s, train_amalgamating_gan(teacher_set=teacher_set, **run))

    export = cpu_stage(s, export_synthetic_samples(teacher_set=teacher_set, gan=gan.outputs["gan"], **run))
    synthetic = export.outputs["samples"]

    blocks = gpu_stage(s, train_dual_generator_blocks(teacher_set=teacher_set, samples=synthetic, **run))

    regroup = gpu_stage(
        s,
        regroup_target_net(teacher_set=teacher_set, samples=synthetic, dual=blocks.outputs["dual"], **run),
    )

    return cpu_stage(
        s,
        evaluate(
            teacher_set=teacher_set,
            target_net=regroup.outputs["target_net"],
            samples=synthetic,
            evaluation_dataset=evaluation_dataset,
            **run,
        ),
        data_free=False,
    )


def environment(s: PipelineSettings, task: PipelineTask, data_free: bool) -> PipelineTask:
    """Credentials from the Secret, endpoints from the ConfigMap, the run id from the pod label."""
    kubernetes.use_secret_as_env(task, secret_name=s.s3_secret, secret_key_to_env=dict(S3_SECRET_TO_ENV))
    kubernetes.use_config_map_as_env(
        task, config_map_name=s.config_map, config_map_key_to_env={k: k for k in PIPELINE_CONFIG_KEYS}
    )
    # optional keys: a ConfigMap applied before a key existed must not stop the pod from starting
    kubernetes.use_config_map_as_env(
        task,
        config_map_name=s.config_map,
        config_map_key_to_env={k: k for k in PIPELINE_CONFIG_OPTIONAL_KEYS},
        optional=True,
    )
    kubernetes.use_field_path_as_env(task, env_name=RUN_ID_ENV, field_path=RUN_ID_FIELD)
    if data_free:
        task.set_env_variable("DFKA_DATA_FREE", task.name)
    task.set_caching_options(s.caching)
    return task


def cpu_stage(s: PipelineSettings, task: PipelineTask, data_free: bool = True) -> PipelineTask:
    """A CPU-only stage: plain requests, the CPU image, no GPU toleration or node selector."""
    task.set_container_image(s.cpu_image)
    task.set_cpu_request(s.cpu.cpu_request).set_cpu_limit(s.cpu.cpu_limit)
    task.set_memory_request(s.cpu.memory_request).set_memory_limit(s.cpu.memory_limit)
    return environment(s, task, data_free)


def gpu_stage(s: PipelineSettings, task: PipelineTask) -> PipelineTask:
    """A training stage: the GPU pool's placement (dfka.ops.placement) and retries for preempted nodes."""
    gpu = s.gpu
    task.set_container_image(s.image)
    if gpu.accelerator_count > 0:
        task.set_accelerator_type(gpu.accelerator_type).set_accelerator_limit(gpu.accelerator_count)
    task.set_cpu_request(gpu.cpu_request).set_cpu_limit(gpu.cpu_limit)
    task.set_memory_request(gpu.memory_request).set_memory_limit(gpu.memory_limit)
    for key, value in gpu.node_selector.items():
        kubernetes.add_node_selector(task, label_key=key, label_value=value)
    for tol in gpu.tolerations:  # an empty key or effect is Kubernetes' wildcard: leave the field out
        kubernetes.add_toleration(
            task,
            key=tol.key or None,
            operator=tol.operator,
            value=tol.value,
            effect=tol.effect or None,
        )
    # a retried attempt resumes from the stage's last checkpoint (s3://<bucket>/runs/<run-id>/<stage>/checkpoints)
    task.set_env_variable(CHECKPOINT_EVERY_ENV, str(s.checkpoint_every))
    r = s.retries
    if r.num_retries > 0:
        task.set_retry(
            num_retries=r.num_retries,
            backoff_duration=r.backoff_duration,
            backoff_factor=r.backoff_factor,
            backoff_max_duration=r.backoff_max_duration,
        )
    return environment(s, task, data_free=True)


dfka_pipeline = build()
