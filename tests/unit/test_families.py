"""A model family is one entry (`families.BASE_MODELS`): what it names must be what diffusers
and the base model's folder have, and the generator and the manifest read it."""

from __future__ import annotations

import dataclasses
import inspect
import json
from pathlib import Path

import diffusers
import pytest
import torch

from core.errors import ConfigError
from pipeline import families
from pipeline.families import BASE_MODELS, MODES
from pipeline.generator import Generator
from pipeline.manifest import validate_row
from pipeline.models import ModelSource
from pipeline.presets import ADAPTERS


@pytest.mark.parametrize("family", list(BASE_MODELS))
def test_each_mode_names_a_diffusers_pipeline_that_takes_ip_adapters(
    family: str, tiny_models: Path
) -> None:
    base = BASE_MODELS[family]
    assert {mode for mode, _, _ in base.pipelines} == set(MODES)
    for mode, plain, with_control in base.pipelines:
        for controlnet, name in ((False, plain), (True, with_control)):
            if name is None:  # diffusers' class of that mode takes no IP-Adapter: none named
                with pytest.raises(KeyError, match="that takes IP-Adapters"):
                    base.pipeline(mode, controlnet)
                continue
            cls = getattr(diffusers, base.pipeline(mode, controlnet))
            arguments = inspect.signature(cls.__call__).parameters
            # the embeds layout names the loader mixin whose pipelines take it
            mixin = {
                "cfg_halves": "IPAdapterMixin",
                "separate": "FluxIPAdapterMixin",
                "cfg_tensor": "SD3IPAdapterMixin",
            }
            assert issubclass(cls, getattr(diffusers.loaders, mixin[base.embeds]))
            assert "ip_adapter_image_embeds" in arguments
            assert ("controlnet_conditioning_scale" in arguments) is controlnet
            assert ("strength" in arguments) is (mode != "text")
            assert ("mask_image" in arguments) is (mode == "inpaint")
            assert ("clip_skip" in arguments) is base.clip_skip
    # the base model's folder is what the text pipeline loads: its model_index names it
    index = json.loads((tiny_models / base.folder / "model_index.json").read_text())
    assert index["_class_name"] == base.pipeline_class
    assert ("safety_checker" in index) is base.safety_checker
    # and every adapter of the family is one of its presets' weights
    assert any(a.family == family for a in ADAPTERS.values())


def test_a_row_without_steps_or_guidance_gets_its_familys(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    changed = dataclasses.replace(BASE_MODELS["sdxl"], default_steps=12, default_guidance=5.0)
    monkeypatch.setitem(families.BASE_MODELS, "sdxl", changed)
    sdxl = validate_row({"id": "x", "reference": "r.png", "adapter": "sdxl-plus"})
    sd15 = validate_row({"id": "s", "reference": "r.png"})
    own = validate_row({"id": "o", "reference": "r.png", "adapter": "sdxl", "steps": 3})
    assert (sdxl.steps, sdxl.guidance_scale) == (12, 5.0)
    assert (sd15.steps, sd15.guidance_scale) == (30, 7.5)
    assert (own.steps, own.guidance_scale) == (3, 5.0)
    # stored with the row: a later change of the family's defaults does not change it
    assert (sdxl.to_params()["steps"], sdxl.to_params()["guidance_scale"]) == (12, 5.0)
    assert validate_row({"id": "g", "reference": "r.png", "guidance_scale": 0}).guidance_scale == 0


def test_a_family_the_generator_cannot_call_is_refused_before_loading(
    monkeypatch: pytest.MonkeyPatch, tiny_models: Path
) -> None:
    other = dataclasses.replace(BASE_MODELS["sd15"], embeds="separate")  # CFG halves expected
    monkeypatch.setitem(families.BASE_MODELS, "sd15", other)
    with pytest.raises(ConfigError, match="sd15: a family this generator cannot call"):
        Generator(
            ModelSource.parse(str(tiny_models)),
            ("sd15",),
            device=torch.device("cpu"),
            dtype=torch.float32,
        )
