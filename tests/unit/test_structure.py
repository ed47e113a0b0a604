"""Structure, regions and source images: ControlNet (single, multi, SDXL), regional IP-Adapter
masks, img2img and inpainting. A row batched next to rows with other inputs, strengths and
step windows equals its solo run through diffusers' own pipeline, built and called as the
diffusers docs show (float64: no rounding hides a mistake); a row given another row's input
does not. Plus the traps: lists shorter than the batch, inpainting with several images per
row, from_pipe and the warm pipeline's dtype."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

import diffusers
import numpy as np
import pytest
import torch
from diffusers.image_processor import IPAdapterMaskProcessor
from PIL import Image, ImageDraw

from core.errors import ItemError
from pipeline.generator import Generator
from pipeline.models import ModelSource
from pipeline.presets import ADAPTERS, CONTROLNETS
from pipeline.requests import AdapterInput, ControlInput, GenerationRequest

# equality with diffusers' own pipelines, number for number: torch's business, not the
# interpreter's; Python 3.12 runs the rest (`make test-py312`)
pytestmark = pytest.mark.numerics

CPU = torch.device("cpu")
F64 = torch.float64
# Computed in float64, returned as float32 arrays: a few float32 ulps (6e-8 near 0.5) is the
# resolution; a layout mistake shows as ~1e-2.
EXACT = 1e-6


def picture(seed: int, size: tuple[int, int] = (80, 72)) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray((rng.random((size[1], size[0], 3)) * 255).astype(np.uint8))


def half_mask(left: bool, size: tuple[int, int] = (64, 64)) -> Image.Image:
    mask = Image.new("L", size, 0)
    box = (0, 0, size[0] // 2, size[1]) if left else (size[0] // 2, 0, size[0], size[1])
    ImageDraw.Draw(mask).rectangle(box, fill=255)
    return mask


def embeds(generator: Generator, adapter_index: int, seed: int, refs: int = 1) -> torch.Tensor:
    """A random embedding the adapter's projection takes, [refs, ...]."""
    shape, _ = generator._projection_shapes[adapter_index]
    g = torch.Generator().manual_seed(seed)
    return torch.randn(refs, *[65 if d == -1 else d for d in shape], generator=g)


def row(generator: Generator, i: int, **fields: Any) -> GenerationRequest:
    adapters = fields.pop("adapters", None)
    if adapters is None:
        pos = embeds(generator, 0, 100 + i)
        adapters = [AdapterInput(generator.adapters[0], 0.5 + 0.1 * i, pos, torch.zeros_like(pos))]
    base = {
        "prompt": f"product {i}",
        "negative_prompt": "",
        "adapters": adapters,
        "num_images": 1,
        "seed": 40 + 7 * i,
        "steps": 3,
        "guidance_scale": 6.0,
        "width": 64,
        "height": 64,
    }
    return GenerationRequest(**(base | fields))


def reference_pipeline(
    models: ModelSource, adapters: tuple[str, ...], mode: str, nets: tuple[str, ...]
) -> Any:
    """diffusers' own pipeline for the mode, from the folders, as the docs load it."""
    family = ADAPTERS[adapters[0]].family
    names = {
        ("text", False): "", ("img2img", False): "Img2Img", ("inpaint", False): "Inpaint",
        ("text", True): "ControlNet", ("img2img", True): "ControlNetImg2Img",
        ("inpaint", True): "ControlNetInpaint",
    }  # fmt: skip
    prefix = "StableDiffusionXL" if family == "sdxl" else "StableDiffusion"
    cls = getattr(diffusers, f"{prefix}{names[(mode, bool(nets))]}Pipeline")
    extra: dict[str, Any] = {}
    if family == "sd15":
        extra |= {"safety_checker": None, "requires_safety_checker": False}
    if nets:
        by_name = {
            n: diffusers.ControlNetModel.from_pretrained(
                models.controlnet(n), variant=CONTROLNETS[n].variant, dtype=F64
            )
            for n in set(nets)
        }
        loaded = [by_name[n] for n in nets]  # a net named twice: one model at two positions
        extra["controlnet"] = loaded[0] if len(loaded) == 1 else loaded
    pipe = cls.from_pretrained(models.base_model(family), dtype=F64, **extra)
    pipe.set_progress_bar_config(disable=True)
    weights = [models.adapter_weights(ADAPTERS[a]) for a in adapters]
    pipe.load_ip_adapter(
        [w[0] for w in weights],
        subfolder=[w[1] for w in weights],
        weight_name=[w[2] for w in weights],
        image_encoder_folder=None,
    )
    return pipe


