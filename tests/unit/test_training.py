"""Training an adapter (pipeline/training.py, pipeline/adapter_weights.py) on the tiny models.

What is checked against something independent: the parameter count against the paper's 22M
(the exact figure for SD1.5's real shapes), the exported file against diffusers'
`load_ip_adapter` and against tencent's loading code (written out here, as in
tencent-ailab/IP-Adapter's `ip_adapter.py`), the frozen UNet against a copy taken before.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from diffusers import DDPMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from PIL import Image
from safetensors.torch import load as load_safetensors
from safetensors.torch import load_file, save, save_file
from transformers import CLIPVisionConfig

from pipeline.adapter_weights import ProjectionShape, from_h94, install, to_h94
from pipeline.embedder import ClipEmbedder
from pipeline.presets import EmbedKind, Projection
from pipeline.train_schema import TrainSettings
from pipeline.training import (
    AdapterTrainer,
    Example,
    TrainingEncoders,
    load_trainer,
    training_crop,
)

CPU = torch.device("cpu")


def _base(models: Path) -> str:
    return str(models / "stable-diffusion-v1-5")


@pytest.fixture(scope="module")
def encoders(tiny_models: Path) -> TrainingEncoders:
    return TrainingEncoders(_base(tiny_models), device=CPU, local_files_only=True)


@pytest.fixture(scope="module")
def examples(tiny_models: Path, encoders: TrainingEncoders) -> list[Example]:
    """16 rows, one caption for all: a two-colour picture each, and its CLIP image embedding
    (the tiny ViT-H stand-in), its own reference. Only the image tells the rows apart, so the
    adapter lowers the loss below the image-dropped one only by reading it."""
    clip = ClipEmbedder(
        str(tiny_models / "IP-Adapter/models/image_encoder"),
        str(tiny_models / "stable-diffusion-v1-5/feature_extractor"),
        device=CPU,
        dtype=torch.float32,
    )
    rng = np.random.default_rng(0)
    rows = []
    for _ in range(16):
        colour = rng.integers(0, 255, 3)
        pixels = np.zeros((64, 64, 3), np.uint8)
        pixels[:] = colour
        pixels[16:48, 16:48] = 255 - colour
        picture = Image.fromarray(pixels)
        latent = encoders.latent(picture, 64)
        embedding = clip.embed(picture, EmbedKind.CLIP_IMAGE_EMBEDS)
        text = encoders.text("a product")["text"]
        rows.append(Example(latent["mean"], latent["std"], text, embedding.pos, embedding.neg))
    return rows


def _trainer(
    models: Path,
    encoders: TrainingEncoders,
    *,
    init: dict[str, Any] | None = None,
    loss_scale: float = 2.0**16,
    **settings: Any,
) -> AdapterTrainer:
    unet = UNet2DConditionModel.from_pretrained(_base(models), subfolder="unet")
    scheduler = DDPMScheduler.from_pretrained(_base(models), subfolder="scheduler")
    encoder = CLIPVisionConfig.from_pretrained(models / "IP-Adapter/models/image_encoder")
    shape = (
        ProjectionShape.of_file(init)
        if init is not None
        else ProjectionShape.fresh(Projection.LINEAR, unet, encoder)
    )
    return AdapterTrainer(
        unet,
        scheduler,
        shape=shape,
        settings=TrainSettings(**{"batch_size": 4, "learning_rate": 1e-2} | settings),
        uncond_text=encoders.text("")["text"],
        init_weights=init,
        vae_scaling_factor=encoders.scaling_factor,
        loss_scale=loss_scale,
    )


SD15_UNET = {  # stable-diffusion-v1-5/unet/config.json, as published
    "sample_size": 64,
    "in_channels": 4,
    "out_channels": 4,
    "down_block_types": ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
    "up_block_types": ["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3,
    "block_out_channels": [320, 640, 1280, 1280],
    "layers_per_block": 2,
    "cross_attention_dim": 768,
    "attention_head_dim": 8,
}


@pytest.mark.parametrize(
    ("shape", "expected"),
    [
        (ProjectionShape(Projection.LINEAR, 768, 1024), 22_319_616),  # the paper's "22M"
        (ProjectionShape(Projection.RESAMPLER, 768, 1280, 768, 16), 49_087_488),  # plus
    ],
)
def test_trainable_parameters_of_real_sd15_shapes(shape: ProjectionShape, expected: int) -> None:
    from pipeline.adapter_weights import freeze_all_but_adapter

    with torch.device("meta"):  # real sizes, no memory
        unet = UNet2DConditionModel(**SD15_UNET)
        install(unet, shape)
    trainable = freeze_all_but_adapter(unet)
    assert sum(p.numel() for p in trainable.values()) == expected
    # 2 x 768 x (5*320 + 5*640 + 6*1280) key/value weights, the rest is the projection
    kv = sum(p.numel() for name, p in trainable.items() if "_ip." in name)
    assert kv == 2 * 768 * (5 * 320 + 5 * 640 + 6 * 1280)


def test_only_the_adapter_trains(tiny_models: Path, encoders: TrainingEncoders, examples) -> None:
    trainer = _trainer(tiny_models, encoders)
    unet = trainer.unet
    processors = [p for p in unet.attn_processors.values() if hasattr(p, "to_k_ip")]
    assert len(processors) == 16  # every cross-attention layer of the tiny SD1.5
    # the paper's init: k/v copied from the text branch, in storage of their own
    for name, processor in zip(
        [n for n in unet.attn_processors if n.endswith("attn2.processor")], processors, strict=True
    ):
        attn = unet.get_submodule(name.removesuffix(".processor"))
        assert torch.equal(processor.to_k_ip[0].weight, attn.to_k.weight)
        assert processor.to_k_ip[0].weight.data_ptr() != attn.to_k.weight.data_ptr()
    frozen = {
        k: v.clone()
        for k, v in unet.state_dict().items()
        if "_ip." not in k and not k.startswith("encoder_hid_proj")
    }
    adapter_before = {k: p.detach().clone() for k, p in trainer.parameters.items()}
    assert set(trainer.parameters) == {
        name
        for name, _ in unet.named_parameters()
        if "_ip." in name or name.startswith("encoder_hid_proj")
    }
    assert trainer.trainable_count == trainer.adapter_count == 50_368
    for _ in range(3):
        trainer.train_step(examples)
    after = unet.state_dict()
    assert all(torch.equal(frozen[k], after[k]) for k in frozen), "a frozen weight moved"
    assert all(not torch.equal(adapter_before[k], p) for k, p in trainer.parameters.items()), (
        "every adapter tensor learns"
    )


def _fixed_draws(trainer: AdapterTrainer, examples: list[Example], n: int) -> list[dict]:
    """Batches drawn once, with no drops: the same inputs measured before and after."""
    state = trainer.rng.get_state()
    trainer.rng.manual_seed(1234)
    draws = []
    for _ in range(n):
        draw = trainer._draw(examples)
        draw["no_image"] = torch.zeros_like(draw["no_image"])
        draw["no_text"] = torch.zeros_like(draw["no_text"])
        draws.append(draw)
    trainer.rng.set_state(state)
    return draws


@torch.no_grad()
def _mean_loss(trainer: AdapterTrainer, draws: list[dict], *, no_image: bool = False) -> float:
    return float(np.mean([float(trainer.loss(d, force_no_image=no_image)) for d in draws]))


def test_overfitting_lowers_the_loss_and_uses_the_image(
    tiny_models: Path, encoders: TrainingEncoders, examples
) -> None:
    trainer = _trainer(tiny_models, encoders, batch_size=8, learning_rate=3e-2)
    draws = _fixed_draws(trainer, examples, 6)
    before = _mean_loss(trainer, draws)
    for _ in range(60):
        trainer.train_step(examples)
    after = _mean_loss(trainer, draws)
    without_image = _mean_loss(trainer, draws, no_image=True)
    assert after < 0.95 * before, (before, after)
    assert after < without_image, (after, without_image)  # the adapter reads the image


def test_drops_follow_the_recipe(tiny_models: Path, encoders: TrainingEncoders, examples) -> None:
    """One u per sample: < 0.05 image only, < 0.10 text only, < 0.15 both."""
    trainer = _trainer(tiny_models, encoders, batch_size=1000)
    draw = trainer._draw(examples)
    no_image, no_text = draw["no_image"], draw["no_text"]
    image_only = float((no_image & ~no_text).float().mean())
    text_only = float((no_text & ~no_image).float().mean())
    both = float((no_image & no_text).float().mean())
    for fraction in (image_only, text_only, both):
        assert 0.03 < fraction < 0.07, (image_only, text_only, both)


def test_a_fresh_adapter_depends_on_the_seed_only(
    tiny_models: Path, encoders: TrainingEncoders
) -> None:
    torch.manual_seed(1)  # the global generator must not matter
    a = _trainer(tiny_models, encoders, seed=3)
    torch.manual_seed(2)
    b = _trainer(tiny_models, encoders, seed=3)
    c = _trainer(tiny_models, encoders, seed=4)
    assert all(torch.equal(p, b.parameters[n]) for n, p in a.parameters.items())
    assert not all(torch.equal(p, c.parameters[n]) for n, p in a.parameters.items())


def test_a_resumed_run_matches_an_uninterrupted_one(
    tiny_models: Path, encoders: TrainingEncoders, examples
) -> None:
    straight = _trainer(tiny_models, encoders, seed=7)
    for _ in range(6):
        straight.train_step(examples)
    checkpoint = save(straight.state())  # through the file format a checkpoint uses
    losses = [straight.train_step(examples).loss for _ in range(6)]

    resumed = _trainer(tiny_models, encoders, seed=7)
    resumed.load_state(load_safetensors(checkpoint))
    assert resumed.step == 6
    assert [resumed.train_step(examples).loss for _ in range(6)] == losses
    for name, param in straight.parameters.items():
        assert torch.equal(param, resumed.parameters[name]), name  # bitwise on the CPU


@pytest.mark.parametrize(
    "weight_name", ["ip-adapter_sd15.safetensors", "ip-adapter-plus_sd15.safetensors"]
)
def test_published_files_round_trip(tiny_models: Path, weight_name: str) -> None:
    published = load_file(tiny_models / "IP-Adapter/models" / weight_name)
    unet = UNet2DConditionModel.from_pretrained(_base(tiny_models), subfolder="unet")
    shape = ProjectionShape.of_file(published)
    install(unet, shape)
    from_h94(unet, shape, published)
    again = to_h94(unet, shape, torch.float32)
    assert again.keys() == published.keys()
    assert all(torch.equal(again[k], published[k]) for k in published)


class _TencentImageProjModel(torch.nn.Module):
    """tencent-ailab/IP-Adapter ip_adapter/ip_adapter.py ImageProjModel, as published."""

    def __init__(self, cross_attention_dim: int, clip_embeddings_dim: int, tokens: int = 4):
        super().__init__()
        self.cross_attention_dim = cross_attention_dim
        self.clip_extra_context_tokens = tokens
        self.proj = torch.nn.Linear(clip_embeddings_dim, tokens * cross_attention_dim)
        self.norm = torch.nn.LayerNorm(cross_attention_dim)

    def forward(self, image_embeds: torch.Tensor) -> torch.Tensor:
        tokens = self.proj(image_embeds).reshape(
            -1, self.clip_extra_context_tokens, self.cross_attention_dim
        )
        return self.norm(tokens)


class _TencentIPAttnProcessor(torch.nn.Module):
    """The weights of tencent's IPAttnProcessor2_0 (to_k_ip / to_v_ip, no bias)."""

    def __init__(self, hidden_size: int, cross_attention_dim: int) -> None:
        super().__init__()
        self.to_k_ip = torch.nn.Linear(cross_attention_dim, hidden_size, bias=False)
        self.to_v_ip = torch.nn.Linear(cross_attention_dim, hidden_size, bias=False)


