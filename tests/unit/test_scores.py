"""CLIP-I and CLIP-T (the IP-Adapter paper's metrics) for every output, and the threshold
that generates an image again with the next seed."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import sqlalchemy as sa
import torch
from helpers.cli import ipbatch
from PIL import Image

from pipeline.models import ModelSource
from pipeline.scores import ClipScorer, clip_i, clip_t


@pytest.fixture(scope="module")
def scorer(tiny_models: Path) -> ClipScorer:
    folder = ModelSource.parse(str(tiny_models)).score_model()
    return ClipScorer(folder, device=torch.device("cpu"), dtype=torch.float32)


def test_clip_i_of_an_image_with_itself_is_one(scorer: ClipScorer) -> None:
    rng = np.random.default_rng(0)
    a = Image.fromarray((rng.random((64, 64, 3)) * 255).astype(np.uint8))
    b = Image.fromarray((rng.random((64, 64, 3)) * 255).astype(np.uint8)).rotate(90)
    ea, eb = scorer.image_embeds([a, b])
    assert clip_i(ea, ea[None]) == pytest.approx(1.0, abs=1e-5)
    assert clip_i(ea, eb[None]) < 0.999
    assert clip_i(ea, torch.stack([ea, eb])) == pytest.approx((1 + float(ea @ eb)) / 2, abs=1e-5)
    [text] = scorer.text_embeds(["a red shoe on white"])
    score = clip_t(ea, text)
    assert score is not None and 0.0 <= score <= 2.5
    assert score == pytest.approx(2.5 * max(float(ea @ text), 0.0))
    assert clip_t(ea, None) is None


def _run(tmp: Path, env: dict[str, str], *extra: str) -> sa.Engine:
    result = ipbatch("run", "-q", "m.jsonl", *extra, env=env, cwd=tmp)
    assert result.returncode == 0, result.stdout + result.stderr
    return sa.create_engine(f"sqlite:///{tmp / 'home' / 'ipbatch.db'}")


@pytest.fixture()
def job(tmp_path: Path, tiny_models: Path, reference_images: dict[str, Path]) -> dict[str, str]:
    rows = [
        {
            "id": "shoe",
            "prompt": "a red shoe",
            "reference": str(reference_images["red"]),
            "steps": 1,
            "num_images": 2,
            "seed": 10,
        },
        {"id": "bag", "reference": str(reference_images["blue"]), "steps": 1, "seed": 20},
    ]
    (tmp_path / "m.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return {
        **os.environ,
        "IPBATCH_HOME": str(tmp_path / "home"),
        "IPBATCH_MODELS": str(tiny_models),
    }


@pytest.mark.slow
def test_every_output_is_scored_and_no_score_turns_it_off(
    tmp_path: Path, job: dict[str, str]
) -> None:
    engine = _run(tmp_path, job)
    with engine.connect() as conn:
        scores = conn.execute(
            sa.text(
                "SELECT i.row_id, o.clip_i, o.clip_t FROM outputs o JOIN items i "
                "ON i.id = o.item_id ORDER BY i.row_id, o.image_index"
            )
        ).all()
        cached = conn.execute(
            sa.text("SELECT COUNT(*) FROM embeddings WHERE kind = 'clip_score'")
        ).scalar()
    engine.dispose()
    assert [r for r, _, _ in scores] == ["bag", "shoe", "shoe"]
    for row_id, ci, ct in scores:
        assert -1.0 <= ci <= 1.0
        assert (ct is None) == (row_id == "bag")  # no prompt, no CLIP-T
    assert cached == 2  # each reference scored once, kept in the embedding cache
    # publishable images, by SQL
    other = tmp_path / "other"
    other.mkdir()
    (other / "m.jsonl").write_text((tmp_path / "m.jsonl").read_text())
    engine = _run(other, {**job, "IPBATCH_HOME": str(other / "home")}, "--no-score")
    with engine.connect() as conn:
        unscored = conn.execute(sa.text("SELECT clip_i, clip_t FROM outputs")).all()
    engine.dispose()
    assert unscored == [(None, None)] * 3


def test_threshold_generates_again_and_keeps_the_best(tmp_path: Path, job: dict[str, str]) -> None:
    """A threshold no image can reach (CLIP-I <= 1): every image is tried 3 times with the
    next seeds; the best attempt is kept in outputs, every attempt is in output_attempts."""
    env = {**job, "IPBATCH_SCORE_THRESHOLD": "1.5", "IPBATCH_SCORE_TRIES": "3"}
    engine = _run(tmp_path, env)
    with engine.connect() as conn:
        attempts = conn.execute(
            sa.text(
                "SELECT i.row_id, a.image_index, a.attempt, a.seed, a.clip_i, a.kept "
                "FROM output_attempts a JOIN items i ON i.id = a.item_id "
                "ORDER BY i.row_id, a.image_index, a.attempt"
            )
        ).all()
        outputs = {
            (row_id, k): (seed, ci)
            for row_id, k, seed, ci in conn.execute(
                sa.text(
                    "SELECT i.row_id, o.image_index, o.seed, o.clip_i FROM outputs o "
                    "JOIN items i ON i.id = o.item_id"
                )
            )
        }
    engine.dispose()
    assert len(attempts) == 3 * 3  # 3 images x 3 attempts
    slots: dict[tuple[str, int], list] = {}
    for row_id, k, attempt, seed, ci, kept in attempts:
        slots.setdefault((row_id, k), []).append((attempt, seed, ci, bool(kept)))
    base = {"shoe": (10, 2), "bag": (20, 1)}
    for (row_id, k), tries in slots.items():
        seed0, n = base[row_id]
        assert [s for _, s, _, _ in tries] == [seed0 + k + a * n for a in range(3)]
        [best] = [t for t in tries if t[3]]
        assert best[2] == max(ci for _, _, ci, _ in tries)
        assert outputs[(row_id, k)] == (best[1], pytest.approx(best[2]))
