"""The GPU benchmark in one command, within a time budget: `bench/gpu.sh` runs this.

    python3 bench/gpu_run.py --out OUT [--dry-run] [--budget 480]

Phases, each given what is left of the budget (a phase that would overrun is stopped, the
figures measured so far are kept, and the rest are skipped):
1. the environment (GPU, driver, torch, diffusers);
2. full-size random-weight SD1.5 written to a scratch folder (`bench/fullsize.py`: the real
   architecture, so the real cost; `--dry-run`: the tiny models);
3. the matmul peak (bf16 8192^3 on CUDA; fp32 on a CPU) and the UNet's FLOPs per image and
   step at the benchmark's size with classifier-free guidance (torch's FlopCounterMode);
4. generation (`bench/generate.py`): the plain diffusers loop, the bare batched call and ipbatch
   eager and compiled at several batch sizes, each with the GPU's busy fraction; the UNet
   FLOP/s each achieved and its fraction of the peak are derived here;
5. training (`bench/train.py`): steps/s of `ipbatch train`'s loop, fp32 / fp16 / bf16;
6. SDXL, if the budget has room: full-size random-weight SDXL (`bench/fullsize.py`) and
   generation at 1024x1024 with `sdxl-plus`, the plain diffusers loop and ipbatch eager at
   B = 1, 4 (`--dry-run`: the tiny SDXL at its native size). Skipped first when time is short.
After every phase OUT/figures.json and OUT/figures.txt are rewritten, so whatever stops the
run leaves the figures measured until then.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

RESERVE = 20.0  # seconds kept for writing the figures at the end
SDXL_NEEDS = 150.0  # seconds the SDXL phase needs at least (writing the weights, 8 rows)


class Run:
    def __init__(self, out: Path, budget: float) -> None:
        self.out = out
        self.started = time.monotonic()
        self.deadline = self.started + budget
        self.figures: dict[str, Any] = {"budget_seconds": budget, "phases": {}, "stopped": []}
        out.mkdir(parents=True, exist_ok=True)

    def left(self) -> float:
        return self.deadline - time.monotonic() - RESERVE

    def phase(self, name: str, seconds: float, **values: Any) -> None:
        self.figures["phases"][name] = {"seconds": round(seconds, 1), **values}
        self.save()

    def stopped(self, name: str, why: str) -> None:
        self.figures["stopped"].append({"phase": name, "why": why})
        self.save()

    def save(self) -> None:
        self.figures["elapsed_seconds"] = round(time.monotonic() - self.started, 1)
        (self.out / "figures.json").write_text(json.dumps(self.figures, indent=2))
        (self.out / "figures.txt").write_text(table(self.figures))


def _environment(dry_run: bool) -> dict[str, Any]:
    import diffusers
    import torch

    env: dict[str, Any] = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
        "dry_run": dry_run,
    }
    try:
        smi = subprocess.run(
            ["nvidia-smi", "--query-gpu=name,memory.total,driver_version", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=30,
        )
        env["nvidia_smi"] = smi.stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        env["nvidia_smi"] = None
    return env


def _unet_flops(models: Path, size: int, device: Any) -> float:
    """FLOPs of one UNet evaluation for one image at `size` with CFG (a batch of 2)."""
    import torch
    from diffusers import UNet2DConditionModel
    from torch.utils.flop_counter import FlopCounterMode

    dtype = torch.float16 if device.type == "cuda" else torch.float32
    base = models / "stable-diffusion-v1-5"
    unet = UNet2DConditionModel.from_pretrained(base, subfolder="unet", dtype=dtype).to(device)
    side = size // 8
    latents = torch.randn(2, 4, side, side, device=device, dtype=dtype)
    text = torch.randn(2, 77, unet.config.cross_attention_dim, device=device, dtype=dtype)
    with torch.inference_mode(), FlopCounterMode(display=False) as counter:
        unet(latents, 10, encoder_hidden_states=text)
    del unet
    return float(counter.get_total_flops())


def _jsonl(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _subprocess(
    run: Run, name: str, command: list[str], records: Path
) -> tuple[list[dict[str, Any]], float]:
    """A benchmark in a child process, stopped when the budget runs out: its JSON lines and
    the seconds it ran."""
    budget = run.left()
    started = time.monotonic()
    log = (run.out / f"{name}.log").open("w")
    try:
        subprocess.run(command, stdout=log, stderr=subprocess.STDOUT, timeout=budget, check=True)
    except subprocess.TimeoutExpired:
        run.stopped(name, f"the budget ran out after {budget:.0f} s; figures so far kept")
    except subprocess.CalledProcessError as exc:
        run.stopped(name, f"exit status {exc.returncode}: see {name}.log")
    finally:
        log.close()
    return _jsonl(records), time.monotonic() - started


def _bench(
    run: Run, name: str, models: Path, options: list[str], *, script: str | None = None
) -> tuple[list[dict[str, Any]], float]:
    """bench/<script or name>.py on `models` in a child process (`_subprocess`), its JSON
    lines written to OUT/<name>.jsonl."""
    records = run.out / f"{name}.jsonl"
    records.unlink(missing_ok=True)
    command = [sys.executable, str(ROOT / f"bench/{script or name}.py"), "--models", str(models)]
    return _subprocess(run, name, [*command, *options, "--json", str(records)], records)


def table(figures: dict[str, Any]) -> str:
    """The short text table of figures.json."""
    phases = figures["phases"]
    env = phases.get("environment", {})
    lines = [
        f"ipbatch GPU benchmark: {env.get('device', '?')}, torch {env.get('torch', '?')}, "
        f"python {env.get('python', '?')}, {figures.get('elapsed_seconds', 0):.0f} s of "
        f"{figures['budget_seconds']:.0f}"
        + (" (DRY RUN, tiny models)" if env.get("dry_run") else "")
    ]
    peak = phases.get("peak", {})
    if peak:
        lines.append(
            f"matmul peak {peak['tflops']:.3g} TFLOP/s ({peak['dtype']}); UNet "
            f"{peak.get('unet_tflop_per_image_step', 0):.3g} TFLOP per image-step with CFG"
        )
    generate = phases.get("generate", {}).get("records", [])
    if generate:
        lines.append(
            f"{'generation':34} {'images/s':>9} {'GPU busy':>9} {'UNet TFLOP/s':>13} {'of peak':>8}"
        )
        for r in generate:
            if "label" not in r:
                continue
            busy = "n/a" if r.get("gpu_busy") is None else f"{r['gpu_busy']:.0%}"
            tflops, share = "-", "-"
            if r.get("unet_tflops") is not None:
                tflops, share = f"{r['unet_tflops']:.3g}", f"{r['fraction_of_peak']:.1%}"
            lines.append(
                f"{r['label']:34} {r['images_per_second']:9.2f} {busy:>9} {tflops:>13} {share:>8}"
            )
    sdxl = phases.get("sdxl", {}).get("records", [])
    if sdxl:
        lines.append(f"{'SDXL generation (sdxl-plus)':34} {'images/s':>9} {'GPU busy':>9}")
        for r in sdxl:
            if "label" in r:
                busy = "n/a" if r.get("gpu_busy") is None else f"{r['gpu_busy']:.0%}"
                lines.append(f"{r['label']:34} {r['images_per_second']:9.2f} {busy:>9}")
    train = phases.get("train", {}).get("records", [])
    if train:
        lines.append(
            f"{'training':34} {'steps/s':>9} {'images/s':>9} {'TFLOP/s':>13} {'of peak':>8}"
        )
        for r in train:
            lines.append(
                f"{r['configuration']:34} {r['steps_per_second']:9.2f} "
                f"{r['images_per_second']:9.1f} {r['achieved_tflops']:13.3g} "
                f"{r['fraction_of_peak']:8.1%}"
            )
    for stop in figures["stopped"]:
        lines.append(f"stopped: {stop['phase']}: {stop['why']}")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--dry-run", action="store_true", help="tiny models, small settings")
    parser.add_argument("--budget", type=float, default=480.0, help="seconds for everything")
    args = parser.parse_args()
    run = Run(args.out, args.budget)

    started = time.monotonic()
    run.phase("environment", time.monotonic() - started, **_environment(args.dry_run))

    import torch

    from workers.context import quiet_model_libraries

    quiet_model_libraries()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    size = 64 if args.dry_run else 512
    steps = 2 if args.dry_run else 30
    with tempfile.TemporaryDirectory(prefix="ipbatch-gpu-") as scratch:
        started = time.monotonic()
        if args.dry_run:
            from pipeline.tiny import write_tiny_models

            models = write_tiny_models(Path(scratch) / "models")
        else:
            from bench.fullsize import write_fullsize_sd15

            models = write_fullsize_sd15(Path(scratch) / "models")
        run.phase(
            "models", time.monotonic() - started, folder="tiny" if args.dry_run else "fullsize"
        )

        started = time.monotonic()
        from bench.train import _peak

        peak = _peak(device)
        flops = _unet_flops(models, size, device)
        run.phase(
            "peak",
            time.monotonic() - started,
            tflops=peak / 1e12,
            dtype="bf16" if device.type == "cuda" else "fp32",
            unet_tflop_per_image_step=flops / 1e12,
        )

        if args.dry_run:
            generate = ["--rows", "4", "--steps", str(steps), "--batch-images", "2"]
            train = ["--batch-size", "2", "--steps", "2", "--warmup", "1", "--resolution", "64"]
        else:
            generate = ["--rows", "32", "--steps", str(steps), "--size", str(size)]
            generate += ["--batch-images", "1,4,8"]
            train = ["--batch-size", "8", "--steps", "10", "--resolution", str(size)]
        figures, seconds = _bench(run, "generate", models, [*generate, "--bare", "--compile"])
        for record in figures:  # the UNet FLOP/s each run achieved
            if "images_per_second" in record:
                achieved = record["images_per_second"] * steps * flops
                record["unet_tflops"] = achieved / 1e12
                record["fraction_of_peak"] = achieved / peak
        run.phase("generate", seconds, records=figures)

        if run.left() > 30:
            found, seconds = _bench(run, "train", models, train)
            run.phase("train", seconds, records=found)
        else:
            run.stopped("train", "no time left in the budget")

        # 6. SDXL at 1024x1024: writing 2.6B + 0.8B parameters takes a minute or two, each
        #    image a few seconds: only with room left
        if args.dry_run or run.left() > SDXL_NEEDS:
            started = time.monotonic()
            if not args.dry_run:
                from bench.fullsize import write_fullsize_sdxl

                write_fullsize_sdxl(models)
            run.phase("sdxl_models", time.monotonic() - started)
            sdxl = ["--adapter", "sdxl-plus", "--rows", "4" if args.dry_run else "8"]
            sdxl += ["--steps", str(steps), "--batch-images", "2" if args.dry_run else "1,4"]
            if not args.dry_run:
                sdxl += ["--size", "1024"]
            found, seconds = _bench(run, "sdxl", models, sdxl, script="generate")
            run.phase("sdxl", seconds, records=found)
        else:
            run.stopped("sdxl", f"under {SDXL_NEEDS:.0f} s left in the budget")
    run.save()
    print((args.out / "figures.txt").read_text(), end="")
    os.sync()


if __name__ == "__main__":
    main()