def test_exported_adapter_loads_in_diffusers_and_in_tencents_code(
    tiny_models: Path, encoders: TrainingEncoders, examples, tmp_path: Path
) -> None:
    trainer = _trainer(tiny_models, encoders)
    for _ in range(3):
        trainer.train_step(examples)
    exported = to_h94(trainer.unet, trainer.shape, torch.float32)
    save_file(exported, str(tmp_path / "adapter.safetensors"))

    # diffusers, as its docs load an adapter: the weights land bitwise
    base = _base(tiny_models)
    pipe = StableDiffusionPipeline.from_pretrained(base, safety_checker=None)
    pipe.load_ip_adapter(
        str(tmp_path), subfolder="", weight_name="adapter.safetensors", image_encoder_folder=None
    )
    loaded = dict(pipe.unet.named_parameters())
    for name, param in trainer.parameters.items():
        assert torch.equal(loaded[name], param.detach()), name

    # and the images: the in-memory adapter vs the file (same VAE, text encoder, scheduler)
    trainer.unet.eval()
    memory = StableDiffusionPipeline.from_pretrained(base, unet=trainer.unet, safety_checker=None)
    image = examples[0].image
    embeds = [torch.stack([torch.zeros_like(image), image])]
    images = [
        p(
            prompt="a product",
            ip_adapter_image_embeds=embeds,
            num_inference_steps=3,
            generator=torch.Generator().manual_seed(5),
            output_type="np",
        ).images[0]
        for p in (memory, pipe)
    ]
    np.testing.assert_allclose(images[0], images[1], atol=1e-5)

    # tencent's code: load_state_dict(strict=True) of image_proj and of the ip layers
    cad = 32
    proj = _TencentImageProjModel(cad, clip_embeddings_dim=40)
    image_proj = {
        k.removeprefix("image_proj."): v for k, v in exported.items() if "image_proj." in k
    }
    proj.load_state_dict(image_proj, strict=True)
    [ours] = trainer.unet.encoder_hid_proj.image_projection_layers
    with torch.no_grad():
        torch.testing.assert_close(proj(image), ours(image))
    layers = torch.nn.ModuleList(
        _TencentIPAttnProcessor(
            pipe.unet.get_submodule(name.removesuffix(".processor")).to_k.out_features, cad
        )
        if name.endswith("attn2.processor")
        else torch.nn.Module()
        for name in pipe.unet.attn_processors
    )
    ip = {k.removeprefix("ip_adapter."): v for k, v in exported.items() if "ip_adapter." in k}
    layers.load_state_dict(ip, strict=True)


