"""The job manifest's schema: `Row` is the validated form of one line (JSON Lines, or CSV with
the same columns), with its adapter and ControlNet specs. Reading a manifest file is
`pipeline.manifest_reader`.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Callable
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    StringConstraints,
    ValidationInfo,
    field_validator,
    model_validator,
)

from pipeline.families import BASE_MODELS, BaseModelPreset
from pipeline.presets import (
    ADAPTERS,
    CONTROLNETS,
    AdapterPreset,
    EmbedKind,
    SchedulerName,
    adapter_error,
    builtin_adapter,
    controlnet_error,
)

ROW_ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$"
MAX_SEED = 2**32 - 1

RowId = Annotated[str, StringConstraints(pattern=ROW_ID_PATTERN)]
# An InstantStyle scale: {"down": {"block_2": [0.0, 1.0]}, "up": {"block_0": 1.0}}
BlockScale = float | list[float]
InstantStyle = dict[Literal["down", "mid", "up"], float | dict[str, BlockScale]]
Combine = Literal["average", "concat"]
# FaceID-Plus v2's structure weight: the model card's `s_scale` (1.0 there), diffusers'
# `shortcut_scale`; ComfyUI lets it go up to 5
SScale = Annotated[float, Field(ge=0, le=5)]


CUSTOM_ADAPTER_PATTERN = r"^custom:[A-Za-z0-9][A-Za-z0-9._-]{0,127}$"


def _check_adapter_name(name: str) -> str:
    if name not in ADAPTERS and not re.fullmatch(CUSTOM_ADAPTER_PATTERN, name):
        raise ValueError(adapter_error(name))
    return name


AdapterLookup = Callable[[str], AdapterPreset]


def _preset(name: str, lookup: AdapterLookup) -> AdapterPreset:
    """The preset a name means; a trained (custom:) name through `lookup`, the worker's
    catalog (KeyError: there is no adapter of that name)."""
    try:
        return lookup(name)
    except KeyError as exc:
        raise ValueError(f"adapter: {exc.args[0] if exc.args else name}") from None


def _check_instant_style(scale: float | InstantStyle) -> float | InstantStyle:
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


AdapterName = Annotated[str, AfterValidator(_check_adapter_name)]


def _check_controlnet_name(name: str) -> str:
    if name not in CONTROLNETS:
        raise ValueError(controlnet_error(name))
    return name


ControlNetName = Annotated[str, AfterValidator(_check_controlnet_name)]
Uri = Annotated[str, StringConstraints(min_length=1, strip_whitespace=True)]
Fraction = Annotated[float, Field(ge=0, le=1)]
Scale = Annotated[
    Annotated[float, Field(ge=0, le=2)] | InstantStyle, AfterValidator(_check_instant_style)
]


def _check_blocks(scale: InstantStyle, base: BaseModelPreset, adapter: str) -> None:
    """An InstantStyle dict must name blocks that have attention in this base model, with one
    value per attention module (diffusers silently ignores unknown blocks)."""
    for part, value in scale.items():
        if part == "mid":
            if isinstance(value, dict):
                raise ValueError("scale.mid takes one number")
            continue
        if not isinstance(value, dict):
            continue
        known = base.attention_blocks[part]
        for block, block_scale in value.items():
            if block not in known:
                raise ValueError(
                    f"scale.{part}.{block}: {adapter} ({base.family}) has attention in "
                    f"{part} blocks {', '.join(known)} only"
                )
            if isinstance(block_scale, list) and len(block_scale) != known[block]:
                raise ValueError(
                    f"scale.{part}.{block}: needs {known[block]} values (one per attention "
                    f"module), got {len(block_scale)}"
                )


def _as_reference_list(value: str | list[str]) -> list[str]:
    refs = [value] if isinstance(value, str) else list(value)
    if not refs or any(not r.strip() for r in refs):
        raise ValueError("reference must be a non-empty URI or a non-empty list of URIs")
    return refs


class ControlSpec(BaseModel):
    """One ControlNet on a row: which weights, which condition image, how strong, when."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    model: ControlNetName
    image: Uri
    # "none": the image already is the condition map (a pose skeleton, a depth map, edges);
    # "canny": edges computed from a photo with OpenCV (thresholds `low`, `high`)
    preprocess: Literal["none", "canny"] = "none"
    low: int | None = Field(None, ge=0, le=255)
    high: int | None = Field(None, ge=0, le=255)
    scale: float = Field(1.0, ge=0, le=2)
    start: Fraction = 0.0
    end: Fraction = 1.0

    @model_validator(mode="after")
    def _consistent(self) -> ControlSpec:
        if self.start >= self.end:
            raise ValueError(f"start ({self.start:g}) must be before end ({self.end:g})")
        if self.preprocess != "canny" and (self.low is not None or self.high is not None):
            raise ValueError("low / high are canny thresholds: give them with preprocess 'canny'")
        if self.low is not None and self.high is not None and self.low >= self.high:
            raise ValueError(f"low ({self.low}) must be below high ({self.high})")
        return self

    @property
    def thresholds(self) -> tuple[int, int]:
        """Canny's (low, high): the diffusers docs' 100 / 200 unless the row says otherwise."""
        return (100 if self.low is None else self.low, 200 if self.high is None else self.high)


