"""`ipbatch models tiny DIR`: tiny random-weight models in the real folder layout.

Everything the real presets load, at a size that runs on two CPU cores in a second:
- SD1.5- and SDXL-shaped diffusers base models (SD1.5's 16 cross-attention layers; SDXL's
  block layout, two text encoders and text_time embeddings);
- stand-ins for the two CLIP image encoders (ViT-H in models/, ViT-bigG in sdxl_models/);
- every adapter preset in h94's key layout: `image_proj.*` for each projection type diffusers
  recognises, `ip_adapter.{i}.to_{k,v}_ip.weight` per cross-attention processor, and for
  FaceID the LoRA keys `ip_adapter.{i}.to_{q,k,v,out}_lora.{down,up}.weight` on every
  processor; .safetensors where h94 ships them, .bin (plain tensors) for FaceID like h94;
- an insightface face-analysis pack (tiny ONNX detector and recogniser);
- a CLIP model with both towers in ViT-L/14's folder layout, for CLIP-I / CLIP-T scores.
Nothing is downloaded: the real diffusers / transformers / insightface loading code then
reads these folders.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from pipeline.families import BASE_MODELS
from pipeline.presets import (
    ADAPTERS,
    CONTROLNETS,
    FACE_PACK,
    FACE_PACK_FOLDER,
    KOLORS_VIT_L,
    SCORE_MODEL,
    SIGLIP,
    VIT_BIGG,
    VIT_H,
    AdapterPreset,
    ControlNetPreset,
    Projection,
    RepoPath,
)

SD15_CROSS_DIM = 32  # text hidden size = UNet cross_attention_dim (768 in SD1.5)
SDXL_TEXT_DIM = 32  # each of SDXL's two text encoders; cross_attention_dim = 2 x this (2048)
SDXL_CROSS_DIM = 2 * SDXL_TEXT_DIM
# CLIP vision stand-ins: (hidden size, projection size); real ViT-H (1280, 1024), bigG (1664, 1280)
ENCODER_DIMS = {VIT_H: (48, 40), VIT_BIGG: (56, 44), KOLORS_VIT_L: (40, 32)}
IMAGE_SIZE = 32  # encoder input (224 for the real ones)
RESAMPLER_DIM = 64  # plus Resampler width (768 in ip-adapter-plus_sd15); heads = dim / 64
RESAMPLER_QUERIES = 16
FACE_ID_DIM = 512  # insightface embedding size (the real one: the tiny face pack keeps it)
LORA_RANK = 4  # 128 in the real FaceID files
SAMPLE_SIZE = 8  # latent size -> 64x64 images
SCORE_PROJECTION = 24  # the tiny ViT-L/14's projection size (768 in openai's)
KOLORS_CROSS_DIM = 16  # the tiny Kolors UNet's cross-attention width (2048)
CROSS_DIM = {"sd15": SD15_CROSS_DIM, "sdxl": SDXL_CROSS_DIM, "kolors": KOLORS_CROSS_DIM}


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


def _tokenizer() -> Any:
    from transformers import CLIPTokenizer

    vocab, merges = _byte_vocab()
    # merges as tuples: strings "a b" raise `failed to extract enum PyMerges` in transformers 5
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=77)  # type: ignore[arg-type]


def _text_config(hidden: int, **extra: Any) -> Any:
    from transformers import CLIPTextConfig

    vocab, _ = _byte_vocab()
    config: dict[str, Any] = {
        "hidden_size": hidden,
        "intermediate_size": 2 * hidden,
        "num_attention_heads": 4,
        "num_hidden_layers": 2,
        "vocab_size": len(vocab),
        "max_position_embeddings": 77,
        "bos_token_id": vocab["<|startoftext|>"],
        "eos_token_id": vocab["<|endoftext|>"],
        "pad_token_id": vocab["<|endoftext|>"],
    }
    return CLIPTextConfig(**(config | extra))


def _vae() -> Any:
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        block_out_channels=(32, 32, 64, 64),
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        latent_channels=4,
        norm_num_groups=32,
        sample_size=SAMPLE_SIZE * 8,
    )


def sd15_scheduler() -> Any:
    """SD1.5's scheduler, as its repository configures it."""
    from diffusers import PNDMScheduler

    return PNDMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        skip_prk_steps=True,
        steps_offset=1,
        set_alpha_to_one=False,
    )


