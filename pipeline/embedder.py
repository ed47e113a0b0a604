"""CLIP image embeddings of references, exactly as diffusers computes them.

diffusers' `encode_image` resizes with the base model's CLIPImageProcessor, runs the adapter's
CLIPVisionModelWithProjection and returns (positive, negative):
- base adapters: `image_embeds`, negative = zeros;
- plus adapters: `hidden_states[-2]`, negative = the same for an all-zero image.
`ClipEmbedder.embed` does the same, so saved embeddings passed back as
`ip_adapter_image_embeds` give the same image as passing the picture (tested bitwise).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image
from transformers import CLIPImageProcessorPil, CLIPVisionModelWithProjection

from pipeline.models import folder_fingerprint
from pipeline.presets import EmbedKind


@dataclass(frozen=True)
class ReferenceEmbedding:
    """One reference's embedding for one kind: `pos` and `neg` shaped [1, ...]."""

    kind: EmbedKind
    pos: torch.Tensor
    neg: torch.Tensor


class ClipEmbedder:
    def __init__(
        self,
        encoder_folder: str,
        processor_folder: str,
        *,
        device: torch.device,
        dtype: torch.dtype,
    ) -> None:
        self.device = device
        self.dtype = dtype
        # the PIL processor is what transformers uses without torchvision (same numbers)
        self.processor = CLIPImageProcessorPil.from_pretrained(processor_folder)
        model = CLIPVisionModelWithProjection.from_pretrained(encoder_folder, dtype=dtype)
        self.model = model.to(device).eval()  # type: ignore[arg-type]
        # The fingerprint names the exact weights, preprocessing and precision: a cached
        # embedding is reused only by an identical encoder.
        weights = folder_fingerprint(encoder_folder, ("*.json", "*.safetensors", "*.bin"))
        processor = json.dumps(self.processor.to_dict(), sort_keys=True, default=str)
        combined = hashlib.sha256(
            f"{weights}|{processor}|{str(dtype).removeprefix('torch.')}".encode()
        ).hexdigest()
        self.fingerprint = f"clip-{Path(encoder_folder).name}-{combined[:16]}"

    @torch.inference_mode()
    def embed(self, image: Image.Image, kind: EmbedKind) -> ReferenceEmbedding:
        pixels = self.processor(image, return_tensors="pt").pixel_values
        pixels = pixels.to(device=self.device, dtype=self.dtype)
        if kind is EmbedKind.CLIP_IMAGE_EMBEDS:
            pos = self.model(pixels).image_embeds
            neg = torch.zeros_like(pos)
        elif kind is EmbedKind.CLIP_HIDDEN_STATES:
            pos = self.model(pixels, output_hidden_states=True).hidden_states[-2]
            neg = self.model(torch.zeros_like(pixels), output_hidden_states=True).hidden_states[-2]
        else:  # pragma: no cover - exhaustive over EmbedKind
            raise ValueError(f"ClipEmbedder cannot compute {kind}")
        return ReferenceEmbedding(kind=kind, pos=pos.float().cpu(), neg=neg.float().cpu())
