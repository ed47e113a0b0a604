"""Fidelity: ipbatch makes the image the published recipe makes. Each reference side below is
written out from the recipe itself (h94's model cards, the diffusers docs), with OpenCV,
insightface, transformers and diffusers called directly: none of ipbatch's own helpers, so a
mistake in them cannot hide behind itself."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import cv2
import diffusers
import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw
from transformers import CLIPImageProcessor, CLIPImageProcessorPil

from core.config import Settings
from pipeline.embedder import ClipEmbedder, FaceReferenceEncoder
from pipeline.faces import FaceEmbedder
from pipeline.generator import Generator
from pipeline.images import decode_reference
from pipeline.manifest import Row
from pipeline.models import ModelSource
from pipeline.presets import ADAPTERS, FACE_PACK
from pipeline.requests import GenerationRequest, build_request

# equality with diffusers' own pipelines, number for number: torch's business, not the
# interpreter's; Python 3.12 runs the rest (`make test-py312`)
pytestmark = pytest.mark.numerics

CPU = torch.device("cpu")
SEED = 11


def face_photo(path: Path) -> Path:
    """A reference the tiny face pack finds a face in (a bright disc), saved as a file."""
    image = Image.new("RGB", (320, 320), (20, 20, 30))
    ImageDraw.Draw(image).ellipse((80, 70, 240, 250), fill=(230, 190, 160))
    ImageDraw.Draw(image).ellipse((130, 130, 150, 150), fill=(40, 60, 200))  # not symmetric:
    image.save(path)  # a channel swap changes the crop's colours
    return path


def ipbatch_images(
    models: ModelSource, row: dict[str, Any], photo: Path
) -> tuple[Generator, GenerationRequest, list[np.ndarray]]:
    """What ipbatch makes of the row: the embed stage's decoding and encoder, the request
    mapping, the generator."""
    parsed = Row.model_validate(row)
    [spec] = parsed.adapter_specs()
    preset = ADAPTERS[spec.adapter]
    clip = None
    if preset.image_encoder is not None:
        clip = ClipEmbedder(
            models.image_encoder(ADAPTERS[spec.adapter]),
            models.feature_extractor(preset.family),
            device=CPU,
            dtype=torch.float32,
        )
    faces = FaceEmbedder(models.face_root(), name=FACE_PACK)
    encoder = FaceReferenceEncoder(faces, preset.family, clip)
    limits = Settings()
    reference = decode_reference(
        photo.read_bytes(),
        name=str(photo),
        max_pixels=limits.max_image_pixels,
        max_bytes=limits.max_reference_bytes,
    )
    tensors = encoder.encode(reference, name="face")
    generator = Generator(models, (spec.adapter,), device=CPU, dtype=torch.float32)
    request = build_request(parsed, [[tensors]])
    return generator, request, generator.generate(request).arrays


def card_images(
    tiny_models: Path, adapter: str, photo: Path, *, guidance: float, s_scale: float
) -> list[np.ndarray]:
    """The model card / diffusers docs, step by step."""
    from insightface.app import FaceAnalysis
    from insightface.utils import face_align
    from transformers import CLIPVisionModelWithProjection

    # 1. the photo as OpenCV reads it (BGR), the faces insightface finds in it
    image = cv2.imread(str(photo))
    pack = tiny_models / "insightface" / "models" / FACE_PACK
    app = FaceAnalysis(
        name=str(pack), root=str(pack.parent.parent), providers=["CPUExecutionProvider"]
    )
    app.prepare(ctx_id=0, det_size=(640, 640))
    faces = app.get(image)
    # 2. the identity embedding, and its all-zero negative for CFG
    ref_images_embeds = torch.stack([torch.from_numpy(faces[0].normed_embedding).unsqueeze(0)])
    ref_images_embeds = ref_images_embeds.unsqueeze(0)
    do_cfg = guidance > 1
    id_embeds = (
        torch.cat([torch.zeros_like(ref_images_embeds), ref_images_embeds])
        if do_cfg
        else ref_images_embeds
    )
    # 3. the base model and the FaceID adapter (its LoRA included): SD1.5 as the card's
    #    IPAdapterFaceID, SDXL as its IPAdapterFaceIDXL (StableDiffusionXLPipeline)
    if adapter.startswith("sdxl"):
        pipe = diffusers.StableDiffusionXLPipeline.from_pretrained(
            str(tiny_models / "stable-diffusion-xl-base-1.0")
        )
    else:
        pipe = diffusers.StableDiffusionPipeline.from_pretrained(
            str(tiny_models / "stable-diffusion-v1-5"),
            safety_checker=None,
            requires_safety_checker=False,
        )
    pipe.set_progress_bar_config(disable=True)
    weight_name = ADAPTERS[adapter].weight_name
    pipe.load_ip_adapter(
        str(tiny_models / "IP-Adapter-FaceID"),
        subfolder=None,
        weight_name=weight_name,
        image_encoder_folder=None,
    )
    pipe.set_ip_adapter_scale(0.7)
    # 4. FaceID-Plus: the aligned crop, BGR as norm_crop returns it, through the pipeline's
    #    image encoder; set on the projection layer with the v2 shortcut and its s_scale
    if ADAPTERS[adapter].image_encoder is not None:
        face_image = face_align.norm_crop(image, landmark=faces[0].kps, image_size=224)
        pipe.image_encoder = CLIPVisionModelWithProjection.from_pretrained(
            str(tiny_models / "IP-Adapter" / "models" / "image_encoder")
        )
        if adapter.startswith("sdxl"):  # no processor in SDXL's folder: as load_ip_adapter
            size = pipe.image_encoder.config.image_size  # makes one with an encoder
            pipe.feature_extractor = CLIPImageProcessor(size=size, crop_size=size)
        clip_embeds = pipe.prepare_ip_adapter_image_embeds([[face_image]], None, CPU, 2, do_cfg)[0]
        layer = pipe.unet.encoder_hid_proj.image_projection_layers[0]
        layer.clip_embeds = clip_embeds
        layer.shortcut = True  # Plus v2
        layer.shortcut_scale = s_scale
    # 5. generate
    output = pipe(
        prompt="a photo of a person on a beach",
        ip_adapter_image_embeds=[id_embeds],
        num_images_per_prompt=2,
        num_inference_steps=3,
        guidance_scale=guidance,
        generator=[torch.Generator().manual_seed(s) for s in (SEED, SEED + 1)],
        output_type="np",
    )
    return list(output.images)


@pytest.mark.parametrize(
    ("adapter", "guidance", "s_scale"),
    [
        ("sd15-faceid", 7.5, None),
        ("sd15-faceid", 1.0, None),
        ("sd15-faceid-plusv2", 7.5, None),
        ("sd15-faceid-plusv2", 1.0, None),
        ("sd15-faceid-plusv2", 7.5, 1.7),
        ("sdxl-faceid", 7.5, None),
        ("sdxl-faceid-plusv2", 7.5, 1.7),  # the card's SDXL v2 uses the same ViT-H encoder
    ],
)
def test_faceid_matches_the_model_cards_recipe(
    tiny_models: Path, tmp_path: Path, adapter: str, guidance: float, s_scale: float | None
) -> None:
    """Bitwise, at guidance above and at or below 1, with the card's s_scale and another."""
    photo = face_photo(tmp_path / "person.png")
    row = {
        "id": "person",
        "adapter": adapter,
        "reference": str(photo),
        "prompt": "a photo of a person on a beach",
        "scale": 0.7,
        "num_images": 2,
        "seed": SEED,
        "steps": 3,
        "guidance_scale": guidance,
    }
    if s_scale is not None:
        row["s_scale"] = s_scale
    generator, _, mine = ipbatch_images(ModelSource.parse(str(tiny_models)), row, photo)
    theirs = card_images(
        tiny_models, adapter, photo, guidance=guidance, s_scale=1.0 if s_scale is None else s_scale
    )
    for a, b in zip(mine, theirs, strict=True):
        assert np.array_equal(a, b)
    # the FaceID LoRA is active during the call, and the crop's state does not leak
    assert generator.pipe.get_active_adapters() == ["faceid_0"]
    for layer in generator.pipe.unet.encoder_hid_proj.image_projection_layers:
        assert getattr(layer, "clip_embeds", None) is None
        assert getattr(layer, "shortcut_scale", 1.0) == 1.0


