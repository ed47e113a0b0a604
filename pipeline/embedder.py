"""Reference embeddings: CLIP (exactly as diffusers computes them) and faces (insightface).

diffusers' `encode_image` resizes with the base model's CLIPImageProcessor, runs the adapter's
CLIPVisionModelWithProjection and returns (positive, negative):
- base adapters: `image_embeds`, negative = zeros;
- plus adapters: `hidden_states[-2]`, negative = the same for an all-zero image;
- FLUX (XLabs): `image_embeds`, negative = those of an all-black picture (FluxPipeline
  encodes one when it is given no negative input; any size: black stays black resized);
- SD3.5 (InstantX): SigLIP's `hidden_states[-2]` (a SiglipVisionModel and its own
  SiglipImageProcessor, as SD3IPAdapterMixin loads them), negative = zeros.
`ClipEmbedder.embed` does the same, so saved embeddings passed back as
`ip_adapter_image_embeds` give the same image as passing the picture (tested bitwise).
"""

from __future__ import annotations

import functools
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from PIL import Image
from transformers import CLIPVisionModelWithProjection, SiglipVisionModel

from pipeline.faces import FaceEmbedder
from pipeline.models import folder_fingerprint, loading
from pipeline.presets import EmbedKind


@dataclass(frozen=True)
class ReferenceEmbedding:
    """One reference's embedding for one kind: `pos` and `neg` shaped [1, ...]."""

    kind: EmbedKind
    pos: torch.Tensor
    neg: torch.Tensor


def processor_class_of_this_environment() -> Any:
    """The class `transformers.CLIPImageProcessor` names now: what diffusers' pipelines load
    for `feature_extractor` (by that name) and what `load_ip_adapter` builds."""
    import transformers

    return transformers.CLIPImageProcessor


class ClipEmbedder:
    def __init__(
        self,
        encoder_folder: str,
        processor_folder: str | None,
        *,
        device: torch.device,
        dtype: torch.dtype,
    ) -> None:
        self.device = device
        self.dtype = dtype
        with loading(f"the image encoder at {encoder_folder}", encoder_folder):
            config = json.loads((Path(encoder_folder) / "config.json").read_text())
            # SD3.5's SigLIP: the vision tower of google's two-tower folder
            self.siglip = str(config.get("model_type", "")).startswith("siglip")
            encoder_class = SiglipVisionModel if self.siglip else CLIPVisionModelWithProjection
            model = encoder_class.from_pretrained(encoder_folder, dtype=dtype)
        self.model = model.to(device).eval()  # type: ignore[arg-type]
        # The processor is built exactly as the diffusers pipeline builds its feature_extractor
        # in this environment: transformers' `CLIPImageProcessor`, which resolves to the
        # torchvision backend when torchvision is installed and to the PIL one otherwise (they
        # differ by about one grey level), from the base model's folder (SD1.5), or as
        # `load_ip_adapter` makes one when the base model has none (SDXL).
        processor_class = processor_class_of_this_environment()
        if self.siglip:  # its own processor, from its folder (SD3IPAdapterMixin's)
            import transformers

            self.processor = transformers.SiglipImageProcessor.from_pretrained(encoder_folder)
        elif processor_folder is not None:
            self.processor = processor_class.from_pretrained(processor_folder)
        else:
            size = self.model.config.image_size
            self.processor = processor_class(size=size, crop_size=size)
        # The fingerprint names the exact weights, preprocessing (backend included) and
        # precision: a cached embedding is reused only by an identical encoder.
        weights = folder_fingerprint(encoder_folder, ("*.json", "*.safetensors", "*.bin"))
        processor = json.dumps(self.processor.to_dict(), sort_keys=True, default=str)
        backend = f"{type(self.processor).__module__}.{type(self.processor).__qualname__}"
        combined = hashlib.sha256(
            f"{weights}|{backend}|{processor}|{str(dtype).removeprefix('torch.')}".encode()
        ).hexdigest()
        family = "siglip" if self.siglip else "clip"
        self.fingerprint = f"{family}-{Path(encoder_folder).name}-{combined[:16]}"

    @functools.cached_property
    def _black_image_embeds(self) -> torch.Tensor:
        """The image_embeds of an all-black picture (the same for every reference)."""
        black = self.processor(np.zeros((64, 64, 3), np.uint8), return_tensors="pt")
        with torch.inference_mode():
            embeds = self.model(black.pixel_values.to(device=self.device, dtype=self.dtype))
        return embeds.image_embeds

    @torch.inference_mode()
    def embed(self, image: Image.Image | np.ndarray, kind: EmbedKind) -> ReferenceEmbedding:
        """`image` as the recipe gives it: a PIL image, or (FaceID-Plus) the BGR uint8 array of
        the aligned face crop, handed to the processor unchanged."""
        pixels = self.processor(image, return_tensors="pt").pixel_values
        pixels = pixels.to(device=self.device, dtype=self.dtype)
        if kind is EmbedKind.CLIP_IMAGE_EMBEDS:
            pos = self.model(pixels).image_embeds
            neg = torch.zeros_like(pos)
        elif kind is EmbedKind.CLIP_IMAGE_EMBEDS_BLACK:  # FluxPipeline's own negative input
            pos = self.model(pixels).image_embeds
            neg = self._black_image_embeds
        elif kind is EmbedKind.CLIP_HIDDEN_STATES:
            pos = self.model(pixels, output_hidden_states=True).hidden_states[-2]
            neg = self.model(torch.zeros_like(pixels), output_hidden_states=True).hidden_states[-2]
        elif kind is EmbedKind.SIGLIP_HIDDEN_STATES:  # StableDiffusion3Pipeline.encode_image
            pos = self.model(pixels, output_hidden_states=True).hidden_states[-2]
            neg = torch.zeros_like(pos)  # what its image path stacks for CFG
        else:  # pragma: no cover - exhaustive over EmbedKind
            raise ValueError(f"ClipEmbedder cannot compute {kind}")
        return ReferenceEmbedding(kind=kind, pos=pos.float().cpu(), neg=neg.float().cpu())