def test_fp16_export_is_what_h94_ships(tiny_models: Path, encoders: TrainingEncoders) -> None:
    trainer = _trainer(tiny_models, encoders)
    exported = to_h94(trainer.unet, trainer.shape, torch.float16)
    assert {v.dtype for v in exported.values()} == {torch.float16}
    data = save(exported)
    assert load_safetensors(io.BytesIO(data).getvalue()).keys() == exported.keys()


def _load(models: Path, encoders: TrainingEncoders, **settings: Any) -> AdapterTrainer:
    """A trainer as the training stage loads it (`load_trainer`: its choice of UNet dtype)."""
    return load_trainer(
        _base(models),
        image_encoder_folder=str(models / "IP-Adapter/models/image_encoder"),
        projection=Projection.LINEAR,
        settings=TrainSettings(**{"batch_size": 8, "seed": 1} | settings),
        encoders=encoders,
        init=None,
        device=CPU,
        local_files_only=True,
    )


@pytest.fixture(scope="module")
def latents_32(tiny_models: Path, encoders: TrainingEncoders) -> list[Example]:
    """16 rows with 32x32 latents (256 px): big enough that fp16 flushes small gradients."""
    g = torch.Generator().manual_seed(0)
    width = CLIPVisionConfig.from_pretrained(
        tiny_models / "IP-Adapter/models/image_encoder"
    ).projection_dim
    text = encoders.text("a product")["text"]
    return [
        Example(
            torch.randn(4, 32, 32, generator=g),
            torch.rand(4, 32, 32, generator=g) * 0.1,
            text,
            torch.randn(1, width, generator=g),
            torch.zeros(1, width),
        )
        for _ in range(16)
    ]