def solo(pipe: Any, r: GenerationRequest) -> np.ndarray:
    """The row through diffusers' pipeline, the docs' way: its scale set, its embeds ([neg,
    pos] for CFG), its control image and strengths, its masks as IPAdapterMaskProcessor
    makes them, its init image / mask as given."""
    scales = [a.scale for a in r.adapters]
    pipe.set_ip_adapter_scale(scales if len(scales) > 1 else scales[0])
    ip = [torch.stack([a.neg, a.pos]).to(F64) for a in r.adapters]
    arguments: dict[str, Any] = {}
    if any(a.regions for a in r.adapters):
        masks = []
        for a in r.adapters:
            if not a.regions:
                masks.append(None)
                continue
            m = IPAdapterMaskProcessor().preprocess(a.regions, height=64, width=64)
            m = m.reshape(1, m.shape[0], 64, 64)
            masks.append(m.repeat(1, a.pos.shape[0], 1, 1) if m.shape[1] < a.pos.shape[0] else m)
        arguments["cross_attention_kwargs"] = {"ip_adapter_masks": masks}
    if r.controls:
        several = len(r.controls) > 1
        name = "control_image" if r.mode != "text" else "image"
        images = [c.image for c in r.controls]
        arguments[name] = images if several else images[0]
        arguments["controlnet_conditioning_scale"] = (
            [c.scale for c in r.controls] if several else r.controls[0].scale
        )
        arguments["control_guidance_start"] = (
            [c.start for c in r.controls] if several else r.controls[0].start
        )
        arguments["control_guidance_end"] = (
            [c.end for c in r.controls] if several else r.controls[0].end
        )
    if r.init_image is not None:
        arguments["image"] = r.init_image
        arguments["strength"] = r.strength
    if r.mask is not None:
        arguments["mask_image"] = r.mask
    if r.mode != "img2img":
        arguments |= {"width": 64, "height": 64}
    return pipe(
        prompt=r.prompt,
        ip_adapter_image_embeds=ip,
        num_inference_steps=r.steps,
        guidance_scale=r.guidance_scale,
        generator=torch.Generator().manual_seed(r.seed),
        output_type="np",
        **arguments,
    ).images[0]


def check_rows(
    models: ModelSource, generator: Generator, rows: list[GenerationRequest]
) -> list[np.ndarray]:
    """Batched, each row equals its solo run in diffusers; returns the batched images."""
    batched = [r.arrays[0] for r in generator.generate_batch(rows)]
    first = rows[0]
    pipe = reference_pipeline(
        models, generator.adapters, first.mode, tuple(c.model for c in first.controls)
    )
    for r, mine in zip(rows, batched, strict=True):
        theirs = solo(pipe, r)
        assert np.abs(mine - theirs).max() < EXACT, (r.prompt, np.abs(mine - theirs).max())
    return batched


@pytest.fixture(scope="module")
def models(tiny_models: Path) -> ModelSource:
    return ModelSource.parse(str(tiny_models))