def test_the_faceid_lora_is_applied(tiny_models: Path, tmp_path: Path) -> None:
    """Switching FaceID's LoRA off changes the image; on again, the same image as before."""
    photo = face_photo(tmp_path / "person.png")
    row = {"id": "p", "adapter": "sd15-faceid", "reference": str(photo), "steps": 2}
    generator, request, with_lora = ipbatch_images(ModelSource.parse(str(tiny_models)), row, photo)
    generator.pipe.disable_lora()
    without = generator.generate(request).arrays
    generator.pipe.enable_lora()
    again = generator.generate(request).arrays
    assert not np.array_equal(without[0], with_lora[0])
    assert np.array_equal(again[0], with_lora[0])


def test_s_scale_changes_the_image(tiny_models: Path, tmp_path: Path) -> None:
    photo = face_photo(tmp_path / "person.png")
    row = {"id": "p", "adapter": "sd15-faceid-plusv2", "reference": str(photo), "steps": 2}
    models = ModelSource.parse(str(tiny_models))
    *_, card = ipbatch_images(models, row, photo)
    *_, tuned = ipbatch_images(models, {**row, "s_scale": 2.5}, photo)
    assert np.abs(card[0] - tuned[0]).max() > 1e-3


class OtherBackend(CLIPImageProcessorPil):
    """Stands for the processor transformers 5 picks when torchvision is installed (its
    resizing differs from PIL's by about one grey level): here, another resampling."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.resample = 2  # bilinear, where CLIP's config says bicubic


@pytest.mark.parametrize("environment", ["as installed", "another backend"])
@pytest.mark.parametrize("adapter", ["sd15", "sdxl"])
def test_pixel_values_are_the_pipelines_own(
    tiny_models: Path, adapter: str, environment: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """ipbatch's processor is whatever the diffusers pipeline uses as `feature_extractor` in
    this environment (SD1.5: the base model's; SDXL: the one `load_ip_adapter` builds), so its
    pixel values are the pipeline's, and the cache key follows the backend."""
    if environment == "another backend":
        from diffusers.loaders import ip_adapter

        # (transformers swaps its module object for a lazy one: patch the one imports find)
        monkeypatch.setattr(sys.modules["transformers"], "CLIPImageProcessor", OtherBackend)
        monkeypatch.setattr(ip_adapter, "CLIPImageProcessor", OtherBackend)
    models = ModelSource.parse(str(tiny_models))
    preset = ADAPTERS[adapter]
    assert preset.image_encoder is not None
    pipeline_class = getattr(
        diffusers, "StableDiffusionPipeline" if adapter == "sd15" else "StableDiffusionXLPipeline"
    )
    extra = {"safety_checker": None, "requires_safety_checker": False} if adapter == "sd15" else {}
    pipe = pipeline_class.from_pretrained(models.base_model(preset.family), **extra)
    repo, subfolder, weight_name = models.adapter_weights(ADAPTERS[adapter])
    pipe.load_ip_adapter(
        repo,
        subfolder=subfolder,
        weight_name=weight_name,
        image_encoder_folder=preset.image_encoder.path,
    )
    ours = ClipEmbedder(
        models.image_encoder(ADAPTERS[adapter]),
        models.feature_extractor(preset.family),
        device=CPU,
        dtype=torch.float32,
    )
    rng = np.random.default_rng(5)
    picture = Image.fromarray((rng.random((70, 90, 3)) * 255).astype(np.uint8))
    assert type(ours.processor) is type(pipe.feature_extractor)
    if environment == "another backend":
        assert type(ours.processor) is OtherBackend
    mine = ours.processor(picture, return_tensors="pt").pixel_values
    theirs = pipe.feature_extractor(picture, return_tensors="pt").pixel_values
    assert torch.equal(mine, theirs)
    if environment == "another backend":  # a cached embedding of the other backend is not reused
        monkeypatch.undo()
        default = ClipEmbedder(
            models.image_encoder(ADAPTERS[adapter]),
            models.feature_extractor(preset.family),
            device=CPU,
            dtype=torch.float32,
        )
        assert default.fingerprint != ours.fingerprint


NO_PEFT = """
import importlib.metadata, importlib.util, sys
find_spec, version = importlib.util.find_spec, importlib.metadata.version
def hidden_find_spec(name, *args, **kwargs):
    return None if name.split(".")[0] == "peft" else find_spec(name, *args, **kwargs)
def hidden_version(name):
    if name == "peft":
        raise importlib.metadata.PackageNotFoundError(name)
    return version(name)
importlib.util.find_spec, importlib.metadata.version = hidden_find_spec, hidden_version
sys.modules["peft"] = None  # `import peft` fails, as where it is not installed

import diffusers, torch
from core.errors import ConfigError
from pipeline.generator import Generator
from pipeline.requests import GenerationRequest
from pipeline.models import ModelSource
from pipeline.presets import ADAPTERS

models = ModelSource.parse(sys.argv[1])
pipe = diffusers.StableDiffusionPipeline.from_pretrained(
    str(models.base_model("sd15")), safety_checker=None, requires_safety_checker=False
)
repo, subfolder, weight_name = models.adapter_weights(ADAPTERS["sd15-faceid"])
pipe.load_ip_adapter(
    repo, subfolder=subfolder or None, weight_name=weight_name, image_encoder_folder=None
)
print("diffusers loaded the adapter; LoRA:", bool(getattr(pipe.unet, "peft_config", None)))
try:
    Generator(models, ("sd15-faceid",), device=torch.device("cpu"), dtype=torch.float32)
    print("ipbatch ran without the LoRA")
except ConfigError as exc:
    print("ipbatch refused:", exc)
"""


def test_without_peft_diffusers_skips_the_lora_and_ipbatch_refuses(tiny_models: Path) -> None:
    """The guard's reason, shown: where peft cannot be imported, diffusers loads a FaceID
    adapter without its LoRA (a warning, and on it goes); ipbatch refuses to run."""
    result = subprocess.run(
        [sys.executable, "-c", NO_PEFT, str(tiny_models)],
        capture_output=True,
        text=True,
        cwd=Path(__file__).resolve().parents[2],
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    assert "diffusers loaded the adapter; LoRA: False" in result.stdout
    assert "ipbatch refused: FaceID adapters need the `peft` package" in result.stdout