def _sd15_base(folder: Path) -> None:
    """SD1.5's shape: 3 cross-attention down blocks x 2 layers -> 16 cross-attention layers."""
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPImageProcessor, CLIPTextModel

    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        block_out_channels=(32, 32, 64, 64),
        layers_per_block=2,
        sample_size=SAMPLE_SIZE,
        in_channels=4,
        out_channels=4,
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        cross_attention_dim=SD15_CROSS_DIM,
        attention_head_dim=8,
        norm_num_groups=32,
    )
    feature_extractor = CLIPImageProcessor(
        size={"shortest_edge": IMAGE_SIZE}, crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}
    )
    pipe = StableDiffusionPipeline(
        unet=unet,
        vae=_vae(),
        text_encoder=CLIPTextModel(_text_config(SD15_CROSS_DIM)),
        tokenizer=_tokenizer(),
        scheduler=sd15_scheduler(),
        safety_checker=None,
        feature_extractor=feature_extractor,
        image_encoder=None,
        requires_safety_checker=False,
    )
    pipe.save_pretrained(folder, safe_serialization=True)  # type: ignore[attr-defined]
    # name the class as the real repository does: diffusers then resolves it when it loads
    # (the torchvision backend where torchvision is installed, the PIL one otherwise), not
    # whatever it resolved to here
    index = json.loads((folder / "model_index.json").read_text())
    index["feature_extractor"] = ["transformers", "CLIPImageProcessor"]
    (folder / "model_index.json").write_text(json.dumps(index, indent=2, sort_keys=True))


def _sdxl_base(folder: Path) -> None:
    """SDXL's shape: no attention in down block 0, two text encoders, text_time embeddings."""
    from diffusers import StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(2)
    time_dim = 8
    unet = UNet2DConditionModel(
        block_out_channels=(32, 64, 64),
        layers_per_block=2,
        sample_size=SAMPLE_SIZE,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=SDXL_CROSS_DIM,
        attention_head_dim=(2, 4, 4),
        transformer_layers_per_block=(1, 2, 2),
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=time_dim,
        projection_class_embeddings_input_dim=SDXL_TEXT_DIM + 6 * time_dim,
        norm_num_groups=32,
    )
    pipe = StableDiffusionXLPipeline(
        vae=_vae(),
        text_encoder=CLIPTextModel(_text_config(SDXL_TEXT_DIM)),
        text_encoder_2=CLIPTextModelWithProjection(
            _text_config(SDXL_TEXT_DIM, projection_dim=SDXL_TEXT_DIM)
        ),
        tokenizer=_tokenizer(),
        tokenizer_2=_tokenizer(),
        unet=unet,
        scheduler=sdxl_scheduler(),
        image_encoder=None,
        feature_extractor=None,
    )
    pipe.save_pretrained(folder, safe_serialization=True)  # type: ignore[attr-defined]


def sdxl_scheduler() -> Any:
    """stable-diffusion-xl-base-1.0's scheduler config (Euler, leading spacing)."""
    from diffusers import EulerDiscreteScheduler

    return EulerDiscreteScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        steps_offset=1,
        timestep_spacing="leading",
    )


