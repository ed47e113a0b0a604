"""`ipbatch eval`: the paper's protocol on two tiny adapters, side by side. The numbers it
prints are checked against CLIP-I / CLIP-T computed here directly from the saved images,
with transformers' CLIPModel and the formulas of the paper and of CLIPScore (Hessel et al.):
cosine of the image embeddings; 2.5 * max(cosine of image and caption embeddings, 0)."""

from __future__ import annotations

import json
import sqlite3
import statistics
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers.cli import ipbatch
from PIL import Image
from transformers import CLIPImageProcessorPil, CLIPModel, CLIPTokenizer

from pipeline.evaluation import row_seed


def _pairs(folder: Path) -> Path:
    rng = np.random.default_rng(5)
    folder.mkdir(parents=True)
    rows = []
    for i, caption in enumerate(["a red bag", "a lamp on a desk", ""]):
        pixels = np.full((64, 64, 3), rng.integers(0, 255, 3), np.uint8)
        pixels[10:40, 20:50] = rng.integers(0, 255, 3)
        Image.fromarray(pixels).save(folder / f"p{i}.png")
        rows.append({"id": f"p{i}", "image": f"p{i}.png", "prompt": caption})  # relative
    rows.append({"id": "bad id!", "image": "p0.png"})
    manifest = folder / "pairs.jsonl"
    manifest.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return manifest


@torch.no_grad()
def test_eval_table_equals_a_direct_computation(tiny_models: Path, tmp_path: Path) -> None:
    """Run with a score threshold no image can reach (CLIP-I <= 1): an evaluation still keeps
    every image as first made (seed + k, one attempt each) and scores all of them."""
    home = tmp_path / "home"
    env = {
        "IPBATCH_HOME": str(home),
        "IPBATCH_MODELS": str(tiny_models),
        "IPBATCH_SCORE_THRESHOLD": "1.5",
        "IPBATCH_SCORE_TRIES": "3",
    }
    manifest = _pairs(tmp_path / "pairs")
    adapters = ["sd15", "sd15-plus"]
    args = ["eval", str(manifest), "--samples", "2", "--steps", "2", "--size", "64", "--json"]
    result = ipbatch(*args, *[x for a in adapters for x in ("--adapter", a)], "-q", env=env)
    assert result.returncode == 0, result.stderr
    assert "skipped line 4" in result.stderr
    printed = json.loads(result.stdout)
    assert [s["adapter"] for s in printed["scores"]] == adapters

    with sqlite3.connect(home / "ipbatch.db") as db:
        outputs = db.execute(
            "SELECT items.row_id, items.params, outputs.uri, outputs.seed FROM outputs "
            "JOIN items ON items.id = outputs.item_id WHERE items.job_id = ? "
            "ORDER BY items.row_index, outputs.image_index",
            (printed["job_id"],),
        ).fetchall()
    assert len(outputs) == 3 * 2 * 2  # pairs x adapters x samples
    seeds: dict[str, list[int]] = {}
    for row_id, _, _, seed in outputs:
        seeds.setdefault(row_id.split(".")[0], []).append(seed)
    for pair, found in seeds.items():  # both adapters drew the same seeds for a pair
        assert found[:2] == found[2:], pair
        assert found[:2] == [row_seed(pair), row_seed(pair) + 1], pair  # as first made
    with sqlite3.connect(home / "ipbatch.db") as db:
        retried = db.execute("SELECT COUNT(*) FROM output_attempts WHERE attempt > 0")
        assert retried.fetchone() == (0,)

    folder = str(tiny_models / "clip-vit-large-patch14")
    model = CLIPModel.from_pretrained(folder).eval()
    processor = CLIPImageProcessorPil.from_pretrained(folder)
    tokenizer = CLIPTokenizer.from_pretrained(folder)

    def image_embedding(image: Image.Image) -> torch.Tensor:
        pixels = processor(images=[image], return_tensors="pt").pixel_values
        features = model.get_image_features(pixel_values=pixels).pooler_output[0]
        return features / features.norm()

    def text_embedding(text: str) -> torch.Tensor:
        tokens = tokenizer([text], padding=True, truncation=True, return_tensors="pt")
        features = model.get_text_features(**tokens).pooler_output[0]
        return features / features.norm()

    expected: dict[str, tuple[list[float], list[float]]] = {a: ([], []) for a in adapters}
    for _, params, uri, _ in outputs:
        row = json.loads(params)
        output = image_embedding(Image.open(uri).convert("RGB"))
        reference = image_embedding(Image.open(row["reference"]).convert("RGB"))
        clip_i, clip_t = expected[row["adapter"]]
        clip_i.append(float(output @ reference))
        if row["caption"]:
            clip_t.append(2.5 * max(float(output @ text_embedding(row["caption"])), 0.0))
    for scores in printed["scores"]:
        clip_i, clip_t = expected[scores["adapter"]]
        assert scores["images"] == 6
        assert scores["clip_i"] == pytest.approx(statistics.fmean(clip_i), abs=1e-5)
        assert scores["clip_i_std"] == pytest.approx(statistics.stdev(clip_i), abs=1e-5)
        assert scores["clip_t"] == pytest.approx(statistics.fmean(clip_t), abs=1e-5)
        assert scores["clip_t_std"] == pytest.approx(statistics.stdev(clip_t), abs=1e-5)

    # the generation rows: the image prompt alone at scale 1, the caption scored
    params = [json.loads(p) for _, p, _, _ in outputs]
    assert {(p["prompt"], p["scale"], p["num_images"]) for p in params} == {("", 1.0, 2)}
    assert {(p["scheduler"], p["steps"], p["guidance_scale"]) for p in params} == {("ddim", 2, 7.5)}
    assert printed["settings"]["scheduler"] == "ddim"
    # the same evaluation again is the same job, and --job prints its table
    again = ipbatch(*args, *[x for a in adapters for x in ("--adapter", a)], "-q", env=env)
    assert json.loads(again.stdout)["job_id"] == printed["job_id"]
    shown = ipbatch("eval", "--job", printed["job_id"], env=env)
    assert shown.returncode == 0 and "IP-Adapter (paper)" in shown.stdout
    assert "settings: ddim sampler, 2 steps, guidance 7.5, adapter scale 1," in shown.stdout
    assert "the paper: ddim sampler, 50 steps, guidance 7.5" in shown.stdout
    assert f"{printed['scores'][0]['clip_i']:.4f}" in shown.stdout