def test_controlnet_rows_with_their_own_images_scales_and_windows(models: ModelSource) -> None:
    generator = Generator(models, ("sd15",), device=CPU, dtype=F64)
    windows = [(1.0, 0.0, 1.0), (0.6, 0.2, 0.8), (1.4, 0.0, 0.5)]
    rows = [
        row(generator, i, controls=(ControlInput("sd15-canny", picture(i), *window),))
        for i, window in enumerate(windows)
    ]
    batched = check_rows(models, generator, rows)
    # a row given another row's control image does not make its image
    swapped = replace(rows[1], controls=(replace(rows[1].controls[0], image=picture(0)),))
    assert np.abs(generator.generate(swapped).arrays[0] - batched[1]).max() > 1e-5
    # three strengths, one call: the scales are per slot, not in batch_key
    assert len({r.adapters[0].scale for r in rows}) == 3
    assert generator.pipe.unet.dtype == F64  # from_pipe left the warm pipeline's dtype alone


def test_two_controlnets_in_one_call(models: ModelSource) -> None:
    generator = Generator(models, ("sd15",), device=CPU, dtype=F64)
    rows = [
        row(
            generator,
            i,
            controls=(
                ControlInput("sd15-canny", picture(i), 0.8 + 0.2 * i, 0.0, 1.0),
                ControlInput("sd15-depth", picture(10 + i), 0.5, 0.0, 0.6 + 0.2 * i),
            ),
        )
        for i in range(2)
    ]
    check_rows(models, generator, rows)


def test_the_same_controlnet_twice_in_one_row(models: ModelSource) -> None:
    """Two canny maps at two scales and windows: one module at two positions of the
    MultiControlNet. Each position keeps its own scale, window and step count, batched (and
    alone on the slot path a compiled pipeline takes) as in diffusers' MultiControlNet of the
    same model twice."""
    generator = Generator(models, ("sd15",), device=CPU, dtype=F64)
    rows = [
        row(
            generator,
            i,
            controls=(
                ControlInput("sd15-canny", picture(i), 1.2 - 0.3 * i, 0.0, 0.7),
                ControlInput("sd15-canny", picture(20 + i), 0.4 + 0.2 * i, 0.3, 1.0),
            ),
        )
        for i in range(2)
    ]
    check_rows(models, generator, rows)
    pipe = reference_pipeline(models, ("sd15",), "text", ("sd15-canny", "sd15-canny"))
    alone = generator._generate_slots(rows[:1])[0].arrays[0]
    assert np.abs(alone - solo(pipe, rows[0])).max() < EXACT
    # both positions are back as they were: the next call (one map) runs unwrapped
    nets = generator._pipe_of(rows[0]).controlnet.nets
    assert nets[0] is nets[1] and "forward" not in vars(nets[0])


def test_sdxl_controlnet(models: ModelSource) -> None:
    generator = Generator(models, ("sdxl",), device=CPU, dtype=F64)
    rows = [
        row(generator, i, controls=(ControlInput("sdxl-depth", picture(i), 0.7 + 0.3 * i),))
        for i in range(2)
    ]
    check_rows(models, generator, rows)


def test_sdxl_img2img_and_inpaint_with_controlnet(models: ModelSource) -> None:
    generator = Generator(models, ("sdxl",), device=CPU, dtype=F64)
    img2img = [
        row(generator, i, init_image=picture(90 + i, (64, 64)), strength=0.7) for i in range(2)
    ]
    check_rows(models, generator, img2img)
    inpaint = [
        row(
            generator,
            i,
            init_image=picture(92 + i, (64, 64)),
            mask=half_mask(i == 0),
            strength=1.0,
            controls=(ControlInput("sdxl-canny", picture(i), 0.5 + 0.5 * i),),
        )
        for i in range(2)
    ]
    check_rows(models, generator, inpaint)


