"""A generation's fingerprint: a name for everything that decides the pixels of a row's image k.

    generation_fingerprint(weights=..., backend=..., row=row, inputs=[...], scoring=..., k=0)

- `weights`: the base model's, the adapters' and the ControlNets' weights by content
  (`Weights.of`): a local folder's files hashed (once per process and file version), a trained
  adapter by its recorded sha256, a hub repository by the commit its snapshot holds;
- `backend`: device kind, dtype, the acceleration settings, torch and diffusers versions and
  GENERATION_VERSION (`backend_of`);
- `row`: every field of the validated row with its effective value (defaults and the derived
  seed filled in, `Row.to_params`), but its id: the same row under another id is the same
  picture; `output_format` and `caption` are in (the stored bytes and the CLIP-T score);
- `inputs`: the cache keys of the row's embeddings and prepared inputs (content-addressed:
  reference bytes + encoder fingerprint), so a reference that changed under its URI changes it;
- `scoring`: the scorer and the threshold settings that may replace an image with a better one;
- the image index k (its seed is the row's seed + k).

Two outputs with one fingerprint are the same picture: ipbatch copies the first instead of
generating it again (`workers.stages.reuse`). What it does not name: which other rows shared
the diffusers call (batched rows are computed together; on CUDA a batch's size can move a
pixel by a level). Bump GENERATION_VERSION with any change that alters the pixels a row makes.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from pipeline.manifest import Row
from pipeline.models import ModelSource, file_sha256
from pipeline.presets import AdapterPreset

GENERATION_VERSION = 1

MODEL_FILES = ("*.json", "*.safetensors", "*.bin", "*.txt", "*.model")


def backend_of(device: Any, dtype: Any, acceleration: Any) -> dict[str, Any]:
    """What runs the generation, as far as it can change a pixel."""
    import diffusers
    import torch

    kind = str(device.type)
    if kind == "cuda":
        kind += ":" + torch.cuda.get_device_name(device)
    return {
        "device": kind,
        "dtype": str(dtype).removeprefix("torch."),
        "acceleration": {
            "compile": bool(acceleration.compile),
            "channels_last": bool(acceleration.channels_last) and device.type == "cuda",
            "vae_slicing_above": acceleration.vae_slicing_above,
        },
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "version": GENERATION_VERSION,
    }


class Weights:
    """The weights a row's pipeline loads, by content. File digests are remembered per process
    by (path, size, modification time): a file replaced in place is hashed again."""

    def __init__(self, models: ModelSource) -> None:
        self.models = models
        self._files: dict[tuple[str, int, int], str] = {}

    def of(self, family: str, presets: Sequence[AdapterPreset], controlnets: Sequence[str]) -> str:
        parts = [("base", self._folder(self.models.base_model(family)))]
        for preset in presets:
            parts.append(("adapter", self._adapter(preset)))
        for name in controlnets:
            parts.append(("controlnet", self._folder(self.models.controlnet(name))))
        return hashlib.sha256(json.dumps(parts).encode()).hexdigest()

    def _adapter(self, preset: AdapterPreset) -> str:
        if preset.custom_sha256 is not None:  # trained here: its catalog recorded the sha256
            return preset.custom_sha256
        repo, sub, name = self.models.adapter_weights(preset)
        if self.models.root is None:
            return self._hub(repo, f"{sub}/{name}" if sub else name)
        return self._file(Path(repo, sub, name))

    def _folder(self, where: str) -> str:
        if self.models.root is None:
            return self._hub(where, None)
        root = Path(where)
        files = sorted({p for pattern in MODEL_FILES for p in root.rglob(pattern) if p.is_file()})
        digest = hashlib.sha256()
        for path in files:
            digest.update(f"{path.relative_to(root)}\0{self._file(path)}\0".encode())
        return digest.hexdigest()

    def _file(self, path: Path) -> str:
        stat = path.stat()
        key = (str(path.resolve()), stat.st_size, stat.st_mtime_ns)
        if key not in self._files:
            self._files[key] = file_sha256(path)
        return self._files[key]

    @staticmethod
    def _hub(repo: str, filename: str | None) -> str:
        """A hub repository's weights: the commit of the snapshot the pipeline loads (git
        names its content)."""
        from huggingface_hub import snapshot_download

        folder = Path(snapshot_download(repo, allow_patterns=[filename] if filename else None))
        return f"{repo}@{folder.name}" + (f"/{filename}" if filename else "")


def generation_fingerprint(
    *,
    weights: str,
    backend: Mapping[str, Any],
    row: Row,
    inputs: Sequence[str],
    scoring: Mapping[str, Any] | None,
    image_index: int,
) -> str:
    """sha256 over everything that decides image `image_index` of `row` (see the module)."""
    params = row.to_params()
    params.pop("id")
    payload = {
        "weights": weights,
        "backend": dict(backend),
        "row": params,
        "inputs": list(inputs),
        "scoring": dict(scoring) if scoring is not None else None,
        "image_index": image_index,
    }
    text = json.dumps(payload, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()
