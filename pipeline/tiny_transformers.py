"""The tiny models of the families whose denoiser is a transformer, in their repositories'
layouts (random weights; shapes from diffusers' own tests): FLUX.1-dev with XLabs' IP-Adapter
(`flux`), SD3.5 Large with InstantX's IP-Adapter and its SigLIP encoder (`sd35`)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from pipeline import tiny

FLUX_TEXT_DIM = 32  # the CLIP text encoder's width = the pooled projection's (768)
# T5's d_model = the transformer's joint attention width = the IP tokens' width: FLUX.1's real
# 4096, since diffusers' loader tells XLabs' v2 adapter (16 tokens) from v1 (4) only by its
# projection having 16 x 4096 = 65,536 rows
FLUX_JOINT_DIM = 4096
SD35_TEXT_DIM = 32  # each CLIP's width (768 / 1280 in SD3.5); T5's = joint width, 2 x this
SIGLIP_DIM = 48  # SigLIP so400m's width: 1152
SIGLIP_IMAGE, SIGLIP_PATCH = 32, 8  # 384 px, 14 px patches: 729 tokens (tiny: 16)
TIME_RESAMPLER_DIM, TIME_RESAMPLER_QUERIES = 64, 8  # 1280 (20 heads of 64), 64 queries
TIMESTEP_DIM = 32  # the projection's timestep features: 320


def t5_encoder(d_model: int, inner: int = 32, layers: int = 2) -> Any:
    """A tiny T5 v1.1 encoder (FLUX's and SD3.5's third text encoder) and its tokenizer;
    `inner` = heads x head width, the feed-forward twice that (kept small where d_model is
    FLUX's real 4096: it reads 512 tokens every call)."""
    from transformers import T5Config, T5EncoderModel, T5Tokenizer

    letters = "abcdefghijklmnopqrstuvwxyz0123456789"
    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0)]
    pieces += [(c, -3.0) for c in letters] + [("\u2581" + c, -3.0) for c in letters]
    encoder = T5EncoderModel(
        T5Config(
            vocab_size=128,
            d_model=d_model,
            d_kv=inner // 4,
            d_ff=2 * inner,
            num_layers=layers,
            num_heads=4,
            relative_attention_num_buckets=8,
            feed_forward_proj="gated-gelu",
            is_encoder_decoder=False,
        )
    )
    return encoder, T5Tokenizer(vocab=pieces, extra_ids=0, model_max_length=512)


def vae16(shift_factor: float, scaling_factor: float) -> Any:
    """The 16-channel VAE of FLUX.1 and SD3.5 (their own shift and scale), tiny: factor 2."""
    from diffusers import AutoencoderKL

    return AutoencoderKL(
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
        shift_factor=shift_factor,
        scaling_factor=scaling_factor,
        sample_size=32,
    )