class ReferenceEncoder(Protocol):
    """Turns one decoded reference into the tensors one adapter kind consumes.

    `fingerprint` names everything that determines the output (weights, preprocessing,
    precision, base model family): it is part of the cache key, so a cached tensor is only
    ever fed to an adapter it fits. `encode` returns `pos`/`neg` ([1, ...] each), plus
    `clip_pos`/`clip_neg` for FaceID-Plus.
    """

    kind: EmbedKind
    fingerprint: str

    def encode(self, image: Image.Image, *, name: str) -> dict[str, torch.Tensor]: ...


class ClipReferenceEncoder:
    def __init__(self, clip: ClipEmbedder, kind: EmbedKind, family: str) -> None:
        self.clip, self.kind = clip, kind
        self.fingerprint = f"{family}/{clip.fingerprint}"

    def encode(self, image: Image.Image, *, name: str) -> dict[str, torch.Tensor]:
        result = self.clip.embed(image, self.kind)
        return {"pos": result.pos, "neg": result.neg}


class FaceReferenceEncoder:
    """FaceID: insightface's normed embedding of the largest face; negative = zeros. With
    `clip` (FaceID-Plus), also the CLIP hidden states of the aligned face crop."""

    def __init__(self, faces: FaceEmbedder, family: str, clip: ClipEmbedder | None = None):
        self.faces, self.clip = faces, clip
        self.kind = EmbedKind.FACE_ID if clip is None else EmbedKind.FACE_ID_PLUS
        parts = [faces.fingerprint] + ([clip.fingerprint] if clip is not None else [])
        self.fingerprint = f"{family}/{'+'.join(parts)}"

    def encode(self, image: Image.Image, *, name: str) -> dict[str, torch.Tensor]:
        face = self.faces.analyze(image, name=name)
        pos = torch.from_numpy(np.asarray(face.embedding, dtype=np.float32)).reshape(1, -1)
        tensors = {"pos": pos, "neg": torch.zeros_like(pos)}
        if self.clip is not None:
            crop = self.clip.embed(face.aligned, EmbedKind.CLIP_HIDDEN_STATES)
            tensors |= {"clip_pos": crop.pos, "clip_neg": crop.neg}
        return tensors
