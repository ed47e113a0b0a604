"""Tiny FLUX.1-dev and XLabs IP-Adapter models in their repositories' layouts (the
`flux` family of `ipbatch models tiny`; shapes from diffusers' FLUX tests, random weights)."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from pipeline import tiny

FLUX_DIM = 32  # T5's d_model = the transformer's joint attention width (4096 in FLUX.1)


def flux_base(folder: Path) -> None:
    """FLUX.1-dev's layout and shapes, tiny: a CLIP text encoder (pooled) and a T5 encoder,
    a guidance-distilled MMDiT transformer (double and single blocks), a 16-channel VAE packed
    2x2, the flow-matching scheduler of FLUX.1-dev."""
    from diffusers import (
        AutoencoderKL,
        FlowMatchEulerDiscreteScheduler,
        FluxPipeline,
        FluxTransformer2DModel,
    )
    from transformers import CLIPTextModel, T5Config, T5EncoderModel, T5Tokenizer

    torch.manual_seed(4)
    transformer = FluxTransformer2DModel(
        patch_size=1,
        in_channels=64,  # 16 latent channels x 2 x 2
        num_layers=2,
        num_single_layers=1,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=FLUX_DIM,
        pooled_projection_dim=FLUX_DIM,
        guidance_embeds=True,
        axes_dims_rope=[4, 4, 8],
    )
    letters = "abcdefghijklmnopqrstuvwxyz0123456789"
    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0)]
    pieces += [(c, -3.0) for c in letters] + [("\u2581" + c, -3.0) for c in letters]
    t5 = T5EncoderModel(
        T5Config(
            vocab_size=128,
            d_model=FLUX_DIM,
            d_kv=8,
            d_ff=64,
            num_layers=2,
            num_heads=4,
            relative_attention_num_buckets=8,
            feed_forward_proj="gated-gelu",
            is_encoder_decoder=False,
        )
    )
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        block_out_channels=(16, 16),
        layers_per_block=1,
        latent_channels=16,
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        norm_num_groups=8,
        use_quant_conv=False,
        use_post_quant_conv=False,
        shift_factor=0.1159,
        scaling_factor=0.3611,
        sample_size=32,
    )
    scheduler = FlowMatchEulerDiscreteScheduler(  # FLUX.1-dev's scheduler config
        base_image_seq_len=256,
        base_shift=0.5,
        max_image_seq_len=4096,
        max_shift=1.15,
        shift=3.0,
        use_dynamic_shifting=True,
    )
    pipe = FluxPipeline(
        scheduler=scheduler,
        vae=vae,
        text_encoder=CLIPTextModel(tiny._text_config(FLUX_DIM, projection_dim=FLUX_DIM)),
        tokenizer=tiny._tokenizer(),
        text_encoder_2=t5,
        tokenizer_2=T5Tokenizer(vocab=pieces, extra_ids=0, model_max_length=512),
        transformer=transformer,
    )
    pipe.save_pretrained(folder, safe_serialization=True)  # type: ignore[attr-defined]


def flux_adapter(path: Path, transformer_folder: Path, image_dim: int, seed: int) -> None:
    """XLabs-AI/flux-ip-adapter's `ip_adapter.safetensors` layout: the image projection
    (`ip_adapter_proj_model.proj` to 4 tokens of the joint width, then its LayerNorm) and the
    image key/value projections of every double-stream block, stored in bf16 as XLabs ships."""
    from safetensors.torch import save_file

    config = json.loads((transformer_folder / "config.json").read_text())
    joint = config["joint_attention_dim"]
    inner = config["num_attention_heads"] * config["attention_head_dim"]
    g = torch.Generator().manual_seed(seed)
    tokens = 4
    state = {
        "ip_adapter_proj_model.proj.weight": tiny._randn(g, tokens * joint, image_dim, std=0.2),
        "ip_adapter_proj_model.proj.bias": tiny._randn(g, tokens * joint),
        "ip_adapter_proj_model.norm.weight": 1 + tiny._randn(g, joint),
        "ip_adapter_proj_model.norm.bias": tiny._randn(g, joint),
    }
    for i in range(config["num_layers"]):
        for kv in ("k", "v"):
            prefix = f"double_blocks.{i}.processor.ip_adapter_double_stream_{kv}_proj"
            state[f"{prefix}.weight"] = tiny._randn(g, inner, joint, std=0.5)
            state[f"{prefix}.bias"] = tiny._randn(g, inner)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.to(torch.bfloat16).contiguous() for k, v in state.items()}, str(path))
