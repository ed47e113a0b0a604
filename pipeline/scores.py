"""The IP-Adapter paper's two quality metrics, per output image.

- CLIP-I: cosine similarity of the CLIP image embeddings of the output and of the reference
  (the mean over the row's references when it has several).
- CLIP-T: CLIPScore of the output against the row's prompt, 2.5 * max(cos, 0) with cos the
  cosine of the CLIP image and text embeddings (Hessel et al. 2021; the paper reports 0.588 for
  IP-Adapter with CLIP ViT-L/14). None when the row has no prompt.
The CLIP model is configurable (IPBATCH_SCORE_MODEL); the paper used ViT-L/14.
"""

from __future__ import annotations

import torch
from PIL import Image
from transformers import CLIPImageProcessorPil, CLIPModel, CLIPTokenizer

from pipeline.models import folder_fingerprint, loading

CLIP_SCORE_WEIGHT = 2.5


class ClipScorer:
    def __init__(self, folder: str, *, device: torch.device, dtype: torch.dtype) -> None:
        self.device = device
        self.dtype = dtype
        with loading(f"the scoring model at {folder}", folder):
            model = CLIPModel.from_pretrained(folder, dtype=dtype)
            self.tokenizer = CLIPTokenizer.from_pretrained(folder)
            self.processor = CLIPImageProcessorPil.from_pretrained(folder)
        self.model = model.to(device).eval()  # type: ignore[arg-type]
        # cached reference embeddings are reused only by the same weights and precision
        weights = folder_fingerprint(folder, ("*.json", "*.safetensors", "*.bin"))
        self.fingerprint = f"score-{weights[:16]}-{str(dtype).removeprefix('torch.')}"

    @torch.inference_mode()
    def image_embeds(self, images: list[Image.Image]) -> torch.Tensor:
        """[n, d], L2-normalised, float32 on the CPU."""
        pixels = self.processor(images=images, return_tensors="pt").pixel_values
        out = self.model.get_image_features(pixel_values=pixels.to(self.device, self.dtype))
        return torch.nn.functional.normalize(out.pooler_output.float(), dim=-1).cpu()

    @torch.inference_mode()
    def text_embeds(self, texts: list[str]) -> torch.Tensor:
        """[n, d], L2-normalised; prompts longer than the text encoder reads are truncated."""
        tokens = self.tokenizer(texts, padding=True, truncation=True, return_tensors="pt")
        out = self.model.get_text_features(**tokens.to(self.device))
        return torch.nn.functional.normalize(out.pooler_output.float(), dim=-1).cpu()


def clip_i(image: torch.Tensor, references: torch.Tensor) -> float:
    """Mean cosine of one output's embedding [d] with its references' [r, d]."""
    return float((references @ image).mean())


def clip_t(image: torch.Tensor, text: torch.Tensor | None) -> float | None:
    """CLIPScore of one output's embedding [d] against its prompt's [d]."""
    if text is None:
        return None
    return CLIP_SCORE_WEIGHT * max(float(text @ image), 0.0)