def _controlnet(folder: Path, unet_folder: Path, preset: ControlNetPreset, seed: int) -> None:
    """A ControlNet shaped like the base model's UNet (as the real ones are). A fresh one has
    zeroed output layers and changes nothing: they get random weights, so a control visibly
    steers the image. Saved in the repository's layout (fp16 files where it ships only those)."""
    from diffusers import ControlNetModel, UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(str(unet_folder))
    torch.manual_seed(seed)
    controlnet = ControlNetModel.from_unet(
        unet, conditioning_embedding_out_channels=(16, 16, 32, 32)
    )
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in controlnet.parameters():
            if not torch.count_nonzero(parameter):
                parameter.copy_(_randn(g, *parameter.shape, std=3.0))
        # the condition's own encoder, untrained, fades the image out in a few random convs:
        # stronger weights, so another control image (not just a control) changes the picture
        embedding = controlnet.controlnet_cond_embedding
        for module in [embedding.conv_in, *embedding.blocks]:
            module.weight.mul_(3.0)
    if preset.variant == "fp16":
        controlnet = controlnet.half()
    controlnet.save_pretrained(str(folder), variant=preset.variant, safe_serialization=True)


def _image_encoder(folder: Path, hidden: int, projection: int, seed: int) -> None:
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    torch.manual_seed(seed)
    model = CLIPVisionModelWithProjection(
        CLIPVisionConfig(
            hidden_size=hidden,
            intermediate_size=2 * hidden,
            num_attention_heads=4,
            num_hidden_layers=3,
            image_size=IMAGE_SIZE,
            patch_size=4,
            projection_dim=projection,
        )
    )
    model.save_pretrained(folder, safe_serialization=True)


