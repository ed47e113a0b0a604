"""Training validation: rendering the validation rows, the way `ipbatch train` used to and the
way it does now, side by side in one run.

    .venv/bin/python bench/validation.py                 # tiny SD1.5 on this machine's CPU
    .venv/bin/python bench/validation.py --validations 4 --rows 8 --steps 30

Before: each validation loaded a fresh `Generator` (the base model, VAE, text encoder and the
adapter's export) and rendered its rows one diffusers call each. Now
(workers/stages/train_validation.py): one warm pipeline for the run, the new export loaded into
it (`reload_adapters`), the rows rendered in batched calls (`generate_batch`, up to
IPBATCH_BATCH_IMAGES images a call). Same rows, same seeds; the images agree to float32
rounding (printed).
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def main() -> None:
    from safetensors.torch import load_file, save_file

    from pipeline.generator import Generator
    from pipeline.models import ModelSource
    from pipeline.pool import default_batch_images
    from pipeline.presets import ADAPTERS, RepoPath
    from pipeline.requests import AdapterInput, GenerationRequest
    from pipeline.tiny import write_tiny_models
    from workers.context import quiet_model_libraries

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--validations", type=int, default=3, help="validations in the run")
    parser.add_argument("--rows", type=int, default=4, help="rows each (validation_rows)")
    parser.add_argument("--steps", type=int, default=30, help="denoising steps (validation_steps)")
    args = parser.parse_args()
    quiet_model_libraries()
    torch.manual_seed(0)
    cpu = torch.device("cpu")
    batch = default_batch_images(cpu)

    with tempfile.TemporaryDirectory(prefix="ipbatch-bench-validation-") as scratch:
        source = ModelSource.parse(str(write_tiny_models(Path(scratch) / "tiny")))
        published = ADAPTERS["sd15"]
        repo, sub, name = source.adapter_weights(published)
        weights = load_file(str(Path(repo, sub, name)))

        def export(v: int) -> object:
            """Validation v's adapter: the weights as training left them by then."""
            folder = Path(scratch) / f"export-{v}"
            folder.mkdir()
            save_file({k: t * (1 + 0.01 * v) for k, t in weights.items()}, folder / "a.safetensors")
            return dataclasses.replace(
                published,
                name="custom:bench",
                weights=RepoPath("", str(folder), ""),
                weight_name="a.safetensors",
                custom_sha256=f"{v:064x}",
            )

        presets = [export(v) for v in range(args.validations)]
        probe = Generator(source, ("custom:bench",), device=cpu, dtype=torch.float32,
                          resolve=lambda _: presets[0])  # fmt: skip
        (dim,), _ = probe._projection_shapes[0]
        size = probe.native_size[0]
        del probe
        requests = []
        for r in range(args.rows):
            pos = torch.randn(1, dim, generator=torch.Generator().manual_seed(r))
            requests.append(
                GenerationRequest(
                    prompt="",
                    negative_prompt="",
                    adapters=[AdapterInput("custom:bench", 1.0, pos, torch.zeros_like(pos))],
                    num_images=1,
                    seed=1000 + r,
                    steps=args.steps,
                    guidance_scale=7.5,
                    width=size,
                    height=size,
                )
            )

        started = time.perf_counter()
        before = []
        for preset in presets:
            fresh = Generator(source, ("custom:bench",), device=cpu, dtype=torch.float32,
                              resolve=lambda _, p=preset: p)  # fmt: skip
            before.append([fresh.generate(r).arrays[0] for r in requests])
            del fresh
        old = time.perf_counter() - started

        started = time.perf_counter()
        now = []
        warm = Generator(source, ("custom:bench",), device=cpu, dtype=torch.float32,
                         resolve=lambda _: presets[0])  # fmt: skip
        for v, preset in enumerate(presets):
            if v:
                warm.reload_adapters([preset])
            results = []
            for start in range(0, len(requests), batch):
                results += warm.generate_batch(requests[start : start + batch])
            now.append([result.arrays[0] for result in results])
        new = time.perf_counter() - started

    differ = max(
        float(np.abs(a - b).max())
        for v in range(len(presets))
        for a, b in zip(before[v], now[v], strict=True)
    )
    renders = args.validations * args.rows
    print(
        f"validation on tiny SD1.5, CPU: {args.validations} validations x {args.rows} rows, "
        f"{args.steps} steps, {size}x{size}, up to {batch} images a call"
    )
    print(f"  before: fresh Generator per validation, one call per row: {old:7.2f} s "
          f"({renders / old:.2f} renders/s)")  # fmt: skip
    print(f"  now:    one warm pipeline reloaded, rows batched:         {new:7.2f} s "
          f"({renders / new:.2f} renders/s)")  # fmt: skip
    print(f"  ratio:  {old / new:.2f}x; largest difference between the two renders: {differ:.1e}")


if __name__ == "__main__":
    main()
