"""Where "the same image as the recipe" ends, with figures (tiny models, CPU).

    .venv/bin/python bench/exactness.py [--models DIR]

1. Several references concatenated (`combine: concat`): ipbatch encodes each reference once
   (for its cache) and concatenates the embeddings; diffusers, given
   `ip_adapter_image=[[a, b, c]]`, encodes the three images as one batch. Batched and single
   CLIP forwards round differently in float32, so pooled embeddings (base adapters) can differ
   in the last bits; hidden states (plus) come out the same.
2. An fp32 embed worker feeding an fp16 generate worker: ipbatch computes embeddings once, in
   the embed worker's precision, and the generate worker casts them to its own; diffusers on a
   GPU would compute them in fp16. Measured here with fp16 on the CPU (the CUDA kernels round
   differently again; not measured: no GPU).

Prints max absolute differences of the embeddings and of the images (as floats in [0, 1] and
in uint8 levels), side by side. No assertions.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--models", help="a models folder (default: tiny models written now)")
    args = parser.parse_args()

    import diffusers
    import numpy as np
    import torch
    from PIL import Image

    from pipeline.embedder import ClipEmbedder
    from pipeline.families import BASE_MODELS
    from pipeline.generator import Generator
    from pipeline.models import ModelSource
    from pipeline.presets import ADAPTERS
    from pipeline.references import combine
    from pipeline.requests import AdapterInput, GenerationRequest
    from pipeline.tiny import write_tiny_models
    from workers.context import quiet_model_libraries

    quiet_model_libraries()
    root = args.models or str(write_tiny_models(Path(tempfile.mkdtemp()) / "models"))
    models = ModelSource.parse(root)
    cpu = torch.device("cpu")
    rng = np.random.default_rng(3)
    pictures = [
        Image.fromarray((rng.random((70 + 9 * i, 90, 3)) * 255).astype(np.uint8)) for i in range(3)
    ]

    def levels(a: np.ndarray, b: np.ndarray) -> int:
        return int(np.abs(np.round(a * 255) - np.round(b * 255)).max())

    def request(
        adapter: str, pos: torch.Tensor, neg: torch.Tensor, prompt: str = "a product photo"
    ) -> GenerationRequest:
        spec = AdapterInput(adapter, 0.7, pos, neg)
        return GenerationRequest(prompt, "", [spec], 1, 5, 3, 7.5)

    print("1. concat of 3 references: ipbatch (one encode each) vs diffusers (one batch)")
    print(f"   {'adapter':16} {'embeddings':>12} {'image':>10} {'levels':>7}")
    for adapter in ("sd15", "sd15-plus", "sdxl", "sdxl-plus"):
        preset = ADAPTERS[adapter]
        assert preset.image_encoder is not None
        clip = ClipEmbedder(
            models.image_encoder(ADAPTERS[adapter]),
            models.feature_extractor(preset.family),
            device=cpu,
            dtype=torch.float32,
        )
        parts = [clip.embed(p, preset.embed_kind) for p in pictures]
        mine = combine([{"pos": e.pos, "neg": e.neg} for e in parts], "concat")
        generator = Generator(models, (adapter,), device=cpu, dtype=torch.float32)
        ours = generator.generate(request(adapter, mine["pos"], mine["neg"])).arrays[0]
        cls = getattr(diffusers, BASE_MODELS[preset.family].pipeline_class)
        extra = (
            {"safety_checker": None, "requires_safety_checker": False}
            if preset.family == "sd15"
            else {}
        )
        pipe = cls.from_pretrained(models.base_model(preset.family), **extra)
        pipe.set_progress_bar_config(disable=True)
        repo, subfolder, weight_name = models.adapter_weights(ADAPTERS[adapter])
        pipe.load_ip_adapter(
            repo,
            subfolder=subfolder,
            weight_name=weight_name,
            image_encoder_folder=preset.image_encoder.path,
        )
        pipe.set_ip_adapter_scale(0.7)
        with torch.no_grad():
            [theirs_embeds] = pipe.prepare_ip_adapter_image_embeds([pictures], None, cpu, 1, True)
        theirs = pipe(
            prompt="a product photo",
            ip_adapter_image=[pictures],
            num_inference_steps=3,
            guidance_scale=7.5,
            generator=torch.Generator().manual_seed(5),
            output_type="np",
        ).images[0]
        embed_diff = float((theirs_embeds[1] - mine["pos"]).abs().max())
        print(
            f"   {adapter:16} {embed_diff:12.2e} {float(np.abs(ours - theirs).max()):10.2e} "
            f"{levels(ours, theirs):7d}"
        )

    print("2. fp32 embeddings cast to fp16 vs fp16 embeddings, fp16 generation (CPU)")
    print(f"   {'adapter, prompt':32} {'embeddings':>12} {'image':>10} {'levels':>7}")
    for adapter, prompt in [
        (a, p) for a in ("sd15", "sd15-plus") for p in ("a product photo", "a shoe")
    ]:
        preset = ADAPTERS[adapter]
        embeds = {
            dtype: ClipEmbedder(
                models.image_encoder(ADAPTERS[adapter]),
                models.feature_extractor(preset.family),
                device=cpu,
                dtype=dtype,
            ).embed(pictures[0], preset.embed_kind)
            for dtype in (torch.float32, torch.float16)
        }
        generator = Generator(models, (adapter,), device=cpu, dtype=torch.float16)
        images = {
            dtype: generator.generate(request(adapter, e.pos, e.neg, prompt)).arrays[0]
            for dtype, e in embeds.items()
        }
        embed_diff = float(
            (embeds[torch.float32].pos.half().float() - embeds[torch.float16].pos).abs().max()
        )
        a, b = images[torch.float32], images[torch.float16]
        label = f"{adapter}, {prompt}"
        image_diff = float(np.abs(a - b).max())
        print(f"   {label:32} {embed_diff:12.2e} {image_diff:10.2e} {levels(a, b):7d}")


if __name__ == "__main__":
    main()
