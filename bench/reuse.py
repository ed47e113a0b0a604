"""A nightly re-run with a few rows changed: what it costs with reuse, and without.

    .venv/bin/python bench/reuse.py [--rows 200] [--changed 0.05] [--steps 10]

On the tiny models, one machine (`ipbatch run`'s code, in-process, one home): night 1 runs a
manifest of `--rows` rows; night 2 runs the same manifest with `--changed` of its rows' prompts
changed, to another output, once with reuse (the default) and once with `--no-reuse`. Prints
wall time, diffusers calls (rows generated) and images copied of each run side by side. The
tiny UNet makes a step cheap, so the copy's own cost (read, sha256, write, record) weighs more
here than beside a real model's seconds per image. No assertions: figures only.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def write_manifest(path: Path, refs: list[Path], rows: int, steps: int, changed: set[int]) -> None:
    with path.open("w") as fh:
        for i in range(rows):
            prompt = f"product {i}" + (" in blue" if i in changed else "")
            reference = str(refs[i % len(refs)])
            row = {"id": f"sku-{i}", "prompt": prompt, "steps": steps, "reference": reference}
            fh.write(json.dumps(row) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=200)
    parser.add_argument("--changed", type=float, default=0.05)
    parser.add_argument("--steps", type=int, default=10)
    args = parser.parse_args()

    from PIL import Image

    from core.config import Settings
    from pipeline.generator import Generator
    from pipeline.tiny import write_tiny_models
    from storage.ledger.jobs import JobOptions
    from workers.context import quiet_model_libraries
    from workers.runner import run_local

    rows_generated: list[int] = []
    batch, solo = Generator.generate_batch, Generator.generate

    def counted_batch(self: Generator, requests: list[Any]) -> Any:
        rows_generated.append(len(requests))
        return batch(self, requests)

    def counted_solo(self: Generator, request: Any) -> Any:
        rows_generated.append(1)
        return solo(self, request)

    Generator.generate_batch = counted_batch  # type: ignore[method-assign]
    Generator.generate = counted_solo  # type: ignore[method-assign]

    quiet_model_libraries()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        models = write_tiny_models(folder / "models")
        refs = []
        for i in range(7):
            path = folder / "refs" / f"r{i}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.new("RGB", (96, 96), ((i * 37) % 256, (i * 91) % 256, 90)).save(path)
            refs.append(path)
        settings = Settings(home=folder / "home", models=str(models), score=False)
        manifest = folder / "night.jsonl"
        changed = set(range(0, args.rows, max(1, round(1 / args.changed))))
        results = []
        for out, label, change, options in (
            ("monday", "night 1 (everything new)", set(), JobOptions()),
            ("tuesday", f"night 2, {len(changed)} rows changed, reuse", changed, JobOptions()),
            (
                "tuesday-again",
                f"night 2, {len(changed)} rows changed, --no-reuse",
                changed,
                JobOptions(reuse=False),
            ),
        ):
            write_manifest(manifest, refs, args.rows, args.steps, change)
            rows_generated.clear()
            started = time.perf_counter()
            summary = run_local(
                settings,
                manifest=str(manifest),
                output=str(folder / out),
                progress=False,
                options=options,
            )
            seconds = time.perf_counter() - started
            assert summary.status == "succeeded", summary
            results.append((label, seconds, len(rows_generated), sum(rows_generated)))

    print(f"{args.rows} rows, {args.steps} steps, tiny SD1.5 on the CPU, scoring off\n")
    print(f"{'run':<42}{'wall s':>9}{'diffusers calls':>17}{'rows generated':>16}")
    for label, seconds, calls, generated in results:
        print(f"{label:<42}{seconds:9.1f}{calls:>17}{generated:>16}")
    reuse_s, full_s = results[1][1], results[2][1]
    print(f"\nnight 2 with reuse: {reuse_s / full_s:.2f}x the wall time of generating it all")


if __name__ == "__main__":
    main()
