"""Model presets: which public weights each adapter name means, and what it embeds.

A models folder mirrors the public repositories, so the same code loads real weights and the
tiny ones `ipbatch models tiny` writes:

    MODELS/stable-diffusion-v1-5/          stable-diffusion-v1-5/stable-diffusion-v1-5
    MODELS/stable-diffusion-xl-base-1.0/   stabilityai/stable-diffusion-xl-base-1.0
    MODELS/IP-Adapter/                     h94/IP-Adapter
        models/                            SD1.5 adapters + models/image_encoder (ViT-H/14)
        sdxl_models/                       SDXL adapters + sdxl_models/image_encoder (ViT-bigG/14)
    MODELS/IP-Adapter-FaceID/              h94/IP-Adapter-FaceID (FaceID .bin files)
    MODELS/insightface/models/buffalo_l/   insightface's buffalo_l face-analysis pack
    MODELS/clip-vit-large-patch14/         openai/clip-vit-large-patch14 (CLIP-I / CLIP-T scores,
                                           FLUX's adapter's encoder)
    MODELS/FLUX.1-dev/, flux-ip-adapter/   black-forest-labs/FLUX.1-dev, XLabs-AI/flux-ip-adapter
    MODELS/stable-diffusion-3.5-large/     stabilityai/stable-diffusion-3.5-large
    MODELS/SD3.5-Large-IP-Adapter/         InstantX/SD3.5-Large-IP-Adapter (ip-adapter.bin)
    MODELS/siglip-so400m-patch14-384/      google/siglip-so400m-patch14-384 (its encoder)
    MODELS/Kolors-diffusers/               Kwai-Kolors/Kolors-diffusers
    MODELS/Kolors-IP-Adapter-Plus/         Kwai-Kolors/Kolors-IP-Adapter-Plus (+ image_encoder/)
    MODELS/control_v11p_sd15_canny/ ...    the ControlNets (`CONTROLNETS`), one folder each
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum
from typing import Literal, get_args


class EmbedKind(StrEnum):
    """What an adapter's image projection consumes."""

    # CLIPVisionModelWithProjection(...).image_embeds; negative half = zeros
    CLIP_IMAGE_EMBEDS = "clip_image_embeds"
    # the same; negative = the image_embeds of an all-black picture (what FluxPipeline encodes
    # for its negative IP-Adapter input when it is given none)
    CLIP_IMAGE_EMBEDS_BLACK = "clip_image_embeds_black"
    # hidden_states[-2] (penultimate layer); negative half = encoder output of an all-zero image
    CLIP_HIDDEN_STATES = "clip_hidden_states"
    # SigLIP's hidden_states[-2] (SD3.5, InstantX): the projection also takes the timestep, so
    # the cache holds these features, never projected tokens; negative half = zeros
    SIGLIP_HIDDEN_STATES = "siglip_hidden_states"
    # insightface normed_embedding (512) of the largest face; negative half = zeros
    FACE_ID = "face_id"
    # FACE_ID plus the CLIP hidden states of the aligned face crop (set on the projection layer)
    FACE_ID_PLUS = "face_id_plus"


class Projection(StrEnum):
    """The adapter's image projection (h94's `image_proj`; the diffusers class that loads it)."""

    LINEAR = "linear"  # ImageProjection: image_embeds -> 4 tokens, LayerNorm
    RESAMPLER = "resampler"  # IPAdapterPlusImageProjection: 16 learned queries over patches
    PATCH_MLP = "patch_mlp"  # IPAdapterFullImageProjection: an MLP over all 257 patch tokens
    FACE_ID_MLP = "face_id_mlp"  # IPAdapterFaceIDImageProjection: 512 -> 1024 -> 4 tokens
    FACE_ID_PLUS = "face_id_plus"  # IPAdapterFaceIDPlusImageProjection: ID MLP + perceiver
    # IPAdapterTimeImageProjection (InstantX SD3.5): a resampler modulated by the timestep
    TIME_RESAMPLER = "time_resampler"


@dataclass(frozen=True)
class RepoPath:
    """A folder or file inside a public repository (mirrored in a models folder)."""

    hub_repo: str
    folder: str  # the repository's folder name inside a models folder
    path: str  # inside the repository ("" = its root)