def _as_uri_list(value: str | list[str] | None) -> list[str]:
    return [] if value is None else [value] if isinstance(value, str) else list(value)


class AdapterSpec(BaseModel):
    """One IP-Adapter applied to a row: which weights, which reference image(s), how strong."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    adapter: AdapterName = "sd15"
    reference: str | list[str]
    scale: Scale = 0.5
    combine: Combine = "average"
    s_scale: SScale | None = None
    # where this adapter's reference applies: a mask image (white = here), one for all its
    # references or one per reference
    region: Uri | list[Uri] | None = None

    @property
    def references(self) -> list[str]:
        return _as_reference_list(self.reference)

    @field_validator("reference")
    @classmethod
    def _reference_ok(cls, value: str | list[str]) -> str | list[str]:
        _as_reference_list(value)
        return value

    @model_validator(mode="after")
    def _consistent(self) -> AdapterSpec:
        _check_adapter_fields(self)
        return self

    @property
    def regions(self) -> list[str]:
        return _as_uri_list(self.region)

    @property
    def shortcut_scale(self) -> float:
        """The FaceID-Plus v2 structure weight (the model card's `s_scale`; diffusers'
        `shortcut_scale`): the card's 1.0 unless the row says otherwise."""
        return 1.0 if self.s_scale is None else self.s_scale


def _check_family(row: Row, base: BaseModelPreset, specs: list[AdapterSpec]) -> None:
    """What a family's pipelines take: FLUX.1 (guidance-distilled) has no negative pass
    unless `true_cfg_scale` > 1 and no CLIP skip; `true_cfg_scale` is FLUX's alone; the
    transformer families' IP-Adapter processors take no masks and no InstantStyle blocks;
    SD3.5 loads one adapter, fed one picture's features; a mode (with ControlNets or not)
    needs a diffusers class of the family that takes IP-Adapters; `clip_skip` needs pipelines
    that take it. Each would be ignored silently by diffusers, or fail deep inside it."""
    try:
        base.pipeline(row.mode, bool(row.control))
    except KeyError as exc:
        field = "inpaint_mask" if row.mode == "inpaint" else "init_image"
        raise ValueError(f"{'control' if row.control else field}: {exc.args[0]}") from None
    if row.clip_skip is not None and not base.clip_skip:
        raise ValueError(
            f"clip_skip is for SD1.5, SDXL and SD3.5 rows: {base.pipeline_class} takes none"
        )
    if base.embeds == "cfg_tensor":  # SD3IPAdapterMixin
        if len(specs) > 1:
            raise ValueError(
                f"adapters: a {base.family} row takes one IP-Adapter (diffusers' SD3 loader "
                "loads one)"
            )
        if specs[0].combine == "concat" and len(specs[0].references) > 1:
            raise ValueError(
                f"combine: {specs[0].adapter}'s projection takes one picture's features; "
                "combine several references with 'average'"
            )
    if base.guidance != "distilled":
        if row.true_cfg_scale is not None:
            raise ValueError(f"true_cfg_scale is for FLUX.1 rows; this row runs on {base.family}")
    else:
        true_cfg = row.true_cfg_scale is not None and row.true_cfg_scale > 1
        if row.negative_prompt and not true_cfg:
            raise ValueError(
                "negative_prompt on a FLUX.1 row needs true_cfg_scale > 1: FLUX.1-dev's "
                "guidance is distilled, it makes no negative pass otherwise"
            )
    for spec in specs:
        if isinstance(spec.scale, dict) and not base.attention_blocks:
            raise ValueError(
                f"scale: InstantStyle blocks are for SD1.5 and SDXL, not {spec.adapter}"
            )
    if base.row_scale != "processor":
        return
    for spec in specs:
        if spec.region is not None:
            raise ValueError(f"region: {spec.adapter}'s pipeline takes no IP-Adapter masks")


def _family_defaults(row: Row, base: BaseModelPreset) -> dict[str, Any]:
    """The family's defaults for what the row leaves unset."""
    defaults: dict[str, Any] = {}
    if row.steps is None:
        defaults["steps"] = base.default_steps
    if row.guidance_scale is None:
        defaults["guidance_scale"] = base.default_guidance
    return defaults


