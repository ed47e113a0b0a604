"""ipbatch vs the plain diffusers loop, same model, same machine, one process run.

    .venv/bin/python bench/generate.py                      # tiny models on CPU (default)
    .venv/bin/python bench/generate.py --rows 64 --steps 4 --batch-images 8

(a) the plain loop a user writes from the diffusers docs: for each row,
    `pipe(prompt=..., ip_adapter_image=picture, generator=...)` then save a PNG; the image
    encoder runs again for every row and each call makes one row's images.
(b) ipbatch's stages on the same manifest (ingest -> embed -> generate, SQLite + a local
    folder): each distinct reference encoded once, rows batched into shared calls, PNG
    encoding and recording overlapped with the next batch.
Both run with models already loaded (a warm-up job first). Prints images/s and the ratio.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image


def make_manifest(folder: Path, rows: int, steps: int, repeat: float, adapter: str) -> Path:
    """`rows` rows; a fraction `repeat` of them reuse a reference of an earlier row."""
    distinct = max(1, round(rows * (1 - repeat)))
    rng = np.random.default_rng(0)
    refs = []
    for i in range(distinct):
        path = folder / "refs" / f"ref-{i}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray((rng.random((96, 96, 3)) * 255).astype(np.uint8)).save(path)
        refs.append(path)
    manifest = folder / "bench.jsonl"
    with manifest.open("w") as fh:
        for i in range(rows):
            ref = refs[i] if i < distinct else refs[int(rng.integers(distinct))]
            row = {
                "id": f"row-{i}",
                "prompt": f"a catalog photo of product {i}",
                "reference": str(ref),
                "adapter": adapter,
                "steps": steps,
                "seed": i,
            }
            fh.write(json.dumps(row) + "\n")
    return manifest


def plain_loop(models: str, manifest: Path, out: Path, adapter: str) -> tuple[float, int]:
    import diffusers

    from pipeline.models import ModelSource, resolve_device, resolve_dtype
    from pipeline.presets import ADAPTERS, BASE_MODELS

    source, preset = ModelSource.parse(models), ADAPTERS[adapter]
    device = resolve_device("auto")
    dtype = resolve_dtype("auto", device)
    cls = getattr(diffusers, BASE_MODELS[preset.family].pipeline_class)
    extra = {"safety_checker": None, "requires_safety_checker": False}
    pipe = cls.from_pretrained(
        source.base_model(preset.family), dtype=dtype, **(extra if preset.family == "sd15" else {})
    )
    repo, subfolder, weight_name = source.adapter_weights(adapter)
    assert preset.image_encoder is not None
    pipe.load_ip_adapter(
        repo,
        subfolder=subfolder,
        weight_name=weight_name,
        image_encoder_folder=preset.image_encoder.path,
    )
    pipe.set_ip_adapter_scale(0.5)
    pipe.to(device)
    pipe.set_progress_bar_config(disable=True)
    rows = [json.loads(line) for line in manifest.read_text().splitlines()]

    def run(selected: list[dict]) -> int:
        images = 0
        for row in selected:
            result = pipe(
                prompt=row["prompt"],
                ip_adapter_image=Image.open(row["reference"]),
                num_inference_steps=row["steps"],
                generator=torch.Generator().manual_seed(row["seed"]),
            )
            for k, image in enumerate(result.images):
                image.save(out / f"{row['id']}-{k}.png")
                images += 1
        return images

    run(rows[:1])  # warm-up
    started = time.perf_counter()
    images = run(rows)
    return time.perf_counter() - started, images


def ipbatch_run(models: str, manifest: Path, home: Path, batch_images: int) -> tuple[float, int]:
    from ipbatch.config import Settings
    from storage.migrate import upgrade
    from workers.context import StageContext
    from workers.runner import run_job

    settings = Settings(home=home, models=models, batch_images=batch_images)
    upgrade(settings.ledger_url())
    ctx = StageContext.create(settings, mode="local")
    warm = manifest.with_name("warm.jsonl")  # a one-row job loads the models
    warm.write_text(manifest.read_text().splitlines()[0].replace("row-0", "warm") + "\n")
    run_job(ctx, manifest=str(warm), output=str(home / "out"), progress=False, started=0)
    started = time.perf_counter()
    summary = run_job(
        ctx, manifest=str(manifest), output=str(home / "out"), progress=False, started=started
    )
    seconds = time.perf_counter() - started
    ctx.close()
    assert summary.status == "succeeded", summary
    return seconds, summary.images


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", default="tiny", help="'tiny' (built here) or a folder")
    parser.add_argument("--rows", type=int, default=64)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--repeat", type=float, default=0.3, help="share of repeated refs")
    parser.add_argument("--adapter", default="sd15")
    parser.add_argument("--batch-images", type=int, default=0, help="0: ipbatch's default")
    args = parser.parse_args()

    from workers.context import quiet_model_libraries

    quiet_model_libraries()
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        models = args.models
        if models == "tiny":
            from pipeline.tiny import write_tiny_models

            models = str(write_tiny_models(root / "models"))
        manifest = make_manifest(root, args.rows, args.steps, args.repeat, args.adapter)
        (root / "plain").mkdir()
        plain_s, plain_n = plain_loop(models, manifest, root / "plain", args.adapter)
        ours_s, ours_n = ipbatch_run(models, manifest, root / "home", args.batch_images)
    device = "cuda" if torch.cuda.is_available() else f"cpu ({torch.get_num_threads()} threads)"
    print(
        f"{args.rows} rows ({args.repeat:.0%} repeated references), {args.steps} steps, "
        f"adapter {args.adapter}, models {args.models}, {device}"
    )
    print(f"{'':24} {'images':>7} {'seconds':>8} {'images/s':>9}")
    print(f"{'plain diffusers loop':24} {plain_n:7d} {plain_s:8.2f} {plain_n / plain_s:9.2f}")
    print(f"{'ipbatch':24} {ours_n:7d} {ours_s:8.2f} {ours_n / ours_s:9.2f}")
    print(f"ratio (ipbatch / plain): {(ours_n / ours_s) / (plain_n / plain_s):.2f}x")


if __name__ == "__main__":
    main()
