"""An adapter's fields on a manifest row, declared once (`AdapterFields`): the `adapters`
entries (`AdapterSpec`) and a row's single form (`pipeline.manifest.Row`) both have them.

What the fields must agree on is checked here, in two steps: among themselves
(`check_adapter_fields`, any adapter) and against the adapter's preset and base model
(`check_with_preset`, once the row knows which adapter a name means).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Annotated

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    StringConstraints,
    field_validator,
    model_validator,
)

from pipeline.families import BaseModelPreset
from pipeline.instantstyle import (
    BlockScales,
    StylePreset,
    check_for_family,
    check_values,
    read_preset,
)
from pipeline.presets import ADAPTERS, AdapterPreset, EmbedKind, adapter_error
from pipeline.references import NOISE, Combine, Fit

# FaceID-Plus v2's structure weight: the model card's `s_scale` (1.0 there), diffusers'
# `shortcut_scale`; ComfyUI lets it go up to 5
SScale = Annotated[float, Field(ge=0, le=5)]
CUSTOM_ADAPTER_PATTERN = r"^custom:[A-Za-z0-9][A-Za-z0-9._-]{0,127}$"
AdapterLookup = Callable[[str], AdapterPreset]
Uri = Annotated[str, StringConstraints(min_length=1, strip_whitespace=True)]
Fraction = Annotated[float, Field(ge=0, le=1)]
Weight = Annotated[float, Field(ge=0, le=10)]
Scale = Annotated[
    Annotated[float, Field(ge=0, le=2)] | BlockScales | StylePreset,
    BeforeValidator(read_preset),
    AfterValidator(check_values),
]


def _check_adapter_name(name: str) -> str:
    if name not in ADAPTERS and not re.fullmatch(CUSTOM_ADAPTER_PATTERN, name):
        raise ValueError(adapter_error(name))
    return name


AdapterName = Annotated[str, AfterValidator(_check_adapter_name)]


def preset_of(name: str, lookup: AdapterLookup) -> AdapterPreset:
    """The preset a name means; a trained (custom:) name through `lookup`, the worker's
    catalog (KeyError: there is no adapter of that name)."""
    try:
        return lookup(name)
    except KeyError as exc:
        raise ValueError(f"adapter: {exc.args[0] if exc.args else name}") from None


def as_reference_list(value: str | list[str]) -> list[str]:
    refs = [value] if isinstance(value, str) else list(value)
    if not refs or any(not r.strip() for r in refs):
        raise ValueError("reference must be a non-empty URI or a non-empty list of URIs")
    return refs


def as_uri_list(value: str | list[str] | None) -> list[str]:
    return [] if value is None else [value] if isinstance(value, str) else list(value)


class AdapterFields(BaseModel):
    """One IP-Adapter's fields besides its references: which weights, how strong, when, how
    the references are fitted and combined, and what the negative side of guidance sees."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    adapter: AdapterName = "sd15"
    scale: Scale = 0.5
    combine: Combine = "average"
    s_scale: SScale | None = None
    # where this adapter's reference applies: a mask image (white = here), one for all its
    # references or one per reference
    region: Uri | list[Uri] | None = None
    # how each picture is made square for the encoder (absent: crop, the encoder's own)
    fit: Fit | None = None
    weights: list[Weight] | None = Field(None, min_length=1)  # one per reference
    # the picture (or "noise") whose embedding replaces the zero negative in CFG
    negative_reference: Uri | None = None
    # the fraction of the steps the adapter acts on (absent: 0 and 1, every step)
    start: Fraction | None = None
    end: Fraction | None = None

    @property
    def regions(self) -> list[str]:
        return as_uri_list(self.region)

    @property
    def shortcut_scale(self) -> float:
        """The FaceID-Plus v2 structure weight (the model card's `s_scale`; diffusers'
        `shortcut_scale`): the card's 1.0 unless the row says otherwise."""
        return 1.0 if self.s_scale is None else self.s_scale

    @property
    def effective_fit(self) -> Fit:
        return self.fit or "crop"

    @property
    def window(self) -> tuple[float, float]:
        """(start, end): the adapter acts on step i of n when i / n >= start (a ControlNet's
        rule) and i <= int(n * end) (diffusers' IPAdapterScaleCutoffCallback's)."""
        return (self.start or 0.0, 1.0 if self.end is None else self.end)


class AdapterSpec(AdapterFields):
    """One IP-Adapter applied to a row (an entry of `adapters`)."""

    reference: str | list[str]

    @property
    def references(self) -> list[str]:
        return as_reference_list(self.reference)

    @property
    def pictures(self) -> list[str]:
        """Every picture this adapter reads: its references and a negative reference (the
        built-in "noise" is made, not read)."""
        negative = self.negative_reference
        return self.references + ([negative] if negative is not None and negative != NOISE else [])

    @field_validator("reference")
    @classmethod
    def _reference_ok(cls, value: str | list[str]) -> str | list[str]:
        as_reference_list(value)
        return value

    @model_validator(mode="after")
    def _consistent(self) -> AdapterSpec:
        check_adapter_fields(self)
        return self