def _score_model(folder: Path) -> None:
    """CLIP with both towers (ViT-L/14's layout, tiny): the model outputs are scored with."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPVisionConfig

    torch.manual_seed(3)
    vision = CLIPVisionConfig(  # the projection size in the vision config too, as openai's
        hidden_size=48,  # config.json has it: CLIPVisionModelWithProjection reads it there
        intermediate_size=96,
        num_attention_heads=4,
        num_hidden_layers=2,
        image_size=IMAGE_SIZE,
        patch_size=4,
        projection_dim=SCORE_PROJECTION,
    )
    config = CLIPConfig(
        text_config=_text_config(32).to_dict(),
        vision_config=vision.to_dict(),
        projection_dim=SCORE_PROJECTION,
    )
    CLIPModel(config).save_pretrained(folder, safe_serialization=True)
    _tokenizer().save_pretrained(folder)
    CLIPImageProcessor(
        size={"shortest_edge": IMAGE_SIZE}, crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}
    ).save_pretrained(folder)


def _randn(generator: torch.Generator, *shape: int, std: float = 0.1) -> torch.Tensor:
    return torch.randn(*shape, generator=generator) * std


def _ip_layers(
    unet_folder: Path, cross_dim: int, g: torch.Generator, *, lora: bool
) -> dict[str, torch.Tensor]:
    """`{i}.to_{k,v}_ip.weight` for every cross-attention processor index i (odd i on SD1.5);
    FaceID also has `{i}.to_{q,k,v,out}_lora.{down,up}.weight` on EVERY processor."""
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(unet_folder)
    tensors: dict[str, torch.Tensor] = {}
    for i, name in enumerate(unet.attn_processors):
        attn = unet.get_submodule(name.removesuffix(".processor"))
        hidden = attn.to_q.out_features
        is_cross = name.endswith("attn2.processor")
        if is_cross:
            for part in ("to_k_ip", "to_v_ip"):
                tensors[f"{i}.{part}.weight"] = _randn(g, hidden, cross_dim, std=0.2)
        if lora:
            kv_in = cross_dim if is_cross else hidden
            for part, fan_in in (
                ("to_q", hidden),
                ("to_k", kv_in),
                ("to_v", kv_in),
                ("to_out", hidden),
            ):
                tensors[f"{i}.{part}_lora.down.weight"] = _randn(g, LORA_RANK, fan_in)
                tensors[f"{i}.{part}_lora.up.weight"] = _randn(g, hidden, LORA_RANK)
    return tensors


def _resampler_layers(g: torch.Generator, dim: int, prefix: str) -> dict[str, torch.Tensor]:
    """The 4 perceiver layers of h94's Resampler (head size 64, as diffusers assumes)."""
    inner = 64 * max(1, dim // 64)
    tensors: dict[str, torch.Tensor] = {}
    for layer in range(4):
        p = f"{prefix}layers.{layer}"
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


def _image_proj(
    preset: AdapterPreset,
    cross_dim: int,
    encoder: tuple[int, int],
    g: torch.Generator,
    resampler_dim: int = RESAMPLER_DIM,
) -> dict[str, torch.Tensor]:
    """The `image_proj` part in h94's names, for each projection type diffusers recognises."""
    hidden, projection = encoder
    dim = resampler_dim
    kind = preset.projection
    if kind is Projection.LINEAR:  # ImageProjection: Linear -> 4 tokens, LayerNorm
        return {
            "proj.weight": _randn(g, 4 * cross_dim, projection),
            "proj.bias": _randn(g, 4 * cross_dim),
            "norm.weight": torch.ones(cross_dim),
            "norm.bias": torch.zeros(cross_dim),
        }
    if kind is Projection.PATCH_MLP:  # MLP over all patch tokens
        return {
            "proj.0.weight": _randn(g, hidden, hidden),
            "proj.0.bias": _randn(g, hidden),
            "proj.2.weight": _randn(g, cross_dim, hidden),
            "proj.2.bias": _randn(g, cross_dim),
            "proj.3.weight": torch.ones(cross_dim),
            "proj.3.bias": torch.zeros(cross_dim),
        }
    if kind is Projection.FACE_ID_MLP:  # MLP: 512 -> 1024 -> 4 tokens, LayerNorm
        return {
            "proj.0.weight": _randn(g, 2 * FACE_ID_DIM, FACE_ID_DIM),
            "proj.0.bias": _randn(g, 2 * FACE_ID_DIM),
            "proj.2.weight": _randn(g, 4 * cross_dim, 2 * FACE_ID_DIM),
            "proj.2.bias": _randn(g, 4 * cross_dim),
            "norm.weight": torch.ones(cross_dim),
            "norm.bias": torch.zeros(cross_dim),
        }
    if kind is Projection.FACE_ID_PLUS:  # ID MLP -> 4 tokens, a perceiver over CLIP
        dim = cross_dim  # the v2 shortcut adds the ID tokens to the output: same width
        return {
            "proj.0.weight": _randn(g, 2 * FACE_ID_DIM, FACE_ID_DIM),
            "proj.0.bias": _randn(g, 2 * FACE_ID_DIM),
            "proj.2.weight": _randn(g, 4 * dim, 2 * FACE_ID_DIM),
            "proj.2.bias": _randn(g, 4 * dim),
            "norm.weight": torch.ones(dim),
            "norm.bias": torch.zeros(dim),
            "perceiver_resampler.proj_in.weight": _randn(g, dim, hidden),
            "perceiver_resampler.proj_in.bias": _randn(g, dim),
            "perceiver_resampler.proj_out.weight": _randn(g, cross_dim, dim),
            "perceiver_resampler.proj_out.bias": _randn(g, cross_dim),
            "perceiver_resampler.norm_out.weight": torch.ones(cross_dim),
            "perceiver_resampler.norm_out.bias": torch.zeros(cross_dim),
        } | _resampler_layers(g, dim, "perceiver_resampler.")
    assert kind is Projection.RESAMPLER, kind
    # plus / plus-face (SD1.5 and SDXL): the Resampler with 16 learned queries
    return {
        "latents": _randn(g, 1, RESAMPLER_QUERIES, dim, std=dim**-0.5),
        "proj_in.weight": _randn(g, dim, hidden),
        "proj_in.bias": _randn(g, dim),
        "proj_out.weight": _randn(g, cross_dim, dim),
        "proj_out.bias": _randn(g, cross_dim),
        "norm_out.weight": torch.ones(cross_dim),
        "norm_out.bias": torch.zeros(cross_dim),
    } | _resampler_layers(g, dim, "")


def _write_adapter(
    path: Path, image_proj: dict[str, torch.Tensor], ip_adapter: dict[str, torch.Tensor]
) -> None:
    """.safetensors flattened (`image_proj.<k>`, `ip_adapter.<k>`), or .bin nested like h94's
    FaceID files (plain tensors: loadable with torch.load(weights_only=True))."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".bin":
        torch.save({"image_proj": image_proj, "ip_adapter": ip_adapter}, path)
        return
    flat = {f"image_proj.{k}": v for k, v in image_proj.items()}
    flat |= {f"ip_adapter.{k}": v for k, v in ip_adapter.items()}
    save_file({k: v.contiguous() for k, v in flat.items()}, str(path))


def write_tiny_models(root: Path) -> Path:
    """Write every tiny model under `root`; returns `root`. Overwrites what is there."""
    from pipeline.tiny_faces import write_tiny_face_pack
    from pipeline.tiny_kolors import kolors_base
    from pipeline.tiny_transformers import (
        flux_adapter,
        flux_base,
        flux_controlnet,
        sd35_adapter,
        sd35_base,
        siglip_encoder,
    )

    # each family's tiny base model, in its repository's layout
    builders = {
        "sd15": _sd15_base,
        "sdxl": _sdxl_base,
        "flux": flux_base,
        "sd35": sd35_base,
        "kolors": kolors_base,
    }

    root = root.expanduser().resolve()
    for family, base in BASE_MODELS.items():
        builders[family](root / base.folder)
    encoders: dict[RepoPath, tuple[int, int]] = {}
    for seed, (ref, dims) in enumerate(ENCODER_DIMS.items(), start=1):
        _image_encoder(root / ref.folder / ref.path, *dims, seed=seed)
        encoders[ref] = dims
    _score_model(root / SCORE_MODEL.folder)  # also FLUX's adapter's image encoder
    siglip_encoder(root / SIGLIP.folder / SIGLIP.path)  # SD3.5's adapter's
    for seed, preset in enumerate(ADAPTERS.values(), start=10):
        file = root / preset.weights.folder / preset.weights.path / preset.weight_name
        if preset.family == "flux":  # XLabs' own layout, not h94's
            transformer = root / BASE_MODELS["flux"].folder / "transformer"
            tokens = 16 if preset.name == "flux-v2" else 4
            flux_adapter(file, transformer, SCORE_PROJECTION, seed, tokens=tokens)
            continue
        if preset.family == "sd35":  # InstantX's layout
            sd35_adapter(file, root / BASE_MODELS["sd35"].folder / "transformer", seed)
            continue
        g = torch.Generator().manual_seed(seed)
        cross_dim = CROSS_DIM[preset.family]
        encoder = encoders[preset.image_encoder] if preset.image_encoder else (0, 0)
        unet = root / BASE_MODELS[preset.family].folder / "unet"
        _write_adapter(
            file,
            _image_proj(preset, cross_dim, encoder, g),
            _ip_layers(unet, cross_dim, g, lora=preset.lora),
        )
    write_tiny_face_pack(root / FACE_PACK_FOLDER, FACE_PACK)
    for seed, control in enumerate(CONTROLNETS.values(), start=40):
        base_folder = root / BASE_MODELS[control.family].folder
        if control.family == "flux":
            flux_controlnet(root / control.repo.folder, base_folder / "transformer", seed)
            continue
        _controlnet(root / control.repo.folder, base_folder / "unet", control, seed)
    (root / "TINY_MODELS.json").write_text(
        json.dumps({"note": "random weights for offline tests; not for real images"}, indent=2)
    )
    return root
