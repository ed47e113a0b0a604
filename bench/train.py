"""Training throughput: optimizer steps per second of `ipbatch train`'s loop, side by side.

    .venv/bin/python bench/train.py                       # tiny SD1.5 on this machine's CPU
    .venv/bin/python bench/train.py --models fullsize     # full-size SD1.5 (bench/fullsize.py)

The loop is the one `ipbatch train` runs (pipeline.training.AdapterTrainer: a frozen UNet,
the adapter in fp32, AdamW), fed precomputed tensors, so this measures the UNet's forward and
backward and the optimizer, the part that costs on a GPU. Configurations: fp32; on CUDA fp16
and bf16 autocast; each with and without gradient checkpointing. For each: steps/s, images/s,
UNet FLOPs per step (torch's FlopCounterMode over one step) and the achieved FLOP/s as a
fraction of the device's measured matmul peak (bf16 on CUDA, fp32 on the CPU).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def _models(spec: str, scratch: Path) -> Path:
    if spec == "tiny":
        from pipeline.tiny import write_tiny_models

        return write_tiny_models(scratch / "tiny")
    if spec == "fullsize":
        from bench.fullsize import write_fullsize_sd15

        return write_fullsize_sd15(scratch / "fullsize")
    return Path(spec)


def _peak(device: torch.device) -> float:
    """The device's matmul FLOP/s: bf16 8192^3 on CUDA, fp32 1024^3 on the CPU."""
    n, dtype = (8192, torch.bfloat16) if device.type == "cuda" else (1024, torch.float32)
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(2):
        a @ b
    _sync(device)
    runs = 10 if device.type == "cuda" else 5
    started = time.perf_counter()
    for _ in range(runs):
        a @ b
    _sync(device)
    return 2 * n**3 * runs / (time.perf_counter() - started)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _trainer(models: Path, device: torch.device, settings: object) -> object:
    from diffusers import DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPVisionConfig

    from pipeline.adapter_weights import ProjectionShape
    from pipeline.presets import Projection
    from pipeline.training import AdapterTrainer

    base = models / "stable-diffusion-v1-5"
    # fp32 in every precision, as load_trainer loads it (autocast runs it in fp16 / bf16)
    unet = UNet2DConditionModel.from_pretrained(base, subfolder="unet").to(device)
    scheduler = DDPMScheduler.from_pretrained(base, subfolder="scheduler")
    encoder = CLIPVisionConfig.from_pretrained(models / "IP-Adapter/models/image_encoder")
    shape = ProjectionShape.fresh(Projection.LINEAR, unet, encoder)
    cad = unet.config.cross_attention_dim
    return AdapterTrainer(
        unet, scheduler, shape=shape, settings=settings, uncond_text=torch.zeros(77, cad)
    )


def _examples(models: Path, resolution: int, n: int) -> list:
    from diffusers import UNet2DConditionModel
    from transformers import CLIPVisionConfig

    from pipeline.training import Example

    base = models / "stable-diffusion-v1-5"
    cad = UNet2DConditionModel.load_config(base, subfolder="unet")["cross_attention_dim"]
    dim = CLIPVisionConfig.from_pretrained(models / "IP-Adapter/models/image_encoder")
    g = torch.Generator().manual_seed(0)
    side = resolution // 8
    return [
        Example(
            torch.randn(4, side, side, generator=g),
            torch.rand(4, side, side, generator=g) * 0.1,
            torch.randn(77, cad, generator=g),
            torch.randn(1, dim.projection_dim, generator=g),
            torch.zeros(1, dim.projection_dim),
        )
        for _ in range(n)
    ]


def measure(models: Path, device: torch.device, args: argparse.Namespace, **options: object):
    from torch.utils.flop_counter import FlopCounterMode

    from pipeline.train_schema import TrainSettings

    settings = TrainSettings(batch_size=args.batch_size, resolution=args.resolution, **options)
    trainer = _trainer(models, device, settings)
    examples = _examples(models, args.resolution, 4 * args.batch_size)
    for _ in range(args.warmup):
        trainer.train_step(examples)  # type: ignore[attr-defined]
    with FlopCounterMode(display=False) as counter:
        trainer.train_step(examples)  # type: ignore[attr-defined]
    flops = counter.get_total_flops()
    _sync(device)
    started = time.perf_counter()
    for _ in range(args.steps):
        trainer.train_step(examples)  # type: ignore[attr-defined]
    _sync(device)
    seconds = time.perf_counter() - started
    memory = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    del trainer
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    return args.steps / seconds, flops, memory


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="tiny", help="tiny, fullsize, or a models folder")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--resolution", type=int, default=None, help="default: 64 tiny, 512")
    parser.add_argument("--steps", type=int, default=10, help="timed steps per configuration")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument(
        "--json", type=Path, help="also append each configuration here as a JSON line"
    )
    args = parser.parse_args()
    args.resolution = args.resolution or (64 if args.models == "tiny" else 512)
    from workers.context import quiet_model_libraries

    quiet_model_libraries()
    device = torch.device(args.device)
    configs: list[tuple[str, dict[str, object]]] = [("fp32", {})]
    if device.type == "cuda":
        configs += [("fp16 autocast", {"mixed_precision": "fp16"})]
        configs += [("bf16 autocast", {"mixed_precision": "bf16"})]
    configs += [
        (f"{name} + grad ckpt", {**options, "gradient_checkpointing": True})
        for name, options in list(configs)
    ]
    with tempfile.TemporaryDirectory(prefix="ipbatch-bench-train-") as scratch:
        models = _models(args.models, Path(scratch))
        peak = _peak(device)
        print(
            f"models {args.models}, {device}, batch {args.batch_size} at "
            f"{args.resolution}x{args.resolution}, {args.steps} timed steps; matmul peak "
            f"{peak / 1e12:.2f} TFLOP/s ({'bf16' if device.type == 'cuda' else 'fp32'})"
        )
        print(
            f"{'configuration':26} {'steps/s':>8} {'images/s':>9} {'x fp32':>7} "
            f"{'TFLOP/step':>11} {'TFLOP/s':>8} {'of peak':>8} {'peak GiB':>9}"
        )
        base = None
        for name, options in configs:
            speed, flops, memory = measure(models, device, args, **options)
            base = base or speed
            achieved = flops * speed
            if args.json is not None:
                record = {
                    "configuration": name,
                    "batch_size": args.batch_size,
                    "resolution": args.resolution,
                    "steps_per_second": speed,
                    "images_per_second": speed * args.batch_size,
                    "tflop_per_step": flops / 1e12,
                    "achieved_tflops": achieved / 1e12,
                    "fraction_of_peak": achieved / peak,
                    "peak_tflops": peak / 1e12,
                    "peak_memory_gib": memory,
                }
                with args.json.open("a") as fh:
                    fh.write(json.dumps(record) + "\n")
            print(
                f"{name:26} {speed:8.2f} {speed * args.batch_size:9.1f} {speed / base:7.2f} "
                f"{flops / 1e12:11.4f} {achieved / 1e12:8.3f} {achieved / peak:8.1%} "
                f"{'-' if memory is None else f'{memory:.1f}':>9}"
            )


if __name__ == "__main__":
    main()