SINGLE_FORM = ("reference", *AdapterFields.model_fields)  # a row's own adapter fields


def check_adapter_fields(spec: AdapterFields) -> None:
    """What an adapter's fields must agree on, written as an `adapters` entry or in the
    row's single form: s_scale only for an adapter with the shortcut, one region per
    reference (or one for all), several regions only with concat, one weight per reference,
    subtract with two references or more, a window that starts before it ends."""
    reference = getattr(spec, "reference", None)
    assert reference is not None
    preset = ADAPTERS.get(spec.adapter)  # a trained adapter is a base or plus one
    if spec.s_scale is not None and (preset is None or not preset.shortcut):
        with_shortcut = [name for name, p in ADAPTERS.items() if p.shortcut]
        raise ValueError(f"s_scale applies to {', '.join(with_shortcut)} only, not {spec.adapter}")
    regions = as_uri_list(spec.region)
    references = as_reference_list(reference)
    if isinstance(spec.region, list) and len(regions) not in (1, len(references)):
        raise ValueError(
            f"region: give one mask for all {len(references)} references or one per "
            f"reference, not {len(regions)}"
        )
    if len(regions) > 1 and spec.combine != "concat":
        raise ValueError(
            f"region: combine {spec.combine!r} makes the references one embedding, so it takes "
            "one mask; use combine 'concat' for one mask per reference"
        )
    if len(regions) > 1 and spec.fit == "tiles":
        raise ValueError(
            "region: fit 'tiles' makes each reference several token sets; give one mask for "
            "all of them"
        )
    if spec.weights is not None:
        if len(spec.weights) != len(references):
            raise ValueError(
                f"weights: give one per reference ({len(references)}), not {len(spec.weights)}"
            )
        if spec.combine in ("average", "norm_average") and sum(spec.weights) <= 0:
            raise ValueError(f"weights: combine {spec.combine!r} needs a weight above 0")
    if spec.combine == "subtract" and len(references) < 2:
        raise ValueError(
            "combine 'subtract' takes the first reference minus the others: give two or more"
        )
    start, end = spec.window
    if start >= end:
        raise ValueError(f"start ({start:g}) must be before end ({end:g})")


def active_steps(window: tuple[float, float], steps: int) -> int:
    """How many of `steps` denoising steps the window holds (see `AdapterFields.window`)."""
    start, end = window
    return sum(1 for i in range(steps) if not (i / steps < start or i > int(steps * end)))


def check_with_preset(
    spec: AdapterSpec,
    preset: AdapterPreset,
    base: BaseModelPreset,
    *,
    steps: int,
    negative_pass: str | None,
) -> None:
    """What a field needs of the adapter's preset and base model. `steps`: the steps the row's
    pipeline runs (img2img: steps x strength); `negative_pass`: None when the row's call makes
    a negative pass, else what the row would need for one."""
    check_for_family(spec.scale, base.family, base.attention_blocks, spec.adapter)
    references = spec.references
    face = preset.uses_faces
    if face and spec.effective_fit != "crop":
        raise ValueError(
            f"fit: {spec.adapter} embeds the face it finds, aligned and cropped by insightface; "
            "it takes no fit"
        )
    if face and spec.negative_reference is not None:
        raise ValueError(
            f"negative_reference: {spec.adapter}'s negative is no face (zeros); it takes none"
        )
    one_picture = base.embeds == "cfg_tensor" or preset.embed_kind is EmbedKind.FACE_ID_PLUS
    if one_picture and spec.combine == "concat" and len(references) > 1:
        what = "one face" if face else "one picture's features"
        raise ValueError(
            f"combine: {spec.adapter} takes {what}; combine several references with 'average'"
        )
    if spec.fit == "tiles" and not one_picture and len(references) > 1 and spec.combine != "concat":
        raise ValueError(
            "fit 'tiles' makes each picture one embedding per tile, which only combine "
            f"'concat' joins across references, not {spec.combine!r}"
        )
    if spec.negative_reference is not None and negative_pass is not None:
        raise ValueError(
            f"negative_reference needs {negative_pass}: the row makes no negative pass otherwise"
        )
    if (spec.start is not None or spec.end is not None) and active_steps(spec.window, steps) == 0:
        raise ValueError(
            f"start/end: the window ({spec.window[0]:g}..{spec.window[1]:g}) holds none of "
            f"the {steps} steps this row runs"
        )