def test_fp16_training_scales_the_loss_and_its_gradients_match_fp32(
    tiny_models: Path, encoders: TrainingEncoders, latents_32: list[Example]
) -> None:
    """tencent's script trains through accelerate: an fp32 UNet under fp16 autocast and a
    scaled backward. One step of the same draw in fp32 and in fp16: every adapter gradient
    within 3% of fp32's (per tensor) and none flushed to zero. Unscaled, 94 of the 50,368
    are exactly zero and the worst tensor is 12% off."""
    reference = _load(tiny_models, encoders)
    half = _load(tiny_models, encoders, mixed_precision="fp16")
    reference.train_step(latents_32)
    result = half.train_step(latents_32)
    for name, param in half.parameters.items():
        expected = reference.parameters[name].grad
        assert param.dtype == param.grad.dtype == torch.float32
        flushed = int(((param.grad == 0) & (expected != 0)).sum())
        assert flushed == 0, (name, flushed)
        error = float((param.grad - expected).norm() / expected.norm())
        assert error < 0.03, (name, error)
    assert not result.skipped and half.skipped_steps == 0
    assert half.unet.conv_in.weight.dtype == torch.float32  # the frozen UNet stays fp32


def test_an_fp16_overflow_skips_the_step_and_is_counted(
    tiny_models: Path, encoders: TrainingEncoders, examples: list[Example]
) -> None:
    """A loss scale too big for fp16 (2^40): the gradients overflow, the adapter does not
    move, the step is counted as skipped and the scale halves; a checkpoint keeps both."""
    trainer = _trainer(tiny_models, encoders, mixed_precision="fp16", loss_scale=2.0**40)
    before = {k: p.detach().clone() for k, p in trainer.parameters.items()}
    result = trainer.train_step(examples)
    assert result.skipped and trainer.skipped_steps == 1 and result.step == 1
    assert all(torch.equal(before[k], p) for k, p in trainer.parameters.items())
    assert trainer.scaler.get_scale() == 2.0**39
    resumed = _trainer(tiny_models, encoders, mixed_precision="fp16")
    resumed.load_state(trainer.state())
    assert (resumed.skipped_steps, resumed.scaler.get_scale()) == (1, 2.0**39)


