"""InstantStyle: an IP-Adapter's strength per attention block (`set_ip_adapter_scale` with a
dict), checked against a family's blocks, and the named presets a row may give instead.

Presets (`{"preset": "style", "strength": 0.8}`) expand to the block dictionaries published by
InstantStyle (arXiv 2404.02733; github.com/InstantStyle/InstantStyle, README and
infer_style_sd15.py) and the diffusers docs (using-diffusers/ip_adapter, "Style & layout
control"), with every 1.0 there replaced by the strength:
- SDXL: style = up block 0's second attention (`up_blocks.0.attentions.1`), layout = down
  block 2's second (`down_blocks.2.attentions.1`), style_and_layout = both;
- SD1.5 (InstantStyle calls it experimental): style = up block 1 (`up_blocks.1`),
  style_and_layout = down block 2, the mid block and up block 1; layout = style_and_layout
  without style (InstantStyle publishes no SD1.5 layout-only list).
"""

from __future__ import annotations

import re
import typing
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

BlockScale = float | list[float]
# {"down": {"block_2": [0.0, 1.0]}, "up": {"block_0": 1.0}}
BlockScales = dict[Literal["down", "mid", "up"], float | dict[str, BlockScale]]
PresetName = Literal["style", "layout", "style_and_layout"]


class StylePreset(BaseModel):
    """A named InstantStyle scale: which blocks, and the strength they get."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    preset: PresetName
    strength: float = Field(1.0, ge=0, le=2)


# family -> preset -> blocks at strength 1.0 (the published dictionaries)
PRESETS: dict[str, dict[str, BlockScales]] = {
    "sdxl": {
        "style": {"up": {"block_0": [0.0, 1.0, 0.0]}},
        "layout": {"down": {"block_2": [0.0, 1.0]}},
        "style_and_layout": {"down": {"block_2": [0.0, 1.0]}, "up": {"block_0": [0.0, 1.0, 0.0]}},
    },
    "sd15": {
        "style": {"up": {"block_1": 1.0}},
        "layout": {"down": {"block_2": 1.0}, "mid": 1.0},
        "style_and_layout": {"down": {"block_2": 1.0}, "mid": 1.0, "up": {"block_1": 1.0}},
    },
}


def read_preset(value: Any) -> Any:
    """A scale written as {"preset": ...} is a `StylePreset`, with an error that names the
    presets (not the union's every alternative)."""
    if not isinstance(value, dict) or "preset" not in value:
        return value
    name = value["preset"]
    names = typing.get_args(PresetName)
    if name not in names:
        raise ValueError(f"preset {name!r} is not one of {', '.join(names)}")
    unknown = set(value) - {"preset", "strength"}
    if unknown:
        raise ValueError(f"a preset takes 'preset' and 'strength', not {sorted(unknown)}")
    return StylePreset.model_validate(value)


def expand(scale: Any, family: str) -> float | BlockScales:
    """A row's scale as diffusers takes it: a number or a block dict as written; a preset as
    its family's block dict times its strength."""
    if not isinstance(scale, StylePreset):
        return scale
    blocks = PRESETS[family][scale.preset]

    def times(value: Any) -> Any:
        if isinstance(value, dict):
            return {k: times(v) for k, v in value.items()}
        if isinstance(value, list):
            return [v * scale.strength for v in value]
        return value * scale.strength

    return times(blocks)


def check_values(scale: Any) -> Any:
    """A block dict's names and values (0..2), whatever the family."""
    if isinstance(scale, dict):
        for part, value in scale.items():
            if not isinstance(value, dict) and not 0 <= value <= 2:
                raise ValueError(f"scale.{part}: a scale must be within 0..2, got {value:g}")
            blocks = value if isinstance(value, dict) else {}
            for block, block_scale in blocks.items():
                if not re.fullmatch(r"block_\d+", block):
                    raise ValueError(
                        f"scale.{part}: block names look like 'block_2', not {block!r}"
                    )
                values = block_scale if isinstance(block_scale, list) else [block_scale]
                if not values or any(not 0 <= v <= 2 for v in values):
                    raise ValueError(f"scale.{part}.{block}: each scale must be within 0..2")
    return scale


def check_for_family(
    scale: Any, family: str, blocks_of_family: dict[str, dict[str, int]], adapter: str
) -> None:
    """A block dict must name blocks that have attention in this base model, with one value per
    attention module (diffusers silently ignores unknown blocks); a preset needs a family with
    published presets."""
    if isinstance(scale, StylePreset):
        if family not in PRESETS:
            raise ValueError(
                f"scale.preset: InstantStyle presets are published for "
                f"{' and '.join(sorted(PRESETS))}, not {family} ({adapter})"
            )
        return
    if not isinstance(scale, dict):
        return
    for part, value in scale.items():
        if part == "mid":
            if isinstance(value, dict):
                raise ValueError("scale.mid takes one number")
            continue
        if not isinstance(value, dict):
            continue
        known = blocks_of_family[part]
        for block, block_scale in value.items():
            if block not in known:
                raise ValueError(
                    f"scale.{part}.{block}: {adapter} ({family}) has attention in "
                    f"{part} blocks {', '.join(known)} only"
                )
            if isinstance(block_scale, list) and len(block_scale) != known[block]:
                raise ValueError(
                    f"scale.{part}.{block}: needs {known[block]} values (one per attention "
                    f"module), got {len(block_scale)}"
                )
