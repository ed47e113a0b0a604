"""Face embeddings for the FaceID adapters, through insightface's FaceAnalysis.

`FaceEmbedder(root)` loads the model pack in `root/models/<name>/` (insightface's layout, e.g.
the buffalo_l files) once; `analyze(image)` returns the normed ArcFace embedding of the largest
face plus its aligned 224x224 crop (what FaceID-Plus feeds to the CLIP image encoder).

The published recipe (h94's model cards, tencent's FaceID notebook, the diffusers docs) works
on OpenCV's BGR pixels throughout: `cv2.imread` -> `FaceAnalysis.get` -> `face_align.norm_crop`
-> that BGR crop straight into `CLIPImageProcessor`. The models were trained that way, so the
crop stays BGR here too (`FaceResult.aligned`), exactly as the recipe hands it on.

insightface is never allowed to download: the pack folder is checked first and handed to
FaceAnalysis as an absolute path (a bare name is looked up relative to the working directory
first, then under root, and a missing folder makes insightface fetch it from GitHub). Only the
detection and recognition models are loaded: buffalo_l's landmark and gender/age models would
run on every face for nothing.
"""

from __future__ import annotations

import hashlib
import logging
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from core.errors import ConfigError, ErrorCode, ItemError

ALIGNED_SIZE = 224
_MODULES = ["detection", "recognition"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class FaceResult:
    embedding: np.ndarray  # (512,) float32, insightface normed_embedding of the LARGEST face
    # the aligned face crop, 224x224x3 uint8 in BGR order (ArcFace template, scaled x2): what
    # the recipe gives CLIPImageProcessor, channel order included
    aligned: np.ndarray
    bbox: tuple[float, float, float, float]  # x1, y1, x2, y2 in the input image's pixels
    det_score: float


def default_providers() -> list[str]:
    """CUDA first when this onnxruntime build offers it, CPU always as the fallback."""
    import onnxruntime

    if "CUDAExecutionProvider" in onnxruntime.get_available_providers():
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    return ["CPUExecutionProvider"]


def _pack_message(folder: Path, name: str, reason: str) -> str:
    return (
        f"insightface model pack '{name}' {reason}: put its .onnx files in {folder} "
        f"(e.g. the {name} files from insightface's GitHub releases; nothing is downloaded "
        "at run time). For offline tests, `ipbatch models tiny` writes a toy pack there."
    )


@contextmanager
def _quiet() -> Iterator[None]:
    """insightface calls warn (scikit-image 0.26 deprecates SimilarityTransform.estimate, which
    face_align uses): silence them here, locally, rather than in the caller's filters."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def pack_fingerprint(folder: Path, name: str, det_size: tuple[int, int]) -> str:
    """`face-<name>-<16 hex>`: sha256 over every *.onnx (name and bytes, sorted) and det_size."""
    digest = hashlib.sha256()
    for path in sorted(folder.glob("*.onnx")):
        digest.update(path.name.encode() + b"\0")
        digest.update(path.stat().st_size.to_bytes(8, "big"))
        with path.open("rb") as stream:
            for chunk in iter(lambda: stream.read(1 << 20), b""):
                digest.update(chunk)
    digest.update(f"det_size={det_size[0]}x{det_size[1]}".encode())
    return f"face-{name}-{digest.hexdigest()[:16]}"


# said by `ipbatch models`, a FaceID worker's log and the report of a job that used FaceID
INSIGHTFACE_LICENCE = (
    "FaceID uses insightface's pretrained face-analysis packs (buffalo_l), which insightface "
    "licenses for non-commercial research only (deepinsight/insightface#2486): selling what "
    "FaceID makes needs a licence from insightface, or another face model"
)


def uses_faceid(adapters: tuple[str, ...]) -> bool:
    """Whether a row's adapters (by name) include a FaceID preset (one that needs a pack)."""
    from pipeline.presets import ADAPTERS

    return any(name in ADAPTERS and ADAPTERS[name].uses_faces for name in adapters)


class FaceEmbedder:
    """Detect, align and embed the largest face of a reference image (insightface pack)."""

    def __init__(
        self,
        root: str | Path,
        *,
        name: str = "buffalo_l",
        providers: list[str] | None = None,
        det_size: tuple[int, int] = (640, 640),
    ) -> None:
        self.name = name
        self.det_size = (int(det_size[0]), int(det_size[1]))  # (width, height), insightface's
        self.folder = Path(root).expanduser().resolve() / "models" / name
        if not self.folder.is_dir():
            raise ConfigError(_pack_message(self.folder, name, "not found"))
        if not any(self.folder.glob("*.onnx")):
            raise ConfigError(_pack_message(self.folder, name, "has no .onnx files"))
        self.providers = list(providers) if providers is not None else default_providers()
        self.fingerprint = pack_fingerprint(self.folder, name, self.det_size)
        self._app = self._load()
        log.info("%s (pack %s)", INSIGHTFACE_LICENCE, self.folder)

    def _load(self) -> Any:
        try:
            from insightface.app import FaceAnalysis

            with _quiet():
                app = FaceAnalysis(
                    name=str(self.folder),  # absolute: no cwd lookup, no download
                    root=str(self.folder.parent.parent),
                    allowed_modules=_MODULES,
                    providers=self.providers,
                )
                app.prepare(ctx_id=0, det_size=self.det_size)
        except Exception as err:  # AssertionError (no detector), ORT/protobuf load errors, ...
            detail = f"{type(err).__name__}: {err}" if str(err) else type(err).__name__
            raise ConfigError(
                _pack_message(self.folder, self.name, f"could not be loaded ({detail})")
            ) from err
        missing = [task for task in _MODULES if task not in app.models]
        if missing:
            raise ConfigError(
                _pack_message(self.folder, self.name, f"has no {' or '.join(missing)} model")
            )
        return app

    def analyze(self, image: Image.Image, *, name: str = "reference") -> FaceResult:
        """Embed the largest face of an RGB image (turned into the BGR pixels `cv2.imread`
        gives the recipe); ItemError(NO_FACE) when there is none. With one face, the face is
        the recipe's `faces[0]`; with several, the recipe takes insightface's first (highest
        detection score), ipbatch the largest."""
        from insightface.utils.face_align import norm_crop

        bgr = np.ascontiguousarray(np.asarray(image.convert("RGB"))[:, :, ::-1])
        with _quiet():
            faces = self._app.get(bgr)
            if not faces:
                raise ItemError(
                    ErrorCode.NO_FACE,
                    f"{name}: no face found in the image (use a reference where the face is "
                    "clearly visible and not cropped too tightly)",
                )
            face = max(
                faces, key=lambda f: float((f.bbox[2] - f.bbox[0]) * (f.bbox[3] - f.bbox[1]))
            )
            crop = norm_crop(bgr, landmark=face.kps, image_size=ALIGNED_SIZE)
        embedding = np.asarray(face.normed_embedding, dtype=np.float32).reshape(-1)
        x1, y1, x2, y2 = (float(v) for v in face.bbox[:4])
        return FaceResult(
            embedding=embedding,
            aligned=np.ascontiguousarray(crop),
            bbox=(x1, y1, x2, y2),
            det_score=float(face.det_score),
        )
