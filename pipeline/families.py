"""Model families, as data: where a family's base model is, which diffusers class runs each
mode, how its IP-Adapters are fed, guided and scaled per row, and its defaults.

Adding a family is an entry in `BASE_MODELS`, a tiny-model builder (`pipeline.tiny`) and tests;
the generator (`pipeline.pipelines`, `pipeline.generator`) reads the entry. The adapters of each
family are `pipeline.presets.ADAPTERS`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, get_args

Mode = Literal["text", "img2img", "inpaint"]  # from noise, from init_image, + inpaint_mask


@dataclass(frozen=True)
class BaseModelPreset:
    """A model family, as data: where its base model is, which diffusers class runs each mode,
    how its IP-Adapters are fed and guided, and its defaults. Adding a family is an entry
    here, a tiny-model builder (`pipeline.tiny`) and tests; the generator reads the entry."""

    family: str
    folder: str  # folder name inside a models folder (the repository's layout)
    hub_repo: str  # public repository the `hub` preset downloads
    # the diffusers class of each mode, without and with ControlNets (None: diffusers has
    # none that takes IP-Adapters; the text mode always has one)
    pipelines: tuple[tuple[Mode, str | None, str | None], ...]
    native_size: int  # the real model's width = height
    default_steps: int  # a row's `steps` when it gives none
    default_guidance: float  # a row's `guidance_scale` when it gives none
    # how guidance runs: "cfg" = classifier-free guidance, one batch of [negative; positive]
    # halves when guidance_scale > 1 (diffusers' rule); "distilled" = FLUX.1-dev's guidance
    # embedding (`guidance_scale` is an input of the model, one pass), and true CFG (a second
    # pass with the negative prompt) only when a row sets `true_cfg_scale` > 1
    guidance: Literal["cfg", "distilled"]
    # what `ip_adapter_image_embeds` holds: "cfg_halves" = a list with one tensor per adapter,
    # [negative; positive] stacked on the batch axis under CFG (diffusers' IPAdapterMixin);
    # "separate" = the positive embeds alone, the negative ones always passed as
    # `negative_ip_adapter_image_embeds` (FluxIPAdapterMixin); "cfg_tensor" = ONE tensor
    # (one adapter only), [negative; positive] stacked under CFG (SD3IPAdapterMixin)
    embeds: Literal["cfg_halves", "separate", "cfg_tensor"]
    # how a row's own adapter strength is applied in a batched call: "ip_mask" = the adapter
    # runs at 1.0 with the strength as a constant IP-Adapter attention mask per slot;
    # "processor" = each IP attention processor's scale is per slot (FLUX: a tensor; SD3.5:
    # an object that multiplies like one, see `diffusers_overrides.set_processor_scales`)
    row_scale: Literal["ip_mask", "processor"]
    # the model that denoises: a UNet (SD1.5, SDXL, Kolors) or a transformer (FLUX.1, SD3.5)
    denoiser: Literal["unet", "transformer"]
    # its pipelines take `clip_skip` (not FLUX's, not Kolors' ChatGLM)
    clip_skip: bool
    # diffusers' ControlNet class and multi-ControlNet class of the family (None: none)
    controlnet_models: tuple[str, str] | None
    # the repository ships a safety checker: loaded without it (catalog jobs review outputs)
    safety_checker: bool
    # InstantStyle: attention modules per block that has them (a list scale needs this length)
    attention_blocks: dict[str, dict[str, int]]
    memory: str  # README's rough fp16 inference memory
    licence: str  # the base model's weights

    def pipeline(self, mode: str, controlnet: bool) -> str:
        """The diffusers class name of `mode`, with ControlNets or without."""
        for name, plain, with_control in self.pipelines:
            found = with_control if controlnet else plain
            if name == mode and found is not None:
                return found
        nets = " with ControlNets" if controlnet else ""
        raise KeyError(f"{self.family} has no {mode} pipeline{nets} that takes IP-Adapters")

    @property
    def pipeline_class(self) -> str:
        """The text-to-image class (what the base model's folder loads as)."""
        return self.pipeline("text", False)


SD15_BLOCKS = {
    "down": {"block_0": 2, "block_1": 2, "block_2": 2},
    "mid": {"block_0": 1},
    "up": {"block_1": 3, "block_2": 3, "block_3": 3},
}
SDXL_BLOCKS = {
    "down": {"block_1": 2, "block_2": 2},
    "mid": {"block_0": 1},
    "up": {"block_0": 3, "block_1": 3},
}

BASE_MODELS: dict[str, BaseModelPreset] = {
    "sd15": BaseModelPreset(
        family="sd15",
        folder="stable-diffusion-v1-5",
        hub_repo="stable-diffusion-v1-5/stable-diffusion-v1-5",
        pipelines=(
            ("text", "StableDiffusionPipeline", "StableDiffusionControlNetPipeline"),
            (
                "img2img",
                "StableDiffusionImg2ImgPipeline",
                "StableDiffusionControlNetImg2ImgPipeline",
            ),
            (
                "inpaint",
                "StableDiffusionInpaintPipeline",
                "StableDiffusionControlNetInpaintPipeline",
            ),
        ),
        native_size=512,
        default_steps=30,
        default_guidance=7.5,
        guidance="cfg",
        embeds="cfg_halves",
        row_scale="ip_mask",
        denoiser="unet",
        clip_skip=True,
        controlnet_models=("ControlNetModel", "MultiControlNetModel"),
        safety_checker=True,
        attention_blocks=SD15_BLOCKS,
        memory="~3.5 GB at batch 1 (fp16), +~1 GB per extra image in a batch at 512x512",
        licence="CreativeML OpenRAIL-M",
    ),
    "sdxl": BaseModelPreset(
        family="sdxl",
        folder="stable-diffusion-xl-base-1.0",
        hub_repo="stabilityai/stable-diffusion-xl-base-1.0",
        pipelines=(
            ("text", "StableDiffusionXLPipeline", "StableDiffusionXLControlNetPipeline"),
            (
                "img2img",
                "StableDiffusionXLImg2ImgPipeline",
                "StableDiffusionXLControlNetImg2ImgPipeline",
            ),
            (
                "inpaint",
                "StableDiffusionXLInpaintPipeline",
                "StableDiffusionXLControlNetInpaintPipeline",
            ),
        ),
        native_size=1024,
        default_steps=30,
        default_guidance=7.5,
        guidance="cfg",
        embeds="cfg_halves",
        row_scale="ip_mask",
        denoiser="unet",
        clip_skip=True,
        controlnet_models=("ControlNetModel", "MultiControlNetModel"),
        safety_checker=False,
        attention_blocks=SDXL_BLOCKS,
        memory="~9 GB at batch 1 (fp16) at 1024x1024",
        licence="CreativeML OpenRAIL++-M",
    ),
    "flux": BaseModelPreset(
        family="flux",
        folder="FLUX.1-dev",
        hub_repo="black-forest-labs/FLUX.1-dev",
        pipelines=(
            ("text", "FluxPipeline", "FluxControlNetPipeline"),
            # FluxControlNetImg2ImgPipeline and ...InpaintPipeline take no IP-Adapter
            ("img2img", "FluxImg2ImgPipeline", None),
            ("inpaint", "FluxInpaintPipeline", None),
        ),
        native_size=1024,
        default_steps=28,  # FluxPipeline's defaults, as the FLUX.1-dev card calls it
        default_guidance=3.5,
        guidance="distilled",
        embeds="separate",
        row_scale="processor",
        denoiser="transformer",
        clip_skip=False,
        controlnet_models=("FluxControlNetModel", "FluxMultiControlNetModel"),
        safety_checker=False,
        attention_blocks={},  # no InstantStyle block scales
        memory="~24 GB of bf16 weights for the 12B transformer, ~10 GB more for T5-XXL",
        licence="FLUX.1 [dev] Non-Commercial License",
    ),
    "sd35": BaseModelPreset(
        family="sd35",
        folder="stable-diffusion-3.5-large",
        hub_repo="stabilityai/stable-diffusion-3.5-large",
        pipelines=(
            ("text", "StableDiffusion3Pipeline", "StableDiffusion3ControlNetPipeline"),
            ("img2img", "StableDiffusion3Img2ImgPipeline", None),  # no SD3 ControlNet img2img
            # StableDiffusion3ControlNetInpaintingPipeline is for an inpainting ControlNet
            # (its own control mask), not a ControlNet beside an inpaint: not listed
            ("inpaint", "StableDiffusion3InpaintPipeline", None),
        ),
        native_size=1024,
        default_steps=28,  # the SD3.5 Large model card's call
        default_guidance=3.5,
        guidance="cfg",
        embeds="cfg_tensor",
        row_scale="processor",
        denoiser="transformer",
        clip_skip=True,
        controlnet_models=("SD3ControlNetModel", "SD3MultiControlNetModel"),
        safety_checker=False,
        attention_blocks={},  # no InstantStyle block scales
        memory="~16 GB of bf16 weights for the 8B transformer, ~10 GB more for T5-XXL, "
        "0.8 GB for SigLIP",
        licence="Stability AI Community License (free below USD 1M annual revenue)",
    ),
    "kolors": BaseModelPreset(
        family="kolors",
        folder="Kolors-diffusers",
        hub_repo="Kwai-Kolors/Kolors-diffusers",
        pipelines=(  # diffusers has no Kolors inpainting and no Kolors ControlNet pipeline
            ("text", "KolorsPipeline", None),
            ("img2img", "KolorsImg2ImgPipeline", None),
            ("inpaint", None, None),
        ),
        native_size=1024,
        default_steps=50,  # the Kolors IP-Adapter-Plus card's call
        default_guidance=5.0,
        guidance="cfg",
        embeds="cfg_halves",
        row_scale="ip_mask",
        denoiser="unet",
        clip_skip=False,
        controlnet_models=None,
        safety_checker=False,
        attention_blocks={},  # SDXL's UNet, but no published InstantStyle recipe for Kolors
        memory="~5 GB of fp16 weights for the UNet, ~12 GB for ChatGLM3-6B",
        licence="Kolors License (academic use; commercial use after registering with Kuaishou)",
    ),
}

MODES: tuple[Mode, ...] = get_args(Mode)
