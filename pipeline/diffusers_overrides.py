"""Where ipbatch reaches into diffusers' internals: the part a diffusers upgrade can break.

Written against diffusers 0.42.1 (pyproject pins it); re-check each function here, and run
tests/unit/test_batching.py and test_structure.py, before moving the pin:

- `prebuilt_ip_embeds`: the per-row fix of diffusers#9813 (still open): for one call,
  `prepare_ip_adapter_image_embeds` returns the per-slot embeds as given instead of tiling them
  over the batch (which makes every row attend to every row's reference, silently).
- `set_processor_scales`: FLUX's and SD3.5's per-slot IP-Adapter strengths, set on their
  processors (diffusers' setters take floats).
- `per_slot_control`: each slot's ControlNet strength and step window in one call, by
  multiplying each ControlNet position's residuals (diffusers takes one scale per net per
  call); a MultiControlNet's positions are swapped for per-position modules during the call.
- `embed_shape`: the embeds each IP-Adapter projection class takes, read from its layers.
- `clip_skip_on_flat_clip`: diffusers' SD1.5 `clip_skip` reads `text_encoder.text_model`, which
  transformers >= 5.6 no longer has (diffusers#14124, fix proposed in #14043).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

import torch

from core.errors import ConfigError

if TYPE_CHECKING:
    from pipeline.requests import GenerationRequest


@contextmanager
def prebuilt_ip_embeds(pipe: Any, given: list[Any], *, slots: int, do_cfg: bool) -> Iterator[None]:
    """For this call, `prepare_ip_adapter_image_embeds` returns our per-slot tensors as they
    are, instead of tiling the given embeds over the batch (which would make every row attend
    to every row's reference, silently). `given`: what the call passes, the positive embeds
    (SD1.5/SDXL: a list, CFG halves stacked; SD3.5: one tensor, the same) and, for FLUX, the
    negative ones, which FLUX's pipeline prepares in a second call of its own signature (no
    CFG flag)."""

    def prebuilt(_image: Any, embeds: Any, _device: Any, repeat: int, *cfg: bool) -> Any:
        known = any(embeds is g for g in given)
        if not known or repeat != slots or (cfg and cfg[0] != do_cfg):
            raise RuntimeError(f"unexpected IP-Adapter call: {repeat} slots, cfg={cfg}")
        return embeds

    pipe.prepare_ip_adapter_image_embeds = prebuilt
    try:
        yield
    finally:
        del pipe.prepare_ip_adapter_image_embeds  # the class's method again


def set_processor_scales(transformer: torch.nn.Module, scales: list[torch.Tensor]) -> None:
    """Each IP-Adapter attention processor's strength per slot: a (batch, 1, 1) tensor per
    adapter, the batch as the transformer sees it (SD3.5 under CFG: [negative; positive]
    slots). The pipelines' `set_ip_adapter_scale` takes floats only.

    FLUX (FluxIPAdapterAttnProcessor, diffusers 0.42.1): `scale` is a list with one entry per
    adapter, each multiplying that adapter's attention output: a tensor broadcasts over the
    slots (through `set_ip_adapter_scale` it raises TypeError). SD3.5
    (SD3IPAdapterJointAttnProcessor2_0): `scale` is one number, tested with `if self.scale !=
    0` (ambiguous for a tensor, a RuntimeError) before `output * self.scale`: it gets a
    `_SlotScale`, which is never 0 and multiplies as the tensor does."""
    from diffusers.models.attention_processor import SD3IPAdapterJointAttnProcessor2_0
    from diffusers.models.transformers.transformer_flux import FluxIPAdapterAttnProcessor

    found = transformer.attn_processors.values()  # type: ignore[operator]
    flux = [p for p in found if isinstance(p, FluxIPAdapterAttnProcessor)]
    sd3 = [p for p in found if isinstance(p, SD3IPAdapterJointAttnProcessor2_0)]
    for processor in flux:
        processor.scale = list(scales)
    if sd3:
        [scale] = scales  # SD3.5 loads one adapter
        for joint in sd3:
            joint.scale = _SlotScale(scale)  # type: ignore[assignment]
    if not flux and not sd3:
        raise RuntimeError("no IP-Adapter processors to scale")


class _SlotScale:
    """A per-slot strength where SD3's IP-Adapter processor expects one float: `!= 0` is
    True (the image attention runs; slots at 0 are multiplied by 0) and `x * scale`
    multiplies by the (batch, 1, 1) tensor."""

    def __init__(self, tensor: torch.Tensor) -> None:
        self.tensor = tensor

    def __ne__(self, other: object) -> bool:
        return True

    def __eq__(self, other: object) -> bool:
        return False

    __hash__ = None  # type: ignore[assignment]

    def __rmul__(self, other: torch.Tensor) -> torch.Tensor:
        return other * self.tensor

    __mul__ = __rmul__


@contextmanager
def per_slot_control(
    pipe: Any, rows: Sequence[GenerationRequest], *, do_cfg: bool
) -> Iterator[None]:
    """Each slot's ControlNet strength and step window in one call. The call runs every
    ControlNet at scale 1.0 over all steps; here each position's residuals are multiplied,
    step by step, by a per-slot factor: the row's scale inside its [start, end] fraction of
    the steps, 0 outside, with diffusers' own rule (`1 - (i / n < start or (i + 1) / n >
    end)`, n the steps the pipeline runs). The second half of a CFG batch repeats the first.

    The override is per position, not per module: a row may use the same ControlNet twice
    (two canny maps at two scales), and a MultiControlNet then holds one module at two
    positions. Each position gets a `_Position` of its own in `nets` for the call."""
    if not rows[0].controls:
        yield
        return

    def scaled(index: int, call: Any) -> Any:
        step = iter(range(10**9))  # this position's step counter

        def forward(*args: Any, **kwargs: Any) -> Any:
            i, n = next(step), pipe._num_timesteps
            factors = [
                0.0 if (i / n < c.start or (i + 1) / n > c.end) else c.scale
                for c in (r.controls[index] for r in rows)
            ]
            factors *= 2 if do_cfg else 1
            # a UNet ControlNet: (down residuals, mid residual); FLUX's: (double-block
            # samples, single-block samples), lists of [batch, tokens, width] or None
            return tuple(_times(part, factors) for part in call(*args, **kwargs))

        return forward

    controlnet = pipe.controlnet
    nets = getattr(controlnet, "nets", None)
    if nets is None:  # one ControlNet: the pipeline checks its class, so its forward is wrapped
        controlnet.forward = scaled(0, controlnet.forward)
        try:
            yield
        finally:
            del controlnet.forward  # the class's method again
        return
    originals = list(nets)
    for index, net in enumerate(originals):
        nets[index] = _Position(net, scaled(index, net))
    try:
        yield
    finally:
        for index, net in enumerate(originals):
            nets[index] = net


def _times(residuals: Any, factors: list[float]) -> Any:
    """Residuals (a tensor, a list of them, or None) times one factor per batch entry."""
    if residuals is None:
        return None
    if isinstance(residuals, (list, tuple)):
        return [_times(part, factors) for part in residuals]
    factor = torch.tensor(factors, dtype=residuals.dtype, device=residuals.device)
    return residuals * factor.view(-1, *[1] * (residuals.ndim - 1))


class _Position(torch.nn.Module):
    """One position of a MultiControlNet during a batched call: its ControlNet (shared with
    other positions if the row names it twice) called through this position's factors."""

    def __init__(self, net: torch.nn.Module, forward: Any) -> None:
        super().__init__()
        self.net = net
        self._scaled = forward

    def __getattr__(self, name: str) -> Any:
        """What the pipeline reads of a position's net (`config`; FLUX: `input_hint_block`,
        `union`) is the net's."""
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self._modules["net"], name)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self._scaled(*args, **kwargs)


def embed_shape(layer: torch.nn.Module) -> tuple[tuple[int, ...], tuple[int, ...] | None]:
    """Per projection layer type: the trailing shape of the embeds it takes (-1: any number of
    tokens), and for FaceID-Plus the trailing shape of its face-crop CLIP embeds."""
    from diffusers.models import embeddings as e

    def width(linear: object) -> int:
        assert isinstance(linear, torch.nn.Linear)
        return int(linear.in_features)

    if isinstance(layer, e.ImageProjection):
        return (width(layer.image_embeds),), None
    if isinstance(layer, e.IPAdapterFullImageProjection):
        return (-1, width(layer.ff.net[0].proj)), None
    if isinstance(layer, e.IPAdapterFaceIDImageProjection):
        return (width(layer.ff.net[0].proj),), None
    if isinstance(layer, e.IPAdapterFaceIDPlusImageProjection):
        return (width(layer.proj.net[0].proj),), (-1, width(layer.proj_in))
    if isinstance(layer, e.IPAdapterPlusImageProjection):
        return (-1, width(layer.proj_in)), None
    if isinstance(layer, e.IPAdapterTimeImageProjection):  # SD3.5: SigLIP patch features
        return (-1, width(layer.proj_in)), None
    raise ConfigError(f"unsupported IP-Adapter projection {type(layer).__name__}")


def clip_skip_on_flat_clip(text_encoder: torch.nn.Module) -> None:
    """transformers 5.6 flattened `CLIPTextModel` (its `final_layer_norm` is on the model, the
    `text_model` wrapper is gone); diffusers 0.42.1's SD1.5 `encode_prompt` still applies
    `text_encoder.text_model.final_layer_norm` when `clip_skip` is set, an AttributeError. The
    fix diffusers#14043 proposes is to use the encoder itself there: `text_model` is made to
    name the encoder (a plain attribute, not a registered submodule: no cycle in the module
    tree, no weights twice). Encoders that still wrap a `text_model` are left as they are."""
    if "text_model" in text_encoder._modules or "final_layer_norm" not in text_encoder._modules:
        return
    object.__setattr__(text_encoder, "text_model", text_encoder)
