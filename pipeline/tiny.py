"""`ipbatch models tiny DIR`: tiny random-weight models in the real folder layout.

Everything the real presets load, at a size that runs on two CPU cores in a second: a
diffusers SD1.5-shaped base model (16 cross-attention layers like the real UNet), the
IP-Adapter image encoder, and the adapter weights as .safetensors in h94's key layout
(`image_proj.*`, `ip_adapter.{i}.to_{k,v}_ip.weight` for odd i). Nothing is downloaded:
the real diffusers / transformers loading code then reads these folders.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from pipeline.presets import ADAPTERS, BASE_MODELS

CROSS_DIM = 32  # text hidden size = UNet cross_attention_dim (768 in SD1.5)
VISION_HIDDEN = 48  # CLIP vision hidden size (1280 for ViT-H)
VISION_PROJ = 40  # CLIP image_embeds size (1024 for ViT-H)
IMAGE_SIZE = 32  # encoder input (224 for ViT-H)
RESAMPLER_DIM = 64  # plus Resampler width (768 in ip-adapter-plus_sd15); heads = dim / 64
RESAMPLER_QUERIES = 16
SAMPLE_SIZE = 8  # latent size -> 64x64 images


def _byte_vocab() -> tuple[dict[str, int], list[tuple[str, str]]]:
    """A byte-level BPE vocabulary like CLIP's, small: every byte, byte+</w>, a few merges."""
    chars = [chr(c) for c in range(ord("!"), ord("~") + 1)]
    chars += [chr(c) for c in range(ord("¡"), ord("¬") + 1)]
    chars += [chr(c) for c in range(ord("®"), ord("ÿ") + 1)]
    extra = 0
    for byte in range(256):
        if chr(byte) not in chars and not (
            ord("!") <= byte <= ord("~") or ord("¡") <= byte <= ord("¬") or ord("®") <= byte <= 255
        ):
            chars.append(chr(256 + extra))
            extra += 1
    tokens = chars + [c + "</w>" for c in chars]
    merges = [("t", "h"), ("th", "e</w>"), ("a", "n"), ("o", "n</w>"), ("e", "r"), ("i", "n")]
    tokens += ["th", "the</w>", "an", "on</w>", "er", "in"]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    return {tok: i for i, tok in enumerate(tokens)}, merges


def _base_model(folder: Path) -> None:
    from diffusers import (
        AutoencoderKL,
        PNDMScheduler,
        StableDiffusionPipeline,
        UNet2DConditionModel,
    )
    from transformers import CLIPImageProcessor, CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        block_out_channels=(32, 32, 64, 64),
        layers_per_block=2,
        sample_size=SAMPLE_SIZE,
        in_channels=4,
        out_channels=4,
        down_block_types=(
            "CrossAttnDownBlock2D",
            "CrossAttnDownBlock2D",
            "CrossAttnDownBlock2D",
            "DownBlock2D",
        ),
        up_block_types=(
            "UpBlock2D",
            "CrossAttnUpBlock2D",
            "CrossAttnUpBlock2D",
            "CrossAttnUpBlock2D",
        ),
        cross_attention_dim=CROSS_DIM,
        attention_head_dim=8,
        norm_num_groups=32,
    )
    vae = AutoencoderKL(
        block_out_channels=(32, 32, 64, 64),
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        latent_channels=4,
        norm_num_groups=32,
        sample_size=SAMPLE_SIZE * 8,
    )
    vocab, merges = _byte_vocab()
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            hidden_size=CROSS_DIM,
            intermediate_size=64,
            num_attention_heads=4,
            num_hidden_layers=2,
            vocab_size=len(vocab),
            max_position_embeddings=77,
            bos_token_id=vocab["<|startoftext|>"],
            eos_token_id=vocab["<|endoftext|>"],
            pad_token_id=vocab["<|endoftext|>"],
        )
    )
    # merges as tuples: strings "a b" raise `failed to extract enum PyMerges` in transformers 5
    tokenizer = CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=77)  # type: ignore[arg-type]
    scheduler = PNDMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        skip_prk_steps=True,
        steps_offset=1,
        set_alpha_to_one=False,
    )
    feature_extractor = CLIPImageProcessor(
        size={"shortest_edge": IMAGE_SIZE}, crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}
    )
    pipe = StableDiffusionPipeline(
        unet=unet,
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=feature_extractor,
        image_encoder=None,
        requires_safety_checker=False,
    )
    pipe.save_pretrained(folder, safe_serialization=True)  # type: ignore[attr-defined]