def flux_base(folder: Path) -> None:
    """FLUX.1-dev's layout and shapes, tiny: a CLIP text encoder (pooled) and a T5 encoder,
    a guidance-distilled MMDiT transformer (double and single blocks), a 16-channel VAE packed
    2x2, the flow-matching scheduler of FLUX.1-dev."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTextModel

    torch.manual_seed(4)
    transformer = FluxTransformer2DModel(
        patch_size=1,
        in_channels=64,  # 16 latent channels x 2 x 2
        num_layers=2,
        num_single_layers=1,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=FLUX_JOINT_DIM,
        pooled_projection_dim=FLUX_TEXT_DIM,
        guidance_embeds=True,
        axes_dims_rope=[4, 4, 8],
    )
    t5, t5_tokenizer = t5_encoder(FLUX_JOINT_DIM, inner=8, layers=1)
    vae = vae16(shift_factor=0.1159, scaling_factor=0.3611)
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
        text_encoder=CLIPTextModel(tiny._text_config(FLUX_TEXT_DIM, projection_dim=FLUX_TEXT_DIM)),
        tokenizer=tiny._tokenizer(),
        text_encoder_2=t5,
        tokenizer_2=t5_tokenizer,
        transformer=transformer,
    )
    pipe.save_pretrained(folder, safe_serialization=True)  # type: ignore[attr-defined]


def flux_adapter(
    path: Path, transformer_folder: Path, image_dim: int, seed: int, tokens: int = 4
) -> None:
    """XLabs-AI/flux-ip-adapter's `ip_adapter.safetensors` layout: the image projection
    (`ip_adapter_proj_model.proj` to `tokens` tokens of the joint width, then its LayerNorm)
    and the image key/value projections of every double-stream block, stored in bf16 as XLabs
    ships; v2 (flux-ip-adapter-v2) has the same keys and 16 tokens."""
    from safetensors.torch import save_file

    config = json.loads((transformer_folder / "config.json").read_text())
    joint = config["joint_attention_dim"]
    inner = config["num_attention_heads"] * config["attention_head_dim"]
    g = torch.Generator().manual_seed(seed)
    state = {
        "ip_adapter_proj_model.proj.weight": tiny._randn(g, tokens * joint, image_dim, std=0.2),
        "ip_adapter_proj_model.proj.bias": tiny._randn(g, tokens * joint),
        "ip_adapter_proj_model.norm.weight": 1 + tiny._randn(g, joint),
        "ip_adapter_proj_model.norm.bias": tiny._randn(g, joint),
    }
    for i in range(config["num_layers"]):
        for kv in ("k", "v"):
            prefix = f"double_blocks.{i}.processor.ip_adapter_double_stream_{kv}_proj"
            # the attention logits' size of a 32-wide joint space, whatever the width
            state[f"{prefix}.weight"] = tiny._randn(g, inner, joint, std=0.5 * (32 / joint) ** 0.5)
            state[f"{prefix}.bias"] = tiny._randn(g, inner)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.to(torch.bfloat16).contiguous() for k, v in state.items()}, str(path))


def sd35_base(folder: Path) -> None:
    """SD3.5 Large's layout and shapes, tiny: two CLIP text encoders with projections (their
    pooled outputs side by side) and T5, an MMDiT transformer with RMS-normed queries and keys
    and 2x2 patches, the 16-channel VAE, the flow-matching scheduler (shift 3.0)."""
    from diffusers import (
        FlowMatchEulerDiscreteScheduler,
        SD3Transformer2DModel,
        StableDiffusion3Pipeline,
    )
    from transformers import CLIPTextModelWithProjection

    torch.manual_seed(5)
    joint = 2 * SD35_TEXT_DIM  # T5's width; the CLIP states (side by side) are padded to it
    transformer = SD3Transformer2DModel(
        sample_size=32,
        patch_size=2,
        in_channels=16,
        out_channels=16,
        num_layers=2,
        attention_head_dim=8,
        num_attention_heads=4,
        joint_attention_dim=joint,
        caption_projection_dim=32,  # = heads x head width
        pooled_projection_dim=2 * SD35_TEXT_DIM,
        qk_norm="rms_norm",  # SD3.5 Large's
        pos_embed_max_size=32,
    )
    text = [
        CLIPTextModelWithProjection(tiny._text_config(SD35_TEXT_DIM, projection_dim=SD35_TEXT_DIM))
        for _ in range(2)
    ]
    t5, t5_tokenizer = t5_encoder(joint)
    pipe = StableDiffusion3Pipeline(
        transformer=transformer,
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        vae=vae16(shift_factor=0.0609, scaling_factor=1.5305),
        text_encoder=text[0],
        tokenizer=tiny._tokenizer(),
        text_encoder_2=text[1],
        tokenizer_2=tiny._tokenizer(),
        text_encoder_3=t5,
        tokenizer_3=t5_tokenizer,
        image_encoder=None,
        feature_extractor=None,
    )
    pipe.save_pretrained(folder, safe_serialization=True)  # type: ignore[attr-defined]


def siglip_encoder(folder: Path) -> None:
    """google/siglip-so400m-patch14-384's layout: the whole two-tower SiglipModel (diffusers'
    SD3 loader and ipbatch take its vision tower) and its SiglipImageProcessor."""
    from transformers import SiglipConfig, SiglipImageProcessor, SiglipModel

    torch.manual_seed(6)
    config = SiglipConfig(
        text_config={
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 1,
            "num_attention_heads": 4,
            "vocab_size": 64,
            "max_position_embeddings": 16,
        },
        vision_config={
            "hidden_size": SIGLIP_DIM,
            "intermediate_size": 2 * SIGLIP_DIM,
            "num_hidden_layers": 3,
            "num_attention_heads": 4,
            "image_size": SIGLIP_IMAGE,
            "patch_size": SIGLIP_PATCH,
        },
    )
    SiglipModel(config).save_pretrained(folder, safe_serialization=True)
    size = {"height": SIGLIP_IMAGE, "width": SIGLIP_IMAGE}
    SiglipImageProcessor(size=size).save_pretrained(folder)


# diffusers' IPAdapterTimeImageProjection names -> InstantX's (the inverse of the renames in
# diffusers' SD3Transformer2DLoadersMixin._convert_ip_adapter_image_proj_to_diffusers)
_TO_INSTANTX = (
    ("ln0", "0.norm1"),
    ("ln1", "0.norm2"),
    ("attn.to_q", "0.to_q"),
    ("attn.to_kv", "0.to_kv"),
    ("attn.to_out.0", "0.to_out"),
    ("adaln_norm", "1.0"),
    ("ff.net.0.proj", "1.1"),
    ("ff.net.2", "1.3"),
    ("adaln_proj", "2.1"),
)


def sd35_adapter(path: Path, transformer_folder: Path, seed: int) -> None:
    """InstantX/SD3.5-Large-IP-Adapter's `ip-adapter.bin` layout: {"image_proj": the
    timestep-aware resampler in InstantX's names (depth 4; its width a multiple of 64, the
    loader's head width), "ip_adapter": each joint block's image key/value projections and
    norms, as `{block}.{name}`}. Plain tensors: loads with torch.load(weights_only=True)."""
    from diffusers.models.attention_processor import SD3IPAdapterJointAttnProcessor2_0
    from diffusers.models.embeddings import IPAdapterTimeImageProjection

    config = json.loads((transformer_folder / "config.json").read_text())
    inner = config["num_attention_heads"] * config["attention_head_dim"]
    torch.manual_seed(seed)
    projection = IPAdapterTimeImageProjection(
        embed_dim=SIGLIP_DIM,
        output_dim=inner,
        hidden_dim=TIME_RESAMPLER_DIM,
        heads=TIME_RESAMPLER_DIM // 64,
        num_queries=TIME_RESAMPLER_QUERIES,
        timestep_in_dim=TIMESTEP_DIM,
    )
    image_proj = {}
    for key, value in projection.state_dict().items():
        if key.startswith("layers."):
            _, index, rest = key.split(".", 2)
            for theirs, instantx in _TO_INSTANTX:
                if rest.startswith(theirs + "."):
                    rest = instantx + rest[len(theirs) :]
                    break
            key = f"layers.{index}.{rest}"
        image_proj[key] = value.clone()
    g = torch.Generator().manual_seed(seed)
    ip_adapter = {}
    for block in range(config["num_layers"]):
        processor = SD3IPAdapterJointAttnProcessor2_0(
            hidden_size=inner,
            ip_hidden_states_dim=inner,
            head_dim=config["attention_head_dim"],
            timesteps_emb_dim=TIME_RESAMPLER_DIM,
        )
        for key, value in processor.state_dict().items():
            # the image key/value projections larger than their init: a visible effect
            extra = tiny._randn(g, *value.shape, std=0.3) if value.ndim == 2 else 0
            ip_adapter[f"{block}.{key}"] = (value + extra).clone()
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"image_proj": image_proj, "ip_adapter": ip_adapter}, path)


def flux_controlnet(folder: Path, transformer_folder: Path, seed: int) -> None:
    """InstantX/FLUX.1-dev-Controlnet-Canny's layout (diffusers' FluxControlNetModel, made
    from the transformer as its training script does: no input hint block, so the pipeline
    VAE-encodes the condition). A fresh one has zeroed output layers and changes nothing:
    they get random weights, so a control visibly steers the image."""
    from diffusers import FluxControlNetModel, FluxTransformer2DModel

    transformer = FluxTransformer2DModel.from_pretrained(str(transformer_folder))
    torch.manual_seed(seed)
    controlnet = FluxControlNetModel.from_transformer(
        transformer, num_layers=1, num_single_layers=1, attention_head_dim=16, num_attention_heads=2
    )
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in controlnet.parameters():
            if not torch.count_nonzero(parameter):
                parameter.copy_(tiny._randn(g, *parameter.shape, std=0.3))
    controlnet.save_pretrained(str(folder), safe_serialization=True)
