"""Full-size SD1.5 with random weights, in the real folder layout, for GPU throughput runs.

    .venv/bin/python bench/fullsize.py DIR        # prints DIR when done

The compute of a model depends on its architecture, not on its weights: this writes SD1.5's
UNet (860M parameters, blocks 320/640/1280/1280, cross-attention 768), its VAE, a 12-layer
ViT-L-sized text encoder, the ViT-H/14 image encoder (632M) and the `sd15` and `sd15-plus`
adapters in h94's key layout (the plus Resampler 768 wide, 12 heads, 16 queries), all in fp16
.safetensors, so `--models DIR` runs ipbatch and the plain diffusers loop at the real cost with
nothing downloaded. The images are noise. The text encoder keeps the tiny byte-level
tokenizer (its vocabulary size does not change the cost of a forward pass).
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from pipeline import tiny  # noqa: E402
from pipeline.presets import ADAPTERS, BASE_MODELS, VIT_H  # noqa: E402

CROSS_DIM = 768
VIT_H_DIMS = (1280, 1024)  # hidden, projection
RESAMPLER_DIM = 768


def write_fullsize_sd15(root: Path) -> Path:
    from diffusers import (
        AutoencoderKL,
        StableDiffusionPipeline,
        UNet2DConditionModel,
    )
    from transformers import (
        CLIPImageProcessor,
        CLIPTextModel,
        CLIPVisionConfig,
        CLIPVisionModelWithProjection,
    )

    root = root.resolve()
    torch.manual_seed(0)
    unet = UNet2DConditionModel(sample_size=64, cross_attention_dim=CROSS_DIM)  # SD1.5 config
    vae = AutoencoderKL(
        block_out_channels=(128, 256, 512, 512),
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        layers_per_block=2,
        latent_channels=4,
        sample_size=512,
    )
    text = CLIPTextModel(
        tiny._text_config(
            CROSS_DIM, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072
        )
    )
    pipe = StableDiffusionPipeline(
        unet=unet,
        vae=vae,
        text_encoder=text,
        tokenizer=tiny._tokenizer(),
        scheduler=tiny.sd15_scheduler(),
        safety_checker=None,
        feature_extractor=CLIPImageProcessor(),  # 224x224, CLIP's mean and std
        image_encoder=None,
        requires_safety_checker=False,
    )
    pipe.to(dtype=torch.float16)
    base = root / BASE_MODELS["sd15"].folder
    pipe.save_pretrained(base, safe_serialization=True)
    hidden, projection = VIT_H_DIMS
    encoder = CLIPVisionModelWithProjection(
        CLIPVisionConfig(
            hidden_size=hidden,
            intermediate_size=4 * hidden,
            num_attention_heads=16,
            num_hidden_layers=32,
            image_size=224,
            patch_size=14,
            projection_dim=projection,
        )
    ).to(torch.float16)
    encoder.save_pretrained(root / VIT_H.folder / VIT_H.path, safe_serialization=True)
    for seed, name in enumerate(("sd15", "sd15-plus"), start=10):
        preset = ADAPTERS[name]
        g = torch.Generator().manual_seed(seed)
        proj = tiny._image_proj(preset, CROSS_DIM, VIT_H_DIMS, g, resampler_dim=RESAMPLER_DIM)
        layers = tiny._ip_layers(base / "unet", CROSS_DIM, g, lora=False)
        tiny._write_adapter(
            root / preset.weights.folder / preset.weights.path / preset.weight_name,
            {k: v.half() for k, v in proj.items()},
            {k: v.half() for k, v in layers.items()},
        )
    return root


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    print(write_fullsize_sd15(Path(sys.argv[1])))
