"""Precomputed embeddings give the same image, bitwise, as the diffusers way of doing it.

Reference path: what diffusers' docs tell a user to write for CLIP adapters,
`load_ip_adapter(..., image_encoder_folder=...)` then `pipe(ip_adapter_image=picture)`. Ours:
the stage's reference encoder -> safetensors cache round trip -> `Generator` with no image
encoder. FaceID has no image path in diffusers: its recipe is written out in
tests/unit/test_fidelity.py.
"""

from __future__ import annotations

from pathlib import Path

import diffusers
import numpy as np
import pytest
import torch
from PIL import Image

from pipeline.embedder import ClipEmbedder, ClipReferenceEncoder
from pipeline.families import BASE_MODELS
from pipeline.generator import Generator
from pipeline.models import ModelSource
from pipeline.presets import ADAPTERS
from pipeline.requests import AdapterInput, GenerationRequest
from storage.embcache import CacheKey, deserialize, serialize

# equality with diffusers' own pipelines, number for number: torch's business, not the
# interpreter's; Python 3.12 runs the rest (`make test-py312`)
pytestmark = pytest.mark.numerics

CPU = torch.device("cpu")
# the IPAdapterMixin families' CLIP adapters (FLUX's, its own loader: tests/unit/test_flux.py)
CLIP_ADAPTERS = [
    n
    for n, p in ADAPTERS.items()
    if not p.uses_faces and BASE_MODELS[p.family].embeds == "cfg_halves"
]


def random_picture(seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray((rng.random((70, 90, 3)) * 255).astype(np.uint8))


def base_pipeline(models: ModelSource, adapter: str):  # type: ignore[no-untyped-def]
    family = ADAPTERS[adapter].family
    cls = getattr(diffusers, BASE_MODELS[family].pipeline_class)
    extra = {"safety_checker": None, "requires_safety_checker": False} if family == "sd15" else {}
    pipe = cls.from_pretrained(models.base_model(family), local_files_only=True, **extra)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def cache_round_trip(tensors: dict[str, torch.Tensor], fingerprint: str) -> dict:
    return deserialize(serialize(tensors, CacheKey("0" * 64, fingerprint, "kind")))


def ours(models: ModelSource, adapter: str, tensors: dict, *, guidance: float, seed: int = 11):
    generator = Generator(models, (adapter,), device=CPU, dtype=torch.float32)
    spec = AdapterInput(
        adapter,
        0.7,
        tensors["pos"],
        tensors["neg"],
        tensors.get("clip_pos"),
        tensors.get("clip_neg"),
    )
    result = generator.generate(
        GenerationRequest(
            prompt="a red shoe",
            negative_prompt="",
            adapters=[spec],
            num_images=2,
            seed=seed,
            steps=3,
            guidance_scale=guidance,
        )
    )
    assert result.seeds == [seed, seed + 1]
    return generator, [np.asarray(im) for im in result.images]


@pytest.mark.parametrize("adapter", CLIP_ADAPTERS)
@pytest.mark.parametrize("guidance", [7.5, 1.0])
def test_clip_adapters_match_diffusers_image_path(
    tiny_models: Path, adapter: str, guidance: float
) -> None:
    models = ModelSource.parse(str(tiny_models))
    preset = ADAPTERS[adapter]
    assert preset.image_encoder is not None
    picture = random_picture(3)
    clip = ClipEmbedder(
        models.image_encoder(ADAPTERS[adapter]),
        models.feature_extractor(preset.family),
        device=CPU,
        dtype=torch.float32,
    )
    encoder = ClipReferenceEncoder(clip, preset.embed_kind, preset.family)
    tensors = cache_round_trip(encoder.encode(picture, name="ref"), encoder.fingerprint)
    _, mine = ours(models, adapter, tensors, guidance=guidance)

    pipe = base_pipeline(models, adapter)
    repo, subfolder, weight_name = models.adapter_weights(ADAPTERS[adapter])
    pipe.load_ip_adapter(
        repo,
        subfolder=subfolder,
        weight_name=weight_name,
        image_encoder_folder=preset.image_encoder.path,
    )
    pipe.set_ip_adapter_scale(0.7)
    theirs = pipe(
        prompt="a red shoe",
        ip_adapter_image=picture,
        num_images_per_prompt=2,
        num_inference_steps=3,
        guidance_scale=guidance,
        generator=[torch.Generator().manual_seed(s) for s in (11, 12)],
    ).images
    for a, b in zip(mine, theirs, strict=True):
        assert np.array_equal(a, np.asarray(b))
    # the reference matters: another picture gives another image
    other = encoder.encode(random_picture(4), name="other")
    _, changed = ours(models, adapter, other, guidance=guidance)
    assert not np.array_equal(changed[0], mine[0])


def test_wrong_embedding_shape_is_refused_before_generation(tiny_models: Path) -> None:
    from core.errors import ItemError

    models = ModelSource.parse(str(tiny_models))
    generator = Generator(models, ("sd15",), device=CPU, dtype=torch.float32)
    hidden = torch.zeros(1, 65, 48)  # a plus-shaped embedding fed to the base adapter
    with pytest.raises(ItemError, match="projection takes"):
        generator.generate(
            GenerationRequest(
                prompt="",
                negative_prompt="",
                adapters=[AdapterInput("sd15", 0.5, hidden, hidden)],
                num_images=1,
                seed=0,
                steps=1,
                guidance_scale=7.5,
            )
        )


def test_faceid_refuses_to_run_without_peft(
    tiny_models: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Without peft diffusers only logs a warning and skips FaceID's LoRA: we refuse."""
    from core.errors import ConfigError

    monkeypatch.setattr(diffusers.utils, "USE_PEFT_BACKEND", False)
    models = ModelSource.parse(str(tiny_models))
    with pytest.raises(ConfigError, match="peft"):
        Generator(models, ("sd15-faceid",), device=CPU, dtype=torch.float32)
    Generator(models, ("sd15-plus",), device=CPU, dtype=torch.float32)  # others don't need it
