"""No pickle runs on user data: a booby-trapped .bin adapter does not execute, and the
workers' Celery app takes JSON only (tests/test_celery_config.py)."""

from __future__ import annotations

import os
import pickle
import shutil
from pathlib import Path

import pytest
import torch

from pipeline.generator import Generator
from pipeline.models import ModelSource
from pipeline.presets import ADAPTERS


class _Trap:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):  # type: ignore[no-untyped-def]
        return (os.makedirs, (str(self.marker),))


def test_a_pickle_in_adapter_weights_never_runs(tiny_models: Path, tmp_path: Path) -> None:
    models = tmp_path / "models"
    shutil.copytree(tiny_models, models)
    preset = ADAPTERS["sd15-faceid"]  # h94 ships FaceID as .bin: a pickle container
    weights = models / preset.weights.folder / preset.weights.path / preset.weight_name
    assert weights.suffix == ".bin" and weights.is_file()
    marker = tmp_path / "pwned"
    weights.write_bytes(pickle.dumps({"image_proj": _Trap(marker), "ip_adapter": {}}))
    with pytest.raises(Exception) as info:
        Generator(
            ModelSource.parse(str(models)),
            ("sd15-faceid",),
            device=torch.device("cpu"),
            dtype=torch.float32,
        )
    assert not marker.exists(), "the pickle in the weights file was executed"
    assert "weights" in str(info.value).lower() or "unpickl" in repr(info.value).lower()
