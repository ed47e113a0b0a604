"""Reference decoding: every mode to upright RGB; bad bytes become item errors with codes."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
from PIL import Image, PngImagePlugin

from core.errors import ErrorCode, ItemError
from pipeline.images import decode_reference, encode_output, judge_stored_output

LIMITS = {"max_pixels": 4_000_000, "max_bytes": 5_000_000}


def encode(image: Image.Image, fmt: str = "PNG", **kwargs: object) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **kwargs)
    return buffer.getvalue()


@pytest.mark.parametrize(
    "image",
    [
        Image.new("CMYK", (40, 30), (0, 255, 255, 0)),
        Image.new("L", (40, 30), 128),
        Image.new("RGBA", (40, 30), (255, 0, 0, 0)),  # fully transparent -> white
        Image.new("P", (40, 30), 3),
        Image.new("LA", (40, 30), (10, 255)),
        Image.fromarray(np.full((30, 40), 65535, dtype=np.uint16)),  # 16-bit grey
    ],
    ids=["cmyk", "grey", "rgba", "palette", "grey-alpha", "16-bit"],
)
def test_modes_become_rgb(image: Image.Image) -> None:
    fmt = "JPEG" if image.mode == "CMYK" else ("TIFF" if image.mode.startswith("I") else "PNG")
    decoded = decode_reference(encode(image, fmt), name="r", **LIMITS)
    assert decoded.mode == "RGB" and decoded.size == (40, 30)
    if image.mode == "RGBA":
        assert decoded.getpixel((0, 0)) == (255, 255, 255)
    if image.mode.startswith("I"):
        assert decoded.getpixel((0, 0)) == (255, 255, 255)


def test_exif_rotation_is_applied() -> None:
    image = Image.new("RGB", (40, 20), (255, 0, 0))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    decoded = decode_reference(encode(image, "JPEG", exif=exif), name="r", **LIMITS)
    assert decoded.size == (20, 40)


def test_animated_gif_uses_the_first_frame() -> None:
    frames = [Image.new("RGB", (16, 16), c) for c in ((255, 0, 0), (0, 0, 255))]
    buffer = io.BytesIO()
    frames[0].save(buffer, format="GIF", save_all=True, append_images=frames[1:])
    decoded = decode_reference(buffer.getvalue(), name="r", **LIMITS)
    r, g, b = decoded.getpixel((8, 8))
    assert r > 200 and b < 50


@pytest.mark.parametrize(
    ("data", "code", "needle"),
    [
        (b"", ErrorCode.REFERENCE_NOT_IMAGE, "empty"),
        (b"this is not an image at all", ErrorCode.REFERENCE_NOT_IMAGE, "not an image"),
        (encode(Image.new("RGB", (64, 64)), "PNG")[:60], ErrorCode.REFERENCE_NOT_IMAGE, "corrupt"),
        (encode(Image.new("RGB", (3000, 2000)), "PNG"), ErrorCode.REFERENCE_TOO_LARGE, "pixels"),
    ],
    ids=["empty", "text", "truncated-png", "over-pixel-limit"],
)
def test_bad_references_fail_with_codes(data: bytes, code: ErrorCode, needle: str) -> None:
    with pytest.raises(ItemError) as info:
        decode_reference(data, name="s3://b/ref.png", **LIMITS)
    assert info.value.code is code and needle in info.value.message


def test_truncated_jpeg_fails_cleanly() -> None:
    data = encode(Image.new("RGB", (200, 200), (10, 200, 30)), "JPEG")
    with pytest.raises(ItemError) as info:
        decode_reference(data[: len(data) // 2], name="r", **LIMITS)
    assert info.value.code is ErrorCode.REFERENCE_NOT_IMAGE


def test_byte_limit() -> None:
    data = encode(Image.new("RGB", (64, 64)), "PNG")
    with pytest.raises(ItemError) as info:
        decode_reference(data, name="r", max_pixels=10**6, max_bytes=10)
    assert info.value.code is ErrorCode.REFERENCE_TOO_LARGE


def test_png_output_carries_parameters() -> None:
    data = encode_output(Image.new("RGB", (8, 8)), "png", {"seed": 5, "prompt": "p"})
    image = Image.open(io.BytesIO(data))
    assert isinstance(image, PngImagePlugin.PngImageFile)
    assert json.loads(image.text["ipbatch"]) == {"prompt": "p", "seed": 5}
    for fmt, magic in (("webp", b"RIFF"), ("jpeg", b"\xff\xd8")):
        assert encode_output(Image.new("RGB", (8, 8)), fmt, {}).startswith(magic)


# -- structure inputs (pipeline.inputs.prepare) ------------------------------------------------


def _prepared(image: Image.Image, kind: str, fmt: str = "PNG", **kwargs: object) -> np.ndarray:
    from pipeline.inputs import prepare

    return prepare(encode(image, fmt, **kwargs), kind, name="x.png", **LIMITS)["pixels"].numpy()


def test_alpha_mask_repaints_the_transparent_pixels() -> None:
    rgba = np.zeros((20, 30, 4), dtype=np.uint8)
    rgba[:, :10, 3] = 255  # opaque product on the left
    rgba[:, 10:20, 3] = 100  # a soft edge
    mask = _prepared(Image.fromarray(rgba, mode="RGBA"), "alpha")
    assert mask.shape == (20, 30, 1) and mask.dtype == np.uint8
    assert (
        (mask[:, :10] == 0).all() and (mask[:, 10:20] == 155).all() and (mask[:, 20:] == 255).all()
    )
    # the same from a grey cut-out and from a palette image with a transparent colour
    la = Image.fromarray(rgba[:, :, [0, 3]], mode="LA")
    assert (_prepared(la, "alpha") == mask).all()
    palette = Image.new("P", (30, 20), 0)
    palette.putpalette([255, 255, 255, 200, 0, 0] + [0] * 762)
    palette.paste(1, (0, 0, 10, 20))
    from_palette = _prepared(palette, "alpha", transparency=0)
    assert (from_palette[:, :10] == 0).all() and (from_palette[:, 10:] == 255).all()


@pytest.mark.parametrize(
    ("image", "fmt", "needle"),
    [
        (Image.new("RGB", (20, 20)), "PNG", "no alpha channel (mode RGB)"),
        (Image.new("RGB", (20, 20)), "JPEG", "no alpha channel"),
        (Image.new("RGBA", (20, 20), (5, 5, 5, 255)), "PNG", "no transparent pixel"),
    ],
)
def test_alpha_mask_of_an_image_without_transparency_fails(
    image: Image.Image, fmt: str, needle: str
) -> None:
    with pytest.raises(ItemError) as failed:
        _prepared(image, "alpha", fmt)
    assert failed.value.code is ErrorCode.INVALID_ROW and needle in str(failed.value)


def test_inputs_follow_the_reference_rules() -> None:
    """Upright by EXIF, within the limits, a clear code when not an image; a mask's transparent
    pixels are not selected (black)."""
    wide = np.zeros((10, 30, 3), dtype=np.uint8)
    wide[:, :5] = 255
    exif = Image.Exif()
    exif[0x0112] = 6  # shown rotated 90 degrees clockwise
    control = _prepared(Image.fromarray(wide), "rgb", "PNG", exif=exif)
    assert control.shape == (30, 10, 3)  # upright, as the user sees it
    transparent_mask = _prepared(Image.new("LA", (8, 8), (0, 0)), "mask")
    assert transparent_mask.shape == (8, 8, 1) and (transparent_mask == 0).all()  # not selected
    from pipeline.inputs import prepare

    with pytest.raises(ItemError) as failed:
        prepare(b"GIF89a nonsense", "mask", name="m.gif", **LIMITS)
    assert failed.value.code is ErrorCode.REFERENCE_NOT_IMAGE
    with pytest.raises(ItemError) as failed:
        prepare(encode(Image.new("RGB", (3000, 2000))), "rgb", name="big.png", **LIMITS)
    assert failed.value.code is ErrorCode.REFERENCE_TOO_LARGE


def test_canny_is_the_guides_recipe() -> None:
    import cv2

    rng = np.random.default_rng(0)
    picture = (rng.random((40, 48, 3)) * 255).astype(np.uint8)
    edges = cv2.Canny(picture, 50, 150)[:, :, None]  # the diffusers ControlNet guide's steps
    expected = np.concatenate([edges, edges, edges], axis=2)
    assert (_prepared(Image.fromarray(picture), "canny-50-150") == expected).all()
    assert expected.any() and not (expected == 255).all()


@pytest.mark.parametrize("fmt", ["png", "webp", "jpeg"])
def test_what_an_output_key_holds_is_judged_against_the_image_made(fmt: str) -> None:
    """Empty or cut short: replaced. The same picture one level off in a few pixels (rows
    batched differently round differently): another rendering, replaced. Another picture:
    output_conflict naming the key, never replaced."""
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 250, (64, 64, 3), dtype=np.uint8)
    made = encode_output(Image.fromarray(pixels), fmt, {"row_id": "r"})
    rounded = pixels.copy()
    rounded[::7, ::5] += 1
    uri = f"s3://out/job/r/0.{fmt}"

    def judge(stored: bytes) -> str:
        return judge_stored_output(stored, made, uri=uri)

    assert judge(b"") == "empty"
    assert judge(made[: len(made) // 2]) == "undecodable"
    assert judge(encode_output(Image.fromarray(rounded), fmt, {"row_id": "r"})) == (
        "another rendering"
    )
    other = encode_output(Image.fromarray(255 - pixels), fmt, {"row_id": "r"})
    with pytest.raises(ItemError) as conflict:
        judge(other)
    assert conflict.value.code == ErrorCode.OUTPUT_CONFLICT
    assert f"{uri} already holds another picture" in conflict.value.message
    with pytest.raises(ItemError, match="it is 32x64"):
        judge(encode_output(Image.fromarray(pixels[:, :32]), fmt, {"row_id": "r"}))
