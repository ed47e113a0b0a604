"""Every adapter preset through `ipbatch run` on the tiny models, in one job: product shots,
FaceID rows, SDXL, FLUX.1, SD3.5 and Kolors rows, two adapters on a row, averaged and
concatenated references, an InstantStyle scale, and a faceless FaceID reference that fails
alone with `no_face`. Options show their effect: rows that differ only by one option make
different images."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import sqlalchemy as sa
from helpers.cli import ipbatch
from PIL import Image, ImageDraw

from pipeline.presets import ADAPTERS


def picture(path: Path, *, face: tuple[int, int, int] | None = None, seed: int = 0) -> str:
    if face is not None:  # what the tiny face detector takes for a face: a bright disc
        image = Image.new("RGB", (320, 320), (20, 20, 30))
        ImageDraw.Draw(image).ellipse((80, 70, 240, 250), fill=face)
    elif seed < 0:  # faceless
        image = Image.new("RGB", (320, 320), (25, 25, 25))
    else:
        rng = np.random.default_rng(seed)
        image = Image.fromarray((rng.random((96, 128, 3)) * 255).astype(np.uint8))
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path)
    return str(path)


def load(path: str) -> np.ndarray:
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"))


def test_every_preset_in_one_job(tmp_path: Path, tiny_models: Path) -> None:
    product = picture(tmp_path / "refs" / "product.png", seed=1)
    product2 = picture(tmp_path / "refs" / "product2.png", seed=2)
    face = picture(tmp_path / "refs" / "face.png", face=(230, 190, 160))
    faceless = picture(tmp_path / "refs" / "wall.png", seed=-1)
    rows: list[dict] = []
    for name, preset in ADAPTERS.items():
        rows.append(
            {
                "id": f"preset-{name}",
                "adapter": name,
                "prompt": "a catalog photo",
                "reference": face if preset.uses_faces else product,
                "steps": 2,
            }
        )
    rows += [
        {"id": "no-face", "adapter": "sd15-faceid", "reference": faceless, "steps": 2},
        {
            "id": "product-and-model",
            "steps": 2,
            "seed": 7,
            "adapters": [
                {"adapter": "sd15-plus", "reference": product, "scale": 0.6},
                {"adapter": "sd15-faceid", "reference": face, "scale": 0.8},
            ],
        },
        {  # the same row with its first adapter only
            "id": "product-only",
            "steps": 2,
            "seed": 7,
            "adapters": [{"adapter": "sd15-plus", "reference": product, "scale": 0.6}],
        },
        {
            "id": "refs-average",
            "reference": [product, product2],
            "combine": "average",
            "steps": 2,
            "seed": 5,
        },
        {
            "id": "refs-concat",
            "reference": [product, product2],
            "combine": "concat",
            "steps": 2,
            "seed": 5,
        },
        {
            "id": "instantstyle",
            "reference": product,
            "steps": 2,
            "seed": 9,
            "scale": {"down": {"block_2": [0.0, 1.0]}, "up": {"block_1": [0.0, 1.0, 0.0]}},
        },
        {"id": "scalar-scale", "reference": product, "steps": 2, "seed": 9, "scale": 0.5},
    ]
    (tmp_path / "job.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    env = {**os.environ, "IPBATCH_HOME": str(tmp_path / "home"), "IPBATCH_MODELS": str(tiny_models)}
    result = ipbatch("run", "-q", "job.jsonl", env=env, cwd=tmp_path, timeout=600)
    assert result.returncode == 1, result.stdout + result.stderr
    engine = sa.create_engine(f"sqlite:///{tmp_path / 'home' / 'ipbatch.db'}")
    with engine.connect() as conn:
        items = {
            r.row_id: r
            for r in conn.execute(
                sa.text("SELECT row_id, status, error_code, error_message FROM items")
            )
        }
        outputs = {
            r.row_id: r.uri
            for r in conn.execute(
                sa.text("SELECT i.row_id, o.uri FROM outputs o JOIN items i ON i.id = o.item_id")
            )
        }
        kinds = sorted(k for (k,) in conn.execute(sa.text("SELECT kind FROM embeddings")))
    engine.dispose()

    failed = {r: i.error_code for r, i in items.items() if i.status != "succeeded"}
    assert failed == {"no-face": "no_face"}, items
    assert "no face found" in items["no-face"].error_message
    assert set(outputs) == set(items) - {"no-face"}
    pixels = {row: load(uri) for row, uri in outputs.items()}
    # the tiny models' native sizes: 64 px; FLUX's 256 (its pipeline's 128 latent pixels x 2)
    for name in ("flux", "flux-v2"):
        assert pixels.pop(f"preset-{name}").shape == (256, 256, 3)
    assert {p.shape for p in pixels.values()} == {(64, 64, 3)}
    # each option has its effect: not only a status, another image
    assert not np.array_equal(pixels["refs-average"], pixels["refs-concat"])
    assert not np.array_equal(pixels["instantstyle"], pixels["scalar-scale"])
    assert not np.array_equal(pixels["product-and-model"], pixels["product-only"])
    # one embedding per (reference, encoder, kind, family): the face is embedded once for
    # SD1.5's FaceID (used by two rows), once for SDXL's and once for each FaceID-Plus; the
    # faceless wall never gets a row
    assert kinds.count("face_id") == 2 and kinds.count("face_id_plus") == 2
    # SD3.5's reference: SigLIP's features, cached once like any other
    assert kinds.count("siglip_hidden_states") == 1