def test_bf16_trains_unscaled_with_the_adapter_in_fp32(
    tiny_models: Path, encoders: TrainingEncoders, examples: list[Example]
) -> None:
    """bf16 has fp32's range: no loss scale. The UNet stays fp32 (autocast runs it in bf16);
    the adapter's parameters, their gradients and AdamW's moments stay fp32."""
    trainer = _load(tiny_models, encoders, mixed_precision="bf16", batch_size=4)
    assert not trainer.scaler.is_enabled() and "scaler.scale" not in trainer.state()
    before = {k: p.detach().clone() for k, p in trainer.parameters.items()}
    result = trainer.train_step(examples)
    assert np.isfinite(result.loss) and not result.skipped
    assert trainer.unet.conv_in.weight.dtype == torch.float32
    assert {p.dtype for p in trainer.parameters.values()} == {torch.float32}
    assert {p.grad.dtype for p in trainer.parameters.values() if p.grad is not None} == {
        torch.float32
    }
    moments = [trainer.optimizer.state[p]["exp_avg"] for p in trainer.parameters.values()]
    assert {m.dtype for m in moments} == {torch.float32}
    assert any(not torch.equal(before[k], p) for k, p in trainer.parameters.items())


def torchvision_resize_and_center_crop(image: Image.Image, size: int) -> Image.Image:
    """tutorial_train.py's `transforms.Resize(size, BILINEAR)` + `CenterCrop(size)` on a PIL
    image, written out from torchvision's source: `functional.resize` ->
    `_compute_resized_output_size` (the longer side `int(size * long / short)`; no resize when
    the size is unchanged), `functional.center_crop` (`int(round((h - size) / 2.0))`)."""
    w, h = image.size
    short, long = (w, h) if w <= h else (h, w)
    new_short, new_long = size, int(size * long / short)
    new_w, new_h = (new_short, new_long) if w <= h else (new_long, new_short)
    if [h, w] != [new_h, new_w]:
        image = image.resize((new_w, new_h), Image.Resampling.BILINEAR)
    crop_top = int(round((new_h - size) / 2.0))
    crop_left = int(round((new_w - size) / 2.0))
    return image.crop((crop_left, crop_top, crop_left + size, crop_top + size))


