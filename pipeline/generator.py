"""The generator: a warm diffusers pipeline with IP-Adapters, fed precomputed embeddings.

Reads like a diffusers pipeline: `check_request` validates every input before any model work
(shapes included: CFG-shaped embeddings with guidance <= 1 give no error in diffusers, only a
wrong image), then numbered steps, then a typed result.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch
from PIL import Image

from ipbatch.errors import ErrorCode, ItemError
from pipeline.models import ModelSource
from pipeline.presets import ADAPTERS, BASE_MODELS, EmbedKind

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class AdapterInput:
    """One adapter's conditioning for one row: `pos`/`neg` shaped [n_refs_or_1, ...]."""

    adapter: str
    scale: float | dict
    pos: torch.Tensor
    neg: torch.Tensor


@dataclass(frozen=True)
class GenerationRequest:
    prompt: str
    negative_prompt: str
    adapters: list[AdapterInput]
    num_images: int
    seed: int
    steps: int
    guidance_scale: float
    width: int | None = None
    height: int | None = None


@dataclass(frozen=True)
class GenerationResult:
    images: list[Image.Image]
    seeds: list[int]
    width: int
    height: int
    warnings: list[str] = field(default_factory=list)


def image_seeds(seed: int, num_images: int) -> list[int]:
    """Image k of a row uses seed + k (wrapping at 2**32, the manifest's seed range)."""
    return [(seed + k) % 2**32 for k in range(num_images)]


class Generator:
    """One warm pipeline for one (base model, adapter set); built in the worker process."""

    def __init__(
        self,
        models: ModelSource,
        adapters: tuple[str, ...],
        *,
        device: torch.device,
        dtype: torch.dtype,
    ) -> None:
        import diffusers

        families = {ADAPTERS[name].family for name in adapters}
        if len(families) != 1:
            raise ItemError(ErrorCode.MODEL_ERROR, f"adapters {adapters} need different bases")
        self.family = families.pop()
        self.adapters = adapters
        self.device = device
        self.dtype = dtype
        base = BASE_MODELS[self.family]
        pipeline_class = getattr(diffusers, base.pipeline_class)
        # 1. the frozen base model (no safety checker: catalog jobs review outputs themselves)
        self.pipe = pipeline_class.from_pretrained(
            models.base_model(self.family),
            dtype=dtype,
            safety_checker=None,
            requires_safety_checker=False,
            local_files_only=models.local_files_only,
        )
        # 2. the adapters, without their image encoders: embeddings arrive precomputed
        presets = [ADAPTERS[name] for name in adapters]
        repos = {models.adapter_repo(name) for name in adapters}
        if len(repos) != 1:
            raise ItemError(ErrorCode.MODEL_ERROR, "adapters of one row must share a repository")
        self.pipe.load_ip_adapter(
            repos.pop(),
            subfolder=[p.subfolder for p in presets],
            weight_name=[p.weight_name for p in presets],
            image_encoder_folder=None,
            local_files_only=models.local_files_only,
        )
        self.pipe.to(device)
        self.pipe.set_progress_bar_config(disable=True)
        self._projection_shapes = self._expected_embed_shapes()

    def _expected_embed_shapes(self) -> list[tuple[int, ...]]:
        """Per adapter, the trailing shape its image projection takes."""
        shapes: list[tuple[int, ...]] = []
        layers = self.pipe.unet.encoder_hid_proj.image_projection_layers
        for name, layer in zip(self.adapters, layers, strict=True):
            kind = ADAPTERS[name].embed_kind
            if kind is EmbedKind.CLIP_IMAGE_EMBEDS:
                shapes.append((layer.image_embeds.in_features,))
            else:
                shapes.append((-1, layer.proj_in.in_features))  # tokens vary by encoder
        return shapes

    @property
    def native_size(self) -> tuple[int, int]:
        size = self.pipe.unet.config.sample_size * self.pipe.vae_scale_factor
        return size, size

    def check_request(self, request: GenerationRequest) -> None:
        names = tuple(a.adapter for a in request.adapters)
        if names != self.adapters:
            raise ItemError(
                ErrorCode.INTERNAL, f"request adapters {names} sent to pipeline {self.adapters}"
            )
        for spec, expected in zip(request.adapters, self._projection_shapes, strict=True):
            for half in (spec.pos, spec.neg):
                trailing = tuple(half.shape[1:])
                fits = len(trailing) == len(expected) and all(
                    e in (-1, t) for e, t in zip(expected, trailing, strict=True)
                )
                if half.ndim < 2 or not fits or half.shape != spec.pos.shape:
                    raise ItemError(
                        ErrorCode.MODEL_ERROR,
                        f"embedding for adapter {spec.adapter!r} has shape {tuple(half.shape)}; "
                        f"its projection takes [n, {', '.join(map(str, expected))}]",
                    )
        width = request.width or self.native_size[0]
        height = request.height or self.native_size[1]
        if width % self.pipe.vae_scale_factor or height % self.pipe.vae_scale_factor:
            raise ItemError(
                ErrorCode.INVALID_ROW, f"width/height must divide by 8: {width}x{height}"
            )

    @torch.inference_mode()
    def generate(self, request: GenerationRequest) -> GenerationResult:
        # 1. check inputs before any model work
        self.check_request(request)
        width = request.width or self.native_size[0]
        height = request.height or self.native_size[1]
        do_cfg = request.guidance_scale > 1.0  # diffusers' own rule

        # 2. embeddings: [neg, pos] stacked on a new batch axis only when CFG runs
        embeds = []
        for spec in request.adapters:
            pos = spec.pos.unsqueeze(0)
            tensor = torch.cat([spec.neg.unsqueeze(0), pos]) if do_cfg else pos
            embeds.append(tensor.to(device=self.device, dtype=self.dtype))

        # 3. strengths (load_ip_adapter resets them, so set them on every call)
        scales = [spec.scale for spec in request.adapters]
        self.pipe.set_ip_adapter_scale(scales if len(scales) > 1 else scales[0])

        # 4. one seeded generator per image: image k matches a solo run with seed + k
        seeds = image_seeds(request.seed, request.num_images)
        generators = [torch.Generator(device="cpu").manual_seed(s) for s in seeds]

        # 5. denoise and decode
        output = self.pipe(
            prompt=request.prompt,
            negative_prompt=request.negative_prompt or None,
            ip_adapter_image_embeds=embeds,
            num_images_per_prompt=request.num_images,
            num_inference_steps=request.steps,
            guidance_scale=request.guidance_scale,
            width=width,
            height=height,
            generator=generators,
            output_type="pil",
        )
        return GenerationResult(images=list(output.images), seeds=seeds, width=width, height=height)


class GeneratorPool:
    """Warm pipelines of this process, keyed by adapter set; built lazily, evicted LRU."""

    def __init__(
        self, models: ModelSource, *, device: torch.device, dtype: torch.dtype, capacity: int = 1
    ) -> None:
        self.models = models
        self.device = device
        self.dtype = dtype
        self.capacity = capacity
        self._pipelines: dict[tuple[str, ...], Generator] = {}

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
            self.models, adapters, device=self.device, dtype=self.dtype
        )
        return self._pipelines[adapters]
