"""What a reference set becomes before its adapter sees it: each picture fitted to the square
the image encoder takes (`fit_picture`), the built-in negative picture (`noise_picture`), and
the set's embeddings combined into one (`combine`), on cached embeddings, never re-encoded.

Fits (the row's `fit`, per reference set; the cache key carries it):
- `crop`: the encoder's own preprocessing, the short side resized and the centre cropped (a
  3:1 rug loses its ends);
- `pad`: the picture centred on a square of its border colour (the per-channel median of its
  outermost pixels: a studio backdrop's colour, white for a cut-out, which is decoded on
  white), so the whole product is seen;
- `tiles`: ComfyUI_IPAdapter_plus' tiled approach along the long side: square tiles of the
  short side's length, ceil(long / short) of them (at most 4: a longer picture is centre-cropped
  to 4:1 first, as ComfyUI does), spread evenly from one end to the other (overlapping where
  the length is not a whole number of tiles). Each tile is embedded; the adapter gets their
  tokens one after another, or their mean where it takes one picture's features (SD3.5).
"""

from __future__ import annotations

import functools
import io
import math
from collections.abc import Sequence
from typing import TYPE_CHECKING, Literal

import numpy as np
from PIL import Image

if TYPE_CHECKING:
    import torch

Fit = Literal["crop", "pad", "tiles"]
Combine = Literal["average", "concat", "norm_average", "subtract"]
Tensors = dict[str, "torch.Tensor"]
MAX_TILES = 4
NOISE = "noise"  # a negative reference: ComfyUI IPAdapterNoise's default picture
# what the positive side of a cached embedding holds (the rest are negatives)
POSITIVE = ("pos", "clip_pos")


def fit_picture(image: Image.Image, fit: Fit) -> list[Image.Image]:
    """The pictures the encoder is given for one reference: the picture itself (`crop`: the
    encoder's processor crops), the padded square, or the tiles."""
    if fit == "crop":
        return [image]
    if fit == "pad":
        return [pad_to_square(image)]
    return tiles(image)


def border_colour(image: Image.Image) -> tuple[int, int, int]:
    """The per-channel median of the picture's outermost row and column of pixels."""
    pixels = np.asarray(image.convert("RGB"))
    border = np.concatenate([pixels[0], pixels[-1], pixels[:, 0], pixels[:, -1]])
    red, green, blue = (int(v) for v in np.median(border, axis=0))
    return red, green, blue


def pad_to_square(image: Image.Image) -> Image.Image:
    """The picture centred (its offset rounded down) on a square of its border colour."""
    width, height = image.size
    side = max(width, height)
    if width == height:
        return image
    square = Image.new("RGB", (side, side), border_colour(image))
    square.paste(image.convert("RGB"), ((side - width) // 2, (side - height) // 2))
    return square


def tiles(image: Image.Image) -> list[Image.Image]:
    """Square tiles along the long side (see the module's docstring)."""
    width, height = image.size
    short, long = min(width, height), max(width, height)
    if long > MAX_TILES * short:  # ComfyUI's limit: the centre 4:1
        kept = MAX_TILES * short
        offset = (long - kept) // 2
        box = (
            (offset, 0, offset + kept, height)
            if width > height
            else (0, offset, width, offset + kept)
        )
        image, long = image.crop(box), kept
    count = math.ceil(long / short)
    overlap = (count * short - long) / (count - 1) if count > 1 else 0.0
    found = []
    for i in range(count):
        start = int(i * (short - overlap))
        box = (
            (start, 0, start + short, short) if width > height else (0, start, short, start + short)
        )
        found.append(image.crop(box))
    return found


@functools.cache
def noise_picture() -> bytes:
    """ComfyUI IPAdapterNoise's default negative (type fade, strength 1, no image): uniform
    noise from torch's generator seeded 0, [1, 224, 224, 3], here as an 8-bit PNG (ComfyUI
    hands the floats to CLIP; this rounds them to the nearest of 256 levels)."""
    import torch

    generator = torch.Generator().manual_seed(0)
    noise = torch.rand((1, 224, 224, 3), generator=generator)
    pixels = (noise[0].clamp(0, 1) * 255).round().to(torch.uint8).numpy()
    buffer = io.BytesIO()
    Image.fromarray(pixels, mode="RGB").save(buffer, format="PNG")
    return buffer.getvalue()


def combine(
    tensors: Sequence[Tensors], how: Combine, weights: Sequence[float] | None = None
) -> Tensors:
    """A reference set's embeddings (each [n, ...]: n = 1, or its tiles) as its adapter takes
    them. Each reference's weight w_i (1 by default) scales its embedding, as ComfyUI's
    encoder weight does; then:

    - `average`: the weighted mean, sum(w_i e_i) / sum(w_i);
    - `norm_average`: each e_i divided by its norm (per token, over the last axis) before the
      weighted mean, which is then scaled back by the weighted mean of those norms;
    - `subtract`: w_0 e_0 minus the mean of w_i e_i over the rest ("this bag without the
      strap"; ComfyUI's `subtract` when the weights are 1);
    - `concat`: the w_i e_i one after another, as extra tokens.

    The negatives (`neg`, `clip_neg`: the same for every reference of an encoder) are
    concatenated with `concat` and averaged otherwise."""
    import torch

    w = [1.0] * len(tensors) if weights is None else [float(x) for x in weights]
    if how != "concat" and len(tensors) == 1:  # the mean of one embedding is itself
        return dict(tensors[0])
    if how == "concat":
        joined = {}
        for name in tensors[0]:
            parts = [
                t[name] * (wi if name in POSITIVE else 1.0)
                for t, wi in zip(tensors, w, strict=True)
            ]
            joined[name] = torch.cat(parts)
        return joined
    combined = {}
    for name in tensors[0]:
        stack = torch.stack([t[name] for t in tensors])  # [refs, n, ...]
        if name not in POSITIVE:
            combined[name] = stack.mean(dim=0)
            continue
        weight = torch.tensor(w, dtype=stack.dtype).view(-1, *[1] * (stack.ndim - 1))
        if how == "average":
            combined[name] = (stack * weight).sum(dim=0) / weight.sum()
        elif how == "norm_average":
            norms = stack.norm(dim=-1, keepdim=True)
            unit = stack / norms.clamp_min(torch.finfo(stack.dtype).tiny)
            mean_norm = (norms * weight).sum(dim=0) / weight.sum()
            combined[name] = (unit * weight).sum(dim=0) / weight.sum() * mean_norm
        else:  # subtract
            scaled = stack * weight
            combined[name] = scaled[0] - scaled[1:].mean(dim=0)
    return combined