def test_regions_one_adapter_per_row_masks_and_strengths(models: ModelSource) -> None:
    generator = Generator(models, ("sd15",), device=CPU, dtype=F64)
    rows = []
    for i in range(3):
        pos = embeds(generator, 0, 100 + i)
        adapter = AdapterInput(
            "sd15", 0.4 + 0.3 * i, pos, torch.zeros_like(pos), regions=[half_mask(i % 2 == 0)]
        )
        rows.append(row(generator, i, adapters=[adapter]))
    batched = check_rows(models, generator, rows)
    flipped = replace(rows[0], adapters=[replace(rows[0].adapters[0], regions=[half_mask(False)])])
    assert np.abs(generator.generate(flipped).arrays[0] - batched[0]).max() > 1e-5


def test_regions_two_adapters_and_several_references(models: ModelSource) -> None:
    generator = Generator(models, ("sd15-plus", "sd15"), device=CPU, dtype=F64)
    rows = []
    for i in range(2):
        plus = embeds(generator, 0, 200 + i, refs=2)  # two references, concatenated
        base = embeds(generator, 1, 300 + i)
        rows.append(
            row(
                generator,
                i,
                adapters=[
                    AdapterInput(
                        "sd15-plus",
                        0.6,
                        plus,
                        torch.zeros_like(plus),
                        regions=[half_mask(True), half_mask(False)],
                    ),
                    AdapterInput(
                        "sd15",
                        0.5 + 0.2 * i,
                        base,
                        torch.zeros_like(base),
                        regions=[half_mask(i == 0)],
                    ),
                ],
            )
        )
    check_rows(models, generator, rows)


def test_img2img_rows_with_their_own_init_images(models: ModelSource) -> None:
    generator = Generator(models, ("sd15",), device=CPU, dtype=F64)
    rows = [row(generator, i, init_image=picture(50 + i, (64, 64)), strength=0.6) for i in range(3)]
    batched = check_rows(models, generator, rows)
    other = replace(rows[2], init_image=rows[0].init_image)
    assert np.abs(generator.generate(other).arrays[0] - batched[2]).max() > 1e-5


@pytest.mark.parametrize("control", [False, True])
def test_inpaint_rows_with_their_own_masks(models: ModelSource, control: bool) -> None:
    generator = Generator(models, ("sd15",), device=CPU, dtype=F64)
    rows = [
        row(
            generator,
            i,
            init_image=picture(60 + i, (64, 64)),
            mask=half_mask(i == 0),
            strength=1.0,
            controls=(ControlInput("sd15-canny", picture(i)),) if control else (),
        )
        for i in range(2)
    ]
    batched = check_rows(models, generator, rows)
    other = replace(rows[0], mask=rows[1].mask)
    assert np.abs(generator.generate(other).arrays[0] - batched[0]).max() > 1e-5


def test_inpainting_several_images_keeps_seed_plus_k(models: ModelSource) -> None:
    """diffusers encodes a single init image with the first generator only; ipbatch gives it
    once per image, so image k of a row is the image of seed + k, as everywhere else."""
    generator = Generator(models, ("sd15",), device=CPU, dtype=F64)
    three = row(
        generator,
        0,
        init_image=picture(70, (64, 64)),
        mask=half_mask(True),
        strength=0.7,
        num_images=3,
    )
    images = generator.generate(three).arrays
    for k in range(3):
        alone = generator.generate(replace(three, seed=three.seed + k, num_images=1)).arrays[0]
        assert np.abs(images[k] - alone).max() < EXACT, k
    # batched next to another row, the same
    other = row(generator, 1, init_image=picture(71, (64, 64)), mask=half_mask(False), strength=0.7)
    batched = generator.generate_batch([three, other])[0].arrays
    for k in range(3):
        assert np.abs(batched[k] - images[k]).max() < EXACT


