"""A tiny insightface model pack (toy detector + toy recogniser) for offline tests.

`write_tiny_face_pack(root)` writes `root/models/<name>/det_tiny.onnx` and
`root/models/<name>/w600k_tiny.onnx`, built with the `onnx` helper API, so the REAL
`insightface.app.FaceAnalysis(name=name, root=str(root))` loads and runs them: insightface
classifies every *.onnx in the folder by its shapes (>= 5 outputs: SCRFD detector; one square
input >= 112 divisible by 16 and one output: ArcFace recogniser), whatever the file names.

The detector is a toy: it "finds a face" where the image holds one compact bright blob on a
darker background (e.g. a skin-coloured disc), and nothing in a uniform or noisy image. It is
NOT a face detector and the recogniser is a fixed random projection: the pack only exercises
the real loading, detection, alignment and embedding code paths.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

OPSET = 17
IR_VERSION = 8  # old enough for any onnxruntime that insightface 2.1 supports

STRIDES = (8, 16, 32)  # SCRFD's three feature strides, in its output order
FIRING_STRIDE = 8  # the only stride whose scores can pass the threshold (see _detector)
NUM_ANCHORS = 2  # SCRFD with 9 outputs: 2 anchors per cell

BRIGHT = 0.25  # blob threshold on the normalised brightest channel ((v - 127.5) / 128): v > 159.5
MIN_RADIUS = 16.0  # px in the detector input: smaller blobs are not faces
MAX_FRACTION = 0.85  # a blob covering more of the detector input is background
MAX_SPREAD = 1.3  # 2 * mean squared distance / r^2: 1.0 for a disc, larger for scattered blobs
MAX_REACH = 1.2  # farthest blob cell / r: 1.0 for a disc, 1.25 for a square, 1.28 for 4:3
MIN_CONTRAST = 0.3  # inside minus outside brightness (normalised units, about 38 grey levels)
CONTRAST_GAIN = 8.0

# The 5 keypoints (left eye, right eye, nose, left mouth corner, right mouth corner) as offsets
# from the blob centre in units of its radius: the proportions of insightface's ArcFace
# template (eye distance 0.7 r), so the similarity transform of the alignment is well posed.
KEYPOINTS = ((-0.35, -0.30), (0.35, -0.30), (0.0, 0.10), (-0.29, 0.51), (0.29, 0.51))

REC_SIZE = 112
REC_POOL = 8  # 112 / 8 = 14 -> 3 * 14 * 14 = 588 pooled values
EMBEDDING_DIM = 512
REC_SEED = 1234


class _Graph:
    """Collects nodes and initializers; every node gets a unique, prefixed name."""

    def __init__(self, prefix: str) -> None:
        self.prefix = prefix
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []
        self._count = 0

    def _name(self, hint: str) -> str:
        self._count += 1
        return f"{self.prefix}_{hint}_{self._count}"

    def const(self, value: float | list[float] | list[int] | np.ndarray, hint: str = "c") -> str:
        array = np.asarray(value)
        if array.dtype.kind == "f":
            array = array.astype(np.float32)
        else:
            array = array.astype(np.int64)
        name = self._name(hint)
        self.inits.append(numpy_helper.from_array(array, name))
        return name

    def op(self, op_type: str, *inputs: str, hint: str = "", **attrs: Any) -> str:
        out = self._name(hint or op_type.lower())
        node_name = self._name(f"node_{(hint or op_type).lower()}")
        self.nodes.append(helper.make_node(op_type, list(inputs), [out], name=node_name, **attrs))
        return out

    def bin(self, op_type: str, a: str, b: float | str) -> str:
        other = b if isinstance(b, str) else self.const(b)
        return self.op(op_type, a, other)

    def indicator(self, op_type: str, a: str, b: float | str) -> str:
        """1.0 where `a <op> b` holds, else 0.0 (op_type: Greater, LessOrEqual, ...)."""
        return self.op("Cast", self.bin(op_type, a, b), to=TensorProto.FLOAT)


def _model(
    graph: _Graph, inputs: list[onnx.ValueInfoProto], outputs: list[onnx.ValueInfoProto], name: str
) -> onnx.ModelProto:
    body = helper.make_graph(graph.nodes, name, inputs, outputs, initializer=graph.inits)
    model = helper.make_model(
        body,
        opset_imports=[helper.make_opsetid("", OPSET)],
        producer_name="ipbatch-tiny-faces",
    )
    model.ir_version = IR_VERSION
    onnx.checker.check_model(model, full_check=True)
    return model


def _per_anchor(g: _Graph, cells: str, width: int) -> str:
    """[Hs, Ws, width] per-cell values -> [Hs * Ws * 2, width], rows y, then x, then anchor."""
    one = g.const([2], "axis")
    expanded = g.op("Unsqueeze", cells, one)  # [Hs, Ws, 1, width]
    doubled = g.op("Concat", *([expanded] * NUM_ANCHORS), axis=2)  # [Hs, Ws, 2, width]
    return g.op("Reshape", doubled, g.const([-1, width], "shape"))


def _detector() -> onnx.ModelProto:
    """The toy SCRFD: input [1, 3, H, W] (RGB, (v - 127.5) / 128), nine rank-2 outputs.

    Output layout (what insightface's SCRFD.forward decodes), for s in (8, 16, 32) and
    N_s = (H // s) * (W // s) * 2:

    - outputs 0..2: scores [N_s, 1];
    - outputs 3..5: boxes [N_s, 4] = (left, top, right, bottom) distances from the anchor
      centre, divided by s;
    - outputs 6..8: keypoints [N_s, 10] = (dx, dy) x 5 from the anchor centre, divided by s.

    Row k is cell (y, x) = divmod(k // 2, W // s), anchor k % 2; the anchor centre of cell
    (y, x) is the pixel (x * s, y * s). insightface keeps rows with score >= 0.5, then NMS.

    How it "detects": the input is average-pooled to 8x8 cells, and a cell is bright when its
    brightest channel exceeds BRIGHT (so red or blue discs count, mid-grey does not; pooling
    first averages noise away). The bright cells form one blob, described by global statistics:
    centroid (cx, cy), equivalent radius r = sqrt(area / pi), spread (mean squared distance),
    reach (farthest cell) and contrast (inside minus outside brightness). The blob is a face
    when r >= MIN_RADIUS, it covers at most MAX_FRACTION of the input (insightface letterboxes
    with black, so a uniformly bright photo becomes a bright rectangle), its spread and reach are
    disc-like (a rectangle reaches too far) and its contrast is at least MIN_CONTRAST. Then the
    stride-8 anchors nearest the centroid score sigmoid(8 * (contrast - MIN_CONTRAST)) and every
    other row scores 0 (strides 16 and 32 never fire). Every row of every stride predicts the
    same absolute box (cx -/+ r, cy -/+ r) and the same KEYPOINTS, so the few firing rows
    collapse to ONE detection under NMS. Several discs in one image are seen as one scattered
    blob (no face); a disc cut by the image border may fail the reach test: this is a toy for
    single-reference tests, not a detector.
    """
    g = _Graph("det")
    x = "input.1"
    # global statistics on the 8x8-pooled brightness map (NCHW, [1, 1, h, w])
    pooled = g.op("AveragePool", x, kernel_shape=[8, 8], strides=[8, 8])
    bright = g.op("ReduceMax", pooled, axes=[1], keepdims=1)
    mask = g.indicator("Greater", bright, BRIGHT)
    ones = g.bin("Add", g.bin("Mul", bright, 0.0), 1.0)
    col = g.bin("Sub", g.op("CumSum", ones, g.const(3, "axis")), 1.0)
    row = g.bin("Sub", g.op("CumSum", ones, g.const(2, "axis")), 1.0)
    px = g.bin("Add", g.bin("Mul", col, 8.0), 3.5)  # pixel centre of each 8x8 cell
    py = g.bin("Add", g.bin("Mul", row, 8.0), 3.5)

    def total(t: str) -> str:
        return g.op("ReduceSum", t, keepdims=1)  # [1, 1, 1, 1]

    cells = total(mask)
    safe_cells = g.bin("Max", cells, 1.0)
    cx = g.op("Div", total(g.op("Mul", mask, px)), safe_cells)
    cy = g.op("Div", total(g.op("Mul", mask, py)), safe_cells)
    radius = g.op("Sqrt", g.bin("Mul", cells, 64.0 / math.pi))
    dxc = g.op("Sub", px, cx)
    dyc = g.op("Sub", py, cy)
    dist2 = g.op("Add", g.op("Mul", dxc, dxc), g.op("Mul", dyc, dyc))
    mean_d2 = g.op("Div", total(g.op("Mul", mask, dist2)), safe_cells)
    spread = g.op("Div", g.bin("Mul", mean_d2, 2.0), g.bin("Add", g.op("Mul", radius, radius), 1.0))
    farthest = g.op("Sqrt", g.op("ReduceMax", g.op("Mul", mask, dist2), keepdims=1))
    reach = g.op("Div", farthest, g.bin("Add", radius, 1.0))
    all_cells = total(ones)
    outside = g.op("Sub", all_cells, cells)
    inside_mean = g.op("Div", total(g.op("Mul", mask, bright)), safe_cells)
    outside_mask = g.op("Sub", ones, mask)
    outside_mean = g.op("Div", total(g.op("Mul", outside_mask, bright)), g.bin("Max", outside, 1.0))
    contrast = g.op("Sub", inside_mean, outside_mean)
    fraction = g.op("Div", cells, all_cells)
    valid = g.indicator("GreaterOrEqual", radius, MIN_RADIUS)
    valid = g.op("Mul", valid, g.indicator("LessOrEqual", fraction, MAX_FRACTION))
    valid = g.op("Mul", valid, g.indicator("LessOrEqual", spread, MAX_SPREAD))
    valid = g.op("Mul", valid, g.indicator("LessOrEqual", reach, MAX_REACH))
    valid = g.op("Mul", valid, g.indicator("GreaterOrEqual", contrast, MIN_CONTRAST))
    confidence = g.op("Sigmoid", g.bin("Mul", g.bin("Sub", contrast, MIN_CONTRAST), CONTRAST_GAIN))
    confidence = g.op("Mul", confidence, valid)

    scalar = g.const([1], "shape")
    cx, cy, radius, confidence = (g.op("Reshape", t, scalar) for t in (cx, cy, radius, confidence))
    # absolute box and keypoints, shared by every anchor
    x1 = g.op("Sub", cx, radius)
    y1 = g.op("Sub", cy, radius)
    x2 = g.op("Add", cx, radius)
    y2 = g.op("Add", cy, radius)
    kx = g.op("Add", cx, g.op("Mul", radius, g.const([k[0] for k in KEYPOINTS], "kx")))  # [5]
    ky = g.op("Add", cy, g.op("Mul", radius, g.const([k[1] for k in KEYPOINTS], "ky")))

    scores, boxes, kpss = [], [], []
    for s in STRIDES:
        grid = g.op("AveragePool", x, kernel_shape=[s, s], strides=[s, s])  # [1, 3, Hs, Ws]
        grid_ones = g.bin(
            "Add", g.bin("Mul", g.op("ReduceMax", grid, axes=[1], keepdims=1), 0.0), 1.0
        )
        hw = g.op("Transpose", grid_ones, perm=[2, 3, 0, 1])  # [Hs, Ws, 1, 1]
        hw = g.op("Squeeze", hw, g.const([3], "axes"))  # [Hs, Ws, 1]
        ax = g.bin("Mul", g.bin("Sub", g.op("CumSum", hw, g.const(1, "axis")), 1.0), float(s))
        ay = g.bin("Mul", g.bin("Sub", g.op("CumSum", hw, g.const(0, "axis")), 1.0), float(s))

        half = s / 2.0
        near = g.op(
            "Mul",
            g.indicator("LessOrEqual", g.op("Abs", g.op("Sub", ax, cx)), half),
            g.indicator("LessOrEqual", g.op("Abs", g.op("Sub", ay, cy)), half),
        )
        fires = 1.0 if s == FIRING_STRIDE else 0.0
        score = g.bin("Mul", g.op("Mul", near, confidence), fires)  # [Hs, Ws, 1]
        scores.append(_per_anchor(g, score, 1))

        inv = 1.0 / s
        left = g.bin("Mul", g.op("Sub", ax, x1), inv)
        top = g.bin("Mul", g.op("Sub", ay, y1), inv)
        right = g.bin("Mul", g.op("Sub", x2, ax), inv)
        bottom = g.bin("Mul", g.op("Sub", y2, ay), inv)
        box = g.op("Concat", left, top, right, bottom, axis=2)  # [Hs, Ws, 4]
        boxes.append(_per_anchor(g, box, 4))

        kdx = g.bin("Mul", g.op("Sub", kx, ax), inv)  # [Hs, Ws, 5]
        kdy = g.bin("Mul", g.op("Sub", ky, ay), inv)
        last = g.const([3], "axes")
        pairs = g.op("Concat", g.op("Unsqueeze", kdx, last), g.op("Unsqueeze", kdy, last), axis=3)
        kps = g.op("Reshape", pairs, g.const([0, 0, 10], "shape"))  # [Hs, Ws, 10] (dx, dy) x 5
        kpss.append(_per_anchor(g, kps, 10))

    outputs = []
    for kind, tensors, width in (("score", scores, 1), ("bbox", boxes, 4), ("kps", kpss, 10)):
        for s, tensor in zip(STRIDES, tensors, strict=True):
            name = f"{kind}_{s}"
            g.nodes.append(helper.make_node("Identity", [tensor], [name], name=f"det_out_{name}"))
            outputs.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, [f"n{s}", width]))
    inputs = [helper.make_tensor_value_info(x, TensorProto.FLOAT, [1, 3, "height", "width"])]
    return _model(g, inputs, outputs, "tiny_scrfd")


def _recogniser() -> onnx.ModelProto:
    """Toy ArcFace: [N, 3, 112, 112] -> [N, 512], a fixed random projection of 8x8 means.

    insightface feeds (v - 127.5) / 127.5 in RGB order (it picks mean 0 / std 1 only when the
    first nodes are named Sub*/Mul*, so no node here is). Visibly different aligned crops give
    different embeddings; the same crop gives the same one.
    """
    g = _Graph("rec")
    x = "input.1"
    pooled = g.op("AveragePool", x, kernel_shape=[REC_POOL, REC_POOL], strides=[REC_POOL] * 2)
    flat = g.op("Flatten", pooled, axis=1)  # [N, 588]
    features = 3 * (REC_SIZE // REC_POOL) ** 2
    rng = np.random.default_rng(REC_SEED)
    weight = rng.standard_normal((features, EMBEDDING_DIM)) / math.sqrt(features)
    projected = g.op("MatMul", flat, g.const(weight, "proj"))
    g.nodes.append(helper.make_node("Identity", [projected], ["fc1"], name="rec_out"))
    inputs = [helper.make_tensor_value_info(x, TensorProto.FLOAT, ["N", 3, REC_SIZE, REC_SIZE])]
    outputs = [helper.make_tensor_value_info("fc1", TensorProto.FLOAT, ["N", EMBEDDING_DIM])]
    return _model(g, inputs, outputs, "tiny_arcface")


def write_tiny_face_pack(root: Path, name: str = "buffalo_l") -> Path:
    """Write the toy pack to `root/models/<name>/` and return that folder. Deterministic."""
    folder = Path(root).expanduser().resolve() / "models" / name
    folder.mkdir(parents=True, exist_ok=True)
    onnx.save(_detector(), str(folder / "det_tiny.onnx"))
    onnx.save(_recogniser(), str(folder / "w600k_tiny.onnx"))
    return folder
