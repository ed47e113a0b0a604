"""What one diffusers call gets besides prompts and embeddings, laid out for it
(`CallInputs`), and what a row gets back (`GenerationResult`, each image's seed)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from PIL import Image

from core.errors import ErrorCode, ItemError
from pipeline.requests import GenerationRequest


@dataclass
class CallInputs:
    """What one diffusers call gets besides prompts and embeddings, already laid out for it:
    strengths, IP-Adapter masks (one entry per adapter, or None), their step windows, the
    control images as the pipeline takes them (one ControlNet: an image, or one per slot;
    several: one per net, or per slot a list with one per net), their (scale, start, end),
    init images and masks."""

    scales: list[Any]
    ip_masks: list[torch.Tensor | None]
    controls: Any
    control_scales: list[tuple[float, float, float]]
    init_images: list[Image.Image] | None
    masks: list[Image.Image] | None
    # each adapter's step window per slot (`pipeline.adapter_windows`); None: every step
    windows: list[list[tuple[float, float]]] | None = None
    slots: int | None = None  # a batched call: every per-slot list has one entry per slot

    def check(self) -> None:
        """diffusers silently tiles a short list (img2img: [A, B, A, B] for four images): a
        batched call's lists must have exactly one entry per slot."""
        if self.slots is None:
            return
        lists = {
            "init images": self.init_images,
            "masks": self.masks,
            "control images": self.controls if self.controls is not None else None,
        }
        for name, values in lists.items():
            if values is not None and len(values) != self.slots:
                raise ItemError(ErrorCode.INTERNAL, f"{len(values)} {name} for {self.slots} slots")


def controls_of(request: GenerationRequest) -> Any:
    """A row's control images as a pipeline takes them: one image for one ControlNet, a list
    with one per net for several (a batched call: that, per slot)."""
    if not request.controls:
        return None
    images = [c.image for c in request.controls]
    return images if len(images) > 1 else images[0]


@dataclass(frozen=True)
class GenerationResult:
    images: list[Image.Image]
    seeds: list[int]
    width: int
    height: int
    arrays: list[np.ndarray] = field(default_factory=list)  # float HxWx3 in [0, 1]
    warning: str | None = None  # e.g. a prompt longer than the text encoder reads


def image_seeds(seed: int, num_images: int) -> list[int]:
    """Image k of a row uses seed + k (wrapping at 2**32, the manifest's seed range)."""
    return [(seed + k) % 2**32 for k in range(num_images)]
