"""The warm diffusers pipelines of one (base model, adapter set), loaded in the worker process:
the base model and its IP-Adapters (with FaceID's LoRA), device settings and compile, the
pipeline of each mode made from the warm one on first use, the ControlNets, and how the
family's pipelines take a call's inputs (CFG halves, the embeds layout, negative inputs).

`pipeline.generator.Generator` is this plus how a row (or a batch of rows) is called.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import PurePosixPath
from typing import TYPE_CHECKING, Any

import torch

from core.errors import ConfigError, ErrorCode, ItemError, ModelLoadError
from pipeline.diffusers_overrides import clip_skip_on_flat_clip, embed_shape
from pipeline.families import BASE_MODELS
from pipeline.models import ModelSource, loading
from pipeline.presets import CONTROLNETS, SCHEDULERS, AdapterPreset, builtin_adapter

if TYPE_CHECKING:
    from collections.abc import Sequence

    from pipeline.requests import GenerationRequest

# (guidance, embeds, row_scale) the generator knows how to call (`BaseModelPreset`)
CALLABLE = {
    ("cfg", "cfg_halves", "ip_mask"),  # SD1.5, SDXL
    ("distilled", "separate", "processor"),  # FLUX.1
    ("cfg", "cfg_tensor", "processor"),  # SD3.5
}


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
    # torch.compile's backend: inductor (the speed); the unit test of the bucketing uses
    # "eager", dynamo's same graph capture without inductor's minutes of code generation
    compile_backend: str = "inductor"


def compile_buckets(max_images: int) -> list[int]:
    """Batch sizes a compiled UNet sees: powers of two up to `max_images`, and itself."""
    sizes, size = [], 1
    while size < max_images:
        sizes.append(size)
        size *= 2
    return sizes + [max_images]


class WarmPipelines:
    """One warm pipeline for one (base model, adapter set), and its other modes' pipelines."""

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
        if (base.guidance, base.embeds, base.row_scale) not in CALLABLE:
            raise ConfigError(f"{self.family}: a family this generator cannot call yet")
        self.base = base
        pipeline_class = getattr(diffusers, base.pipeline_class)
        extra = {"safety_checker": None, "requires_safety_checker": False}
        # 1. the frozen base model (no safety checker: catalog jobs review outputs themselves)
        base_folder = models.base_model(self.family)
        with loading(f"the base model at {base_folder}", base_folder):
            self.pipe = pipeline_class.from_pretrained(
                base_folder,
                dtype=dtype,
                local_files_only=models.local_files_only,
                **(extra if base.safety_checker else {}),
            )
        # 2. the adapters, without their image encoders: embeddings arrive precomputed
        self.models = models
        self._load_adapters()
        for encoder in self.text_encoders:
            clip_skip_on_flat_clip(encoder)
        self.pipe.to(device)
        self.pipe.set_progress_bar_config(disable=True)
        # 3. device settings: channels_last (a UNet's convolutions) and the VAE's slicing on
        #    CUDA, optional compile
        self.acceleration = acceleration or Acceleration()
        if device.type == "cuda" and self.acceleration.channels_last and base.denoiser == "unet":
            self.denoiser.to(memory_format=torch.channels_last)
        self.buckets: list[int] = []
        if self.acceleration.compile:
            from torch import _dynamo

            self.buckets = compile_buckets(self.acceleration.max_images)
            # one graph per (bucket, CFG or not, resolution): allow a few dozen
            _dynamo.config.cache_size_limit = max(_dynamo.config.cache_size_limit, 64)
            self.denoiser.compile(dynamic=False, backend=self.acceleration.compile_backend)
        # 4. the other modes' pipelines (made on first use, sharing every module) and the
        #    ControlNets (loaded on first use)
        self._pipes: dict[tuple[str, tuple[str, ...]], Any] = {("text", ()): self.pipe}
        self._controlnets: dict[str, Any] = {}
        self._schedulers: dict[str, Any] = {"default": self.pipe.scheduler}

    def _load_adapters(self) -> None:
        """`self.presets`' weights into the UNet (attention processors, projection layers)."""
        weights = [self.models.adapter_weights(preset) for preset in self.presets]
        files = [str(PurePosixPath(repo, sub, name)) for repo, sub, name in weights]
        # no image encoder: embeddings arrive precomputed (IPAdapterMixin's and
        # FluxIPAdapterMixin's loaders name that differently; SD3IPAdapterMixin's loads one
        # adapter, given as one path, not a list)
        no_encoder = (
            {"image_encoder_pretrained_model_name_or_path": None}
            if self.base.embeds == "separate"
            else {"image_encoder_folder": None}
        )
        repos, subfolders, names = (list(part) for part in zip(*weights, strict=True))
        if self.base.embeds == "cfg_tensor":
            if len(weights) != 1:
                raise ItemError(ErrorCode.MODEL_ERROR, f"{self.family} takes one IP-Adapter")
            repos, subfolders, names = repos[0], subfolders[0], names[0]
        with loading(f"adapter weights {', '.join(files)}"):
            self.pipe.load_ip_adapter(
                repos,
                subfolder=subfolders,
                weight_name=names,
                local_files_only=self.models.local_files_only,
                **no_encoder,
            )
        # FaceID's LoRA: loaded and ACTIVE (diffusers activates only the last one it loads;
        # rows with two FaceID adapters are refused by the manifest for that reason)
        active = (
            set(self.pipe.get_active_adapters()) if any(p.lora for p in self.presets) else set()
        )
        for index, (preset, file) in enumerate(zip(self.presets, files, strict=True)):
            if preset.lora and f"faceid_{index}" not in active:
                raise ModelLoadError(f"{preset.name}: the LoRA in {file} is not active")
        if self.base.embeds == "cfg_tensor":  # SD3.5: one projection, on the transformer
            self._layers = [self.denoiser.image_proj]
        else:
            self._layers = list(self.denoiser.encoder_hid_proj.image_projection_layers)
        self._projection_shapes = [embed_shape(layer) for layer in self._layers]

    def reload_adapters(self, presets: list[AdapterPreset]) -> None:
        """New weights for the same adapters, on this warm pipeline: training's validation
        renders each export of the adapter it trains without loading the base model again.
        The same names and architectures only, and no LoRA (unloading keeps FaceID's)."""
        same = [(p.name, p.projection) for p in presets] == [
            (p.name, p.projection) for p in self.presets
        ]
        if not same or any(p.lora for p in [*presets, *self.presets]):
            raise ValueError(f"cannot reload {self.adapters} as {[p.name for p in presets]}")
        self.pipe.unload_ip_adapter()
        self.presets = presets
        self._load_adapters()

    @property
    def denoiser(self) -> Any:
        """The UNet (SD1.5, SDXL) or the transformer (FLUX.1, SD3.5) the adapters live in."""
        return self.pipe.unet if self.base.denoiser == "unet" else self.pipe.transformer

    @property
    def native_size(self) -> tuple[int, int]:
        if self.base.denoiser == "unet":
            size = self.denoiser.config.sample_size * self.pipe.vae_scale_factor
        else:  # the pipeline's default (FLUX: 128 latent pixels; SD3.5: the transformer's)
            size = self.pipe.default_sample_size * self.pipe.vae_scale_factor
        return size, size

    @property
    def size_multiple(self) -> int:
        """What width and height must divide by: the VAE's factor, times the transformer's
        patch (SD3.5: its pipeline's `patch_size`; FLUX: 2, its latents are packed 2x2)."""
        patch = 1 if self.base.denoiser == "unet" else getattr(self.pipe, "patch_size", 2)
        return int(self.pipe.vae_scale_factor) * int(patch)

    @property
    def text_encoders(self) -> list[Any]:
        """The base model's text encoders (SD1.5: one; SDXL: two)."""
        found = self.pipe.components.items()
        return [m for name, m in found if name.startswith("text_encoder") and m is not None]

    def pipe_for(self, mode: str, nets: tuple[str, ...]) -> Any:
        """The pipeline of a mode (text, img2img, inpaint) with these ControlNets, made from the
        warm one with `from_pipe` (the same UNet, VAE, text encoders and IP-Adapters; nothing
        reloaded). The dtype is passed: without it, from_pipe casts every shared module to
        float32."""
        import diffusers

        key = (mode, nets)
        if key not in self._pipes:
            cls = getattr(diffusers, self.base.pipeline(mode, bool(nets)))
            extra: dict[str, Any] = {}
            if nets:
                models = [self._controlnet(name) for name in nets]
                assert self.base.controlnet_models is not None  # the manifest refuses others
                multi = getattr(diffusers, self.base.controlnet_models[1])
                extra["controlnet"] = models[0] if len(models) == 1 else multi(models)
            pipe = cls.from_pipe(self.pipe, dtype=self.dtype, **extra)
            pipe.set_progress_bar_config(disable=True)
            self._pipes[key] = pipe
        return self._pipes[key]

    def scheduler(self, name: str) -> Any:
        """The sampler a row names (`presets.SCHEDULERS`), made as the diffusers docs swap
        one: `from_config` of the model folder's scheduler's config (made once; a call sets
        its timesteps afresh)."""
        import diffusers

        if name not in self._schedulers:
            cls = getattr(diffusers, SCHEDULERS[name] or "")
            self._schedulers[name] = cls.from_config(self._schedulers["default"].config)
        return self._schedulers[name]

    def _controlnet(self, name: str) -> Any:
        import diffusers

        if name not in self._controlnets:
            preset = CONTROLNETS[name]
            if preset.family != self.family or self.base.controlnet_models is None:
                raise ItemError(
                    ErrorCode.INVALID_ROW, f"{name} is for {preset.family}, not {self.family}"
                )
            folder = self.models.controlnet(name)
            model_class = getattr(diffusers, self.base.controlnet_models[0])
            with loading(f"the ControlNet at {folder}", folder):
                net = model_class.from_pretrained(
                    folder,
                    variant=preset.variant,
                    dtype=self.dtype,
                    local_files_only=self.models.local_files_only,
                )
            net.to(self.device)
            unet = self.base.denoiser == "unet"
            if self.device.type == "cuda" and self.acceleration.channels_last and unet:
                net.to(memory_format=torch.channels_last)  # a UNet ControlNet's convolutions
            self._controlnets[name] = net
        return self._controlnets[name]

    # how the family's pipeline takes a call's inputs (`BaseModelPreset`)

    def _stacks_cfg(self, request: GenerationRequest) -> bool:
        """Whether the call stacks [negative; positive] halves: classic CFG above guidance 1
        (diffusers' rule); never for FLUX (distilled guidance; true CFG is a second pass)."""
        return self.base.guidance == "cfg" and request.guidance_scale > 1.0

    def _embeds_argument(
        self, per_adapter: list[torch.Tensor]
    ) -> list[torch.Tensor] | torch.Tensor:
        """`ip_adapter_image_embeds` as the family's pipeline takes it: a list with a tensor
        per adapter, [batch, references, ...]; or (SD3.5: one adapter, one reference) the
        tensor itself, [batch, tokens, width]."""
        if self.base.embeds != "cfg_tensor":
            return per_adapter
        [tensor] = per_adapter
        return tensor.squeeze(1)

    def _negatives(self, per_adapter: list[list[torch.Tensor]]) -> list[torch.Tensor] | None:
        """FLUX's `negative_ip_adapter_image_embeds`: [slots, n, D] per adapter. Always given:
        without them FluxPipeline encodes an all-black image with the image encoder, which a
        worker fed precomputed embeddings does not load (AttributeError)."""
        if self.base.embeds != "separate":
            return None
        return [torch.stack(negs).to(self.device, self.dtype) for negs in per_adapter]

    def _negative_prompts(
        self, rows: Sequence[GenerationRequest], *, solo: bool = False
    ) -> str | list[str] | None:
        """The call's negative prompt(s). SD1.5/SDXL: the rows' when given (SDXL zeroes an
        absent one). FLUX: only with true CFG, and then always (an empty one included: a
        negative prompt is what turns the second pass on)."""
        first = rows[0]
        if self.base.guidance == "distilled":
            given = first.true_cfg_scale is not None and first.true_cfg_scale > 1
        else:
            given = bool(first.negative_prompt)
        if not given:
            return None
        return first.negative_prompt if solo else [r.negative_prompt for r in rows]

    def set_vae_slicing(self, images: int) -> None:
        """Decode one image at a time on big batches (same images, lower memory peak)."""
        limit = self.acceleration.vae_slicing_above
        if limit is None:
            limit = 8 if self.device.type == "cuda" else 0
        if limit and images > limit:
            self.pipe.vae.enable_slicing()
        else:
            self.pipe.vae.disable_slicing()
