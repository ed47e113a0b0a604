"""A row's structure inputs: control images, region masks, the init image and the inpaint mask.

The embed stage reads each one with the reference rules (allowed sources, size and pixel
limits, EXIF, odd modes, the same error codes), prepares it (`prepare`: decoded, canny edges
computed, a cut-out's alpha turned into a mask) and caches the pixels content-addressed next to
the embeddings, so a control image shared by 1,000 rows is read and prepared once and the GPU
worker reads only the cache. Images keep their own size here: diffusers' processors resize them
to the row's size in the call, as they do for anyone calling diffusers.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image

from pipeline.images import alpha_mask, mask_levels, open_image, to_rgb
from pipeline.manifest import Row

if TYPE_CHECKING:
    import torch

# The cache's "encoder" for prepared inputs: bump it when `prepare` changes what it makes
# (v2: a mask's transparent pixels are black, not white)
ENCODER = "inputs-v2"
CONTROL, REGION, INIT, MASK = "control", "region", "init", "mask"


@dataclass(frozen=True)
class RowInput:
    """One input of a row, where it goes, and how it is prepared."""

    role: str  # control | region | init | mask
    owner: int  # the control's index (control), the adapter's index (region); else 0
    position: int  # the mask's index among its adapter's regions; else 0
    uri: str  # as the row wrote it (relative URIs resolve against the manifest)
    kind: str  # rgb | canny-LOW-HIGH | mask | alpha

    @property
    def slot(self) -> tuple[str, int, int]:
        return (self.role, self.owner, self.position)


def row_inputs(row: Row) -> list[RowInput]:
    """Every structure input of the row, in a stable order."""
    found = []
    for i, control in enumerate(row.control or []):
        kind = "rgb" if control.preprocess == "none" else "canny-{}-{}".format(*control.thresholds)
        found.append(RowInput(CONTROL, i, 0, control.image, kind))
    for a, spec in enumerate(row.adapter_specs()):
        for r, uri in enumerate(spec.regions):
            found.append(RowInput(REGION, a, r, uri, "mask"))
    if row.init_image is not None:
        found.append(RowInput(INIT, 0, 0, row.init_image, "rgb"))
        if row.inpaint_mask == "alpha":  # the init image's own transparency
            found.append(RowInput(MASK, 0, 0, row.init_image, "alpha"))
        elif row.inpaint_mask is not None:
            found.append(RowInput(MASK, 0, 0, row.inpaint_mask, "mask"))
    return found


def prepare(
    data: bytes, kind: str, *, name: str, max_pixels: int, max_bytes: int
) -> dict[str, torch.Tensor]:
    """An input's bytes -> its prepared pixels, {"pixels": uint8 [H, W, C]} (C = 3 for rgb
    and canny, 1 for masks), or an ItemError naming the file."""
    import torch

    image = open_image(data, name=name, max_pixels=max_pixels, max_bytes=max_bytes)
    if kind == "rgb":
        pixels = np.asarray(to_rgb(image))
    elif kind.startswith("canny-"):
        low, high = (int(v) for v in kind.removeprefix("canny-").split("-"))
        pixels = canny(to_rgb(image), low, high)
    elif kind == "mask":  # grey levels; transparent = not selected (black)
        pixels = np.asarray(mask_levels(image))[:, :, None]
    elif kind == "alpha":
        pixels = np.asarray(alpha_mask(image, name=name))[:, :, None]
    else:
        raise ValueError(f"unknown input kind {kind!r}")
    return {"pixels": torch.from_numpy(np.array(pixels, dtype=np.uint8, order="C", copy=True))}


def canny(image: Image.Image, low: int, high: int) -> np.ndarray:
    """Canny edges as the ControlNet guides compute them: OpenCV on the RGB array, white edges
    on black, three channels. [H, W, 3] uint8."""
    import cv2

    edges = cv2.Canny(np.asarray(image), low, high)
    return np.repeat(edges[:, :, None], 3, axis=2)


def to_image(tensors: dict[str, torch.Tensor]) -> Image.Image:
    """Cached pixels -> the PIL image a diffusers call takes (RGB, or L for a mask)."""
    pixels = tensors["pixels"].numpy()
    if pixels.shape[2] == 1:
        return Image.fromarray(pixels[:, :, 0], mode="L")
    return Image.fromarray(pixels, mode="RGB")