def _check_adapter_fields(spec: AdapterSpec | Row) -> None:
    """What an adapter's fields must agree on, written as an `adapters` entry or in the
    row's single form: s_scale only for an adapter with the shortcut, one region per
    reference (or one for all), several regions only with concat."""
    assert spec.reference is not None
    preset = ADAPTERS.get(spec.adapter)  # a trained adapter is a base or plus one
    if spec.s_scale is not None and (preset is None or not preset.shortcut):
        with_shortcut = [name for name, p in ADAPTERS.items() if p.shortcut]
        raise ValueError(f"s_scale applies to {', '.join(with_shortcut)} only, not {spec.adapter}")
    regions = _as_uri_list(spec.region)
    references = _as_reference_list(spec.reference)
    if isinstance(spec.region, list) and len(regions) not in (1, len(references)):
        raise ValueError(
            f"region: give one mask for all {len(references)} references or one per "
            f"reference, not {len(regions)}"
        )
    if len(regions) > 1 and spec.combine == "average":
        raise ValueError(
            "region: combine 'average' makes the references one embedding, so it takes one "
            "mask; use combine 'concat' for one mask per reference"
        )


_FAMILY_DEFAULT = (
    "default: the base model family's ("
    + "; ".join(
        f"{b.family}: {b.default_steps} steps, guidance {b.default_guidance:g}"
        for b in BASE_MODELS.values()
    )
    + ")"
)