H94 = "h94/IP-Adapter"
H94_FACEID = "h94/IP-Adapter-FaceID"
VIT_H = RepoPath(H94, "IP-Adapter", "models/image_encoder")
VIT_BIGG = RepoPath(H94, "IP-Adapter", "sdxl_models/image_encoder")
# InstantX's SD3.5 adapter's encoder: google's SigLIP so400m (a two-tower folder; the vision
# tower and its SiglipImageProcessor are loaded from it)
SIGLIP = RepoPath("google/siglip-so400m-patch14-384", "siglip-so400m-patch14-384", "")
# Kolors-IP-Adapter-Plus's encoder: CLIP ViT-L/14 at 336 px, in the adapter's repository
KOLORS_VIT_L = RepoPath(
    "Kwai-Kolors/Kolors-IP-Adapter-Plus", "Kolors-IP-Adapter-Plus", "image_encoder"
)
# the model the IP-Adapter paper scores with: CLIP ViT-L/14, both towers
SCORE_MODEL = RepoPath("openai/clip-vit-large-patch14", "clip-vit-large-patch14", "")


@dataclass(frozen=True)
class AdapterPreset:
    name: str
    family: str  # which base model it was trained for
    weights: RepoPath  # path = subfolder holding the weight file
    weight_name: str
    image_encoder: RepoPath | None  # None: needs no CLIP encoder (FaceID)
    embed_kind: EmbedKind
    projection: Projection
    summary: str
    lora: bool = False  # FaceID: the weight file also carries a LoRA for the UNet (needs peft)
    shortcut: bool = False  # FaceID-Plus v2: the projection adds the ID tokens back
    # an adapter trained with `ipbatch train` (`custom:<name>`): `weights.folder` is the local
    # folder holding its file, `custom_sha256` the file's sha256
    custom_sha256: str | None = None

    @property
    def uses_faces(self) -> bool:
        return self.embed_kind in (EmbedKind.FACE_ID, EmbedKind.FACE_ID_PLUS)


_PROJECTION = {  # what each kind of embedding is projected with, in h94's CLIP adapters
    EmbedKind.CLIP_IMAGE_EMBEDS: Projection.LINEAR,
    EmbedKind.CLIP_HIDDEN_STATES: Projection.RESAMPLER,
}


def _sd15(
    name: str, weight: str, kind: EmbedKind, summary: str, projection: Projection | None = None
) -> AdapterPreset:
    return AdapterPreset(
        name,
        "sd15",
        RepoPath(H94, "IP-Adapter", "models"),
        weight,
        VIT_H,
        kind,
        projection or _PROJECTION[kind],
        summary,
    )


def _sdxl(
    name: str, weight: str, encoder: RepoPath, kind: EmbedKind, summary: str
) -> AdapterPreset:
    return AdapterPreset(
        name,
        "sdxl",
        RepoPath(H94, "IP-Adapter", "sdxl_models"),
        weight,
        encoder,
        kind,
        _PROJECTION[kind],
        summary,
    )


