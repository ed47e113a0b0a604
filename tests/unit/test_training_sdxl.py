"""Training an SDXL adapter (`ipbatch train --kind sdxl`) as tencent's tutorial_train_sdxl.py
does, on the tiny SDXL: the tutorial's text conditioning (both encoders' penultimate hidden
states, the second's pooled embedding), its crop and time ids, its drops, written out here
from the script, never through ipbatch's helpers; and a run end to end whose adapter loads in
diffusers' SDXL pipeline and generates by name."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionXLPipeline
from helpers.cli import ipbatch
from PIL import Image
from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

from pipeline.presets import Projection
from pipeline.train_schema import TrainSettings
from pipeline.training import Example, TrainingEncoders, load_trainer

CPU = torch.device("cpu")
SDXL = "stable-diffusion-xl-base-1.0"
BIGG = "IP-Adapter/sdxl_models/image_encoder"


@pytest.fixture(scope="module")
def encoders(tiny_models: Path) -> TrainingEncoders:
    return TrainingEncoders(str(tiny_models / SDXL), device=CPU, local_files_only=True)


def tutorial_text(folder: Path, prompt: str) -> tuple[torch.Tensor, torch.Tensor]:
    """tutorial_train_sdxl.py: each tokenizer pads to its max length; `text_encoder(ids,
    output_hidden_states=True).hidden_states[-2]` of both, concatenated; the pooled embedding
    is `text_encoder_2(...)[0]`."""
    hidden = []
    pooled = None
    for tokenizer_folder, encoder_class, encoder_folder in (
        ("tokenizer", CLIPTextModel, "text_encoder"),
        ("tokenizer_2", CLIPTextModelWithProjection, "text_encoder_2"),
    ):
        tokenizer = CLIPTokenizer.from_pretrained(folder, subfolder=tokenizer_folder)
        encoder = encoder_class.from_pretrained(folder, subfolder=encoder_folder)
        ids = tokenizer(
            prompt,
            max_length=tokenizer.model_max_length,
            padding="max_length",
            truncation=True,
            return_tensors="pt",
        ).input_ids
        with torch.no_grad():
            output = encoder(ids, output_hidden_states=True)
        hidden.append(output.hidden_states[-2])
        pooled = output[0]
    assert pooled is not None
    return torch.concat(hidden, dim=-1)[0], pooled[0]


def tutorial_crop(image: Image.Image, size: int) -> tuple[Image.Image, list[int]]:
    """The tutorial's dataset: `transforms.Resize(size, BILINEAR)` (torchvision: the shorter
    side to `size`, the longer `int(size * long / short)`), then `delta // 2` offsets; the time
    ids original_size (h, w) + crop_coords_top_left (top, left) + target_size (size, size)."""
    w, h = image.size
    short, long = (w, h) if w <= h else (h, w)
    new_long = int(size * long / short)
    new_w, new_h = (size, new_long) if w <= h else (new_long, size)
    if (new_w, new_h) != (w, h):
        image = image.resize((new_w, new_h), Image.Resampling.BILINEAR)
    top, left = (new_h - size) // 2, (new_w - size) // 2
    return image.crop((left, top, left + size, top + size)), [h, w, top, left, size, size]


def test_the_text_conditioning_is_the_tutorials(tiny_models: Path, encoders: TrainingEncoders):
    for prompt in ["a leather bag on white", ""]:
        mine = encoders.text(prompt)
        text, pooled = tutorial_text(tiny_models / SDXL, prompt)
        assert torch.equal(mine["text"], text) and torch.equal(mine["pooled"], pooled)
    assert mine["text"].shape[-1] == 2 * 32  # both tiny encoders' widths side by side


def test_the_latent_and_time_ids_are_the_tutorials(encoders: TrainingEncoders) -> None:
    """640x427 at 64: 95 wide, 31 to crop: the tutorial floors to 15 (CenterCrop's rounding
    would give 16); the others: both orientations, a square, an odd delta."""
    rng = np.random.default_rng(7)
    for size in [(640, 427), (57, 80), (64, 64), (97, 64)]:
        picture = Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8))
        crop, time_ids = tutorial_crop(picture, 64)
        pixels = torch.from_numpy(np.asarray(crop, dtype=np.float32) / 255.0)
        pixels = ((pixels - 0.5) / 0.5).permute(2, 0, 1)[None]  # ToTensor + Normalize
        with torch.inference_mode():
            expected = encoders.vae.encode(pixels).latent_dist.mean[0]
        mine = encoders.latent(picture, 64)
        torch.testing.assert_close(mine["mean"], expected, atol=1e-6, rtol=0)
        assert mine["time_ids"].tolist() == time_ids
    assert time_ids == [64, 97, 0, 16, 64, 64]
    assert tutorial_crop(Image.new("RGB", (640, 427)), 64)[1] == [427, 640, 0, 15, 64, 64]


def test_a_step_conditions_the_unet_as_the_tutorial_does(
    tiny_models: Path, encoders: TrainingEncoders
) -> None:
    """The loss of three rows, the first with its text dropped ("" through both encoders,
    pooled too) and the second with its image dropped (zeros), equals the tutorial's UNet
    call with its text, pooled embedding and time ids; without the time ids it differs."""
    trainer = load_trainer(
        str(tiny_models / SDXL),
        image_encoder_folder=str(tiny_models / BIGG),
        projection=Projection.LINEAR,
        settings=TrainSettings(kind="sdxl", batch_size=3),
        encoders=encoders,
        init=None,
        device=CPU,
        local_files_only=True,
    )
    g = torch.Generator().manual_seed(3)
    prompts = ["a red bag", "a blue shoe", "a green hat"]
    sizes = [(80, 57), (64, 64), (57, 90)]
    examples = []
    for prompt, (w, h) in zip(prompts, sizes, strict=True):
        picture = Image.fromarray((torch.rand(h, w, 3, generator=g) * 255).byte().numpy())
        latent, text = encoders.latent(picture, 64), encoders.text(prompt)
        image = torch.randn(1, trainer.shape.image_dim, generator=g)
        examples.append(
            Example(
                latent["mean"],
                latent["std"],
                text["text"],
                image,
                torch.zeros_like(image),
                text["pooled"],
                latent["time_ids"],
            )
        )
    draw = {
        "latents": torch.randn(3, 4, 8, 8, generator=g),
        "noise": torch.randn(3, 4, 8, 8, generator=g),
        "timesteps": torch.tensor([10, 500, 990]),
        "text": torch.stack([e.text for e in examples]),
        "image": torch.stack([e.image for e in examples]),
        "image_neg": torch.stack([e.image_neg for e in examples]),
        "pooled": torch.stack([e.pooled for e in examples]),  # type: ignore[misc]
        "time_ids": torch.stack([e.time_ids for e in examples]),  # type: ignore[misc]
        "no_text": torch.tensor([True, False, False]),
        "no_image": torch.tensor([False, True, False]),
    }
    with torch.no_grad():
        mine = trainer.loss(draw)

        # the tutorial: "" for the dropped text, zeros for the dropped image embedding
        texts = [tutorial_text(tiny_models / SDXL, p) for p in ["", prompts[1], prompts[2]]]
        dropped = torch.zeros(1, trainer.shape.image_dim)
        image_embeds = torch.stack([examples[0].image, dropped, examples[2].image])
        time_ids = []
        for size in sizes:
            picture = Image.new("RGB", size)
            time_ids.append(tutorial_crop(picture, 64)[1])
        noisy = trainer.scheduler.add_noise(draw["latents"], draw["noise"], draw["timesteps"])

        def tutorial_loss(ids: torch.Tensor) -> torch.Tensor:
            prediction = trainer.unet(
                noisy,
                draw["timesteps"],
                torch.stack([t for t, _ in texts]),
                added_cond_kwargs={
                    "image_embeds": [image_embeds],
                    "text_embeds": torch.stack([p for _, p in texts]),
                    "time_ids": ids,
                },
            ).sample
            return torch.nn.functional.mse_loss(prediction.float(), draw["noise"].float())

        expected = tutorial_loss(torch.tensor(time_ids, dtype=torch.float32))
        without = tutorial_loss(torch.zeros(3, 6))
    torch.testing.assert_close(mine, expected, atol=1e-7, rtol=1e-6)
    assert abs(float(without) - float(expected)) > 1e-6


@pytest.mark.slow
def test_an_sdxl_adapter_trains_loads_in_diffusers_and_generates_by_name(
    tiny_models: Path, tmp_path: Path
) -> None:
    home = tmp_path / "home"
    env = {"IPBATCH_HOME": str(home), "IPBATCH_MODELS": str(tiny_models)}
    rng = np.random.default_rng(4)
    rows = []
    for i in range(3):
        path = tmp_path / f"p{i}.png"
        Image.fromarray(rng.integers(0, 255, (70, 90, 3), dtype=np.uint8)).save(path)
        rows.append({"id": f"p{i}", "image": str(path), "prompt": f"product {i}"})
    manifest = tmp_path / "train.jsonl"
    manifest.write_text("".join(json.dumps(r) + "\n" for r in rows))
    args = [
        "train", str(manifest), "--name", "xl", "--kind", "sdxl", "--steps", "3",
        "--batch-size", "2", "--resolution", "64", "--validation-rows", "1",
        "--validation-steps", "2",
    ]  # fmt: skip
    result = ipbatch(*args, env=env)
    assert result.returncode == 0, result.stdout + result.stderr
    folder = home / "adapters" / "xl"
    card = json.loads((folder / "card.json").read_text())
    assert (card["kind"], card["family"], card["steps"]) == ("sdxl", "sdxl", 3)

    # diffusers loads the exported file as an SDXL IP-Adapter (h94's layout) and runs it
    pipe = StableDiffusionXLPipeline.from_pretrained(str(tiny_models / SDXL))
    pipe.load_ip_adapter(
        str(folder),
        subfolder="",
        weight_name="adapter.safetensors",
        image_encoder_folder=str(tiny_models / BIGG),
    )
    picture = Image.open(rows[0]["image"])
    out = pipe(
        "product 0", ip_adapter_image=picture, num_inference_steps=2, output_type="np"
    ).images
    assert out.shape == (1, 64, 64, 3) and np.isfinite(out).all()

    # and a generation job uses it by name
    job = tmp_path / "job.jsonl"
    job.write_text(json.dumps({"id": "g", "adapter": "custom:xl", "reference": rows[1]["image"],
                               "steps": 2}) + "\n")  # fmt: skip
    run = ipbatch("run", "-q", str(job), env=env, cwd=tmp_path)
    assert run.returncode == 0, run.stdout + run.stderr
