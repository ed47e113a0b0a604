"""An IP-Adapter inside a UNet, as trainable modules, and its weights in h94's file layout.

The structure is diffusers' own (what `load_ip_adapter` builds), made here without a file:
- every cross-attention (`attn2`) processor becomes an `IPAdapterAttnProcessor2_0` whose
  `to_k_ip` / `to_v_ip` start as copies of the layer's `to_k` / `to_v` (the paper's init);
  self-attention keeps a plain processor;
- the image projection goes in `unet.encoder_hid_proj` (`MultiIPAdapterImageProjection`):
  `ImageProjection` (4 tokens from the global CLIP embedding) or
  `IPAdapterPlusImageProjection` (a Resampler with 16 queries over the patch features).

`to_h94` writes those modules in h94's names (`image_proj.*`, `ip_adapter.{i}.to_{k,v}_ip`,
i = the processor's position in `unet.attn_processors`), the file diffusers' `load_ip_adapter`
and tencent's IP-Adapter code read; `from_h94` reads such a file back into the modules.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from pipeline.presets import Projection

HEAD_DIM = 64  # diffusers' Resampler assumes head size 64 (heads = to_q rows / 64)
RESAMPLER_DEPTH = 4
PLUS_QUERIES = 16
LINEAR_TOKENS = 4


@dataclass(frozen=True)
class ProjectionShape:
    """What an adapter's image projection looks like: enough to build it empty."""

    projection: Projection
    cross_attention_dim: int  # the UNet's (768 in SD1.5)
    image_dim: int  # LINEAR: the CLIP projection size (1024); RESAMPLER: its hidden size (1280)
    hidden_dim: int = 0  # RESAMPLER: the perceiver's width (768 in ip-adapter-plus_sd15)
    tokens: int = LINEAR_TOKENS  # image tokens the projection makes

    @classmethod
    def fresh(cls, projection: Projection, unet: Any, encoder_config: Any) -> ProjectionShape:
        """The paper's shapes for a new adapter on `unet` with this CLIP vision encoder:
        tencent's tutorial_train(_plus).py settings (plus: width = the UNet's
        cross-attention size, rounded up to whole 64-wide heads)."""
        cad = unet.config.cross_attention_dim
        if projection is Projection.LINEAR:
            return cls(projection, cad, encoder_config.projection_dim)
        if projection is Projection.RESAMPLER:
            width = -(-cad // HEAD_DIM) * HEAD_DIM
            return cls(projection, cad, encoder_config.hidden_size, width, PLUS_QUERIES)
        raise ValueError(f"training builds linear and resampler projections, not {projection}")

    @classmethod
    def of_file(cls, state: dict[str, torch.Tensor]) -> ProjectionShape:
        """The shapes of an h94-layout file (`image_proj.*` keys)."""
        if "image_proj.proj.weight" in state:
            rows, image_dim = state["image_proj.proj.weight"].shape
            return cls(Projection.LINEAR, rows // LINEAR_TOKENS, image_dim)
        if "image_proj.latents" in state:
            _, queries, width = state["image_proj.latents"].shape
            return cls(
                Projection.RESAMPLER,
                state["image_proj.proj_out.weight"].shape[0],
                state["image_proj.proj_in.weight"].shape[1],
                width,
                queries,
            )
        raise ValueError("not a base or plus IP-Adapter file (no image_proj.proj / latents)")

    def build(self) -> nn.Module:
        from diffusers.models.embeddings import ImageProjection, IPAdapterPlusImageProjection

        if self.projection is Projection.LINEAR:
            return ImageProjection(
                image_embed_dim=self.image_dim,
                cross_attention_dim=self.cross_attention_dim,
                num_image_text_embeds=self.tokens,
            )
        return IPAdapterPlusImageProjection(
            embed_dims=self.image_dim,
            output_dims=self.cross_attention_dim,
            hidden_dims=self.hidden_dim,
            depth=RESAMPLER_DEPTH,
            dim_head=HEAD_DIM,
            heads=self.hidden_dim // HEAD_DIM,
            num_queries=self.tokens,
            ffn_ratio=4,
        )


def install(unet: Any, shape: ProjectionShape) -> None:
    """Give `unet` a new adapter of `shape`: IP processors on every cross-attention layer with
    k/v copied from the text branch, the projection in `encoder_hid_proj`. Works on the meta
    device too (counting parameters of real-size models without their weights)."""
    from diffusers.models.attention_processor import AttnProcessor2_0, IPAdapterAttnProcessor2_0
    from diffusers.models.embeddings import MultiIPAdapterImageProjection

    processors: dict[str, Any] = {}
    for name in unet.attn_processors:
        attn = unet.get_submodule(name.removesuffix(".processor"))
        if not name.endswith("attn2.processor"):
            processors[name] = AttnProcessor2_0()
            continue
        processor = IPAdapterAttnProcessor2_0(
            hidden_size=attn.to_k.out_features,
            cross_attention_dim=unet.config.cross_attention_dim,
            num_tokens=(shape.tokens,),
            scale=1.0,
        )
        k_ip: Any = processor.to_k_ip[0]
        v_ip: Any = processor.to_v_ip[0]
        with torch.no_grad():  # the paper's init: the text branch's projections, copied
            k_ip.weight.copy_(attn.to_k.weight)
            v_ip.weight.copy_(attn.to_v.weight)
        processors[name] = processor.to(device=attn.to_k.weight.device, dtype=torch.float32)
    unet.set_attn_processor(processors)
    projection = shape.build().to(device=unet.device, dtype=torch.float32)
    unet.encoder_hid_proj = MultiIPAdapterImageProjection([projection])
    unet.config.encoder_hid_dim_type = "ip_image_proj"


def freeze_all_but_adapter(unet: Any) -> dict[str, nn.Parameter]:
    """Freeze the UNet; the adapter's parameters (fp32) alone are trainable. Returns them by
    name, in a fixed order (checkpoints and the optimizer use it)."""
    unet.requires_grad_(False)
    for module in _adapter_modules(unet):
        module.float().requires_grad_(True)
    return {name: p for name, p in unet.named_parameters() if p.requires_grad}


def _adapter_modules(unet: Any) -> list[nn.Module]:
    from diffusers.models.attention_processor import IPAdapterAttnProcessor2_0

    processors = [
        p for p in unet.attn_processors.values() if isinstance(p, IPAdapterAttnProcessor2_0)
    ]
    return [unet.encoder_hid_proj, *processors]


def adapter_parameter_count(unet: Any) -> int:
    return sum(p.numel() for m in _adapter_modules(unet) for p in m.parameters())


# --- h94's file layout -------------------------------------------------------------------
# inside `layers.L.`: diffusers' Resampler names -> h94's (tencent's Resampler), where the
# attention's to_k and to_v are one `to_kv` matrix
_RESAMPLER_NAMES = [
    ("ln0.", "0.norm1."),
    ("ln1.", "0.norm2."),
    ("attn.to_q.", "0.to_q."),
    ("attn.to_out.0.", "0.to_out."),
    ("ff.0.", "1.0."),
    ("ff.1.net.0.proj.", "1.1."),
    ("ff.1.net.2.", "1.3."),
]


def _rename_layer_key(key: str, pairs: list[tuple[str, str]]) -> str:
    match = re.fullmatch(r"(layers\.\d+\.)(.*)", key)
    if match is None:
        return key  # latents, proj_in, proj_out, norm_out: the same in both
    prefix, rest = match.groups()
    for old, new in pairs:
        if rest.startswith(old):
            return prefix + new + rest.removeprefix(old)
    raise KeyError(f"unexpected Resampler weight {key!r}")


def _h94_image_proj(projection: Projection, state: dict[str, torch.Tensor]) -> dict[str, Any]:
    if projection is Projection.LINEAR:  # ImageProjection: image_embeds.* -> proj.*
        return {k.replace("image_embeds.", "proj.", 1): v for k, v in state.items()}
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        match = re.fullmatch(r"layers\.(\d+)\.attn\.to_([kv])\.weight", key)
        if match is None:
            out[_rename_layer_key(key, _RESAMPLER_NAMES)] = value
        elif match.group(2) == "k":
            layer = match.group(1)
            v = state[f"layers.{layer}.attn.to_v.weight"]
            out[f"layers.{layer}.0.to_kv.weight"] = torch.cat([value, v])
    return out


def _diffusers_image_proj(projection: Projection, state: dict[str, torch.Tensor]) -> dict[str, Any]:
    if projection is Projection.LINEAR:
        return {k.replace("proj.", "image_embeds.", 1): v for k, v in state.items()}
    inverse = [(h94, ours) for ours, h94 in _RESAMPLER_NAMES]
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        match = re.fullmatch(r"layers\.(\d+)\.0\.to_kv\.weight", key)
        if match is None:
            out[_rename_layer_key(key, inverse)] = value
        else:
            k, v = value.chunk(2)
            out[f"layers.{match.group(1)}.attn.to_k.weight"] = k
            out[f"layers.{match.group(1)}.attn.to_v.weight"] = v
    return out


def to_h94(unet: Any, shape: ProjectionShape, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The adapter in `unet` as h94's flat safetensors dict (copies, contiguous, `dtype`)."""
    from diffusers.models.attention_processor import IPAdapterAttnProcessor2_0

    [projection] = unet.encoder_hid_proj.image_projection_layers
    image_proj = _h94_image_proj(shape.projection, projection.state_dict())
    flat = {f"image_proj.{k}": v for k, v in image_proj.items()}
    for index, processor in enumerate(unet.attn_processors.values()):
        if isinstance(processor, IPAdapterAttnProcessor2_0):
            flat[f"ip_adapter.{index}.to_k_ip.weight"] = processor.to_k_ip[0].weight
            flat[f"ip_adapter.{index}.to_v_ip.weight"] = processor.to_v_ip[0].weight
    return {
        k: v.detach().to(dtype=dtype, device="cpu").clone().contiguous() for k, v in flat.items()
    }


def from_h94(unet: Any, shape: ProjectionShape, state: dict[str, torch.Tensor]) -> None:
    """Load an h94-layout file into the adapter `install` made (strict: every key, every
    shape). The tensors are copied into the modules' own fp32 storage: never shared with the
    file's tensors or the UNet's `to_k` / `to_v`."""
    from diffusers.models.attention_processor import IPAdapterAttnProcessor2_0

    image_proj = {
        k.removeprefix("image_proj."): v for k, v in state.items() if k.startswith("image_proj.")
    }
    [projection] = unet.encoder_hid_proj.image_projection_layers
    projection.load_state_dict(_diffusers_image_proj(shape.projection, image_proj), strict=True)
    layers = {
        k.removeprefix("ip_adapter."): v for k, v in state.items() if k.startswith("ip_adapter.")
    }
    expected: set[str] = set()
    with torch.no_grad():
        for index, processor in enumerate(unet.attn_processors.values()):
            if not isinstance(processor, IPAdapterAttnProcessor2_0):
                continue
            for part in ("to_k_ip", "to_v_ip"):
                key = f"{index}.{part}.weight"
                expected.add(key)
                if key not in layers:
                    raise ValueError(f"the adapter file has no ip_adapter.{key}")
                getattr(processor, part)[0].weight.copy_(layers[key])
    extra = sorted(set(layers) - expected)
    if extra:
        raise ValueError(f"the adapter file has weights this UNet has no place for: {extra[:4]}")


def read_h94_file(data: bytes, name: str) -> dict[str, torch.Tensor]:
    """An adapter file in h94's layout as one flat float32 state (`image_proj.*`,
    `ip_adapter.*`): safetensors, or h94's pickled `.bin` read as tensors only (never code)."""
    import io

    from safetensors.torch import load as load_safetensors

    if name.endswith(".bin"):
        nested = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
        state = {
            f"{part}.{k}": v
            for part in ("image_proj", "ip_adapter")
            for k, v in nested[part].items()
        }
    else:
        state = load_safetensors(data)
    return {k: v.float() for k, v in state.items()}
