"""Model presets: which public weights each adapter name means, and what it embeds.

A models folder mirrors the public repositories, so the same code loads real weights and the
tiny ones `ipbatch models tiny` writes:

    MODELS/stable-diffusion-v1-5/      <- stable-diffusion-v1-5/stable-diffusion-v1-5 (diffusers)
    MODELS/IP-Adapter/models/          <- h94/IP-Adapter, models/ folder
        ip-adapter_sd15.safetensors
        ip-adapter-plus_sd15.safetensors
        image_encoder/                 (OpenCLIP ViT-H/14 as CLIPVisionModelWithProjection)
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum


class EmbedKind(StrEnum):
    """What an adapter's image projection consumes."""

    # CLIPVisionModelWithProjection(...).image_embeds; negative half = zeros
    CLIP_IMAGE_EMBEDS = "clip_image_embeds"
    # hidden_states[-2] (penultimate layer); negative half = encoder output of an all-zero image
    CLIP_HIDDEN_STATES = "clip_hidden_states"


@dataclass(frozen=True)
class BaseModelPreset:
    family: str
    folder: str  # folder name inside a models folder
    hub_repo: str  # public repository the `hub` preset downloads
    pipeline_class: str  # diffusers class name


@dataclass(frozen=True)
class AdapterPreset:
    name: str
    family: str  # which base model it was trained for
    repo_folder: str  # folder inside a models folder (mirrors hub_repo)
    hub_repo: str
    subfolder: str  # inside the repository
    weight_name: str
    image_encoder_subfolder: str  # inside the repository
    embed_kind: EmbedKind
    summary: str


BASE_MODELS: dict[str, BaseModelPreset] = {
    "sd15": BaseModelPreset(
        family="sd15",
        folder="stable-diffusion-v1-5",
        hub_repo="stable-diffusion-v1-5/stable-diffusion-v1-5",
        pipeline_class="StableDiffusionPipeline",
    ),
}

ADAPTERS: dict[str, AdapterPreset] = {
    "sd15": AdapterPreset(
        name="sd15",
        family="sd15",
        repo_folder="IP-Adapter",
        hub_repo="h94/IP-Adapter",
        subfolder="models",
        weight_name="ip-adapter_sd15.safetensors",
        image_encoder_subfolder="models/image_encoder",
        embed_kind=EmbedKind.CLIP_IMAGE_EMBEDS,
        summary="global image embedding -> 4 tokens; overall look and style of the reference",
    ),
    "sd15-plus": AdapterPreset(
        name="sd15-plus",
        family="sd15",
        repo_folder="IP-Adapter",
        hub_repo="h94/IP-Adapter",
        subfolder="models",
        weight_name="ip-adapter-plus_sd15.safetensors",
        image_encoder_subfolder="models/image_encoder",
        embed_kind=EmbedKind.CLIP_HIDDEN_STATES,
        summary="patch features through a Resampler -> 16 tokens; closer to the reference's detail",
    ),
}

# Named by the contract, not built yet (see the open issue on adapter variants).
PLANNED_ADAPTERS = (
    "sd15-plus-face",
    "sd15-full-face",
    "sd15-faceid",
    "sd15-faceid-plusv2",
    "sdxl",
    "sdxl-plus",
    "sdxl-plus-face",
)


def available_adapter_names() -> list[str]:
    return list(ADAPTERS)


def adapter_error(name: str) -> str:
    if name in PLANNED_ADAPTERS:
        return (
            f"adapter {name!r} is not available in this version of ipbatch; "
            f"available: {', '.join(ADAPTERS)}"
        )
    return f"unknown adapter {name!r}; choose one of: {', '.join(ADAPTERS)}"