class Row(BaseModel):
    """One manifest line, validated. Field meanings are in README's manifest table."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    id: RowId
    prompt: str = ""
    negative_prompt: str = ""
    # the text CLIP-T scores the images against (default: the prompt); `ipbatch eval` sets
    # it to the caption while generating from the image prompt alone, as the paper does
    caption: str | None = None
    reference: str | list[str] | None = None
    adapter: AdapterName = "sd15"
    scale: Scale = 0.5
    combine: Combine = "average"
    s_scale: SScale | None = None
    region: Uri | list[Uri] | None = None
    adapters: list[AdapterSpec] | None = Field(None, min_length=1, max_length=4)
    control: list[ControlSpec] | None = Field(None, min_length=1, max_length=3)
    init_image: Uri | None = None
    strength: Fraction | None = None
    inpaint_mask: Uri | None = None  # a mask image (white = repaint), or "alpha"
    num_images: int = Field(1, ge=1, le=16)
    seed: int | None = Field(None, ge=0, le=MAX_SEED)
    # unset: the family's (`BaseModelPreset.default_steps` / `default_guidance`), filled in
    # when the row is validated, so a validated row always has both
    steps: int = Field(None, ge=1, le=150, description=_FAMILY_DEFAULT)  # type: ignore[assignment]
    guidance_scale: float = Field(None, ge=0, le=30, description=_FAMILY_DEFAULT)  # type: ignore[assignment]
    # skip the text encoder's last layers (anime-style checkpoints are tuned for 2); the
    # loaded encoder's depth is checked in the worker (SD1.5 and SDXL's CLIP-L: 12 layers)
    clip_skip: int | None = Field(None, ge=1, le=11)
    # FLUX.1 rows: true classifier-free guidance (a second pass with the negative prompt and
    # the negative image embeds) when > 1; FLUX.1-dev's own `guidance_scale` is distilled
    true_cfg_scale: float | None = Field(None, ge=1, le=30)
    scheduler: SchedulerName = "default"  # the sampler (presets.SCHEDULERS)
    width: int | None = Field(None, ge=64, le=2048, multiple_of=8)
    height: int | None = Field(None, ge=64, le=2048, multiple_of=8)
    output_format: Literal["png", "webp", "jpeg"] = "png"
    # with IPBATCH_SCORE_THRESHOLD, an image below it is made again; False keeps every image
    # as first made (`ipbatch eval` rows: an evaluation must not pick its best images)
    regenerate: bool = True

    @model_validator(mode="before")
    @classmethod
    def _one_form(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("adapters") is not None:
            single = ("reference", "adapter", "scale", "combine", "s_scale", "region")
            both = [k for k in single if k in data]
            if both:
                raise ValueError(
                    f"give either 'adapters' or {', '.join(repr(k) for k in both)}, not both"
                )
        return data

    @model_validator(mode="after")
    def _has_reference(self, info: ValidationInfo) -> Row:
        if self.adapters is None:
            if self.reference is None:
                raise ValueError("'reference' is required (or give 'adapters')")
            _check_adapter_fields(self)
        specs = self.adapter_specs()
        lookup = (info.context or {}).get("adapters", builtin_adapter)
        presets = {spec.adapter: _preset(spec.adapter, lookup) for spec in specs}
        families = sorted({presets[spec.adapter].family for spec in specs})
        if len(families) > 1:
            raise ValueError(f"all adapters of a row must share one base model, got {families}")
        with_lora = [spec.adapter for spec in specs if presets[spec.adapter].lora]
        if len(with_lora) > 1:
            raise ValueError(
                f"at most one FaceID adapter per row, got {', '.join(with_lora)}: each brings "
                "its own LoRA for the UNet and diffusers keeps only the last one active; no "
                "published recipe combines two"
            )
        for control in self.control or []:
            if CONTROLNETS[control.model].family != families[0]:
                raise ValueError(
                    f"control: {control.model} is a {CONTROLNETS[control.model].family} "
                    f"ControlNet; this row's adapters run on {families[0]}"
                )
        if self.init_image is None and (self.strength is not None or self.inpaint_mask):
            given = "strength" if self.strength is not None else "inpaint_mask"
            raise ValueError(f"{given} needs init_image (the picture to start from)")
        base = BASE_MODELS[families[0]]
        _check_family(self, base, specs)
        defaults = _family_defaults(self, base)
        for spec in specs:
            preset = presets[spec.adapter]
            if isinstance(spec.scale, dict):
                _check_blocks(spec.scale, BASE_MODELS[preset.family], spec.adapter)
            if preset.embed_kind is EmbedKind.FACE_ID_PLUS and (
                spec.combine == "concat" and len(spec.references) > 1
            ):
                raise ValueError(
                    f"{spec.adapter} takes one face: combine several references with "
                    "'average', not 'concat'"
                )
        for name, value in defaults.items():  # frozen: set once, while being validated
            object.__setattr__(self, name, value)
        return self

    def adapter_specs(self) -> list[AdapterSpec]:
        """The row's adapters in one form, whichever way the manifest wrote them."""
        if self.adapters is not None:
            return list(self.adapters)
        assert self.reference is not None
        # the single form's fields were validated as the row's, with the same types and
        # `_check_adapter_fields`: not validated a second time
        return [
            AdapterSpec.model_construct(
                adapter=self.adapter,
                reference=self.reference,
                scale=self.scale,
                combine=self.combine,
                s_scale=self.s_scale,
                region=self.region,
            )
        ]

    @property
    def scored_text(self) -> str:
        """What CLIP-T scores the outputs against: the caption if given, else the prompt."""
        return self.prompt if self.caption is None else self.caption

    @property
    def effective_strength(self) -> float | None:
        """How much of `init_image` is repainted: the row's, else 0.8 (1.0 when inpainting);
        None without an init image."""
        if self.init_image is None:
            return None
        if self.strength is not None:
            return self.strength
        return 1.0 if self.inpaint_mask else 0.8

    @property
    def mode(self) -> str:
        """text (from noise), img2img (from init_image) or inpaint (init_image + a mask)."""
        if self.init_image is None:
            return "text"
        return "inpaint" if self.inpaint_mask else "img2img"

    def to_params(self) -> dict[str, Any]:
        """The row as the ledger stores it (items.params): every field with its effective
        value (defaults and the derived seed filled in), in the one form it was written in, so
        `Row.model_validate(params)` gives the same row back."""
        params: dict[str, Any] = json.loads(self.params_json())
        return params

    def params_json(self) -> str:
        """`to_params()` as JSON text, written by pydantic's serializer (an ingest writes a
        million of them: a third of the time of `json.dumps(model_dump())`)."""
        single_form = {"adapter", "scale", "combine", "s_scale", "region"}
        text = self.model_dump_json(
            exclude_none=True, exclude=single_form if self.adapters is not None else None
        )
        if self.seed is None:  # the derived seed is stored with the row (`id` is never absent)
            text = f'{text[:-1]},"seed":{self.effective_seed()}}}'
        return text

    def effective_seed(self) -> int:
        """The row's seed, or one derived from its id (stable across runs and machines)."""
        if self.seed is not None:
            return self.seed
        digest = hashlib.sha256(self.id.encode()).digest()
        return int.from_bytes(digest[:4], "big")


def manifest_json_schema() -> dict[str, Any]:
    schema = Row.model_json_schema()
    schema["title"] = "ipbatch manifest row"
    schema["description"] = (
        "One JSON object per line of a JSON Lines manifest (or one CSV record with the same "
        "column names; list and object values as JSON text)."
    )
    return schema


def validate_row(obj: Any, adapters: AdapterLookup = builtin_adapter) -> Row:
    """A row checked against the adapters `adapters` resolves (the published ones, and with a
    worker's catalog the trained `custom:` ones)."""
    return Row.model_validate(obj, context={"adapters": adapters})
