"""ipbatch vs the plain diffusers loop (and a bare batched call), same model, one process run.

    .venv/bin/python bench/generate.py                       # tiny models on CPU (default)
    .venv/bin/python bench/generate.py --batch-images 8,16,32
    .venv/bin/python bench/generate.py --models fullsize --steps 30 --batch-images 1,4,8 \
        --bare --compile                                     # GPU: full-size SD1.5, 512x512
    .venv/bin/python bench/generate.py --mixed               # structure controls (below)
    .venv/bin/python bench/generate.py --adapter flux        # (or sd35) another family
    .venv/bin/python bench/generate.py --catalog --no-plain  # catalog reference fields (below)

(a) the plain loop a user writes from the diffusers docs: for each row,
    `pipe(prompt=..., ip_adapter_image=picture, generator=...)` then save a PNG; the image
    encoder runs again for every row and each call makes one row's images.
(b) `--bare`: the same pipeline called with B prompts at once and one precomputed embedding
    (what the GPU can do at that batch size with no pipeline around it: no ledger, no files).
(c) ipbatch's stages on the same manifest (ingest -> embed -> generate, SQLite + a local
    folder): each distinct reference encoded once, rows batched into shared calls, PNG
    encoding and recording overlapped with the next batch; with `--compile` also with
    IPBATCH_COMPILE (warmed up on other rows first, so compile time is not counted).
`--mixed`: half the rows are pose-style ControlNet rows (a canny map computed from a photo,
ControlNet scales 0.5 / 0.8 / 1.0 / 1.2), half background replacements (inpainting from a
cut-out's alpha), with four IP-Adapter scales (0.3 / 0.5 / 0.7 / 0.9) across the rows. The plain
loop then calls the matching diffusers pipeline per row (ControlNet or inpaint, derived from
the warm pipeline with `from_pipe`), computing the canny map and the mask for every row as the
docs do; ipbatch prepares each input once and batches rows across the scales.
`--catalog`: 3:1 product pictures, and each row with one of the catalog reference fields in
turn (`fit: pad`; `fit: tiles`; a `"noise"` negative reference with the adapter on steps
25%..75%; two references with `weights` and `norm_average`), run by ipbatch beside the same
rows without those fields ("ipbatch, plain fields"): what the fields cost.
All run with models loaded (warm-up calls first). Prints images/s, ratios and, on CUDA, the
GPU's busy fraction (nvidia-smi, sampled every 200 ms) during each run. No assertions.
`--models fullsize` writes full-size random-weight SD1.5 (bench/fullsize.py) first.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


@dataclass
class Figure:
    label: str
    images: int
    seconds: float
    busy: float | None = None

    @property
    def rate(self) -> float:
        return self.images / self.seconds


class Figures(list[Figure]):
    """The figures of this run; with a path, each is also appended there as a JSON line as
    soon as it is measured (a run stopped by a time limit keeps what it measured)."""

    def __init__(self, path: Path | None) -> None:
        super().__init__()
        self.path = path

    def _write(self, record: dict[str, object]) -> None:
        if self.path is not None:
            with self.path.open("a") as fh:
                fh.write(json.dumps(record) + "\n")

    def header(self, **settings: object) -> None:
        self._write({"settings": settings})

    def append(self, figure: Figure) -> None:
        super().append(figure)
        self._write(
            {
                "label": figure.label,
                "images": figure.images,
                "seconds": figure.seconds,
                "images_per_second": figure.rate,
                "gpu_busy": figure.busy,
            }
        )


class GpuBusy:
    """Share of nvidia-smi samples with the GPU busy (utilization.gpu, every 200 ms)."""

    def __init__(self) -> None:
        self.samples: list[float] = []
        self._proc: subprocess.Popen[str] | None = None
        self._reader: threading.Thread | None = None

    def __enter__(self) -> GpuBusy:
        if torch.cuda.is_available() and shutil.which("nvidia-smi"):
            self._proc = subprocess.Popen(
                ["nvidia-smi", "--query-gpu=utilization.gpu", "--format=csv,noheader,nounits"]
                + ["-i", "0", "-lms", "200"],
                stdout=subprocess.PIPE,
                text=True,
            )
            self._reader = threading.Thread(target=self._read, daemon=True)
            self._reader.start()
        return self

    def _read(self) -> None:
        assert self._proc is not None and self._proc.stdout is not None
        for line in self._proc.stdout:
            if line.strip().isdigit():
                self.samples.append(float(line) / 100)

    def __exit__(self, *exc: object) -> None:
        if self._proc is not None:
            self._proc.terminate()
            self._proc.wait()

    @property
    def fraction(self) -> float | None:
        return sum(self.samples) / len(self.samples) if self.samples else None


def make_manifest(
    folder: Path,
    name: str,
    rows: int,
    args: argparse.Namespace,
    *,
    seed: int,
    catalog: bool = False,
) -> Path:
    """`rows` rows; a fraction `args.repeat` of them reuse a reference of an earlier row.
    References are random pictures from `seed`: another seed gives references never seen."""
    distinct = max(1, round(rows * (1 - args.repeat)))
    rng = np.random.default_rng(seed)
    refs = []
    for i in range(distinct):
        path = folder / f"refs-{name}" / f"ref-{i}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        shape = (48, 144, 3) if args.catalog else (96, 96, 3)  # --catalog: 3:1 products
        Image.fromarray((rng.random(shape) * 255).astype(np.uint8)).save(path)
        refs.append(path)
    manifest = folder / f"{name}.jsonl"
    with manifest.open("w") as fh:
        for i in range(rows):
            ref = refs[i] if i < distinct else refs[int(rng.integers(distinct))]
            row = {
                "id": f"{name}-{i}",
                "prompt": f"a catalog photo of product {i}",
                "reference": str(ref),
                "adapter": args.adapter,
                "steps": args.steps,
                "seed": i,
            }
            if args.size:
                row |= {"width": args.size, "height": args.size}
            if args.mixed:
                row |= structure_fields(folder / f"refs-{name}", i, ref, args.adapter)
            if catalog:
                row |= catalog_fields(i, refs[(i + 1) % distinct])
            fh.write(json.dumps(row) + "\n")
    return manifest


def catalog_fields(i: int, other: Path) -> dict[str, object]:
    """--catalog: one of the catalog reference fields, in turn."""
    kind = i % 4
    if kind == 0:
        return {"fit": "pad"}
    if kind == 1:
        return {"fit": "tiles"}
    if kind == 2:
        return {"negative_reference": "noise", "start": 0.25, "end": 0.75}
    return {"reference": [str(other), str(other)], "weights": [1.0, 0.5], "combine": "norm_average"}


IP_SCALES = (0.3, 0.5, 0.7, 0.9)
CONTROL_SCALES = (0.5, 0.8, 1.0, 1.2)


def structure_fields(folder: Path, i: int, ref: Path, adapter: str) -> dict[str, object]:
    """--mixed: a ControlNet row (canny from the reference photo) or a background replacement
    (inpainting from a cut-out of it), with one of four IP-Adapter scales."""
    from pipeline.presets import ADAPTERS

    fields: dict[str, object] = {"scale": IP_SCALES[i % 4]}
    if i % 2 == 0:
        model = f"{ADAPTERS[adapter].family}-canny"
        control = {"model": model, "image": str(ref), "preprocess": "canny"}
        return fields | {"control": [control | {"scale": CONTROL_SCALES[i // 2 % 4]}]}
    cut = folder / f"{ref.stem}-cut.png"
    if not cut.exists():  # the reference's product on a transparent background
        picture = Image.open(ref).convert("RGBA")
        alpha = Image.new("L", picture.size, 0)
        w, h = picture.size
        alpha.paste(255, (w // 4, h // 4, 3 * w // 4, 3 * h // 4))
        picture.putalpha(alpha)
        picture.save(cut)
    return fields | {"init_image": str(cut), "inpaint_mask": "alpha"}


def load_plain_pipeline(models: str, adapter: str):  # type: ignore[no-untyped-def]
    import diffusers

    from pipeline.families import BASE_MODELS
    from pipeline.models import ModelSource, resolve_device, resolve_dtype
    from pipeline.presets import ADAPTERS

    source, preset = ModelSource.parse(models), ADAPTERS[adapter]
    device = resolve_device("auto")
    dtype = resolve_dtype("auto", device)
    cls = getattr(diffusers, BASE_MODELS[preset.family].pipeline_class)
    extra = {"safety_checker": None, "requires_safety_checker": False}
    pipe = cls.from_pretrained(
        source.base_model(preset.family), dtype=dtype, **(extra if preset.family == "sd15" else {})
    )
    repo, subfolder, weight_name = source.adapter_weights(ADAPTERS[adapter])
    assert preset.image_encoder is not None
    embeds = BASE_MODELS[preset.family].embeds
    if embeds == "separate":  # FLUX: its docs' loader call
        pipe.load_ip_adapter(
            repo,
            weight_name=weight_name,
            image_encoder_pretrained_model_name_or_path=source.image_encoder(preset),
            image_encoder_dtype=dtype,
        )
    elif embeds == "cfg_tensor":  # SD3.5: its docs' loader call, SigLIP from its folder
        pipe.load_ip_adapter(
            repo, weight_name=weight_name, image_encoder_folder=source.image_encoder(preset)
        )
    else:
        pipe.load_ip_adapter(
            repo,
            subfolder=subfolder,
            weight_name=weight_name,
            image_encoder_folder=preset.image_encoder.path,
        )
    pipe.set_ip_adapter_scale(0.5)
    pipe.to(device)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def plain_loop(pipe, manifest: Path, out: Path, models: str) -> Figure:  # type: ignore[no-untyped-def]
    rows = [json.loads(line) for line in manifest.read_text().splitlines()]
    out.mkdir(exist_ok=True)
    derived = derived_pipelines(pipe, rows, models)

    def run(selected: list[dict]) -> int:
        images = 0
        for row in selected:
            call, arguments = pipe, {}
            if "control" in row or "init_image" in row:
                call, arguments = structure_call(derived, row)
                pipe.set_ip_adapter_scale(row["scale"])
            result = call(
                prompt=row["prompt"],
                ip_adapter_image=Image.open(row["reference"]),
                num_inference_steps=row["steps"],
                width=row.get("width"),
                height=row.get("height"),
                generator=torch.Generator().manual_seed(row["seed"]),
                **arguments,
            )
            for k, image in enumerate(result.images):
                image.save(out / f"{row['id']}-{k}.png")
                images += 1
        return images

    run(rows[:1])  # warm-up
    started = time.perf_counter()
    images = run(rows)
    return Figure("plain diffusers loop", images, time.perf_counter() - started)


def derived_pipelines(pipe, rows: list[dict], models: str) -> dict:  # type: ignore[no-untyped-def]
    """The ControlNet and inpainting pipelines the plain loop needs, from the warm one (as the
    diffusers docs derive them: `from_pipe`, sharing its modules)."""
    import diffusers

    from pipeline.models import ModelSource
    from pipeline.presets import CONTROLNETS

    derived = {}
    nets = {row["control"][0]["model"] for row in rows if "control" in row}
    for name in nets:
        controlnet = diffusers.ControlNetModel.from_pretrained(
            ModelSource.parse(models).controlnet(name),
            variant=CONTROLNETS[name].variant,
            dtype=pipe.dtype,
        ).to(pipe.device)
        derived[name] = diffusers.AutoPipelineForText2Image.from_pipe(
            pipe, controlnet=controlnet, dtype=pipe.dtype
        )
    if any("init_image" in row for row in rows):
        derived["inpaint"] = diffusers.AutoPipelineForInpainting.from_pipe(pipe, dtype=pipe.dtype)
    for derived_pipe in derived.values():
        derived_pipe.set_progress_bar_config(disable=True)
    return derived


def structure_call(derived: dict, row: dict) -> tuple:  # type: ignore[type-arg]
    """The plain loop's per-row preparation, as the docs write it: canny with OpenCV, the
    cut-out on white and its alpha as the mask."""
    import cv2

    if "control" in row:
        control = row["control"][0]
        edges = cv2.Canny(np.array(Image.open(control["image"]).convert("RGB")), 100, 200)
        image = Image.fromarray(np.concatenate([edges[:, :, None]] * 3, axis=2))
        return derived[control["model"]], {
            "image": image,
            "controlnet_conditioning_scale": control["scale"],
        }
    cut = Image.open(row["init_image"])
    on_white = Image.alpha_composite(Image.new("RGBA", cut.size, "white"), cut).convert("RGB")
    mask = Image.fromarray(255 - np.asarray(cut)[:, :, 3])
    return derived["inpaint"], {"image": on_white, "mask_image": mask, "strength": 1.0}


def bare_batched(pipe, manifest: Path, batch: int) -> Figure:  # type: ignore[no-untyped-def]
    """B prompts per call with one precomputed embedding: the pipeline-free ceiling."""
    rows = [json.loads(line) for line in manifest.read_text().splitlines()]
    device = pipe._execution_device
    # FLUX's has no CFG flag (its pipeline encodes the negative black picture itself)
    cfg = () if "do_classifier_free_guidance" not in inspect_arguments(pipe) else (True,)
    embeds = pipe.prepare_ip_adapter_image_embeds(
        Image.open(rows[0]["reference"]), None, device, 1, *cfg
    )

    def call(chunk: list[dict]) -> int:
        result = pipe(
            prompt=[r["prompt"] for r in chunk],
            ip_adapter_image_embeds=embeds,
            num_inference_steps=chunk[0]["steps"],
            width=chunk[0].get("width"),
            height=chunk[0].get("height"),
            generator=[torch.Generator().manual_seed(r["seed"]) for r in chunk],
        )
        return len(result.images)

    call(rows[:batch])  # warm-up
    with GpuBusy() as busy:
        started = time.perf_counter()
        images = sum(call(rows[i : i + batch]) for i in range(0, len(rows), batch))
        seconds = time.perf_counter() - started
    return Figure(f"bare batched call, B={batch}", images, seconds, busy.fraction)


def inspect_arguments(pipe) -> set[str]:  # type: ignore[no-untyped-def]
    import inspect

    return set(inspect.signature(pipe.prepare_ip_adapter_image_embeds).parameters)


def ipbatch_run(
    models: str,
    root: Path,
    manifest: Path,
    warm: Path,
    batch: int,
    compile_: bool,
    tag: str = "",
) -> Figure:
    from core.config import Settings
    from storage.migrate import upgrade
    from workers.context import StageContext
    from workers.runner import run_job

    home = root / f"home-{batch}-{int(compile_)}{tag}"
    # scoring off: the plain loop does not score either (scores cost one CLIP pass per image)
    settings = Settings(home=home, models=models, batch_images=batch, compile=compile_, score=False)
    upgrade(settings.ledger_url())
    ctx = StageContext.create(settings, mode="local")
    # warm-up on other rows with other references: loads (and compiles) the models, primes
    # nothing the measured job uses
    run_job(ctx, manifest=str(warm), output=str(home / "out"), progress=False, started=0)
    with GpuBusy() as busy:
        started = time.perf_counter()
        summary = run_job(
            ctx, manifest=str(manifest), output=str(home / "out"), progress=False, started=started
        )
        seconds = time.perf_counter() - started
    ctx.close()
    assert summary.status == "succeeded", summary
    label = f"ipbatch{' compiled' if compile_ else ''}{f', {tag}' if tag else ''}, B={batch}"
    return Figure(label, summary.images, seconds, busy.fraction)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", default="tiny", help="'tiny', 'fullsize' or a folder")
    parser.add_argument("--rows", type=int, default=64)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--size", type=int, default=0, help="width = height; 0: native")
    parser.add_argument("--repeat", type=float, default=0.3, help="share of repeated refs")
    parser.add_argument("--adapter", default="sd15")
    parser.add_argument(
        "--batch-images", default="0", help="comma-separated images per call; 0: ipbatch's default"
    )
    parser.add_argument("--bare", action="store_true", help="also a bare batched call per B")
    parser.add_argument("--compile", action="store_true", help="also ipbatch with compile")
    parser.add_argument("--no-plain", action="store_true", help="skip the plain loop")
    parser.add_argument(
        "--mixed", action="store_true", help="ControlNet and inpainting rows, four scales"
    )
    parser.add_argument(
        "--catalog", action="store_true", help="3:1 pictures, catalog reference fields per row"
    )
    parser.add_argument(
        "--json", type=Path, help="also append each figure here as a JSON line once measured"
    )
    args = parser.parse_args()

    from pipeline.models import resolve_device
    from pipeline.pool import default_batch_images
    from workers.context import quiet_model_libraries

    quiet_model_libraries()
    torch.manual_seed(0)
    device = resolve_device("auto")
    sizes = [int(b) or default_batch_images(device) for b in args.batch_images.split(",")]
    figures = Figures(args.json)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        models = args.models
        if models == "tiny":
            from pipeline.tiny import write_tiny_models

            models = str(write_tiny_models(root / "models"))
        elif models == "fullsize":
            from bench.fullsize import write_fullsize_sd15

            models = str(write_fullsize_sd15(root / "models"))
        figures.header(
            rows=args.rows, steps=args.steps, size=args.size, adapter=args.adapter,
            models=args.models, mixed=args.mixed, catalog=args.catalog, device=str(device),
        )  # fmt: skip
        manifest = make_manifest(root, "bench", args.rows, args, seed=0)
        if not args.no_plain or args.bare:
            pipe = load_plain_pipeline(models, args.adapter)
            if not args.no_plain:
                figures.append(plain_loop(pipe, manifest, root / "plain", models))
            if args.bare:
                for b in sizes:
                    figures.append(bare_batched(pipe, manifest, b))
            del pipe
            if device.type == "cuda":
                torch.cuda.empty_cache()
        if args.catalog:  # the same pictures and rows as `manifest`, each with a field
            with_fields = make_manifest(root, "fields", args.rows, args, seed=0, catalog=True)
        for b in sizes:
            warm = make_manifest(root, f"warm-{b}", b, args, seed=1000 + b, catalog=args.catalog)
            plain_fields = ipbatch_run(models, root, manifest, warm, b, False)
            if args.catalog:
                plain_fields.label = f"ipbatch, plain fields, B={b}"
                figures.append(plain_fields)
                figures.append(
                    ipbatch_run(models, root, with_fields, warm, b, False, tag="catalog")
                )
            else:
                figures.append(plain_fields)
            if args.compile:
                figures.append(ipbatch_run(models, root, manifest, warm, b, True))

    where = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    threads = torch.get_num_threads()
    print(
        f"{args.rows} rows ({args.repeat:.0%} repeated references), {args.steps} steps, "
        f"size {args.size or 'native'}, adapter {args.adapter}, models {args.models}, "
        f"{'mixed: ControlNet + inpainting rows, four scales, ' if args.mixed else ''}"
        f"{where} ({threads} threads)"
    )
    plain = next((f for f in figures if f.label.startswith("plain")), None)
    print(f"{'':30} {'images':>7} {'seconds':>8} {'images/s':>9} {'vs plain':>9} {'GPU busy':>9}")
    for f in figures:
        ratio = f"{f.rate / plain.rate:8.2f}x" if plain else "       -"
        busy = f"{f.busy:9.0%}" if f.busy is not None else "      n/a"
        print(f"{f.label:30} {f.images:7d} {f.seconds:8.2f} {f.rate:9.2f} {ratio:>9} {busy}")
    for b in sizes:
        bare = next((f for f in figures if f.label == f"bare batched call, B={b}"), None)
        ours = next((f for f in figures if f.label == f"ipbatch, B={b}"), None)
        if bare and ours:
            print(f"B={b}: ipbatch at {ours.rate / bare.rate:.0%} of the bare batched call")
        same = next((f for f in figures if f.label == f"ipbatch, plain fields, B={b}"), None)
        fields = next((f for f in figures if f.label == f"ipbatch, catalog, B={b}"), None)
        if same and fields:
            print(f"B={b}: catalog fields at {fields.rate / same.rate:.0%} of plain fields")


if __name__ == "__main__":
    main()