ADAPTERS: dict[str, AdapterPreset] = {
    p.name: p
    for p in (
        _sd15(
            "sd15",
            "ip-adapter_sd15.safetensors",
            EmbedKind.CLIP_IMAGE_EMBEDS,
            "global image embedding -> 4 tokens: overall look, colour and style",
        ),
        _sd15(
            "sd15-plus",
            "ip-adapter-plus_sd15.safetensors",
            EmbedKind.CLIP_HIDDEN_STATES,
            "patch features -> 16 tokens (Resampler): closer to the reference's details",
        ),
        _sd15(
            "sd15-plus-face",
            "ip-adapter-plus-face_sd15.safetensors",
            EmbedKind.CLIP_HIDDEN_STATES,
            "plus, trained on cropped faces: a face reference drives the generated face",
        ),
        _sd15(
            "sd15-full-face",
            "ip-adapter-full-face_sd15.safetensors",
            EmbedKind.CLIP_HIDDEN_STATES,
            "all 257 patch tokens of a face crop: stronger face likeness than plus-face",
            projection=Projection.PATCH_MLP,
        ),
        AdapterPreset(
            "sd15-faceid",
            "sd15",
            RepoPath(H94_FACEID, "IP-Adapter-FaceID", ""),
            "ip-adapter-faceid_sd15.bin",
            None,
            EmbedKind.FACE_ID,
            Projection.FACE_ID_MLP,
            "insightface identity embedding -> 4 tokens, with a LoRA on the UNet: the same "
            "person in new scenes",
            lora=True,
        ),
        AdapterPreset(
            "sd15-faceid-plusv2",
            "sd15",
            RepoPath(H94_FACEID, "IP-Adapter-FaceID", ""),
            "ip-adapter-faceid-plusv2_sd15.bin",
            VIT_H,
            EmbedKind.FACE_ID_PLUS,
            Projection.FACE_ID_PLUS,
            "FaceID + CLIP features of the aligned face (v2 shortcut): identity and face structure",
            lora=True,
            shortcut=True,
        ),
        AdapterPreset(
            "sdxl-faceid",
            "sdxl",
            RepoPath(H94_FACEID, "IP-Adapter-FaceID", ""),
            "ip-adapter-faceid_sdxl.bin",
            None,
            EmbedKind.FACE_ID,
            Projection.FACE_ID_MLP,
            "SDXL FaceID: insightface identity embedding -> 4 tokens, with a LoRA on the UNet",
            lora=True,
        ),
        AdapterPreset(
            "sdxl-faceid-plusv2",
            "sdxl",
            RepoPath(H94_FACEID, "IP-Adapter-FaceID", ""),
            "ip-adapter-faceid-plusv2_sdxl.bin",
            VIT_H,
            EmbedKind.FACE_ID_PLUS,
            Projection.FACE_ID_PLUS,
            "SDXL FaceID + ViT-H features of the aligned face (v2 shortcut, `s_scale`)",
            lora=True,
            shortcut=True,
        ),
        AdapterPreset(
            "flux",
            "flux",
            RepoPath("XLabs-AI/flux-ip-adapter", "flux-ip-adapter", ""),
            "ip_adapter.safetensors",
            SCORE_MODEL,  # XLabs' encoder: openai/clip-vit-large-patch14's image_embeds
            EmbedKind.CLIP_IMAGE_EMBEDS_BLACK,
            Projection.LINEAR,
            "FLUX.1-dev, XLabs: CLIP ViT-L/14 image embedding -> 4 tokens in the double blocks",
        ),
        AdapterPreset(
            "flux-v2",
            "flux",
            RepoPath("XLabs-AI/flux-ip-adapter-v2", "flux-ip-adapter-v2", ""),
            "ip_adapter.safetensors",
            SCORE_MODEL,
            EmbedKind.CLIP_IMAGE_EMBEDS_BLACK,
            Projection.LINEAR,
            "FLUX.1-dev, XLabs v2: the same embedding -> 16 tokens (diffusers' loader tells it "
            "by its 65,536 projection rows)",
        ),
        AdapterPreset(
            "sd35",
            "sd35",
            RepoPath("InstantX/SD3.5-Large-IP-Adapter", "SD3.5-Large-IP-Adapter", ""),
            "ip-adapter.bin",
            SIGLIP,
            EmbedKind.SIGLIP_HIDDEN_STATES,
            Projection.TIME_RESAMPLER,
            "SD3.5 Large, InstantX: SigLIP patch features -> 64 tokens, timestep-aware resampler",
        ),
        AdapterPreset(
            "kolors-plus",
            "kolors",
            RepoPath("Kwai-Kolors/Kolors-IP-Adapter-Plus", "Kolors-IP-Adapter-Plus", ""),
            "ip_adapter_plus_general.bin",
            KOLORS_VIT_L,
            EmbedKind.CLIP_HIDDEN_STATES,
            Projection.RESAMPLER,
            "Kolors, plus: ViT-L/14-336 patch features -> 16 tokens (Resampler)",
        ),
        _sdxl(
            "sdxl",
            "ip-adapter_sdxl.safetensors",
            VIT_BIGG,
            EmbedKind.CLIP_IMAGE_EMBEDS,
            "SDXL, global ViT-bigG embedding -> 4 tokens",
        ),
        _sdxl(
            "sdxl-plus",
            "ip-adapter-plus_sdxl_vit-h.safetensors",
            VIT_H,
            EmbedKind.CLIP_HIDDEN_STATES,
            "SDXL plus (ViT-H patch features, 16 tokens)",
        ),
        _sdxl(
            "sdxl-plus-face",
            "ip-adapter-plus-face_sdxl_vit-h.safetensors",
            VIT_H,
            EmbedKind.CLIP_HIDDEN_STATES,
            "SDXL plus-face (ViT-H, cropped faces)",
        ),
    )
}


