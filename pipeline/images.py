"""Reference decoding, output encoding, and judging an output found at a key.

References come from users: decode them defensively (size and pixel limits before decoding,
EXIF orientation, first frame of animations, every mode to RGB on white) and turn every
failure into an `ItemError` with a code from the contract.
"""

from __future__ import annotations

import io
import json
import warnings
from typing import Any

import numpy as np
from PIL import Image, ImageOps, PngImagePlugin, UnidentifiedImageError

from core.errors import ErrorCode, ItemError

CONTENT_TYPES = {"png": "image/png", "webp": "image/webp", "jpeg": "image/jpeg"}


def decode_reference(data: bytes, *, name: str, max_pixels: int, max_bytes: int) -> Image.Image:
    """Bytes of a reference image -> an upright RGB image, or an ItemError."""
    return to_rgb(open_image(data, name=name, max_pixels=max_pixels, max_bytes=max_bytes))


def open_image(data: bytes, *, name: str, max_pixels: int, max_bytes: int) -> Image.Image:
    """Bytes of a user's image -> the upright first frame, decoded, in its own mode (alpha
    kept), or an ItemError."""
    if not data:
        raise ItemError(ErrorCode.REFERENCE_NOT_IMAGE, f"{name} is an empty file")
    if len(data) > max_bytes:
        raise ItemError(
            ErrorCode.REFERENCE_TOO_LARGE,
            f"{name} is {len(data)} bytes; the limit is {max_bytes} (IPBATCH_MAX_REFERENCE_BYTES)",
        )
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image: Image.Image = Image.open(io.BytesIO(data))
            width, height = image.size  # header only: nothing decoded yet
            if width * height > max_pixels:
                raise ItemError(
                    ErrorCode.REFERENCE_TOO_LARGE,
                    f"{name} is {width}x{height} pixels; the limit is {max_pixels} pixels",
                )
            image.seek(0)  # first frame of an animation
            image.load()
            return ImageOps.exif_transpose(image) or image
    except ItemError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ItemError(ErrorCode.REFERENCE_TOO_LARGE, f"{name}: {exc}") from exc
    except UnidentifiedImageError as exc:
        raise ItemError(
            ErrorCode.REFERENCE_NOT_IMAGE,
            f"{name} is not an image PIL can read (PNG, JPEG, WebP, GIF, TIFF...)",
        ) from exc
    except (OSError, ValueError, SyntaxError) as exc:
        raise ItemError(
            ErrorCode.REFERENCE_NOT_IMAGE, f"{name} is truncated or corrupt ({exc})"
        ) from exc


def alpha_mask(image: Image.Image, *, name: str) -> Image.Image:
    """An inpainting mask from a cut-out's alpha channel: transparent pixels are repainted
    (white), opaque ones kept (black), partly transparent ones in between (the inpainting
    pipeline binarises at half). An ItemError if the image has no transparent pixel."""
    if image.mode in ("P", "PA"):  # a palette's transparency becomes alpha
        image = image.convert("RGBA")
    if image.mode not in ("RGBA", "LA", "RGBa", "La"):
        raise ItemError(
            ErrorCode.INVALID_ROW,
            f"inpaint_mask 'alpha': {name} has no alpha channel (mode {image.mode}); give a "
            "cut-out with transparency (PNG, WebP) or a mask image",
        )
    alpha = np.asarray(image.getchannel("A"), dtype=np.uint8)
    if int(alpha.min()) == 255:
        raise ItemError(
            ErrorCode.INVALID_ROW,
            f"inpaint_mask 'alpha': {name} has no transparent pixel, so nothing would be "
            "repainted; give a cut-out with a transparent background or a mask image",
        )
    return Image.fromarray(255 - alpha, mode="L")


def mask_levels(image: Image.Image) -> Image.Image:
    """A drawn mask's grey levels (L): transparent pixels are not selected, so they count as
    black (keep, outside the region), partly transparent ones as their opacity times their
    grey. A person draws a mask as a white stripe on a transparent layer; on white (the rule
    for pictures) it would select everything. Opaque masks are read as they are."""
    if image.mode in ("P", "PA"):  # a palette's transparency becomes alpha
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "RGBa", "La"):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (0, 0, 0, 255))
        return Image.alpha_composite(background, rgba).convert("L")
    return to_rgb(image).convert("L")


def to_rgb(image: Image.Image) -> Image.Image:
    if image.mode == "RGB":
        return image
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):  # 16/32-bit grey -> 8-bit
        values = np.asarray(image, dtype=np.float64)
        peak = 65535.0 if image.mode.startswith("I;16") else max(float(values.max()), 1.0)
        image = Image.fromarray((values / peak * 255.0).clip(0, 255).astype(np.uint8), mode="L")
    if image.mode == "P":
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA"):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def encode_output(image: Image.Image, fmt: str, metadata: dict[str, Any]) -> bytes:
    """PNG keeps the generation parameters in an `ipbatch` text chunk."""
    buffer = io.BytesIO()
    if fmt == "png":
        info = PngImagePlugin.PngInfo()
        info.add_text("ipbatch", json.dumps(metadata, sort_keys=True))
        image.save(buffer, format="PNG", pnginfo=info)
    elif fmt == "webp":
        image.save(buffer, format="WEBP", quality=95)
    elif fmt == "jpeg":
        image.save(buffer, format="JPEG", quality=95)
    else:
        raise ValueError(f"unknown output format {fmt!r}")
    return buffer.getvalue()


def output_pixels(data: bytes) -> np.ndarray | None:
    """An output image's RGB pixels (float32), or None where the bytes do not decode whole
    (empty, cut off, not an image)."""
    try:
        with Image.open(io.BytesIO(data)) as image:
            image.load()
            return np.asarray(image.convert("RGB"), dtype=np.float32)
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError):
        return None


# A stored output "is the same picture" as the one just made when its pixels differ by at
# most this mean, in levels of 255: rows batched differently round differently (one value in
# 12,288 by one level on the tiny models in float32; fp16 on a GPU more), a changed model or
# another seed differs by tens of levels.
SAME_PICTURE_MEAN_DIFF = 2.0


def judge_stored_output(stored: bytes, made: bytes, *, uri: str) -> str:
    """Why the object found at an output key may be replaced by the image just `made`:
    "empty", "undecodable" (a cut-off upload), or "another rendering" (the same picture up to
    float rounding). Another picture raises `ItemError(output_conflict)` naming the key: two
    different images for one row and seed mean a changed model or a bug, never to be
    recorded in silence, and the object is left as evidence."""
    if not stored:
        return "empty"
    old_pixels = output_pixels(stored)
    if old_pixels is None:
        return "undecodable"
    new_pixels = output_pixels(made)
    assert new_pixels is not None, "an image just encoded decodes"
    if old_pixels.shape == new_pixels.shape:
        mean = float(np.abs(old_pixels - new_pixels).mean())
        if mean <= SAME_PICTURE_MEAN_DIFF:
            return "another rendering"
        what = f"its pixels differ by {mean:.1f} levels on average"
    else:
        what = f"it is {old_pixels.shape[1]}x{old_pixels.shape[0]}"
    raise ItemError(
        ErrorCode.OUTPUT_CONFLICT,
        f"{uri} already holds another picture ({what}) than this row makes with the same "
        "seed: the models changed since it was written, or generation is not deterministic. "
        "It is left as it is: delete it (or write to another output) to make the row again",
    )
