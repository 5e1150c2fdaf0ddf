"""Where pipeline stages run on a cluster: the GPU node-pool convention shared by the pipeline and k8s/.

The defaults here are the single source of truth. ``pipelines/dfka_pipeline.py`` applies them to the
training stages, the k8s overlays label and taint GPU pools to match, and ``dfka cluster doctor`` checks
a live cluster against them. Pure data: no kfp, no kubernetes imports.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, model_validator

#: Node label that marks a GPU pool. Cloud-native labels work too: pass them as the node selector.
GPU_POOL_LABEL_KEY = "dfka.io/node-pool"
GPU_POOL_LABEL_VALUE = "gpu"
#: The extended resource that the NVIDIA device plugin advertises.
GPU_RESOURCE = "nvidia.com/gpu"


class Toleration(BaseModel):
    """A pod toleration, as Kubernetes reads it: an empty ``key`` (operator Exists only) matches every
    taint key, an empty ``effect`` every effect; a key-less, effect-less Exists tolerates everything."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    key: str = ""
    operator: str = Field(default="Exists", pattern="^(Exists|Equal)$")
    value: str | None = None
    effect: str = Field(default="NoSchedule", pattern="^(|NoSchedule|PreferNoSchedule|NoExecute)$")

    @model_validator(mode="after")
    def _keyless_is_exists(self) -> Toleration:
        if not self.key and self.operator != "Exists":
            raise ValueError("a toleration without a key must use operator Exists (it matches every key)")
        return self


class GpuPlacement(BaseModel):
    """Kubernetes placement of a GPU training stage."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    accelerator_type: str = GPU_RESOURCE
    accelerator_count: int = Field(default=1, ge=0)
    node_selector: dict[str, str] = Field(default_factory=lambda: {GPU_POOL_LABEL_KEY: GPU_POOL_LABEL_VALUE})
    tolerations: tuple[Toleration, ...] = (
        Toleration(key=GPU_RESOURCE, operator="Exists", effect="NoSchedule"),
    )
    cpu_request: str = "4"
    cpu_limit: str = "8"
    memory_request: str = "16G"
    memory_limit: str = "32G"


class CpuPlacement(BaseModel):
    """Placement of a CPU-only stage (ingestion, export, evaluation): plain requests, no GPU pool."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    cpu_request: str = "1"
    cpu_limit: str = "2"
    memory_request: str = "2G"
    memory_limit: str = "8G"


DEFAULT_GPU_PLACEMENT = GpuPlacement()
DEFAULT_CPU_PLACEMENT = CpuPlacement()
