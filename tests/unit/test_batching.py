"""Several rows in one diffusers call: each row matches its solo run; batches are planned by
compatibility and size; out-of-memory splits a batch instead of failing it."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers.requests import requests_for

from core.errors import ItemError
from pipeline.generator import Generator
from pipeline.models import ModelSource
from pipeline.requests import GenerationRequest, batch_key

# equality with diffusers' own pipelines, number for number: torch's business, not the
# interpreter's; Python 3.12 runs the rest (`make test-py312`)
pytestmark = pytest.mark.numerics

CPU = torch.device("cpu")


def pixels(result) -> list[np.ndarray]:  # type: ignore[no-untyped-def]
    return [np.asarray(image).astype(np.int16) for image in result.images]


@pytest.mark.parametrize(
    ("adapters", "negative", "guidance"),
    [
        (("sd15",), "", 7.5),
        (("sd15-plus",), "blurry", 7.5),
        (("sd15",), "", 1.0),
        (("sd15-faceid-plusv2",), "", 7.5),  # per-row face-crop state on the UNet
        (("sd15-plus", "sd15-faceid"), "", 7.5),  # two adapters, FaceID LoRA
        (("sdxl",), "", 7.5),
        (("sdxl-plus",), "dark", 5.0),
        (("sdxl-faceid-plusv2",), "", 7.5),  # SDXL FaceID: its LoRA, the crop's state
        (("sdxl-plus", "sdxl-faceid"), "", 5.0),
    ],
)
def test_each_row_of_a_batch_is_exactly_its_solo_run_in_float64(
    tiny_models: Path, adapters: tuple[str, ...], negative: str, guidance: float
) -> None:
    """In float64, rounding cannot hide anything: every image of every row must equal its solo
    run to ~1e-10 (seen: 0 for most images, 1.2e-10 at most). A layout mistake, e.g. rows
    attending to each other's references, shows as a difference of ~0.1."""
    generator = Generator(
        ModelSource.parse(str(tiny_models)), adapters, device=CPU, dtype=torch.float64
    )
    rows = requests_for(generator, num_images=[1, 3, 2], negative=negative, guidance=guidance)
    batched = generator.generate_batch(rows)
    solo = [generator.generate(r) for r in rows]
    for row, b, s in zip(rows, batched, solo, strict=True):
        assert b.seeds == s.seeds == [(row.seed + k) % 2**32 for k in range(row.num_images)]
        assert len(b.arrays) == row.num_images
        for mine, alone in zip(b.arrays, s.arrays, strict=True):
            assert np.abs(mine - alone).max() < 1e-8
    # rows really got their own references: row 1 with row 0's reference (nothing else
    # changed: same prompt, seed and size) makes another image than row 1 in the batch, by far
    # more than the batch's rounding (< 1e-8 above); seen: 0.011 to 0.05 on average
    swapped = replace(rows[1], adapters=rows[0].adapters)
    assert np.abs(batched[1].arrays[0] - generator.generate(swapped).arrays[0]).mean() > 1e-3


def test_float32_batches_match_within_rounding_and_repeat_bitwise(tiny_models: Path) -> None:
    """In float32 CPU kernels round differently at other batch sizes; the tiny random model
    amplifies that to at most ~3e-3 (under one uint8 level); batched runs repeat bitwise."""
    generator = Generator(
        ModelSource.parse(str(tiny_models)), ("sd15-plus",), device=CPU, dtype=torch.float32
    )
    rows = requests_for(generator, num_images=[1, 3, 2])
    batched = generator.generate_batch(rows)
    again = generator.generate_batch(rows)
    solo = [generator.generate(r) for r in rows]
    for b, a, s in zip(batched, again, solo, strict=True):
        for mine, rerun, alone in zip(b.arrays, a.arrays, s.arrays, strict=True):
            assert np.array_equal(mine, rerun)
            assert np.abs(mine - alone).max() < 5e-3
        for mine, alone in zip(pixels(b), pixels(s), strict=True):
            assert np.abs(mine - alone).max() <= 1


def test_rows_that_cannot_share_a_call_are_refused(tiny_models: Path) -> None:
    generator = Generator(
        ModelSource.parse(str(tiny_models)), ("sd15",), device=CPU, dtype=torch.float32
    )
    a, b = requests_for(generator, num_images=[1, 1])
    other_steps = GenerationRequest(**{**b.__dict__, "steps": 5})
    assert batch_key(a) == batch_key(b) != batch_key(other_steps)
    with pytest.raises(ItemError, match="cannot share a call"):
        generator.generate_batch([a, other_steps])
    # a prompt past CLIP's 77 tokens is said in the item (diffusers only logs it)
    assert generator.prompt_warning(a) is None
    warning = generator.prompt_warning(replace(a, negative_prompt="a " * 90))
    assert warning is not None and warning.startswith("negative_prompt is 92 tokens")
    assert "reads the first 77" in warning


def test_out_of_memory_splits_the_batch(tiny_models: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    generator = Generator(
        ModelSource.parse(str(tiny_models)), ("sd15",), device=CPU, dtype=torch.float64
    )
    rows = requests_for(generator, num_images=[1, 1, 2, 1])
    real = generator._generate_slots
    calls: list[int] = []

    def small_gpu(requests):  # type: ignore[no-untyped-def]
        images = sum(r.num_images for r in requests)
        calls.append(images)
        if images > 2:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return real(requests)

    monkeypatch.setattr(generator, "_generate_slots", small_gpu)
    results = generator.generate_batch(rows)
    assert calls == [5, 2, 3]  # 5 -> (1+1) + (2+1); 2+1 -> alone each (solo path)
    assert [len(r.images) for r in results] == [1, 1, 2, 1]
    solo = [generator.generate(r) for r in rows]
    for b, s in zip(results, solo, strict=True):
        for mine, alone in zip(b.arrays, s.arrays, strict=True):
            assert np.abs(mine - alone).max() < 1e-8


def test_plan_batches_groups_compatible_rows_up_to_the_image_budget(tiny_models: Path) -> None:
    from pipeline.manifest import Row
    from workers.stages.generate import Prepared, plan_batches

    generator = Generator(
        ModelSource.parse(str(tiny_models)), ("sd15",), device=CPU, dtype=torch.float32
    )
    ks = [1, 2, 3, 1, 9, 1]
    requests = requests_for(generator, num_images=ks)
    requests[3] = GenerationRequest(**{**requests[3].__dict__, "steps": 9})  # incompatible
    prepared = []
    for i, (k, request) in enumerate(zip(ks, requests, strict=True)):
        row = Row(id=f"r{i}", reference="x", num_images=k)
        prepared.append(Prepared(i, "job", row, "/out", [], request, ()))
    batches = plan_batches(prepared, max_images=4)
    assert [[p.item_id for p in b] for b in batches] == [[0, 1], [2], [4], [5], [3]]


def test_per_slot_negative_prompts_are_each_rows_own(tiny_models: Path) -> None:
    """Rows with different negative prompts in one call: each matches its solo run."""
    generator = Generator(
        ModelSource.parse(str(tiny_models)), ("sd15",), device=CPU, dtype=torch.float64
    )
    rows = requests_for(generator, num_images=[1, 2], negative="blurry")
    rows[1] = replace(rows[1], negative_prompt="dark, grainy")
    assert batch_key(rows[0]) == batch_key(rows[1])
    batched = generator.generate_batch(rows)
    for row, b in zip(rows, batched, strict=True):
        for mine, alone in zip(b.arrays, generator.generate(row).arrays, strict=True):
            assert np.abs(mine - alone).max() < 1e-8
