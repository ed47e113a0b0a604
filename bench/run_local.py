"""Per-item time of the one-machine mode (`ipbatch run`) on the tiny models.

Run by hand: `.venv/bin/python bench/run_local.py [--rows 64] [--steps 4]`. Builds the tiny
models and a manifest (30% of rows reuse a reference), runs the job twice in fresh homes and
prints wall time, per-item and per-image figures for each stage. No assertions: figures only.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from PIL import Image


def make_job(folder: Path, rows: int, steps: int) -> Path:
    refs = []
    distinct = max(1, round(rows * 0.7))
    for i in range(distinct):
        path = folder / "refs" / f"r{i}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (96, 96), ((i * 37) % 256, (i * 91) % 256, (i * 53) % 256)).save(path)
        refs.append(path)
    manifest = folder / "bench.jsonl"
    with manifest.open("w") as fh:
        for i in range(rows):
            row = {
                "id": f"row-{i}",
                "prompt": f"product {i}",
                "steps": steps,
                "reference": str(refs[i % distinct]),
            }
            fh.write(json.dumps(row) + "\n")
    return manifest


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, default=64)
    parser.add_argument("--steps", type=int, default=4)
    args = parser.parse_args()

    from core.config import Settings
    from pipeline.tiny import write_tiny_models
    from workers.context import quiet_model_libraries
    from workers.runner import run_local

    quiet_model_libraries()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        models = write_tiny_models(root / "models")
        manifest = make_job(root, args.rows, args.steps)
        print(f"{args.rows} rows, {args.steps} steps, 64x64, tiny SD1.5 + sd15 adapter, CPU")
        print(f"{'run':>6} {'seconds':>8} {'s/item':>7} {'images/s':>9}")
        for run in (1, 2):
            settings = Settings(home=root / f"home{run}", models=str(models))
            started = time.perf_counter()
            summary = run_local(settings, manifest=str(manifest), output=None, progress=False)
            seconds = time.perf_counter() - started
            total = sum(summary.counts.values())
            print(f"{run:>6} {seconds:8.2f} {seconds / total:7.3f} {summary.images / seconds:9.2f}")


if __name__ == "__main__":
    main()
