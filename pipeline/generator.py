"""The generator: a warm diffusers pipeline with IP-Adapters, fed precomputed embeddings.

Reads like a diffusers pipeline: `check_request` validates every input before any model work
(shapes included: CFG-shaped embeddings with guidance <= 1 give no error in diffusers, only a
wrong image), then numbered steps, then a typed result.
"""

from __future__ import annotations

import inspect
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
from pipeline.presets import BASE_MODELS, CONTROLNETS, AdapterPreset, builtin_adapter

log = logging.getLogger(__name__)


def shared(description: str = "", default: Any = MISSING) -> Any:
    """A request field every row of one diffusers call must have equal (it is in `batch_key`)."""
    return field(default=default, metadata={"batch": "shared", "doc": description})


def per_slot(shared_part: Callable[[Any], object] | None = None, default: Any = MISSING) -> Any:
    """A request field each row of a call may have its own of. `shared_part(obj)` (given the
    whole input) is what of it must still be equal (a tensor's shape, whether an image is
    given), and is in `batch_key`."""
    return field(default=default, metadata={"batch": "per_slot", "shared_part": shared_part})


def _shape(tensor: torch.Tensor | None) -> tuple[int, ...] | None:
    return None if tensor is None else tuple(tensor.shape)


def _given(value: object) -> bool:
    return value is not None


@dataclass(frozen=True)
class ControlInput:
    """One ControlNet on one row: the condition map (any size: diffusers resizes it to the
    output) and how strong it is, and over which fraction of the steps. Rows of one call may
    each have their own (a per-slot multiplier of the ControlNet's residuals)."""

    model: str = shared("one ControlNet per position, loaded for the call")
    image: Image.Image = per_slot()
    scale: float = per_slot(default=1.0)
    start: float = per_slot(default=0.0)
    end: float = per_slot(default=1.0)


def _scale_shared(a: AdapterInput) -> object:
    """An IP-Adapter strength can differ row by row through a per-slot attention mask when it
    is a plain number and masks do not change how the references are attended (one reference,
    or regions given anyway); InstantStyle dicts and the rest must be equal."""
    if isinstance(a.scale, dict):
        return json.dumps(a.scale, sort_keys=True)
    return "per slot" if per_slot_scale(a) else a.scale


def _plain(scale: float | dict) -> float:
    assert not isinstance(scale, dict), "InstantStyle scales are never per slot"
    return float(scale)


def per_slot_scale(a: AdapterInput) -> bool:
    return not isinstance(a.scale, dict) and (a.pos.shape[0] == 1 or a.regions is not None)


@dataclass(frozen=True)
class AdapterInput:
    """One adapter's conditioning for one row: `pos`/`neg` shaped [n_refs_or_1, ...].

    FaceID-Plus also takes `clip_pos`/`clip_neg`: CLIP hidden states of the aligned face crop,
    [1, tokens, hidden], which diffusers reads from the projection layer's `clip_embeds`.
    `regions`: where the reference applies (white), one mask for all references or one each.
    """

    adapter: str = shared("which adapter (the pipeline loaded for the call)")
    scale: float | dict = per_slot(_scale_shared)
    pos: torch.Tensor = per_slot(lambda a: _shape(a.pos))
    neg: torch.Tensor = per_slot(lambda a: _shape(a.neg))
    clip_pos: torch.Tensor | None = per_slot(lambda a: _shape(a.clip_pos), default=None)
    clip_neg: torch.Tensor | None = per_slot(lambda a: _shape(a.clip_neg), default=None)
    # FaceID-Plus v2's structure weight (the card's s_scale), state on the projection layer
    shortcut_scale: float = shared("one value per projection layer and call", default=1.0)
    # with several references, a mask changes how they are attended (separately, summed): the
    # presence of regions must be equal in one call, the masks themselves may differ
    regions: list[Image.Image] | None = per_slot(
        lambda a: None if a.regions is None else len(a.regions), default=None
    )