def _image_encoder(folder: Path) -> None:
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    torch.manual_seed(1)
    model = CLIPVisionModelWithProjection(
        CLIPVisionConfig(
            hidden_size=VISION_HIDDEN,
            intermediate_size=96,
            num_attention_heads=4,
            num_hidden_layers=3,
            image_size=IMAGE_SIZE,
            patch_size=4,
            projection_dim=VISION_PROJ,
        )
    )
    model.save_pretrained(folder, safe_serialization=True)


def _ip_layers(unet_config_folder: Path, seed: int) -> dict[str, torch.Tensor]:
    """`ip_adapter.{i}.to_{k,v}_ip.weight` for every cross-attention processor index i."""
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(unet_config_folder)
    generator = torch.Generator().manual_seed(seed)
    tensors: dict[str, torch.Tensor] = {}
    for i, name in enumerate(unet.attn_processors):
        if not name.endswith("attn2.processor"):
            continue
        attn = unet.get_submodule(name.removesuffix(".processor"))
        hidden = attn.to_q.out_features
        for part in ("to_k_ip", "to_v_ip"):
            weight = torch.randn(hidden, CROSS_DIM, generator=generator) * 0.2
            tensors[f"ip_adapter.{i}.{part}.weight"] = weight
    return tensors


def _randn(generator: torch.Generator, *shape: int, std: float = 0.1) -> torch.Tensor:
    return torch.randn(*shape, generator=generator) * std


def _base_projection(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "image_proj.proj.weight": _randn(g, 4 * CROSS_DIM, VISION_PROJ),
        "image_proj.proj.bias": _randn(g, 4 * CROSS_DIM),
        "image_proj.norm.weight": torch.ones(CROSS_DIM),
        "image_proj.norm.bias": torch.zeros(CROSS_DIM),
    }


def _plus_projection(seed: int) -> dict[str, torch.Tensor]:
    """The Resampler of ip-adapter-plus, in h94's names (depth 4, head size 64)."""
    g = torch.Generator().manual_seed(seed)
    dim, inner = RESAMPLER_DIM, 64 * (RESAMPLER_DIM // 64)
    tensors = {
        "image_proj.latents": _randn(g, 1, RESAMPLER_QUERIES, dim, std=dim**-0.5),
        "image_proj.proj_in.weight": _randn(g, dim, VISION_HIDDEN),
        "image_proj.proj_in.bias": _randn(g, dim),
        "image_proj.proj_out.weight": _randn(g, CROSS_DIM, dim),
        "image_proj.proj_out.bias": _randn(g, CROSS_DIM),
        "image_proj.norm_out.weight": torch.ones(CROSS_DIM),
        "image_proj.norm_out.bias": torch.zeros(CROSS_DIM),
    }
    for layer in range(4):
        p = f"image_proj.layers.{layer}"
        tensors |= {
            f"{p}.0.norm1.weight": torch.ones(dim),
            f"{p}.0.norm1.bias": torch.zeros(dim),
            f"{p}.0.norm2.weight": torch.ones(dim),
            f"{p}.0.norm2.bias": torch.zeros(dim),
            f"{p}.0.to_q.weight": _randn(g, inner, dim),
            f"{p}.0.to_kv.weight": _randn(g, 2 * inner, dim),
            f"{p}.0.to_out.weight": _randn(g, dim, inner),
            f"{p}.1.0.weight": torch.ones(dim),
            f"{p}.1.0.bias": torch.zeros(dim),
            f"{p}.1.1.weight": _randn(g, 4 * dim, dim),
            f"{p}.1.3.weight": _randn(g, dim, 4 * dim),
        }
    return tensors


def write_tiny_models(root: Path) -> Path:
    """Write every tiny model under `root`; returns `root`. Idempotent (overwrites)."""
    root = root.expanduser().resolve()
    base = root / BASE_MODELS["sd15"].folder
    _base_model(base)
    adapter_repo = root / ADAPTERS["sd15"].repo_folder
    _image_encoder(adapter_repo / ADAPTERS["sd15"].image_encoder_subfolder)
    projections = {"sd15": _base_projection(10), "sd15-plus": _plus_projection(11)}
    for seed, (name, projection) in enumerate(projections.items(), start=20):
        preset = ADAPTERS[name]
        weights = projection | _ip_layers(base / "unet", seed)
        path = adapter_repo / preset.subfolder / preset.weight_name
        path.parent.mkdir(parents=True, exist_ok=True)
        save_file({k: v.contiguous() for k, v in weights.items()}, str(path))
    (root / "TINY_MODELS.json").write_text(
        json.dumps({"note": "random weights for offline tests; not for real images"}, indent=2)
    )
    return root
