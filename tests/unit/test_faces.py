"""FaceEmbedder through the REAL insightface FaceAnalysis path, on the toy pack of tiny_faces."""

from __future__ import annotations

import re
import socket
import warnings
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from core.errors import ConfigError, ErrorCode, ItemError
from pipeline.faces import FaceEmbedder, FaceResult
from pipeline.tiny_faces import write_tiny_face_pack

SKIN = (230, 190, 160)


def disc_image(
    size: tuple[int, int] = (400, 320),
    centre: tuple[int, int] = (200, 150),
    radius: int = 90,
    colour: tuple[int, int, int] = SKIN,
    background: tuple[int, int, int] = (25, 25, 30),
) -> Image.Image:
    width, height = size
    pixels = np.empty((height, width, 3), dtype=np.uint8)
    pixels[:] = background
    yy, xx = np.mgrid[:height, :width]
    pixels[(xx - centre[0]) ** 2 + (yy - centre[1]) ** 2 <= radius**2] = colour
    return Image.fromarray(pixels)


@pytest.fixture(scope="module")
def pack_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("insightface")
    write_tiny_face_pack(root)
    return root


@pytest.fixture(scope="module")
def embedder(pack_root: Path) -> FaceEmbedder:
    return FaceEmbedder(pack_root, providers=["CPUExecutionProvider"])


def test_pack_loads_in_real_face_analysis_by_name_and_root(pack_root: Path) -> None:
    from insightface.app import FaceAnalysis

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # scikit-image 0.26 FutureWarning in face_align
        app = FaceAnalysis(
            name="buffalo_l", root=str(pack_root), providers=["CPUExecutionProvider"]
        )
        app.prepare(ctx_id=0, det_size=(640, 640))
        image = np.asarray(disc_image())[:, :, ::-1].copy()
        faces = app.get(image)
    assert {task: type(model).__name__ for task, model in app.models.items()} == {
        "detection": "SCRFD",
        "recognition": "ArcFaceONNX",
    }
    assert len(faces) == 1
    x1, y1, x2, y2 = faces[0].bbox
    kps = faces[0].kps
    assert kps.shape == (5, 2)
    assert ((kps[:, 0] > x1) & (kps[:, 0] < x2) & (kps[:, 1] > y1) & (kps[:, 1] < y2)).all()
    left_eye, right_eye, nose, left_mouth, right_mouth = kps
    assert left_eye[0] < nose[0] < right_eye[0] and left_mouth[0] < right_mouth[0]
    assert left_eye[1] < nose[1] < left_mouth[1]


@pytest.mark.parametrize(
    ("size", "centre", "radius"),
    [((400, 320), (200, 150), 90), ((256, 256), (128, 128), 60), ((640, 480), (420, 260), 120)],
)
def test_disc_gives_face_result(
    embedder: FaceEmbedder, size: tuple[int, int], centre: tuple[int, int], radius: int
) -> None:
    result = embedder.analyze(disc_image(size, centre, radius))
    assert isinstance(result, FaceResult)
    assert result.embedding.shape == (512,) and result.embedding.dtype == np.float32
    assert np.linalg.norm(result.embedding) == pytest.approx(1.0, abs=1e-5)
    # the crop in OpenCV's BGR order, as the published recipe hands it to CLIPImageProcessor
    assert result.aligned.shape == (224, 224, 3) and result.aligned.dtype == np.uint8
    assert result.det_score >= 0.5
    # the box roughly matches the disc's bounding square (IoU > 0.6)
    x1, y1, x2, y2 = result.bbox
    dx1, dy1, dx2, dy2 = (
        centre[0] - radius,
        centre[1] - radius,
        centre[0] + radius,
        centre[1] + radius,
    )
    inter = max(0.0, min(x2, dx2) - max(x1, dx1)) * max(0.0, min(y2, dy2) - max(y1, dy1))
    union = (x2 - x1) * (y2 - y1) + (dx2 - dx1) * (dy2 - dy1) - inter
    assert inter / union > 0.6
    # the alignment used the keypoints: the crop's centre lies on the disc (BGR: reversed)
    centre_pixel = result.aligned[112, 112].astype(int)
    assert np.abs(centre_pixel - np.array(SKIN[::-1])).max() <= 3