@dataclass(frozen=True)
class GenerationRequest:
    """One row's call. Every field says whether rows batched into one diffusers call may
    differ in it (`per_slot`) or must share it (`shared`); `batch_key` follows that, and a
    test fails for a field that says neither."""

    prompt: str = per_slot()
    # SDXL zeroes an absent negative prompt instead of encoding "": presence is shared
    negative_prompt: str = per_slot(lambda r: bool(r.negative_prompt))
    adapters: list[AdapterInput] = per_slot(lambda r: tuple(batch_key(a) for a in r.adapters))
    num_images: int = per_slot()  # each image is a slot of its own
    seed: int = per_slot()
    steps: int = shared("one denoising schedule per call")
    guidance_scale: float = shared("one CFG rule per call")
    width: int | None = shared("one latent size per call", default=None)
    height: int | None = shared("one latent size per call", default=None)
    controls: tuple[ControlInput, ...] = per_slot(
        lambda r: tuple(batch_key(c) for c in r.controls), default=()
    )
    # image-to-image from `init_image`, inpainting where `mask` is white; one pipeline per mode
    init_image: Image.Image | None = per_slot(lambda r: _given(r.init_image), default=None)
    mask: Image.Image | None = per_slot(lambda r: _given(r.mask), default=None)
    strength: float | None = shared("one noise level per call (a float in diffusers)", None)

    @property
    def mode(self) -> str:
        if self.mask is not None:
            return "inpaint"
        return "img2img" if self.init_image is not None else "text"


def batch_key(request: GenerationRequest | AdapterInput | ControlInput) -> tuple[object, ...]:
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
            key.append(None if shared_part is None else shared_part(request))
        else:
            raise TypeError(f"{type(request).__name__}.{f.name} says neither per_slot nor shared")
    return tuple(key)


@dataclass
class CallInputs:
    """What one diffusers call gets besides prompts and embeddings, already laid out for it:
    strengths, IP-Adapter masks (one entry per adapter, or None), the control images as the
    pipeline takes them (one ControlNet: an image, or one per slot; several: one per net, or
    per slot a list with one per net), their (scale, start, end), init images and masks."""

    scales: list[Any]
    ip_masks: list[torch.Tensor | None]
    controls: Any
    control_scales: list[tuple[float, float, float]]
    init_images: list[Image.Image] | None
    masks: list[Image.Image] | None
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


_PIPELINES = {  # (family, mode, with ControlNet) -> diffusers class
    ("sd15", "text", False): "StableDiffusionPipeline",
    ("sd15", "text", True): "StableDiffusionControlNetPipeline",
    ("sd15", "img2img", False): "StableDiffusionImg2ImgPipeline",
    ("sd15", "img2img", True): "StableDiffusionControlNetImg2ImgPipeline",
    ("sd15", "inpaint", False): "StableDiffusionInpaintPipeline",
    ("sd15", "inpaint", True): "StableDiffusionControlNetInpaintPipeline",
    ("sdxl", "text", False): "StableDiffusionXLPipeline",
    ("sdxl", "text", True): "StableDiffusionXLControlNetPipeline",
    ("sdxl", "img2img", False): "StableDiffusionXLImg2ImgPipeline",
    ("sdxl", "img2img", True): "StableDiffusionXLControlNetImg2ImgPipeline",
    ("sdxl", "inpaint", False): "StableDiffusionXLInpaintPipeline",
    ("sdxl", "inpaint", True): "StableDiffusionXLControlNetInpaintPipeline",
}


def _controls_of(request: GenerationRequest) -> Any:
    """A row's control images as a pipeline takes them: one image for one ControlNet, a list
    with one per net for several (a batched call: that, per slot)."""
    if not request.controls:
        return None
    images = [c.image for c in request.controls]
    return images if len(images) > 1 else images[0]


