"""Where weights come from: a local folder laid out like the public repositories, or the hub.

`ModelSource.parse("hub")` names the public repositories (downloads happen only then);
any other spec is a folder, used with `local_files_only=True` so nothing is ever fetched.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import torch

from ipbatch.errors import ConfigError
from pipeline.presets import ADAPTERS, BASE_MODELS, AdapterPreset, BaseModelPreset

HUB = "hub"


@dataclass(frozen=True)
class ModelSource:
    root: Path | None  # None: the public repositories

    @classmethod
    def parse(cls, spec: str) -> ModelSource:
        if spec == HUB:
            return cls(root=None)
        return cls(root=Path(spec).expanduser().resolve())

    @property
    def local_files_only(self) -> bool:
        return self.root is not None

    def describe(self) -> str:
        return "the public repositories (hub)" if self.root is None else str(self.root)

    def base_model(self, family: str) -> str:
        preset: BaseModelPreset = BASE_MODELS[family]
        if self.root is None:
            return preset.hub_repo
        path = self.root / preset.folder
        if not (path / "model_index.json").is_file():
            raise ConfigError(
                f"no base model at {path} (expected a diffusers folder with model_index.json). "
                f"Download {preset.hub_repo} there, or run `ipbatch models tiny {self.root}` "
                "for tiny offline test models."
            )
        return str(path)

    def adapter_repo(self, adapter: str) -> str:
        preset: AdapterPreset = ADAPTERS[adapter]
        if self.root is None:
            return preset.hub_repo
        path = self.root / preset.repo_folder
        weights = path / preset.subfolder / preset.weight_name
        if not weights.is_file():
            raise ConfigError(
                f"adapter {adapter!r} needs {weights}. Download {preset.weight_name} from "
                f"{preset.hub_repo} ({preset.subfolder}/) there, or run "
                f"`ipbatch models tiny {self.root}`."
            )
        return str(path)

    def image_encoder(self, adapter: str) -> str:
        """A local folder holding the adapter's CLIP image encoder (downloaded if hub)."""
        preset = ADAPTERS[adapter]
        if self.root is None:
            from huggingface_hub import snapshot_download

            repo = snapshot_download(
                preset.hub_repo, allow_patterns=[f"{preset.image_encoder_subfolder}/*"]
            )
            return str(Path(repo) / preset.image_encoder_subfolder)
        path = Path(self.adapter_repo(adapter)) / preset.image_encoder_subfolder
        if not (path / "config.json").is_file():
            raise ConfigError(f"adapter {adapter!r} needs its image encoder at {path}")
        return str(path)

    def feature_extractor(self, family: str) -> str:
        """The base model's CLIPImageProcessor folder (how references are resized)."""
        if self.root is None:
            from huggingface_hub import snapshot_download

            repo = snapshot_download(
                BASE_MODELS[family].hub_repo, allow_patterns=["feature_extractor/*"]
            )
            return str(Path(repo) / "feature_extractor")
        return str(Path(self.base_model(family)) / "feature_extractor")


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    table = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
    if name == "auto":
        return torch.float16 if device.type == "cuda" else torch.float32
    if name not in table:
        raise ConfigError(f"dtype must be auto, fp32, fp16 or bf16, not {name!r}")
    return table[name]


def folder_fingerprint(folder: str | Path, patterns: tuple[str, ...]) -> str:
    """sha256 over the files of a model folder matching `patterns`, names included."""
    digest = hashlib.sha256()
    root = Path(folder)
    files = sorted({p for pattern in patterns for p in root.glob(pattern) if p.is_file()})
    if not files:
        raise ConfigError(f"no model files in {root}")
    for path in files:
        digest.update(path.name.encode() + b"\0")
        with path.open("rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()
