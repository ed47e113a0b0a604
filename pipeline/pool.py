"""The warm generators of one worker process, and how many images one call takes."""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch

from pipeline.generator import Generator
from pipeline.models import ModelSource
from pipeline.pipelines import Acceleration
from pipeline.presets import AdapterPreset, builtin_adapter

log = logging.getLogger(__name__)


def default_batch_images(device: torch.device) -> int:
    """Images per call when IPBATCH_BATCH_IMAGES is unset: 16 on CPU (bench/generate.py: 8
    gave 3.0x the plain loop, 16 gave 3.5x, 32 gave 4.1x on the tiny models); on CUDA by
    memory (a 512x512 SD1.5 image in fp16 needs well under 1 GB of activations)."""
    if device.type != "cuda":
        return 16
    total = torch.cuda.get_device_properties(device).total_memory
    return 16 if total >= 40 * 2**30 else 8


class GeneratorPool:
    """Warm pipelines of this process, keyed by adapter set; built lazily, evicted LRU."""

    def __init__(
        self,
        models: ModelSource,
        *,
        device: torch.device,
        dtype: torch.dtype,
        capacity: int = 1,
        acceleration: Acceleration | None = None,
        resolve: Callable[[str], AdapterPreset] = builtin_adapter,
    ) -> None:
        self.models = models
        self.resolve = resolve  # adapter name -> preset (trained ones: the worker's catalog)
        self.device = device
        self.dtype = dtype
        self.capacity = capacity
        self.acceleration = acceleration
        self._pipelines: dict[tuple[str, ...], Generator] = {}

    def loaded(self) -> list[tuple[str, ...]]:
        """The adapter sets warm now, least recently used first."""
        return list(self._pipelines)

    def get(self, adapters: tuple[str, ...]) -> Generator:
        if adapters in self._pipelines:
            self._pipelines[adapters] = self._pipelines.pop(adapters)  # most recent last
            return self._pipelines[adapters]
        while len(self._pipelines) >= self.capacity:
            oldest = next(iter(self._pipelines))
            del self._pipelines[oldest]
            if self.device.type == "cuda":
                torch.cuda.empty_cache()
        log.info("loading pipeline for adapters %s from %s", adapters, self.models.describe())
        self._pipelines[adapters] = Generator(
            self.models,
            adapters,
            device=self.device,
            dtype=self.dtype,
            acceleration=self.acceleration,
            resolve=self.resolve,
        )
        return self._pipelines[adapters]