def test_differently_coloured_faces_give_different_embeddings(embedder: FaceEmbedder) -> None:
    red = embedder.analyze(disc_image(colour=(220, 40, 40))).embedding
    blue = embedder.analyze(disc_image(colour=(40, 40, 220))).embedding
    assert float(np.dot(red, blue)) < 0.99


def test_same_image_gives_identical_embedding(embedder: FaceEmbedder) -> None:
    first = embedder.analyze(disc_image())
    second = embedder.analyze(disc_image())
    assert np.array_equal(first.embedding, second.embedding)
    assert first.bbox == second.bbox
    assert np.array_equal(np.asarray(first.aligned), np.asarray(second.aligned))


def test_largest_face_is_chosen(embedder: FaceEmbedder, monkeypatch: pytest.MonkeyPatch) -> None:
    real_get = embedder._app.get

    def two_faces(img: np.ndarray) -> list:
        small = real_get(np.ascontiguousarray(np.asarray(disc_image(radius=40))[:, :, ::-1]))[0]
        large = real_get(img)[0]
        return [small, large]

    monkeypatch.setattr(embedder._app, "get", two_faces)
    image = disc_image(radius=120)
    result = embedder.analyze(image)
    x1, y1, x2, y2 = result.bbox
    assert x2 - x1 > 200


@pytest.mark.parametrize(
    "pixels",
    [
        np.full((320, 400, 3), 15, dtype=np.uint8),
        np.full((320, 400, 3), 128, dtype=np.uint8),
        (128 + np.random.default_rng(0).integers(-20, 21, (320, 400, 3))).astype(np.uint8),
        np.random.default_rng(1).integers(0, 256, (320, 400, 3), dtype=np.uint8),
    ],
    ids=["dark", "grey", "small-noise", "noise"],
)
def test_faceless_image_raises_no_face(embedder: FaceEmbedder, pixels: np.ndarray) -> None:
    with pytest.raises(ItemError) as caught:
        embedder.analyze(Image.fromarray(pixels), name="ref-7")
    assert caught.value.code == ErrorCode.NO_FACE
    assert caught.value.message.startswith("ref-7: no face found")


@pytest.fixture
def no_network(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("network access attempted")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


@pytest.mark.usefixtures("no_network")
def test_missing_pack_raises_config_error_naming_the_folder(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as caught:
        FaceEmbedder(tmp_path, providers=["CPUExecutionProvider"])
    folder = tmp_path.resolve() / "models" / "buffalo_l"
    assert str(folder) in str(caught.value)
    assert "ipbatch models tiny" in str(caught.value)
    assert not folder.exists()  # insightface did not start a download into it


@pytest.mark.usefixtures("no_network")
def test_empty_or_broken_pack_raises_config_error(tmp_path: Path) -> None:
    folder = tmp_path / "models" / "antelope"
    folder.mkdir(parents=True)
    with pytest.raises(ConfigError, match="has no .onnx files"):
        FaceEmbedder(tmp_path, name="antelope", providers=["CPUExecutionProvider"])
    (folder / "det.onnx").write_bytes(b"not an onnx model")
    with pytest.raises(ConfigError, match="could not be loaded") as caught:
        FaceEmbedder(tmp_path, name="antelope", providers=["CPUExecutionProvider"])
    assert str(folder.resolve()) in str(caught.value)


def test_fingerprint_is_stable_and_depends_on_det_size(
    pack_root: Path, embedder: FaceEmbedder
) -> None:
    again = FaceEmbedder(pack_root, providers=["CPUExecutionProvider"])
    assert re.fullmatch(r"face-buffalo_l-[0-9a-f]{16}", embedder.fingerprint)
    assert again.fingerprint == embedder.fingerprint
    smaller = FaceEmbedder(pack_root, providers=["CPUExecutionProvider"], det_size=(320, 320))
    assert smaller.fingerprint != embedder.fingerprint
    assert smaller.analyze(disc_image()).embedding.shape == (512,)


def test_pack_is_deterministic(tmp_path: Path, pack_root: Path) -> None:
    other = write_tiny_face_pack(tmp_path)
    for path in sorted((pack_root / "models" / "buffalo_l").glob("*.onnx")):
        assert (other / path.name).read_bytes() == path.read_bytes()
