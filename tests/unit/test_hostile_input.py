"""Hostile and broken input as one manifest, through the real `ipbatch run`: every bad row
fails alone with its error code, every good row (odd image modes included) succeeds; and a
property test that no input crashes the manifest reader."""

from __future__ import annotations

import io
import json
import os
import struct
import zlib
from pathlib import Path

import numpy as np
import sqlalchemy as sa
from helpers.cli import ipbatch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image, ImageOps

from pipeline.manifest import Row
from pipeline.manifest_reader import NotAManifest, read_manifest


def _save(path: Path, image: Image.Image, fmt: str, **kwargs: object) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, format=fmt, **kwargs)
    return path


def _png_header_only(width: int, height: int) -> bytes:
    """A PNG that claims width x height (a decompression bomb's header) with almost no data."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (
            struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
        )

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    idat = zlib.compress(b"\0" * (1 + 3 * width) * 4)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def build_corpus(tmp: Path) -> tuple[list[str], list[tuple[str, str | None]]]:
    """Manifest lines, and for each its expected (status, error code)."""
    refs = tmp / "refs"
    rng = np.random.default_rng(3)
    good = _save(
        refs / "good.png", Image.fromarray((rng.random((48, 48, 3)) * 255).astype(np.uint8)), "PNG"
    )
    cmyk = _save(refs / "cmyk.jpg", Image.new("CMYK", (40, 30), (0, 255, 255, 0)), "JPEG")
    grey16 = _save(
        refs / "grey16.png", Image.fromarray(np.full((30, 40), 40000, dtype=np.uint16)), "PNG"
    )
    palette = _save(
        refs / "palette.png", Image.new("RGB", (40, 30), (200, 10, 10)).convert("P"), "PNG"
    )
    alpha = _save(refs / "alpha.png", Image.new("RGBA", (40, 30), (0, 90, 0, 120)), "PNG")
    frames = [Image.new("RGB", (24, 24), c) for c in ((255, 0, 0), (0, 0, 255))]
    gif = _save(refs / "anim.gif", frames[0], "GIF", save_all=True, append_images=frames[1:])
    exif = Image.Exif()
    exif[0x0112] = 6  # displayed rotated 90 degrees clockwise
    wide = Image.fromarray((rng.random((20, 40, 3)) * 255).astype(np.uint8))
    rotated = _save(refs / "rotated.jpg", wide, "JPEG", exif=exif)
    upright = _save(refs / "upright.png", ImageOps.exif_transpose(Image.open(rotated)), "PNG")
    (refs / "empty.png").write_bytes(b"")
    (refs / "text.png").write_bytes(b"just some text, not an image")
    jpeg = io.BytesIO()
    wide.resize((200, 100)).save(jpeg, format="JPEG")
    (refs / "truncated.jpg").write_bytes(jpeg.getvalue()[: len(jpeg.getvalue()) // 2])
    (refs / "truncated.png").write_bytes(good.read_bytes()[:80])
    (refs / "bomb.png").write_bytes(_png_header_only(30000, 30000))
    _save(refs / "huge.png", Image.new("RGB", (1200, 1000)), "PNG")  # over the 1 MP limit
    faceless = _save(refs / "faceless.png", Image.new("RGB", (64, 64), (20, 20, 20)), "PNG")
    outside = _save(tmp / "elsewhere" / "ok.png", Image.new("RGB", (32, 32), (1, 2, 3)), "PNG")

    def row(**fields: object) -> str:
        return json.dumps({"steps": 1, **fields})

    ok, bad = ("succeeded", None), ("failed", "invalid_row")
    cases: list[tuple[str, tuple[str, str | None]]] = [
        (row(id="good", reference=str(good)), ok),
        ('{"id": "broken-json", "reference": ', bad),
        (row(id="wrong-type", reference=str(good), steps="many"), bad),
        (row(id="unknown-field", reference=str(good), colour="red"), bad),
        (row(id="good", reference=str(good), prompt="again"), bad),  # duplicate id
        (row(id="a/b", reference=str(good)), bad),
        (row(id="..", reference=str(good)), bad),
        (row(id="../../etc", reference=str(good)), bad),
        (row(id="ctl\u0001id", reference=str(good)), bad),
        (row(id="too-many", reference=str(good), num_images=99), bad),
        (row(id="negative-seed", reference=str(good), seed=-1), bad),
        (row(id="odd-width", reference=str(good), width=100), bad),
        (row(id="unknown-adapter", reference=str(good), adapter="sd99"), bad),
        ("[1, 2, 3]", bad),  # valid JSON, not an object
        (row(id="missing", reference=str(refs / "nope.png")), ("failed", "reference_not_found")),
        (row(id="outside", reference=str(outside)), ("failed", "reference_forbidden")),
        (
            row(id="outside-file-uri", reference=f"file://{outside}"),
            ("failed", "reference_forbidden"),
        ),
        (row(id="empty", reference=str(refs / "empty.png")), ("failed", "reference_not_image")),
        (row(id="text", reference=str(refs / "text.png")), ("failed", "reference_not_image")),
        (
            row(id="trunc-jpeg", reference=str(refs / "truncated.jpg")),
            ("failed", "reference_not_image"),
        ),
        (
            row(id="trunc-png", reference=str(refs / "truncated.png")),
            ("failed", "reference_not_image"),
        ),
        (row(id="bomb", reference=str(refs / "bomb.png")), ("failed", "reference_too_large")),
        (row(id="huge", reference=str(refs / "huge.png")), ("failed", "reference_too_large")),
        (row(id="faceless", reference=str(faceless), adapter="sd15-faceid"), ("failed", "no_face")),
        (row(id="cmyk", reference=str(cmyk)), ok),
        (row(id="grey16", reference=str(grey16)), ok),
        (row(id="palette", reference=str(palette)), ok),
        (row(id="alpha", reference=str(alpha)), ok),
        (row(id="gif", reference=str(gif)), ok),
        (row(id="rotated", reference=str(rotated)), ok),
        (row(id="upright", reference=str(upright)), ok),
        (row(id="long-prompt", reference=str(good), prompt="catalog " * 120), ok),
    ]
    return [line for line, _ in cases], [expected for _, expected in cases]


def test_hostile_manifest_fails_each_bad_row_alone(tmp_path: Path, tiny_models: Path) -> None:
    import torch

    lines, expected = build_corpus(tmp_path)
    (tmp_path / "hostile.jsonl").write_text("\n".join(lines) + "\n\n")
    env = {
        **os.environ,
        "IPBATCH_HOME": str(tmp_path / "home"),
        "IPBATCH_MODELS": str(tiny_models),
        "IPBATCH_ALLOWED_SOURCES": str(tmp_path / "refs"),
        "IPBATCH_MAX_IMAGE_PIXELS": "1000000",
    }
    result = ipbatch("run", "-q", "hostile.jsonl", env=env, cwd=tmp_path, timeout=600)
    assert result.returncode == 1, result.stderr  # some rows failed; the run itself did not
    engine = sa.create_engine(f"sqlite:///{tmp_path / 'home' / 'ipbatch.db'}")
    with engine.connect() as conn:
        items = conn.execute(
            sa.text(
                "SELECT row_index, row_id, status, error_code, error_message, warning "
                "FROM items ORDER BY row_index"
            )
        ).all()
        links = dict(
            conn.execute(
                sa.text(
                    "SELECT i.row_id, e.uri FROM items i "
                    "JOIN item_embeddings l ON l.item_id = i.id "
                    "JOIN embeddings e ON e.id = l.embedding_id "
                    "WHERE i.row_id IN ('rotated', 'upright')"
                )
            ).all()
        )
        n_outputs = conn.execute(sa.text("SELECT COUNT(*) FROM outputs")).scalar()
    engine.dispose()
    assert len(items) == len(expected)
    for (index, row_id, status, code, message, _), want in zip(items, expected, strict=True):
        assert (status, code) == want, (index, row_id, status, code, message)
        if status == "failed":
            assert message, f"row {index} failed without saying why"
    assert n_outputs == sum(1 for want in expected if want[0] == "succeeded")
    by_id = {row_id: (message, warning) for _, row_id, _, _, message, warning in items}
    assert "num_images" in items[9].error_message and "colour" in items[3].error_message
    assert "already" in items[4].error_message or "earlier row" in items[4].error_message
    assert by_id["long-prompt"][1] and "tokens" in by_id["long-prompt"][1]
    # the EXIF-rotated photo was embedded upright: same embedding as its upright twin
    from safetensors.torch import load_file

    rotated = load_file(links["rotated"].removeprefix("file://"))
    upright = load_file(links["upright"].removeprefix("file://"))
    assert torch.allclose(rotated["pos"], upright["pos"], atol=1e-6)


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True) | st.text(),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3)
    ),
    max_leaves=8,
)
row_like = st.dictionaries(
    st.sampled_from([*sorted(Row.model_fields), "extra"]),  # every field, and an unknown one
    json_values,
    max_size=8,
)
lines = st.lists(
    st.one_of(
        st.binary(max_size=60),
        row_like.map(lambda d: json.dumps(d).encode()),
        st.text(max_size=40).map(str.encode),
    ),
    max_size=12,
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(lines=lines, fmt=st.sampled_from(["jsonl", "csv"]))
def test_no_input_crashes_the_manifest_reader(lines: list[bytes], fmt: str) -> None:
    """Whatever the bytes, the reader yields rows or per-row errors, in order, and raises
    nothing but NotAManifest, for a file none of whose first rows is one (said once, naming
    a line or the header); every row error names a line."""
    data = b"\n".join(lines)
    try:
        parsed = list(read_manifest(io.BytesIO(data), fmt))  # type: ignore[arg-type]
    except NotAManifest as exc:
        assert str(exc).startswith(("not a JSON Lines file", "not a manifest CSV"))
        return
    assert [p.index for p in parsed] == list(range(len(parsed)))
    for p in parsed:
        assert (p.row is None) != (p.error is None)
        if p.error is not None:
            assert p.error.startswith("line ")