@dataclass(frozen=True)
class ControlNetPreset:
    """A ControlNet a row's `control` entry names: public weights in the diffusers layout
    (MODELS/<folder>/config.json + diffusion_pytorch_model[.variant].safetensors)."""

    name: str
    family: str  # the base model it was trained for
    repo: RepoPath
    variant: str | None  # "fp16": the repository ships only fp16 weight files
    condition: str  # what its condition image shows: canny edges, an OpenPose skeleton, depth
    summary: str


def _controlnet(
    name: str, family: str, hub_repo: str, variant: str | None, condition: str, summary: str
) -> ControlNetPreset:
    folder = hub_repo.split("/", 1)[1]
    return ControlNetPreset(
        name, family, RepoPath(hub_repo, folder, ""), variant, condition, summary
    )


CONTROLNETS: dict[str, ControlNetPreset] = {
    c.name: c
    for c in (
        _controlnet(
            "sd15-canny",
            "sd15",
            "lllyasviel/control_v11p_sd15_canny",
            "fp16",
            "canny",
            "edges: keeps a product's outline and layout",
        ),
        _controlnet(
            "sd15-openpose",
            "sd15",
            "lllyasviel/control_v11p_sd15_openpose",
            "fp16",
            "openpose",
            "an OpenPose skeleton: a model's pose",
        ),
        _controlnet(
            "sd15-depth",
            "sd15",
            "lllyasviel/control_v11f1p_sd15_depth",
            "fp16",
            "depth",
            "a depth map: the scene's layout",
        ),
        _controlnet(
            "sdxl-canny",
            "sdxl",
            "diffusers/controlnet-canny-sdxl-1.0",
            None,
            "canny",
            "SDXL, edges",
        ),
        _controlnet(
            "flux-canny",
            "flux",
            "InstantX/FLUX.1-dev-Controlnet-Canny",
            None,
            "canny",
            "FLUX.1-dev, edges (FluxControlNetModel; text-to-image rows only)",
        ),
        _controlnet(
            "sdxl-depth",
            "sdxl",
            "diffusers/controlnet-depth-sdxl-1.0",
            None,
            "depth",
            "SDXL, a depth map",
        ),
    )
}


# A row's sampler (`scheduler`): the diffusers scheduler class, made with
# `from_config(<the model folder's scheduler>.config)` as the diffusers docs swap schedulers
# (the same betas and timestep spacing; SD1.5's folder gives the DDIM of tencent's demos)
SchedulerName = Literal["default", "ddim", "euler", "dpm++"]
SCHEDULERS: dict[str, str | None] = {
    "default": None,  # the model folder's own (SD1.5: PNDM; SDXL: Euler)
    "ddim": "DDIMScheduler",  # the IP-Adapter paper's sampler
    "euler": "EulerDiscreteScheduler",
    "dpm++": "DPMSolverMultistepScheduler",  # DPM-Solver++ (2M), diffusers' defaults
}
assert tuple(SCHEDULERS) == get_args(SchedulerName)

FACE_PACK = "buffalo_l"
FACE_PACK_FOLDER = "insightface"  # MODELS/insightface/models/buffalo_l


CUSTOM_PREFIX = "custom:"  # "custom:<name>": an adapter trained with `ipbatch train --name`


def is_custom(name: str) -> bool:
    return name.startswith(CUSTOM_PREFIX)


def builtin_adapter(name: str) -> AdapterPreset:
    """A published adapter by name; `custom:` names are resolved by the worker's catalog."""
    if is_custom(name):
        raise KeyError(f"{name} is a trained adapter: its catalog resolves it")
    return ADAPTERS[name]


def available_adapter_names() -> list[str]:
    return list(ADAPTERS)


def adapter_error(name: str) -> str:
    return (
        f"unknown adapter {name!r}; choose one of: {', '.join(ADAPTERS)}, or custom:NAME "
        "for an adapter trained with `ipbatch train --name NAME`"
    )


def controlnet_error(name: str) -> str:
    return f"unknown ControlNet {name!r}; choose one of: {', '.join(CONTROLNETS)}"
