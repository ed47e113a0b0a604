"""Where weights come from: a local folder laid out like the public repositories, or the hub.

`ModelSource.parse("hub")` names the public repositories (downloads happen only then);
any other spec is a folder, used with `local_files_only=True` so nothing is ever fetched.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from core.errors import Action, ConfigError, ItemError, ModelLoadError, classify, short
from pipeline.families import BASE_MODELS, BaseModelPreset
from pipeline.presets import CONTROLNETS, FACE_PACK_FOLDER, SCORE_MODEL, AdapterPreset, RepoPath

if TYPE_CHECKING:
    import torch

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

    def _repo_path(self, ref: RepoPath, *, allow_patterns: list[str]) -> Path:
        if self.root is None:
            from huggingface_hub import snapshot_download

            return Path(snapshot_download(ref.hub_repo, allow_patterns=allow_patterns))
        return self.root / ref.folder

    def adapter_weights(self, preset: AdapterPreset) -> tuple[str, str, str]:
        """(repository folder or hub id, subfolder, weight file name) for load_ip_adapter."""
        adapter = preset.name
        ref = preset.weights
        if preset.custom_sha256 is not None:  # trained here: its catalog put it in a folder
            return ref.folder, "", preset.weight_name
        if self.root is None:
            return ref.hub_repo, ref.path, preset.weight_name
        path = self.root / ref.folder
        weights = path / ref.path / preset.weight_name
        if not weights.is_file():
            raise ConfigError(
                f"adapter {adapter!r} needs {weights}. Download {preset.weight_name} from "
                f"{ref.hub_repo} ({ref.path or 'top level'}) there, or run "
                f"`ipbatch models tiny {self.root}` for tiny offline test models."
            )
        return str(path), ref.path, preset.weight_name

    def image_encoder(self, preset: AdapterPreset) -> str:
        """A local folder holding the adapter's CLIP image encoder (downloaded if hub)."""
        adapter, ref = preset.name, preset.image_encoder
        if ref is None:
            raise ConfigError(f"adapter {adapter!r} uses no CLIP image encoder")
        path = self._repo_path(ref, allow_patterns=[f"{ref.path}/*"]) / ref.path
        if not (path / "config.json").is_file():
            raise ConfigError(
                f"adapter {adapter!r} needs its image encoder at {path}. Download "
                f"{ref.hub_repo} ({ref.path}/) there, or run `ipbatch models tiny {self.root}` "
                "for tiny offline test models."
            )
        return str(path)

    def feature_extractor(self, family: str) -> str | None:
        """The base model's CLIPImageProcessor folder, if it has one (SD1.5 does, SDXL does
        not: diffusers then resizes to the encoder's image size, and so do we)."""
        preset = BASE_MODELS[family]
        if self.root is None:
            from huggingface_hub import snapshot_download

            repo = Path(snapshot_download(preset.hub_repo, allow_patterns=["feature_extractor/*"]))
        else:
            repo = self.root / preset.folder
        folder = repo / "feature_extractor"
        return str(folder) if (folder / "preprocessor_config.json").is_file() else None

    def controlnet(self, name: str) -> str:
        """A ControlNet's folder (diffusers layout), or its hub id."""
        preset = CONTROLNETS[name]
        if self.root is None:
            return preset.repo.hub_repo
        path = self.root / preset.repo.folder
        if not (path / "config.json").is_file():
            raise ConfigError(
                f"ControlNet {name!r} needs {path} (config.json and its weights). Download "
                f"{preset.repo.hub_repo} there, or run `ipbatch models tiny {self.root}` for "
                "tiny offline test models."
            )
        return str(path)

    def score_model(self) -> str:
        """The CLIP model (both towers) that scores outputs: CLIP-I and CLIP-T."""
        path = self._repo_path(SCORE_MODEL, allow_patterns=["*.json", "*.safetensors", "*.txt"])
        if not (path / "config.json").is_file():
            raise ConfigError(
                f"scoring needs CLIP ViT-L/14 at {path}. Download {SCORE_MODEL.hub_repo} there, "
                f"run `ipbatch models tiny {self.root}` for tiny offline test models, or turn "
                "scoring off (IPBATCH_SCORE=false, `ipbatch run --no-score`)."
            )
        return str(path)

    def face_root(self) -> Path:
        """insightface's root: the face-analysis pack is at <root>/models/<name>/."""
        if self.root is None:
            return Path.home() / ".insightface"
        return self.root / FACE_PACK_FOLDER


def resolve_device(name: str) -> torch.device:
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    import torch

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
        _feed(digest, path)
    return digest.hexdigest()


def file_sha256(path: Path) -> str:
    """The sha256 of a file, read a megabyte at a time."""
    digest = hashlib.sha256()
    _feed(digest, path)
    return digest.hexdigest()


def _feed(digest: Any, path: Path) -> None:
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)


@contextmanager
def loading(what: str, folder: str | Path | None = None) -> Iterator[None]:
    """A model file that is there but does not load (corrupt, truncated, the wrong kind) is
    the worker's configuration problem, with the file named (for a folder: the first of its
    .safetensors files that does not open); a failed download is an outage."""
    try:
        yield
    except (ConfigError, ItemError):
        raise
    except Exception as exc:
        if classify(exc).action is Action.RETRY:
            raise
        broken = _first_broken(Path(folder)) if folder is not None else None
        where = f" ({broken} does not open)" if broken is not None else ""
        raise ModelLoadError(f"could not load {what}{where}: {short(exc)}") from exc


def _first_broken(folder: Path) -> Path | None:
    from safetensors import safe_open

    for path in sorted(folder.rglob("*.safetensors")):
        try:
            with safe_open(str(path), framework="pt"):
                pass
        except Exception:
            return path
    return None