def test_a_per_slot_list_of_the_wrong_length_is_refused(models: ModelSource) -> None:
    """diffusers' img2img silently tiles a short list of init images ([A, B, A, B] for four
    images); ipbatch refuses a call whose per-slot lists do not match its slots."""
    generator = Generator(models, ("sd15",), device=CPU, dtype=F64)
    rows = [row(generator, i, init_image=picture(80 + i, (64, 64)), strength=0.5) for i in range(2)]
    real = generator._call_arguments

    def short(pipe: Any, shared: Any, inputs: Any, **kwargs: Any) -> Any:
        inputs.init_images = inputs.init_images[:1]
        return real(pipe, shared, inputs, **kwargs)

    generator._call_arguments = short  # type: ignore[method-assign]
    with pytest.raises(ItemError, match="1 init images for 2 slots"):
        generator.generate_batch(rows)


def test_from_pipe_shares_the_warm_modules_and_keeps_their_dtype(models: ModelSource) -> None:
    generator = Generator(models, ("sd15",), device=CPU, dtype=F64)
    r = row(
        generator,
        0,
        controls=(ControlInput("sd15-canny", picture(1)),),
        init_image=picture(2, (64, 64)),
        mask=half_mask(True),
        strength=1.0,
    )
    generator.generate(r)
    pipe = generator.pipe_for(r.mode, tuple(c.model for c in r.controls))
    assert pipe is not generator.pipe and pipe.unet is generator.pipe.unet
    assert pipe.vae is generator.pipe.vae and pipe.text_encoder is generator.pipe.text_encoder
    assert {p.dtype for p in generator.pipe.unet.parameters()} == {F64}
    assert {p.dtype for p in pipe.controlnet.parameters()} == {F64}


def test_four_scales_run_in_as_many_calls_as_one(models: ModelSource) -> None:
    """Rows that differ only in their IP-Adapter scale and ControlNet scale/start/end fill the
    same batches as rows that all share one scale; InstantStyle dicts still split them."""
    from pipeline.manifest import Row
    from pipeline.requests import build_request
    from workers.stages.generate import Prepared, plan_batches

    generator = Generator(models, ("sd15",), device=CPU, dtype=torch.float32)

    def prepared(i: int, scale: Any, control: dict[str, float]) -> Prepared:
        row = Row.model_validate(
            {
                "id": f"r{i}",
                "reference": "ref.png",
                "scale": scale,
                "control": [{"model": "sd15-canny", "image": "c.png", **control}],
                "steps": 2,
                "width": 64,
                "height": 64,
            }
        )
        pos = embeds(generator, 0, i)
        pixels = torch.from_numpy(np.asarray(picture(i, (64, 64))).copy())
        request = build_request(
            row,
            [[{"pos": pos, "neg": torch.zeros_like(pos)}]],
            {("control", 0, 0): {"pixels": pixels}},
        )
        return Prepared(i, "job", row, "/out", [], request, ())

    one = [prepared(i, 0.5, {}) for i in range(8)]
    four = [
        prepared(
            i,
            [0.2, 0.4, 0.6, 0.8][i % 4],
            {"scale": [0.5, 1.0, 1.5, 2.0][i % 4], "end": [1.0, 0.9, 0.7, 0.5][i % 4]},
        )
        for i in range(8)
    ]
    assert len(plan_batches(one, max_images=4)) == len(plan_batches(four, max_images=4)) == 2
    styled = [prepared(i, {"up": [0.2, 0.4, 0.6, 0.8][i % 4]}, {}) for i in range(8)]
    assert len(plan_batches(styled, max_images=4)) == 4  # one InstantStyle dict per batch key

    calls: list[int] = []
    real = generator._generate_slots

    def counted(requests: Any) -> Any:
        calls.append(len(requests))
        return real(requests)

    generator._generate_slots = counted  # type: ignore[method-assign]
    for batch in plan_batches(four, max_images=4):
        generator.generate_batch([p.request for p in batch])
    assert calls == [4, 4]  # one diffusers call per batch


