"""One batch of synthetic samples: what the generator made and what every teacher said about it."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from dfka.engine import distributed as dist


@dataclass
class SampleBatch:
    z: torch.Tensor
    image: torch.Tensor
    features: dict[int, torch.Tensor]  # teacher level -> generated feature
    logits: dict[str, torch.Tensor]  # teacher name -> logits on the image
    index: torch.Tensor | None = None  # positions in the sample bank, when drawn from one

    def __len__(self) -> int:
        return self.image.shape[0]

    def to(self, device: torch.device, dtype: torch.dtype = torch.float32) -> SampleBatch:
        return SampleBatch(
            self.z.to(device, dtype),
            self.image.to(device, dtype),
            {k: v.to(device, dtype) for k, v in self.features.items()},
            {k: v.to(device, torch.float32) for k, v in self.logits.items()},
            self.index,
        )

    def gathered(self) -> SampleBatch:
        """The whole global batch on every rank (detached; this batch itself with one process)."""
        if dist.world().size == 1:
            return self
        index = None if self.index is None else dist.gather(self.index)
        return SampleBatch(
            dist.gather(self.z.detach()),
            dist.gather(self.image.detach()),
            {k: dist.gather(v.detach()) for k, v in self.features.items()},
            {k: dist.gather(v.detach()) for k, v in self.logits.items()},
            index,
        )

    def detached(self) -> SampleBatch:
        return SampleBatch(
            self.z.detach(),
            self.image.detach(),
            {k: v.detach() for k, v in self.features.items()},
            {k: v.detach() for k, v in self.logits.items()},
            self.index,
        )
