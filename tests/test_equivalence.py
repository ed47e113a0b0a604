"""Precomputed embeddings give the same image, bitwise, as handing diffusers the picture.

The reference path is diffusers' own: `ip_adapter_image=` with the adapter's image encoder
loaded on the pipeline. Ours: `ClipEmbedder` -> safetensors cache round trip -> `Generator`
with `ip_adapter_image_embeds=` and no image encoder at all.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionPipeline
from PIL import Image
from transformers import CLIPVisionModelWithProjection

from pipeline.embedder import ClipEmbedder
from pipeline.generator import AdapterInput, GenerationRequest, Generator
from pipeline.models import ModelSource
from pipeline.presets import ADAPTERS
from storage.embcache import CacheKey, deserialize, serialize

CPU = torch.device("cpu")


def diffusers_images(
    models: ModelSource,
    adapter: str,
    image: Image.Image,
    *,
    seeds: list[int],
    guidance: float,
    scale: float,
) -> list[np.ndarray]:
    preset = ADAPTERS[adapter]
    pipe = StableDiffusionPipeline.from_pretrained(
        models.base_model("sd15"),
        safety_checker=None,
        requires_safety_checker=False,
        local_files_only=True,
    )
    pipe.image_encoder = CLIPVisionModelWithProjection.from_pretrained(
        models.image_encoder(adapter)
    )
    pipe.load_ip_adapter(
        models.adapter_repo(adapter),
        subfolder=preset.subfolder,
        weight_name=preset.weight_name,
        image_encoder_folder=None,
    )
    pipe.set_ip_adapter_scale(scale)
    pipe.set_progress_bar_config(disable=True)
    out = pipe(
        prompt="a red shoe",
        ip_adapter_image=image,
        num_images_per_prompt=len(seeds),
        num_inference_steps=3,
        guidance_scale=guidance,
        generator=[torch.Generator().manual_seed(s) for s in seeds],
    )
    return [np.asarray(im) for im in out.images]


@pytest.mark.parametrize("adapter", ["sd15", "sd15-plus"])
@pytest.mark.parametrize("guidance", [7.5, 1.0])
def test_precomputed_embeddings_are_bitwise_identical(
    tiny_models: Path, adapter: str, guidance: float
) -> None:
    models = ModelSource.parse(str(tiny_models))
    rng = np.random.default_rng(3)
    image = Image.fromarray((rng.random((70, 90, 3)) * 255).astype(np.uint8))
    embedder = ClipEmbedder(
        models.image_encoder(adapter),
        models.feature_extractor("sd15"),
        device=CPU,
        dtype=torch.float32,
    )
    computed = embedder.embed(image, ADAPTERS[adapter].embed_kind)
    key = CacheKey("0" * 64, embedder.fingerprint, ADAPTERS[adapter].embed_kind.value)
    cached = deserialize(serialize({"pos": computed.pos, "neg": computed.neg}, key))

    generator = Generator(models, (adapter,), device=CPU, dtype=torch.float32)
    ours = generator.generate(
        GenerationRequest(
            prompt="a red shoe",
            negative_prompt="",
            adapters=[AdapterInput(adapter, 0.7, cached["pos"], cached["neg"])],
            num_images=2,
            seed=11,
            steps=3,
            guidance_scale=guidance,
        )
    )
    theirs = diffusers_images(models, adapter, image, seeds=[11, 12], guidance=guidance, scale=0.7)
    assert ours.seeds == [11, 12]
    for mine, reference in zip(ours.images, theirs, strict=True):
        assert np.array_equal(np.asarray(mine), reference)
    # and the adapter matters: another reference gives another image
    other = embedder.embed(Image.new("RGB", (64, 64), (0, 0, 255)), ADAPTERS[adapter].embed_kind)
    changed = generator.generate(
        GenerationRequest(
            prompt="a red shoe",
            negative_prompt="",
            adapters=[AdapterInput(adapter, 0.7, other.pos, other.neg)],
            num_images=1,
            seed=11,
            steps=3,
            guidance_scale=guidance,
        )
    )
    assert not np.array_equal(np.asarray(changed.images[0]), theirs[0])


def test_wrong_embedding_shape_is_refused_before_generation(tiny_models: Path) -> None:
    from ipbatch.errors import ItemError

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
