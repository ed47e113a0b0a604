"""A row's sampler (`scheduler`) and the evaluation protocol's: each name against diffusers'
scheduler swapped in as its docs show (`XScheduler.from_config(pipe.scheduler.config)`), per
row, batched with rows of its own kind only, in float64; and `ipbatch eval`'s rows against the
paper's settings written out (DDIM, 50 steps, guidance 7.5, no text prompt, scale 1.0)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import diffusers
import numpy as np
import pytest
import torch

from pipeline.evaluation import EvalSettings, generation_rows, row_seed
from pipeline.families import BASE_MODELS
from pipeline.generator import Generator
from pipeline.manifest import Row
from pipeline.models import ModelSource
from pipeline.presets import ADAPTERS
from pipeline.requests import AdapterInput, GenerationRequest, batch_key, build_request
from pipeline.train_schema import TrainRow

pytestmark = pytest.mark.numerics

CPU = torch.device("cpu")
F64 = torch.float64
# the names the manifest takes, and the class the diffusers docs swap in for each
DIFFUSERS_CLASSES = {
    "ddim": diffusers.DDIMScheduler,
    "euler": diffusers.EulerDiscreteScheduler,
    "dpm++": diffusers.DPMSolverMultistepScheduler,
}


def reference_pipe(models: ModelSource, adapter: str) -> Any:
    """diffusers' pipeline for the adapter's base model, in float64, as its docs load it."""
    family = ADAPTERS[adapter].family
    cls = getattr(diffusers, BASE_MODELS[family].pipeline_class)
    extra = {"safety_checker": None, "requires_safety_checker": False} if family == "sd15" else {}
    pipe = cls.from_pretrained(models.base_model(family), dtype=F64, **extra)
    pipe.set_progress_bar_config(disable=True)
    repo, subfolder, weight_name = models.adapter_weights(ADAPTERS[adapter])
    pipe.load_ip_adapter(
        repo, subfolder=subfolder, weight_name=weight_name, image_encoder_folder=None
    )
    return pipe


def theirs(pipe: Any, request: GenerationRequest, folder_scheduler: Any) -> np.ndarray:
    """The request through diffusers with its scheduler swapped in the documented way."""
    name = request.scheduler
    pipe.scheduler = (
        folder_scheduler
        if name == "default"
        else DIFFUSERS_CLASSES[name].from_config(folder_scheduler.config)
    )
    [spec] = request.adapters
    pipe.set_ip_adapter_scale(spec.scale)
    return pipe(
        prompt=request.prompt,
        ip_adapter_image_embeds=[torch.stack([spec.neg, spec.pos]).to(F64)],
        num_inference_steps=request.steps,
        guidance_scale=request.guidance_scale,
        generator=torch.Generator().manual_seed(request.seed),
        width=64,
        height=64,
        output_type="np",
    ).images[0]


@pytest.mark.parametrize("adapter", ["sd15", "sdxl"])
def test_each_scheduler_matches_diffusers_per_row(tiny_models: Path, adapter: str) -> None:
    """Two DDIM rows share a call; Euler, DPM++ and the folder's own each take their own.
    Every row equals diffusers with that scheduler; the default row, run after the others on
    the same warm pipeline, still gets the folder's scheduler; the sampler changes the image."""
    models = ModelSource.parse(str(tiny_models))
    generator = Generator(models, (adapter,), device=CPU, dtype=F64)
    (dim,), _ = generator._projection_shapes[0]
    names = ["ddim", "ddim", "euler", "dpm++", "default"]
    rows = []
    for i, name in enumerate(names):
        pos = torch.randn(1, dim, generator=torch.Generator().manual_seed(i))
        rows.append(
            GenerationRequest(
                prompt=f"a product photo {i}",
                negative_prompt="",
                adapters=[AdapterInput(adapter, 0.6 + 0.1 * i, pos, torch.zeros_like(pos))],
                num_images=1,
                seed=30 + i,
                steps=4,
                guidance_scale=5.0,
                width=64,
                height=64,
                scheduler=name,
            )
        )
    assert batch_key(rows[0]) == batch_key(rows[1])
    assert len({batch_key(r) for r in rows[1:]}) == 4  # each kind batches with its own only
    mine = [r.arrays[0] for r in generator.generate_batch(rows[:2])]
    mine += [generator.generate_batch([r])[0].arrays[0] for r in rows[2:]]

    pipe = reference_pipe(models, adapter)
    folder_scheduler = pipe.scheduler
    for request, image in zip(rows, mine, strict=True):
        assert np.abs(image - theirs(pipe, request, folder_scheduler)).max() < 1e-6, request
    # DDIM made another picture than the folder's scheduler would have
    default = theirs(
        pipe, GenerationRequest(**(vars(rows[0]) | {"scheduler": "default"})), folder_scheduler
    )
    assert np.abs(mine[0] - default).mean() > 1e-3


def test_an_unknown_scheduler_is_refused_with_the_names() -> None:
    with pytest.raises(ValueError, match="'default', 'ddim', 'euler' or 'dpm\\+\\+'"):
        Row.model_validate({"id": "r", "reference": "a.png", "scheduler": "lms"})


def test_eval_rows_run_the_papers_protocol(tiny_models: Path) -> None:
    """`ipbatch eval`'s generation row for a pair, through the generate path, equals diffusers
    called with the paper's settings written out here: DDIM (the folder's betas), 50 steps,
    guidance 7.5, no text prompt, the image prompt at scale 1.0, the pair's seed."""
    pair = TrainRow(id="p0", image="p0.png", prompt="a red bag")
    [data] = generation_rows([pair], ["sd15"], EvalSettings(samples=1, size=64), resolve=str)
    row = Row.model_validate(data)
    models = ModelSource.parse(str(tiny_models))
    generator = Generator(models, ("sd15",), device=CPU, dtype=F64)
    (dim,), _ = generator._projection_shapes[0]
    pos = torch.randn(1, dim, generator=torch.Generator().manual_seed(7))
    request = build_request(row, [[{"pos": pos, "neg": torch.zeros_like(pos)}]])
    mine = generator.generate(request).arrays[0]

    pipe = reference_pipe(models, "sd15")
    pipe.scheduler = diffusers.DDIMScheduler.from_config(pipe.scheduler.config)
    pipe.set_ip_adapter_scale(1.0)
    expected = pipe(
        prompt="",
        ip_adapter_image_embeds=[torch.stack([torch.zeros_like(pos), pos]).to(F64)],
        num_inference_steps=50,
        guidance_scale=7.5,
        generator=torch.Generator().manual_seed(row_seed("p0")),
        width=64,
        height=64,
        output_type="np",
    ).images[0]
    assert np.abs(mine - expected).max() < 1e-6
    # scored against the caption, and never regenerated below a score threshold
    assert row.caption == "a red bag" and data["regenerate"] is False
