"""Full-size SD1.5 and SDXL with random weights, in the real folder layout, for GPU runs.

    .venv/bin/python bench/fullsize.py DIR [sd15|sdxl ...]   # prints DIR when done

The compute of a model depends on its architecture, not on its weights: this writes SD1.5's
UNet (860M parameters, blocks 320/640/1280/1280, cross-attention 768), its VAE, a 12-layer
ViT-L-sized text encoder, the ViT-H/14 image encoder (632M) and the `sd15` and `sd15-plus`
adapters in h94's key layout (the plus Resampler 768 wide, 12 heads, 16 queries), all in fp16
.safetensors, so `--models DIR` runs ipbatch and the plain diffusers loop at the real cost with
nothing downloaded. The images are noise. The text encoder keeps the tiny byte-level
tokenizer (its vocabulary size does not change the cost of a forward pass).

SDXL (`write_fullsize_sdxl`): stabilityai/stable-diffusion-xl-base-1.0's UNet config (2.6B
parameters: blocks 320/640/1280 with 1/2/10 transformer layers, cross-attention 2048, text_time
embeddings), its VAE shape, CLIP-L and OpenCLIP-bigG-sized text encoders (12 and 32 layers),
and the `sdxl-plus` adapter (ViT-H, the same encoder SD1.5's adapters use; written if absent).
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from pipeline import tiny  # noqa: E402
from pipeline.families import BASE_MODELS  # noqa: E402
from pipeline.presets import ADAPTERS, VIT_H  # noqa: E402

CROSS_DIM = 768
SDXL_CROSS_DIM = 2048
VIT_H_DIMS = (1280, 1024)  # hidden, projection
RESAMPLER_DIM = 768


def write_fullsize_sd15(root: Path) -> Path:
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPImageProcessor, CLIPTextModel

    root = root.resolve()
    torch.manual_seed(0)
    unet = UNet2DConditionModel(sample_size=64, cross_attention_dim=CROSS_DIM)  # SD1.5 config
    pipe = StableDiffusionPipeline(
        unet=unet,
        vae=_vae(512, 0.18215),
        text_encoder=CLIPTextModel(_clip_l_text()),
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
    _vit_h(root)
    for seed, name in enumerate(("sd15", "sd15-plus"), start=10):
        _adapter(root, base, name, CROSS_DIM, RESAMPLER_DIM, seed)
    return root


def _adapter(
    root: Path, base: Path, name: str, cross_dim: int, resampler_dim: int, seed: int
) -> None:
    """A published adapter's file in h94's layout, fp16, shaped for ViT-H and `base`'s UNet."""
    preset = ADAPTERS[name]
    g = torch.Generator().manual_seed(seed)
    proj = tiny._image_proj(preset, cross_dim, VIT_H_DIMS, g, resampler_dim=resampler_dim)
    layers = tiny._ip_layers(base / "unet", cross_dim, g, lora=False)
    tiny._write_adapter(
        root / preset.weights.folder / preset.weights.path / preset.weight_name,
        {k: v.half() for k, v in proj.items()},
        {k: v.half() for k, v in layers.items()},
    )


def _clip_l_text() -> Any:
    """A ViT-L/14-sized CLIP text encoder's config (SD1.5's, and SDXL's first)."""
    return tiny._text_config(
        CROSS_DIM, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072
    )


def _vae(sample_size: int, scaling_factor: float) -> Any:
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        block_out_channels=(128, 256, 512, 512),
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        layers_per_block=2,
        latent_channels=4,
        sample_size=sample_size,
        scaling_factor=scaling_factor,
    )


def _vit_h(root: Path) -> None:
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    folder = root / VIT_H.folder / VIT_H.path
    if (folder / "config.json").is_file():
        return
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
    encoder.save_pretrained(folder, safe_serialization=True)


def write_fullsize_sdxl(root: Path) -> Path:
    from diffusers import StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    root = root.resolve()
    torch.manual_seed(1)
    unet = UNet2DConditionModel(  # stable-diffusion-xl-base-1.0/unet/config.json
        sample_size=128,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        block_out_channels=(320, 640, 1280),
        layers_per_block=2,
        transformer_layers_per_block=(1, 2, 10),
        attention_head_dim=(5, 10, 20),
        cross_attention_dim=SDXL_CROSS_DIM,
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=256,
        projection_class_embeddings_input_dim=2816,
    )
    big_g = tiny._text_config(
        1280, num_hidden_layers=32, num_attention_heads=20, intermediate_size=5120
    )
    big_g.projection_dim = 1280
    pipe = StableDiffusionXLPipeline(
        vae=_vae(1024, 0.13025),
        text_encoder=CLIPTextModel(
            tiny._text_config(
                768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072
            )
        ),
        text_encoder_2=CLIPTextModelWithProjection(big_g),
        tokenizer=tiny._tokenizer(),
        tokenizer_2=tiny._tokenizer(),
        unet=unet,
        scheduler=tiny.sdxl_scheduler(),
        image_encoder=None,
        feature_extractor=None,
    )
    pipe.to(dtype=torch.float16)
    base = root / BASE_MODELS["sdxl"].folder
    pipe.save_pretrained(base, safe_serialization=True)
    _vit_h(root)
    _adapter(root, base, "sdxl-plus", SDXL_CROSS_DIM, 1280, 20)  # its Resampler: 1280 wide
    return root


WRITERS = {"sd15": write_fullsize_sd15, "sdxl": write_fullsize_sdxl}


if __name__ == "__main__":
    if len(sys.argv) < 2 or any(f not in WRITERS for f in sys.argv[2:]):
        sys.exit(__doc__)
    for family in sys.argv[2:] or ["sd15"]:
        WRITERS[family](Path(sys.argv[1]))
    print(Path(sys.argv[1]).resolve())
