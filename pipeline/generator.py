"""The generator: a warm diffusers pipeline with IP-Adapters, fed precomputed embeddings.

Reads like a diffusers pipeline: `check_request` validates every input before any model work
(shapes included: CFG-shaped embeddings with guidance <= 1 give no error in diffusers, only a
wrong image), then numbered steps, then a typed result.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import MISSING, dataclass, field, fields
from pathlib import PurePosixPath
from typing import Any

import numpy as np
import torch
from PIL import Image

from core.errors import (
    ConfigError,
    ErrorCode,
    ItemError,
    ModelLoadError,
)
from pipeline.models import ModelSource, loading
from pipeline.presets import ADAPTERS, BASE_MODELS

log = logging.getLogger(__name__)


def shared(description: str = "", default: Any = MISSING) -> Any:
    """A request field every row of one diffusers call must have equal (it is in `batch_key`)."""
    return field(default=default, metadata={"batch": "shared", "doc": description})


def per_slot(shared_part: Callable[[Any], object] | None = None, default: Any = MISSING) -> Any:
    """A request field each row of a call may have its own of; `shared_part` is what of it
    must still be equal (a tensor's shape, whether a text is given), and is in `batch_key`."""
    return field(default=default, metadata={"batch": "per_slot", "shared_part": shared_part})


def _shape(tensor: torch.Tensor | None) -> tuple[int, ...] | None:
    return None if tensor is None else tuple(tensor.shape)


@dataclass(frozen=True)
class AdapterInput:
    """One adapter's conditioning for one row: `pos`/`neg` shaped [n_refs_or_1, ...].

    FaceID-Plus also takes `clip_pos`/`clip_neg`: CLIP hidden states of the aligned face crop,
    [1, tokens, hidden], which diffusers reads from the projection layer's `clip_embeds`.
    """

    adapter: str = shared("which adapter (the pipeline loaded for the call)")
    scale: float | dict = shared("diffusers sets one strength per adapter for a call")
    pos: torch.Tensor = per_slot(_shape)
    neg: torch.Tensor = per_slot(_shape)
    clip_pos: torch.Tensor | None = per_slot(_shape, default=None)
    clip_neg: torch.Tensor | None = per_slot(_shape, default=None)
    # FaceID-Plus v2's structure weight (the card's s_scale), state on the projection layer
    shortcut_scale: float = shared("one value per projection layer and call", default=1.0)


@dataclass(frozen=True)
class GenerationRequest:
    """One row's call. Every field says whether rows batched into one diffusers call may
    differ in it (`per_slot`) or must share it (`shared`); `batch_key` follows that, and a
    test fails for a field that says neither."""

    prompt: str = per_slot()
    # SDXL zeroes an absent negative prompt instead of encoding "": presence is shared
    negative_prompt: str = per_slot(bool)
    adapters: list[AdapterInput] = per_slot(lambda inputs: tuple(batch_key(a) for a in inputs))
    num_images: int = per_slot()  # each image is a slot of its own
    seed: int = per_slot()
    steps: int = shared("one denoising schedule per call")
    guidance_scale: float = shared("one CFG rule per call")
    width: int | None = shared("one latent size per call", default=None)
    height: int | None = shared("one latent size per call", default=None)


def batch_key(request: GenerationRequest | AdapterInput) -> tuple[object, ...]:
    """Rows with equal keys can share one diffusers call: the shared fields, and the shared
    part of the per-slot ones, as their fields declare."""
    key: list[object] = []
    for f in fields(request):
        value = getattr(request, f.name)
        kind = f.metadata.get("batch")
        if kind == "shared":
            key.append(json.dumps(value, sort_keys=True) if isinstance(value, dict) else value)
        elif kind == "per_slot":
            shared_part = f.metadata["shared_part"]
            key.append(None if shared_part is None else shared_part(value))
        else:
            raise TypeError(f"{type(request).__name__}.{f.name} says neither per_slot nor shared")
    return tuple(key)


@dataclass(frozen=True)
class GenerationResult:
    images: list[Image.Image]
    seeds: list[int]
    width: int
    height: int
    arrays: list[np.ndarray] = field(default_factory=list)  # float HxWx3 in [0, 1]
    warning: str | None = None  # e.g. a prompt longer than the text encoder reads


@dataclass(frozen=True)
class Acceleration:
    """How the pipeline runs on its device (IPBATCH_CHANNELS_LAST, _COMPILE, _VAE_SLICING_ABOVE).

    fp16 (CUDA) / fp32 (CPU) comes from the dtype; attention is PyTorch SDPA, diffusers'
    default with torch 2 (IP-Adapter's processors are its `*2_0` variants).
    """

    channels_last: bool = True  # CUDA only
    compile: bool = False
    vae_slicing_above: int | None = None  # 0: never; None: 8 on CUDA, never on CPU
    max_images: int = 16  # the largest call; compile buckets go up to it


def compile_buckets(max_images: int) -> list[int]:
    """Batch sizes a compiled UNet sees: powers of two up to `max_images`, and itself."""
    sizes, size = [], 1
    while size < max_images:
        sizes.append(size)
        size *= 2
    return sizes + [max_images]


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
        acceleration: Acceleration | None = None,
    ) -> None:
        import diffusers

        presets = [ADAPTERS[name] for name in adapters]
        families = {p.family for p in presets}
        if len(families) != 1:
            raise ItemError(ErrorCode.MODEL_ERROR, f"adapters {adapters} need different bases")
        self.family = families.pop()
        self.adapters = adapters
        self.presets = presets
        self.device = device
        self.dtype = dtype
        base = BASE_MODELS[self.family]
        if any(p.lora for p in presets) and not diffusers.utils.USE_PEFT_BACKEND:
            # without peft diffusers only logs a warning and skips FaceID's LoRA
            raise ConfigError("FaceID adapters need the `peft` package for their LoRA")
        pipeline_class = getattr(diffusers, base.pipeline_class)
        extra = {"safety_checker": None, "requires_safety_checker": False}
        # 1. the frozen base model (no safety checker: catalog jobs review outputs themselves)
        base_folder = models.base_model(self.family)
        with loading(f"the base model at {base_folder}", base_folder):
            self.pipe = pipeline_class.from_pretrained(
                base_folder,
                dtype=dtype,
                local_files_only=models.local_files_only,
                **(extra if self.family == "sd15" else {}),
            )
        # 2. the adapters, without their image encoders: embeddings arrive precomputed
        weights = [models.adapter_weights(name) for name in adapters]
        files = [str(PurePosixPath(repo, sub, name)) for repo, sub, name in weights]
        with loading(f"adapter weights {', '.join(files)}"):
            self.pipe.load_ip_adapter(
                [repo for repo, _, _ in weights],
                subfolder=[sub for _, sub, _ in weights],
                weight_name=[name for _, _, name in weights],
                image_encoder_folder=None,
                local_files_only=models.local_files_only,
            )
        # FaceID's LoRA: loaded and ACTIVE (diffusers activates only the last one it loads;
        # rows with two FaceID adapters are refused by the manifest for that reason)
        active = set(self.pipe.get_active_adapters()) if any(p.lora for p in presets) else set()
        for index, (preset, file) in enumerate(zip(presets, files, strict=True)):
            if preset.lora and f"faceid_{index}" not in active:
                raise ModelLoadError(f"{preset.name}: the LoRA in {file} is not active")
        self.pipe.to(device)
        self.pipe.set_progress_bar_config(disable=True)
        # 3. device settings: channels_last and the VAE's slicing on CUDA, optional compile
        self.acceleration = acceleration or Acceleration()
        if device.type == "cuda" and self.acceleration.channels_last:
            self.pipe.unet.to(memory_format=torch.channels_last)
        self.buckets: list[int] = []
        if self.acceleration.compile:
            from torch import _dynamo

            self.buckets = compile_buckets(self.acceleration.max_images)
            # one graph per (bucket, CFG or not, resolution): allow a few dozen
            _dynamo.config.cache_size_limit = max(_dynamo.config.cache_size_limit, 64)
            self.pipe.unet.compile(dynamic=False)
        self._layers = list(self.pipe.unet.encoder_hid_proj.image_projection_layers)
        self._projection_shapes = [_embed_shape(layer) for layer in self._layers]

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
        for spec, preset, (expected, clip_expected) in zip(
            request.adapters, self.presets, self._projection_shapes, strict=True
        ):
            _check_shape(spec.adapter, spec.pos, spec.neg, expected)
            if clip_expected is not None:
                if spec.clip_pos is None or spec.clip_neg is None:
                    raise ItemError(
                        ErrorCode.MODEL_ERROR, f"{preset.name} needs the face crop's CLIP embeds"
                    )
                _check_shape(spec.adapter, spec.clip_pos, spec.clip_neg, clip_expected)
                if spec.clip_pos.shape[0] != 1:
                    raise ItemError(ErrorCode.MODEL_ERROR, f"{preset.name} takes one face")
        width, height = self._size(request)
        if width % self.pipe.vae_scale_factor or height % self.pipe.vae_scale_factor:
            raise ItemError(
                ErrorCode.INVALID_ROW, f"width/height must divide by 8: {width}x{height}"
            )

    @torch.inference_mode()
    def generate(self, request: GenerationRequest) -> GenerationResult:
        # 1. check inputs before any model work
        self.check_request(request)
        width, height = self._size(request)
        do_cfg = request.guidance_scale > 1.0  # diffusers' own rule
        k = request.num_images

        # 2. embeddings: [neg, pos] stacked on a new batch axis only when CFG runs; FaceID-Plus
        #    face-crop embeds batched like the images ([neg x k, pos x k])
        embeds = [self._cfg_stack(spec.neg, spec.pos, 1, do_cfg) for spec in request.adapters]
        clip_embeds = [
            None
            if spec.clip_pos is None or spec.clip_neg is None
            else self._cfg_stack(spec.clip_neg, spec.clip_pos, k, do_cfg)
            for spec in request.adapters
        ]

        # 3. one seeded generator per image: image k matches a solo run with seed + k
        seeds = image_seeds(request.seed, k)
        generators = [torch.Generator(device="cpu").manual_seed(s) for s in seeds]

        # 4. denoise and decode: diffusers' stock path, k images of one prompt
        self._set_vae_slicing(k)
        arrays = self._call(
            request,
            prompt=request.prompt,
            negative_prompt=request.negative_prompt or None,
            embeds=embeds,
            clip_embeds=clip_embeds,
            per_prompt=k,
            generators=generators,
        )
        return GenerationResult(
            images=self._to_pil(arrays),
            seeds=seeds,
            width=width,
            height=height,
            arrays=arrays,
            warning=self.prompt_warning(request),
        )

    def _call(
        self,
        shared: GenerationRequest,
        *,
        prompt: str | list[str],
        negative_prompt: str | list[str] | None,
        embeds: list[torch.Tensor],
        clip_embeds: list[torch.Tensor | None],
        per_prompt: int,
        generators: list[torch.Generator],
    ) -> list[np.ndarray]:
        """The one diffusers call both paths make: the per-slot inputs given, every shared
        field taken from `shared` (a row of the call: they are equal in all of them)."""
        width, height = self._size(shared)
        # strengths: load_ip_adapter resets them, so they are set on every call
        scales = [spec.scale for spec in shared.adapters]
        self.pipe.set_ip_adapter_scale(scales if len(scales) > 1 else scales[0])
        # FaceID-Plus reads the face crop's CLIP embeds from its projection layer: state on
        # the UNet, set for this call and cleared afterwards (it must not leak into the next)
        stateful = []
        for preset, layer, clip, spec in zip(
            self.presets, self._layers, clip_embeds, shared.adapters, strict=True
        ):
            if clip is not None:
                layer.clip_embeds = clip
                layer.shortcut = preset.shortcut
                layer.shortcut_scale = spec.shortcut_scale
                stateful.append(layer)
        try:
            output = self.pipe(
                prompt=prompt,
                negative_prompt=negative_prompt,
                ip_adapter_image_embeds=embeds,
                num_images_per_prompt=per_prompt,
                num_inference_steps=shared.steps,
                guidance_scale=shared.guidance_scale,
                width=width,
                height=height,
                generator=generators,
                output_type="np",
            )
        finally:
            for layer in stateful:
                layer.clip_embeds = None
                layer.shortcut = False
                layer.shortcut_scale = 1.0
        return list(output.images)

    def _size(self, request: GenerationRequest) -> tuple[int, int]:
        return request.width or self.native_size[0], request.height or self.native_size[1]

    def generate_batch(self, requests: Sequence[GenerationRequest]) -> list[GenerationResult]:
        """Several rows in one diffusers call, each with its own references, prompts and seeds.

        Rows must share `batch_key` (adapters, scales, size, steps, guidance...). Each row's
        images match its solo run to within float rounding (CPU: ~2e-6 before the uint8
        conversion). A single request takes diffusers' stock path (bitwise as diffusers).
        On CUDA out-of-memory the batch is split in halves and retried.
        """
        if len(requests) == 1 and not self.buckets:
            return [self.generate(requests[0])]
        keys = {batch_key(r) for r in requests}
        if len(keys) != 1:
            raise ItemError(ErrorCode.INTERNAL, "rows that cannot share a call were batched")
        for request in requests:
            self.check_request(request)
        try:
            return self._generate_slots(requests)
        except torch.OutOfMemoryError:
            if self.device.type == "cuda":
                torch.cuda.empty_cache()
            half = len(requests) // 2
            log.warning(
                "out of memory with %d rows: retrying as %d + %d",
                len(requests),
                half,
                len(requests) - half,
            )
            return self.generate_batch(requests[:half]) + self.generate_batch(requests[half:])

    @torch.inference_mode()
    def _generate_slots(self, requests: Sequence[GenerationRequest]) -> list[GenerationResult]:
        first = requests[0]
        width, height = self._size(first)
        do_cfg = first.guidance_scale > 1.0
        # 1. one slot per output image: row i's image j is a prompt of its own (diffusers'
        #    num_images_per_prompt would repeat ONE set of IP embeds over the whole batch)
        slots = [(r, seed) for r in requests for seed in image_seeds(r.seed, r.num_images)]
        real = len(slots)
        if self.buckets:  # compiled: pad to a fixed batch size (copies of the last slot)
            size = next((b for b in self.buckets if b >= real), real)
            slots += [slots[-1]] * (size - real)
        generators = [torch.Generator(device="cpu").manual_seed(seed) for _, seed in slots]

        # 2. embeddings per slot, [neg_1..neg_S, pos_1..pos_S] like diffusers' own CFG layout
        def stacked(halves: list[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
            neg = torch.stack([n for n, _ in halves])
            pos = torch.stack([p for _, p in halves])
            tensor = torch.cat([neg, pos]) if do_cfg else pos
            return tensor.to(device=self.device, dtype=self.dtype)

        adapters = range(len(self.adapters))
        embeds = [
            stacked([(r.adapters[a].neg, r.adapters[a].pos) for r, _ in slots]) for a in adapters
        ]
        clip_embeds = [
            None
            if first.adapters[a].clip_pos is None
            else stacked([(r.adapters[a].clip_neg, r.adapters[a].clip_pos) for r, _ in slots])  # type: ignore[misc]
            for a in adapters
        ]

        # 3. denoise and decode, with the per-slot embeds passed through unrepeated
        self._set_vae_slicing(len(slots))
        with _prebuilt_ip_embeds(self.pipe, embeds, slots=len(slots), do_cfg=do_cfg):
            arrays = self._call(
                first,
                prompt=[r.prompt for r, _ in slots],
                negative_prompt=[r.negative_prompt for r, _ in slots]
                if first.negative_prompt
                else None,
                embeds=embeds,
                clip_embeds=clip_embeds,
                per_prompt=1,
                generators=generators,
            )[:real]  # padding slots dropped

        # 4. hand each row its images back
        results = []
        for r in requests:
            mine, arrays = arrays[: r.num_images], arrays[r.num_images :]
            results.append(
                GenerationResult(
                    images=self._to_pil(mine),
                    seeds=image_seeds(r.seed, r.num_images),
                    width=width,
                    height=height,
                    arrays=mine,
                    warning=self.prompt_warning(r),
                )
            )
        return results

    def prompt_warning(self, request: GenerationRequest) -> str | None:
        """The text encoder reads a fixed number of tokens (77 for CLIP); diffusers drops the
        rest with only a log line. Say so in the item instead."""
        tokenizer = self.pipe.tokenizer
        limit = int(tokenizer.model_max_length)
        notes = []
        for name, text in (
            ("prompt", request.prompt),
            ("negative_prompt", request.negative_prompt),
        ):
            if text:
                count = len(tokenizer(text, truncation=False).input_ids)
                if count > limit:
                    notes.append(
                        f"{name} is {count} tokens; the text encoder reads the first {limit}, "
                        "the rest was ignored"
                    )
        return "; ".join(notes) or None

    def _set_vae_slicing(self, images: int) -> None:
        """Decode one image at a time on big batches (same images, lower memory peak)."""
        limit = self.acceleration.vae_slicing_above
        if limit is None:
            limit = 8 if self.device.type == "cuda" else 0
        if limit and images > limit:
            self.pipe.vae.enable_slicing()
        else:
            self.pipe.vae.disable_slicing()

    def _to_pil(self, arrays: list[np.ndarray]) -> list[Image.Image]:
        """diffusers' own float -> uint8 conversion (what output_type="pil" does)."""
        return list(self.pipe.image_processor.numpy_to_pil(np.stack(arrays)))

    def _cfg_stack(
        self, neg: torch.Tensor, pos: torch.Tensor, repeat: int, do_cfg: bool
    ) -> torch.Tensor:
        """[n, ...] halves -> [(2 if CFG) * repeat, n, ...], negative first like diffusers."""
        pos_b = pos.unsqueeze(0).repeat_interleave(repeat, dim=0)
        tensor = (
            torch.cat([neg.unsqueeze(0).repeat_interleave(repeat, dim=0), pos_b])
            if (do_cfg)
            else pos_b
        )
        return tensor.to(device=self.device, dtype=self.dtype)


def default_batch_images(device: torch.device) -> int:
    """Images per call when IPBATCH_BATCH_IMAGES is unset: 16 on CPU (bench/generate.py: 8
    gave 3.0x the plain loop, 16 gave 3.5x, 32 gave 4.1x on the tiny models); on CUDA by
    memory (a 512x512 SD1.5 image in fp16 needs well under 1 GB of activations)."""
    if device.type != "cuda":
        return 16
    total = torch.cuda.get_device_properties(device).total_memory
    return 16 if total >= 40 * 2**30 else 8


@contextmanager
def _prebuilt_ip_embeds(
    pipe: Any, embeds: list[torch.Tensor], *, slots: int, do_cfg: bool
) -> Iterator[None]:
    """The one override of diffusers: for this call, `prepare_ip_adapter_image_embeds` returns
    our per-slot tensors as they are, instead of tiling the given embeds over the batch
    (which would make every row attend to every row's reference, silently)."""

    def prebuilt(_image: Any, given: Any, _device: Any, repeat: int, cfg: bool) -> Any:
        if given is not embeds or repeat != slots or cfg != do_cfg:
            raise RuntimeError(f"unexpected IP-Adapter call: {repeat} slots, cfg={cfg}")
        return embeds

    pipe.prepare_ip_adapter_image_embeds = prebuilt
    try:
        yield
    finally:
        del pipe.prepare_ip_adapter_image_embeds  # the class's method again


def _embed_shape(layer: torch.nn.Module) -> tuple[tuple[int, ...], tuple[int, ...] | None]:
    """Per projection layer type: the trailing shape of the embeds it takes (-1: any number of
    tokens), and for FaceID-Plus the trailing shape of its face-crop CLIP embeds."""
    from diffusers.models import embeddings as e

    def width(linear: object) -> int:
        assert isinstance(linear, torch.nn.Linear)
        return int(linear.in_features)

    if isinstance(layer, e.ImageProjection):
        return (width(layer.image_embeds),), None
    if isinstance(layer, e.IPAdapterFullImageProjection):
        return (-1, width(layer.ff.net[0].proj)), None
    if isinstance(layer, e.IPAdapterFaceIDImageProjection):
        return (width(layer.ff.net[0].proj),), None
    if isinstance(layer, e.IPAdapterFaceIDPlusImageProjection):
        return (width(layer.proj.net[0].proj),), (-1, width(layer.proj_in))
    if isinstance(layer, e.IPAdapterPlusImageProjection):
        return (-1, width(layer.proj_in)), None
    raise ConfigError(f"unsupported IP-Adapter projection {type(layer).__name__}")


def _check_shape(
    adapter: str, pos: torch.Tensor, neg: torch.Tensor, expected: tuple[int, ...]
) -> None:
    trailing = tuple(pos.shape[1:])
    fits = len(trailing) == len(expected) and all(
        e in (-1, t) for e, t in zip(expected, trailing, strict=True)
    )
    if pos.ndim < 2 or not fits or neg.shape != pos.shape:
        raise ItemError(
            ErrorCode.MODEL_ERROR,
            f"embedding for adapter {adapter!r} has shape {tuple(pos.shape)}; "
            f"its projection takes [n, {', '.join(map(str, expected))}]",
        )


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
    ) -> None:
        self.models = models
        self.device = device
        self.dtype = dtype
        self.capacity = capacity
        self.acceleration = acceleration
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
            self.models,
            adapters,
            device=self.device,
            dtype=self.dtype,
            acceleration=self.acceleration,
        )
        return self._pipelines[adapters]