@pytest.mark.parametrize("name", sorted(CONTROLNETS))
def test_every_controlnet_preset_is_written_in_its_repository_layout(
    models: ModelSource, name: str
) -> None:
    """`ipbatch models tiny` writes each preset where the real weights go, in the file the
    real repository ships (fp16 where only that exists), loadable by diffusers as documented,
    shaped for its base model, and with output layers that are not zero (a fresh ControlNet's
    are, and would change nothing)."""
    preset = CONTROLNETS[name]
    folder = Path(models.controlnet(name))
    assert folder.name == preset.repo.hub_repo.split("/")[-1]
    weights = "diffusion_pytorch_model" + (f".{preset.variant}" if preset.variant else "")
    assert (folder / f"{weights}.safetensors").is_file() and (folder / "config.json").is_file()
    base = Path(models.base_model(preset.family))
    if preset.family == "flux":  # FluxControlNetModel, made from the transformer
        net = diffusers.FluxControlNetModel.from_pretrained(folder)
        transformer = diffusers.FluxTransformer2DModel.from_pretrained(base / "transformer")
        assert net.config.joint_attention_dim == transformer.config.joint_attention_dim
        outputs = [*net.controlnet_blocks, *net.controlnet_single_blocks]
        assert all(torch.count_nonzero(block.weight) for block in outputs)
        return
    net = diffusers.ControlNetModel.from_pretrained(folder, variant=preset.variant)
    unet = diffusers.UNet2DConditionModel.from_pretrained(base / "unet")
    assert net.config.cross_attention_dim == unet.config.cross_attention_dim
    assert all(torch.count_nonzero(block.weight) for block in net.controlnet_down_blocks)
    assert torch.count_nonzero(net.controlnet_mid_block.weight)


def _drawn(background: tuple[int, int, int, int]) -> Image.Image:
    """A mask as a person draws one: a white stripe (a quarter of the picture) on a transparent
    layer whose pixels are `background`."""
    image = Image.new("RGBA", (64, 64), background)
    ImageDraw.Draw(image).rectangle((0, 16, 63, 31), fill=(255, 255, 255, 255))
    return image


def _prepared_mask(image: Image.Image) -> Image.Image:
    """The mask as the embed stage prepares and caches it, and generate reads it back."""
    import io

    from pipeline.inputs import prepare, to_image

    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    prepared = prepare(
        buffer.getvalue(), "mask", name="mask.png", max_pixels=10**6, max_bytes=10**7
    )
    return to_image(prepared)


def test_masks_drawn_on_transparency_select_only_what_is_drawn(models: ModelSource) -> None:
    """inpaint_mask and region: transparent pixels are not selected (black). diffusers reads the
    usual transparent-black PNG that way; a transparent-white layer reads the same here. (Read
    on white, the rule for pictures, both selected everything: the whole image repainted, the
    adapter everywhere.)"""
    black, white = _drawn((0, 0, 0, 0)), _drawn((255, 255, 255, 0))
    mask = _prepared_mask(black)
    assert (np.asarray(mask) > 127).mean() == 0.25  # the stripe, and nothing else
    assert np.array_equal(np.asarray(mask), np.asarray(_prepared_mask(white)))
    generator = Generator(models, ("sd15",), device=CPU, dtype=F64)
    # inpainting: diffusers' inpaint pipeline given the drawn PNG, as its docs pass a mask
    inpaint = row(generator, 0, init_image=picture(90, (64, 64)), mask=mask, strength=1.0)
    pipe = reference_pipeline(models, ("sd15",), "inpaint", ())
    theirs = solo(pipe, replace(inpaint, mask=black))
    assert np.abs(generator.generate(inpaint).arrays[0] - theirs).max() < EXACT
    # a region: IPAdapterMaskProcessor given the drawn PNG
    spec = row(generator, 1).adapters[0]
    regional = row(generator, 1, adapters=[replace(spec, regions=[mask])])
    pipe = reference_pipeline(models, ("sd15",), "text", ())
    theirs = solo(pipe, replace(regional, adapters=[replace(spec, regions=[black])]))
    assert np.abs(generator.generate(regional).arrays[0] - theirs).max() < EXACT