def pipeline_class(family: str, mode: str, controlnet: bool) -> str:
    return _PIPELINES[(family, mode, controlnet)]


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
        resolve: Callable[[str], AdapterPreset] = builtin_adapter,
    ) -> None:
        import diffusers

        presets = [resolve(name) for name in adapters]
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
        weights = [models.adapter_weights(preset) for preset in presets]
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
        # 4. the other modes' pipelines (made on first use, sharing every module) and the
        #    ControlNets (loaded on first use)
        self.models = models
        self._pipes: dict[tuple[str, tuple[str, ...]], Any] = {("text", ()): self.pipe}
        self._controlnets: dict[str, Any] = {}

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
        """One row, the way the diffusers docs call a pipeline: k images of one prompt, the
        row's strengths set on the pipeline, its control image, init image and mask given
        once (inpainting: once per image, so that image k is seed + k's, see below)."""
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

        # 4. the row's inputs as the docs pass them. Inpainting encodes a single init image
        #    with the first generator only, so images 1.. would not be their seed's: it gets
        #    the init image and mask once per image
        inpaint = request.mode == "inpaint"
        inputs = CallInputs(
            scales=[spec.scale for spec in request.adapters],
            ip_masks=[self._region_masks(spec, width, height) for spec in request.adapters],
            controls=_controls_of(request),
            control_scales=[(c.scale, c.start, c.end) for c in request.controls],
            init_images=None
            if request.init_image is None
            else [self._init_image(request.init_image, width, height)] * (k if inpaint else 1),
            masks=None if request.mask is None else [request.mask] * k,
        )

        # 5. denoise and decode: diffusers' stock path, k images of one prompt
        self._set_vae_slicing(k)
        arrays = self._call(
            request,
            prompt=request.prompt,
            negative_prompt=request.negative_prompt or None,
            embeds=embeds,
            clip_embeds=clip_embeds,
            per_prompt=k,
            generators=generators,
            inputs=inputs,
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
        inputs: CallInputs,
    ) -> list[np.ndarray]:
        """The one diffusers call both paths make: the per-slot inputs given, every shared
        field taken from `shared` (a row of the call: they are equal in all of them), the
        pipeline of the call's mode (text, img2img, inpaint; with its ControlNets)."""
        pipe = self._pipe_for(shared)
        width, height = self._size(shared)
        # strengths: load_ip_adapter resets them, so they are set on every call
        scales = inputs.scales
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
        arguments = self._call_arguments(pipe, shared, inputs, width=width, height=height)
        try:
            output = pipe(
                prompt=prompt,
                negative_prompt=negative_prompt,
                ip_adapter_image_embeds=embeds,
                num_images_per_prompt=per_prompt,
                num_inference_steps=shared.steps,
                guidance_scale=shared.guidance_scale,
                generator=generators,
                output_type="np",
                **arguments,
            )
        finally:
            for layer in stateful:
                layer.clip_embeds = None
                layer.shortcut = False
                layer.shortcut_scale = 1.0
        return list(output.images)

    def _call_arguments(
        self, pipe: Any, shared: GenerationRequest, inputs: CallInputs, *, width: int, height: int
    ) -> dict[str, Any]:
        """The mode's arguments, named as this pipeline class names them."""
        inputs.check()
        accepted = inspect.signature(pipe.__call__).parameters
        arguments: dict[str, Any] = {}
        if "width" in accepted:  # img2img takes its size from the (resized) init image
            arguments |= {"width": width, "height": height}
        if any(mask is not None for mask in inputs.ip_masks):
            arguments["cross_attention_kwargs"] = {"ip_adapter_masks": inputs.ip_masks}
        if shared.controls:
            name = "control_image" if "control_image" in accepted else "image"
            several = len(shared.controls) > 1
            arguments[name] = inputs.controls
            scale, start, end = zip(*inputs.control_scales, strict=True)
            arguments["controlnet_conditioning_scale"] = list(scale) if several else scale[0]
            arguments["control_guidance_start"] = list(start) if several else start[0]
            arguments["control_guidance_end"] = list(end) if several else end[0]
        if inputs.init_images is not None:
            arguments["image"] = inputs.init_images
            arguments["strength"] = shared.strength
        if inputs.masks is not None:
            arguments["mask_image"] = inputs.masks
        return arguments

    def _pipe_for(self, request: GenerationRequest) -> Any:
        """The pipeline of the request's mode and ControlNets, made from the warm one with
        `from_pipe` (the same UNet, VAE, text encoders and IP-Adapters; nothing reloaded). The
        dtype is passed: without it, from_pipe casts every shared module to float32."""
        import diffusers

        nets = tuple(c.model for c in request.controls)
        key = (request.mode, nets)
        if key not in self._pipes:
            cls = getattr(diffusers, pipeline_class(self.family, request.mode, bool(nets)))
            extra: dict[str, Any] = {}
            if nets:
                models = [self._controlnet(name) for name in nets]
                extra["controlnet"] = (
                    models[0] if len(models) == 1 else diffusers.MultiControlNetModel(models)
                )
            pipe = cls.from_pipe(self.pipe, dtype=self.dtype, **extra)
            pipe.set_progress_bar_config(disable=True)
            self._pipes[key] = pipe
        return self._pipes[key]

    def _controlnet(self, name: str) -> Any:
        from diffusers import ControlNetModel

        if name not in self._controlnets:
            preset = CONTROLNETS[name]
            if preset.family != self.family:
                raise ItemError(
                    ErrorCode.INVALID_ROW, f"{name} is for {preset.family}, not {self.family}"
                )
            folder = self.models.controlnet(name)
            with loading(f"the ControlNet at {folder}", folder):
                net = ControlNetModel.from_pretrained(
                    folder,
                    variant=preset.variant,
                    dtype=self.dtype,
                    local_files_only=self.models.local_files_only,
                )
            net.to(self.device)
            if self.device.type == "cuda" and self.acceleration.channels_last:
                net.to(memory_format=torch.channels_last)
            self._controlnets[name] = net
        return self._controlnets[name]

    def _init_image(self, image: Image.Image, width: int, height: int) -> Image.Image:
        """The init image at the output's size, resized as diffusers' image processor does
        (img2img pipelines otherwise take the size from the image itself)."""
        if image.size == (width, height):
            return image
        return self.pipe.image_processor.resize(image, height=height, width=width)

    def _region_masks(
        self, spec: AdapterInput, width: int, height: int, scale: float | None = None
    ) -> torch.Tensor | None:
        """The adapter's regions as diffusers' IPAdapterMaskProcessor makes them, [1, refs, H,
        W], one channel per reference; times `scale` (a per-slot strength), or a constant
        `scale` where the row has no regions. None: no mask (no regions, no per-slot scale)."""
        from diffusers.image_processor import IPAdapterMaskProcessor

        refs = int(spec.pos.shape[0])
        if spec.regions is None:
            if scale is None:
                return None
            return torch.full((1, refs, height, width), float(scale), dtype=self.dtype)
        masks = IPAdapterMaskProcessor().preprocess(spec.regions, height=height, width=width)
        masks = masks.reshape(1, -1, height, width).to(self.dtype)
        if masks.shape[1] == 1 and refs > 1:  # one region for all the references
            masks = masks.repeat(1, refs, 1, 1)
        return masks if scale is None else masks * float(scale)

    def _size(self, request: GenerationRequest) -> tuple[int, int]:
        return request.width or self.native_size[0], request.height or self.native_size[1]

    def generate_batch(self, requests: Sequence[GenerationRequest]) -> list[GenerationResult]:
        """Several rows in one diffusers call, each with its own references, prompts, seeds,
        strengths, control images, regions, init images and masks.

        Rows must share `batch_key`. Each row's images match its solo run to within float
        rounding (CPU: ~2e-6 before the uint8 conversion). A single request takes diffusers'
        stock path (bitwise as diffusers). On CUDA out-of-memory the batch is split in halves
        and retried.
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
        rows = [r for r, _ in slots]
        generators = [torch.Generator(device="cpu").manual_seed(seed) for _, seed in slots]

        # 2. embeddings per slot, [neg_1..neg_S, pos_1..pos_S] like diffusers' own CFG layout
        def stacked(halves: list[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
            neg = torch.stack([n for n, _ in halves])
            pos = torch.stack([p for _, p in halves])
            tensor = torch.cat([neg, pos]) if do_cfg else pos
            return tensor.to(device=self.device, dtype=self.dtype)

        adapters = range(len(self.adapters))
        embeds = [stacked([(r.adapters[a].neg, r.adapters[a].pos) for r in rows]) for a in adapters]
        clip_embeds = [
            None
            if first.adapters[a].clip_pos is None
            else stacked([(r.adapters[a].clip_neg, r.adapters[a].clip_pos) for r in rows])  # type: ignore[misc]
            for a in adapters
        ]

        # 3. per-slot strengths and inputs. An adapter whose rows may differ in strength runs
        #    at 1.0 with each slot's strength as a constant mask (times its regions): diffusers
        #    multiplies the adapter's attention output by the mask, as it does by the scale.
        #    ControlNets run at 1.0 too, their residuals multiplied per slot (_per_slot_control)
        scales: list[Any] = []
        ip_masks: list[torch.Tensor | None] = []
        for a in adapters:
            by_mask = per_slot_scale(first.adapters[a])
            scales.append(1.0 if by_mask else first.adapters[a].scale)
            masks = [
                self._region_masks(
                    r.adapters[a],
                    width,
                    height,
                    scale=_plain(r.adapters[a].scale) if by_mask else None,
                )
                for r in rows
            ]
            if all(m is None for m in masks):
                ip_masks.append(None)
                continue
            mask = torch.cat(masks)  # type: ignore[arg-type]
            ip_masks.append(torch.cat([mask, mask]) if do_cfg else mask)
        inputs = CallInputs(
            scales=scales,
            ip_masks=ip_masks,
            controls=[_controls_of(r) for r in rows] if first.controls else None,
            control_scales=[(1.0, 0.0, 1.0)] * len(first.controls),
            init_images=None
            if first.init_image is None
            else [self._init_image(r.init_image, width, height) for r in rows],  # type: ignore[arg-type]
            masks=None if first.mask is None else [r.mask for r in rows],  # type: ignore[misc]
            slots=len(slots),
        )

        # 4. denoise and decode, with the per-slot embeds passed through unrepeated
        self._set_vae_slicing(len(slots))
        pipe = self._pipe_for(first)
        with (
            _prebuilt_ip_embeds(pipe, embeds, slots=len(slots), do_cfg=do_cfg),
            _per_slot_control(pipe, rows, do_cfg=do_cfg),
        ):
            arrays = self._call(
                first,
                prompt=[r.prompt for r in rows],
                negative_prompt=[r.negative_prompt for r in rows]
                if first.negative_prompt
                else None,
                embeds=embeds,
                clip_embeds=clip_embeds,
                per_prompt=1,
                generators=generators,
                inputs=inputs,
            )[:real]  # padding slots dropped

        # 5. hand each row its images back
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


@contextmanager
def _per_slot_control(
    pipe: Any, rows: Sequence[GenerationRequest], *, do_cfg: bool
) -> Iterator[None]:
    """Each slot's ControlNet strength and step window in one call. The call runs every
    ControlNet at scale 1.0 over all steps; here each net's residuals are multiplied, step by
    step, by a per-slot factor: the row's scale inside its [start, end] fraction of the steps,
    0 outside, with diffusers' own rule (`1 - (i / n < start or (i + 1) / n > end)`, n the
    steps the pipeline runs). The second half of a CFG batch repeats the first."""
    if not rows[0].controls:
        yield
        return
    controlnet = pipe.controlnet
    nets = list(getattr(controlnet, "nets", [controlnet]))
    originals = [net.forward for net in nets]

    def wrapped(index: int, original: Any) -> Any:
        step = iter(range(10**9))

        def forward(*args: Any, **kwargs: Any) -> Any:
            i, n = next(step), pipe._num_timesteps
            factors = [
                0.0 if (i / n < c.start or (i + 1) / n > c.end) else c.scale
                for c in (r.controls[index] for r in rows)
            ]
            down, mid = original(*args, **kwargs)
            factor = torch.tensor(
                factors * (2 if do_cfg else 1), dtype=mid.dtype, device=mid.device
            )
            factor = factor.view(-1, 1, 1, 1)
            return [d * factor for d in down], mid * factor

        return forward

    for index, (net, original) in enumerate(zip(nets, originals, strict=True)):
        net.forward = wrapped(index, original)
    try:
        yield
    finally:
        for net in nets:
            del net.forward  # the class's method again


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
        resolve: Callable[[str], AdapterPreset] = builtin_adapter,
    ) -> None:
        self.models = models
        self.resolve = resolve  # adapter name -> preset (trained ones: the worker's catalog)
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
            resolve=self.resolve,
        )
        return self._pipelines[adapters]
