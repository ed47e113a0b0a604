"""The job manifest's schema: `Row` is the validated form of one line (JSON Lines, or CSV with
the same columns), with its adapter and ControlNet specs. Reading a manifest file is
`pipeline.manifest_reader`.
"""

from __future__ import annotations

import hashlib
import json
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    StringConstraints,
    ValidationInfo,
    model_validator,
)

from pipeline.families import BASE_MODELS, BaseModelPreset
from pipeline.manifest_adapters import (
    SINGLE_FORM,
    AdapterFields,
    AdapterLookup,
    AdapterSpec,
    Fraction,
    Uri,
    check_adapter_fields,
    check_with_preset,
    preset_of,
)
from pipeline.presets import CONTROLNETS, SchedulerName, builtin_adapter, controlnet_error

__all__ = ["AdapterLookup", "AdapterSpec", "Row", "Uri", "validate_row"]

ROW_ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$"
MAX_SEED = 2**32 - 1

RowId = Annotated[str, StringConstraints(pattern=ROW_ID_PATTERN)]


def _check_controlnet_name(name: str) -> str:
    if name not in CONTROLNETS:
        raise ValueError(controlnet_error(name))
    return name


ControlNetName = Annotated[str, AfterValidator(_check_controlnet_name)]


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


def _negative_pass(row: Row, base: BaseModelPreset) -> str | None:
    """None when the row's call makes a negative pass (CFG); else what would make one."""
    if base.guidance == "distilled":
        true_cfg = row.true_cfg_scale is not None and row.true_cfg_scale > 1
        return None if true_cfg else "true_cfg_scale > 1"
    return None if row.guidance_scale > 1 else "guidance_scale > 1"


def _where(row: Row, index: int) -> str:
    """The place of an adapter's field in an error: the row's own, or `adapters[i]`."""
    return "" if row.adapters is None else f"adapters[{index}]: "


def _family_defaults(row: Row, base: BaseModelPreset) -> dict[str, Any]:
    """The family's defaults for what the row leaves unset."""
    defaults: dict[str, Any] = {}
    if row.steps is None:
        defaults["steps"] = base.default_steps
    if row.guidance_scale is None:
        defaults["guidance_scale"] = base.default_guidance
    return defaults


_FAMILY_DEFAULT = (
    "default: the base model family's ("
    + "; ".join(
        f"{b.family}: {b.default_steps} steps, guidance {b.default_guidance:g}"
        for b in BASE_MODELS.values()
    )
    + ")"
)


class Row(AdapterFields):
    """One manifest line, validated. Field meanings are in README's manifest table. The
    adapter fields (`AdapterFields`) are the row's single form: one adapter, written on the
    row itself; `adapters` lists several instead."""

    id: RowId
    prompt: str = ""
    negative_prompt: str = ""
    # the text CLIP-T scores the images against (default: the prompt); `ipbatch eval` sets
    # it to the caption while generating from the image prompt alone, as the paper does
    caption: str | None = None
    reference: str | list[str] | None = None
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
    _family: str = PrivateAttr("")  # set while validated: the base model family

    @model_validator(mode="before")
    @classmethod
    def _one_form(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("adapters") is not None:
            both = [k for k in SINGLE_FORM if k in data]
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
            check_adapter_fields(self)
        specs = self.adapter_specs()
        lookup = (info.context or {}).get("adapters", builtin_adapter)
        presets = {spec.adapter: preset_of(spec.adapter, lookup) for spec in specs}
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
        for name, value in _family_defaults(self, base).items():  # frozen: set once, here
            object.__setattr__(self, name, value)
        self._family = base.family
        for index, spec in enumerate(specs):
            try:
                check_with_preset(
                    spec,
                    presets[spec.adapter],
                    base,
                    steps=self.steps_run,
                    negative_pass=_negative_pass(self, base),
                )
            except ValueError as exc:
                raise ValueError(f"{_where(self, index)}{exc}") from None
        return self

    @property
    def family(self) -> str:
        """The base model family the row's adapters run on."""
        return self._family

    @property
    def steps_run(self) -> int:
        """The denoising steps the row's pipeline runs: `steps`, times the strength (as
        diffusers' img2img and inpaint pipelines truncate the schedule) from an init image."""
        strength = self.effective_strength
        return self.steps if strength is None else min(int(self.steps * strength), self.steps)

    def adapter_specs(self) -> list[AdapterSpec]:
        """The row's adapters in one form, whichever way the manifest wrote them."""
        if self.adapters is not None:
            return list(self.adapters)
        assert self.reference is not None
        # the single form's fields were validated as the row's, with the same types and
        # `check_adapter_fields`: not validated a second time
        return [AdapterSpec.model_construct(**{k: getattr(self, k) for k in SINGLE_FORM})]

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
        single_form = set(SINGLE_FORM) - {"reference"}
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