COCO_SIZES = [  # (width, height): common COCO shapes, both orientations, and a square
    (640, 480), (640, 427), (640, 424), (640, 426), (500, 375), (640, 360), (612, 612),
    (480, 640), (427, 640), (333, 500), (640, 429), (375, 500),
]  # fmt: skip


@pytest.mark.parametrize("resolution", [512, 1024, 64])
def test_the_training_crop_is_torchvisions(resolution: int) -> None:
    for width, height in COCO_SIZES:
        short, long = min(width, height), max(width, height)
        new_long = int(resolution * long / short)
        new_w, new_h = (resolution, new_long) if width <= height else (new_long, resolution)
        left = int(round((new_w - resolution) / 2.0))
        top = int(round((new_h - resolution) / 2.0))
        expected = ((new_w, new_h), (left, top, left + resolution, top + resolution))
        assert training_crop(width, height, resolution) == expected, (width, height)
    # the two the audit found off by one (683 wide; left 127)
    assert training_crop(640, 480, 512)[0] == (682, 512)
    assert training_crop(640, 427, 512)[1][0] == 128


def test_the_training_latent_is_of_torchvisions_crop(encoders: TrainingEncoders) -> None:
    """The VAE sees the pixels of torchvision's Resize + CenterCrop, scaled to [-1, 1] as
    ToTensor + Normalize([0.5], [0.5]) do. 80x57 at 64: torchvision resizes to 89 wide and
    crops from 12 (rounding 12.5 to even); rounding the width gives 90 and 13."""
    rng = np.random.default_rng(5)
    for size in [(80, 57), (57, 80), (64, 64), (96, 64)]:
        picture = Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8))
        crop = torchvision_resize_and_center_crop(picture, 64)
        pixels = torch.from_numpy(np.asarray(crop, dtype=np.float32) / 255.0)
        pixels = ((pixels - 0.5) / 0.5).permute(2, 0, 1)[None]
        with torch.inference_mode():
            expected = encoders.vae.encode(pixels).latent_dist.mean[0]
        torch.testing.assert_close(
            encoders.latent(picture, 64)["mean"], expected, atol=1e-6, rtol=0
        )


def test_gradient_checkpointing_changes_no_result(
    tiny_models: Path, encoders: TrainingEncoders, examples
) -> None:
    plain = _trainer(tiny_models, encoders, seed=2)
    checkpointed = _trainer(tiny_models, encoders, seed=2, gradient_checkpointing=True)
    assert checkpointed.unet.is_gradient_checkpointing
    for _ in range(2):
        assert plain.train_step(examples).loss == pytest.approx(
            checkpointed.train_step(examples).loss, abs=1e-6
        )
    for name, param in plain.parameters.items():
        torch.testing.assert_close(param, checkpointed.parameters[name], atol=1e-6, rtol=0)
