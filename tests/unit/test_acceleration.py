"""Device settings of the generator: VAE slicing on big calls, SDPA attention, and an
optional compiled UNet whose batches are padded to fixed sizes (one graph per size)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from helpers.requests import requests_for

from pipeline.generator import Generator
from pipeline.models import ModelSource
from pipeline.pipelines import Acceleration, compile_buckets

CPU = torch.device("cpu")


def test_compile_buckets() -> None:
    assert compile_buckets(16) == [1, 2, 4, 8, 16]
    assert compile_buckets(12) == [1, 2, 4, 8, 12]
    assert compile_buckets(1) == [1]


def test_attention_runs_on_sdpa(tiny_models: Path) -> None:
    generator = Generator(
        ModelSource.parse(str(tiny_models)), ("sd15-plus",), device=CPU, dtype=torch.float32
    )
    kinds = {type(p).__name__ for p in generator.pipe.unet.attn_processors.values()}
    assert kinds == {"AttnProcessor2_0", "IPAdapterAttnProcessor2_0"}


def test_vae_slicing_above_the_limit_gives_the_same_images(
    tiny_models: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Above `vae_slicing_above` images a call decodes one image at a time; the images are
    those of the unsliced decode (float64: to ~1e-10)."""
    source = ModelSource.parse(str(tiny_models))
    sliced = Generator(
        source,
        ("sd15",),
        device=CPU,
        dtype=torch.float64,
        acceleration=Acceleration(vae_slicing_above=2),
    )
    plain = Generator(source, ("sd15",), device=CPU, dtype=torch.float64)
    decoded: list[int] = []
    real_decode = sliced.pipe.vae._decode

    def counting(z: torch.Tensor, *args, **kwargs):  # type: ignore[no-untyped-def]
        decoded.append(z.shape[0])
        return real_decode(z, *args, **kwargs)

    monkeypatch.setattr(sliced.pipe.vae, "_decode", counting)
    rows = requests_for(sliced, num_images=[1, 3])
    big = sliced.generate_batch(rows)
    assert decoded == [1, 1, 1, 1]  # 4 images > 2: one at a time
    decoded.clear()
    sliced.generate_batch(rows[:1])
    assert decoded == [1]
    sliced.generate_batch([requests_for(sliced, num_images=[2])[0]])
    assert decoded == [1, 2]  # 2 images: not above the limit, one decode
    for a, b in zip(big, plain.generate_batch(rows), strict=True):
        for x, y in zip(a.arrays, b.arrays, strict=True):
            assert np.abs(x - y).max() < 1e-8


# raised from inside torch's own compile machinery, not from ipbatch
@pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated:DeprecationWarning")
def test_compiled_unet_pads_batches_to_fixed_sizes(tiny_models: Path) -> None:
    """IPBATCH_COMPILE: batches of 3 and 4 images both run as 4 (one compiled graph, no
    recompile), padding is dropped, and the images match the eager pipeline's. The graph is
    captured by dynamo as in production and run by its "eager" backend: inductor's code
    generation took 1.5-3 minutes of this machine here, and the GPU command's rehearsal in
    `make test` runs the inductor build (`bench/generate.py --compile` on the tiny models)."""
    import torch._dynamo.utils

    source = ModelSource.parse(str(tiny_models))
    compiled = Generator(
        source,
        ("sd15",),
        device=CPU,
        dtype=torch.float32,
        acceleration=Acceleration(compile=True, max_images=4, compile_backend="eager"),
    )
    eager = Generator(source, ("sd15",), device=CPU, dtype=torch.float32)
    assert compiled.buckets == [1, 2, 4]
    graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    three = requests_for(compiled, num_images=[1, 2])
    four = requests_for(compiled, num_images=[2, 1, 1])
    first, second = compiled.generate_batch(three), compiled.generate_batch(four)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == graphs + 1
    assert [len(r.arrays) for r in first] == [1, 2] and [len(r.arrays) for r in second] == [2, 1, 1]
    for mine, theirs in (
        (first, eager.generate_batch(three)),
        (second, eager.generate_batch(four)),
    ):
        for a, b in zip(mine, theirs, strict=True):
            assert a.seeds == b.seeds
            for x, y in zip(a.arrays, b.arrays, strict=True):
                assert np.abs(x - y).max() < 5e-3


def test_settings_reach_the_pipeline_pool(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from core.config import Settings
    from workers.context import StageContext

    for key, value in {
        "IPBATCH_HOME": str(tmp_path),
        "IPBATCH_COMPILE": "true",
        "IPBATCH_CHANNELS_LAST": "false",
        "IPBATCH_VAE_SLICING_ABOVE": "4",
        "IPBATCH_BATCH_IMAGES": "6",
    }.items():
        monkeypatch.setenv(key, value)
    ctx = StageContext.create(Settings(), mode="local")
    try:
        assert ctx.generators.acceleration == Acceleration(
            channels_last=False, compile=True, vae_slicing_above=4, max_images=6
        )
    finally:
        ctx.close()
