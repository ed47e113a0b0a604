"""A row's diffusers call, declared once: the request schema, the row -> request mapping and the
image's metadata.

Every field of `GenerationRequest` (and of the `AdapterInput` / `ControlInput` it holds) is
declared with `shared(...)` or `per_slot(...)`, which say:

- how it batches: `shared` fields are equal in every row of one diffusers call (`batch_key`
  holds them); `per_slot` fields may differ row by row, except for their `shared_part` (a
  tensor's shape, whether an image is given), which `batch_key` holds;
- `feeds`: the diffusers argument (or pipeline state) it reaches; `direct=True` fields are
  passed to the call as they are, under that name, by `Generator._call`;
- `row`: the manifest `Row` field it is copied from unchanged (a name), or the fields
  `build_request` builds it from (a tuple);
- `recorded`: whether the row's value goes into each image's metadata (`image_metadata`), or
  a function of the row giving the metadata entries.

A new per-row call input that diffusers takes as it is (`clip_skip`) is the `Row` field plus one
declaration here. Row fields that are not call inputs are listed in `NOT_CALL_INPUTS`; tests fail
for a Row field in neither place, a request field that never reaches the call, and a field
whose batching does not match what the call does with it.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import MISSING, dataclass, field, fields
from typing import TYPE_CHECKING, Any, Literal

from core.errors import ErrorCode, ItemError
from pipeline.families import BASE_MODELS
from pipeline.instantstyle import expand
from pipeline.manifest import Row
from pipeline.manifest_adapters import SINGLE_FORM
from pipeline.references import combine

if TYPE_CHECKING:  # torch and diffusers load with the generate stage, not with an ingest worker
    import torch
    from PIL import Image

Tensors = dict[str, "torch.Tensor"]
Recorded = bool | Callable[[Row], dict[str, Any]]

# Row fields that are not inputs of the diffusers call, and why
NOT_CALL_INPUTS = {
    "id": "names the item and its output keys",
    "caption": "what CLIP-T scores the images against, after generation",
    "output_format": "how the images are encoded after generation",
    "regenerate": "whether an image below the score threshold is made again, after scoring",
}


@dataclass(frozen=True)
class CallInput:
    """A request field's declaration (kept in the dataclass field's metadata)."""

    batch: Literal["shared", "per_slot"]
    feeds: str
    row: str | tuple[str, ...]
    recorded: Recorded
    direct: bool = False
    shared_part: Callable[[Any], object] | None = None
    doc: str = ""


def declaration(f: Any) -> CallInput:
    """The `CallInput` of a dataclass field; TypeError for a field that declares none."""
    found = f.metadata.get("call")
    if not isinstance(found, CallInput):
        raise TypeError(f"{f.name} says neither per_slot nor shared")
    return found


def shared(
    doc: str,
    *,
    feeds: str,
    row: str | tuple[str, ...] = (),
    recorded: Recorded,
    direct: bool = False,
    default: Any = MISSING,
) -> Any:
    """A field every row of one diffusers call must have equal (it is in `batch_key`)."""
    call = CallInput("shared", feeds, row, recorded, direct, None, doc)
    return field(default=default, metadata={"call": call})


def per_slot(
    shared_part: Callable[[Any], object] | None = None,
    *,
    feeds: str,
    row: str | tuple[str, ...] = (),
    recorded: Recorded,
    default: Any = MISSING,
) -> Any:
    """A field each row of a call may have its own of. `shared_part(obj)` (given the whole
    input) is what of it must still be equal (a tensor's shape, whether an image is given)."""
    call = CallInput("per_slot", feeds, row, recorded, False, shared_part)
    return field(default=default, metadata={"call": call})


def _shape(tensor: torch.Tensor | None) -> tuple[int, ...] | None:
    return None if tensor is None else tuple(tensor.shape)


def _given(value: object) -> bool:
    return value is not None


@dataclass(frozen=True)
class ControlInput:
    """One ControlNet on one row: the condition map (any size: diffusers resizes it to the
    output) and how strong it is, and over which fraction of the steps. Rows of one call may
    each have their own (a per-slot multiplier of the ControlNet's residuals)."""

    model: str = shared("one ControlNet per position", feeds="controlnet", recorded=False)
    image: Image.Image = per_slot(feeds="control_image", recorded=False)
    scale: float = per_slot(feeds="controlnet_conditioning_scale", recorded=False, default=1.0)
    start: float = per_slot(feeds="control_guidance_start", recorded=False, default=0.0)
    end: float = per_slot(feeds="control_guidance_end", recorded=False, default=1.0)


def per_slot_scale(a: AdapterInput) -> bool:
    """An IP-Adapter strength can differ row by row through a per-slot attention mask when it
    is a plain number and masks do not change how the references are attended (one reference,
    or regions given anyway); InstantStyle dicts and the rest must be equal."""
    return not isinstance(a.scale, dict) and (a.pos.shape[0] == 1 or a.regions is not None)


def _scale_shared(a: AdapterInput) -> object:
    if isinstance(a.scale, dict):
        return json.dumps(a.scale, sort_keys=True)
    return "per slot" if per_slot_scale(a) else a.scale


def _window_shared(a: AdapterInput) -> object:
    """A window acts per slot where the strength does (a per-slot factor, step by step);
    otherwise it is one call-wide strength change, equal in every row of the call."""
    return None if per_slot_scale(a) else a.window


def _regions_shared(a: AdapterInput) -> object:
    """One reference at a plain strength: every slot gets a mask anyway (its strength, times
    its region if it has one), so rows with and without regions share a call. Otherwise a mask
    changes how the references are attended (separately, summed): whether there are regions,
    and how many, must be equal in one call; the masks themselves may differ."""
    if a.pos.shape[0] == 1 and not isinstance(a.scale, dict):
        return None
    return None if a.regions is None else len(a.regions)


@dataclass(frozen=True)
class AdapterInput:
    """One adapter's conditioning for one row: `pos`/`neg` shaped [n_refs_or_1, ...].

    FaceID-Plus also takes `clip_pos`/`clip_neg`: CLIP hidden states of the aligned face crop,
    [1, tokens, hidden], which diffusers reads from the projection layer's `clip_embeds`.
    `regions`: where the reference applies (white), one mask for all references or one each.
    The row's adapter fields are recorded whole by `GenerationRequest.adapters`.
    """

    adapter: str = shared(
        "the pipeline loaded for the call", feeds="load_ip_adapter", recorded=False
    )
    scale: float | dict = per_slot(_scale_shared, feeds="set_ip_adapter_scale", recorded=False)
    pos: torch.Tensor = per_slot(
        lambda a: _shape(a.pos), feeds="ip_adapter_image_embeds", recorded=False
    )
    neg: torch.Tensor = per_slot(
        lambda a: _shape(a.neg), feeds="ip_adapter_image_embeds", recorded=False
    )
    clip_pos: torch.Tensor | None = per_slot(
        lambda a: _shape(a.clip_pos), feeds="projection clip_embeds", recorded=False, default=None
    )
    clip_neg: torch.Tensor | None = per_slot(
        lambda a: _shape(a.clip_neg), feeds="projection clip_embeds", recorded=False, default=None
    )
    # FaceID-Plus v2's structure weight (the card's s_scale), state on the projection layer
    shortcut_scale: float = shared(
        "one value per projection layer and call",
        feeds="projection shortcut_scale",
        recorded=False,
        default=1.0,
    )
    regions: list[Image.Image] | None = per_slot(
        _regions_shared,
        feeds="cross_attention_kwargs ip_adapter_masks",
        recorded=False,
        default=None,
    )
    # (start, end): the fraction of the steps the adapter acts on (`AdapterFields.window`)
    window: tuple[float, float] = per_slot(
        _window_shared, feeds="callback_on_step_end", recorded=False, default=(0.0, 1.0)
    )


def _record_adapters(row: Row) -> dict[str, Any]:
    return {"adapters": [s.model_dump(mode="json") for s in row.adapter_specs()]}


def _record_controls(row: Row) -> dict[str, Any]:
    return {"control": [c.model_dump(mode="json") for c in row.control]} if row.control else {}


def _record_init(row: Row) -> dict[str, Any]:
    return {} if row.init_image is None else {"init_image": row.init_image}


def _record_mask(row: Row) -> dict[str, Any]:
    return {} if row.inpaint_mask is None else {"inpaint_mask": row.inpaint_mask}


def _record_strength(row: Row) -> dict[str, Any]:
    return {} if row.init_image is None else {"strength": row.effective_strength}


ADAPTER_ROW_FIELDS = ("adapters", *SINGLE_FORM)


@dataclass(frozen=True)
class GenerationRequest:
    """One row's call. Every field declares how it batches, what it feeds and whether it is
    recorded (see the module's docstring); `batch_key` follows the declarations."""

    prompt: str = per_slot(feeds="prompt", row="prompt", recorded=True)
    # SDXL zeroes an absent negative prompt instead of encoding "": presence is shared
    negative_prompt: str = per_slot(
        lambda r: bool(r.negative_prompt),
        feeds="negative_prompt",
        row="negative_prompt",
        recorded=True,
    )
    adapters: list[AdapterInput] = per_slot(
        lambda r: tuple(batch_key(a) for a in r.adapters),
        feeds="ip_adapter_image_embeds",
        row=ADAPTER_ROW_FIELDS,
        recorded=_record_adapters,
    )
    # each image is a slot of its own
    num_images: int = per_slot(feeds="num_images_per_prompt", row="num_images", recorded=False)
    # image k's seed (seed + k) is recorded with each image
    seed: int = per_slot(feeds="generator", row=("seed",), recorded=False)
    steps: int = shared(
        "one denoising schedule per call",
        feeds="num_inference_steps",
        row="steps",
        recorded=True,
        direct=True,
    )
    guidance_scale: float = shared(
        "one CFG rule per call",
        feeds="guidance_scale",
        row="guidance_scale",
        recorded=True,
        direct=True,
    )
    width: int | None = shared(
        "one latent size per call", feeds="width", row="width", recorded=False, default=None
    )
    height: int | None = shared(
        "one latent size per call", feeds="height", row="height", recorded=False, default=None
    )
    controls: tuple[ControlInput, ...] = per_slot(
        lambda r: tuple(batch_key(c) for c in r.controls),
        feeds="control_image",
        row=("control",),
        recorded=_record_controls,
        default=(),
    )
    # image-to-image from `init_image`, inpainting where `mask` is white; one pipeline per mode
    init_image: Image.Image | None = per_slot(
        lambda r: _given(r.init_image),
        feeds="image",
        row=("init_image",),
        recorded=_record_init,
        default=None,
    )
    mask: Image.Image | None = per_slot(
        lambda r: _given(r.mask),
        feeds="mask_image",
        row=("inpaint_mask",),
        recorded=_record_mask,
        default=None,
    )
    strength: float | None = shared(
        "one noise level per call (a float in diffusers)",
        feeds="strength",
        row=("strength",),
        recorded=_record_strength,
        direct=True,  # None (no init image): not passed
        default=None,
    )
    clip_skip: int | None = shared(
        "one text-encoder layer per call (diffusers takes one int)",
        feeds="clip_skip",
        row="clip_skip",
        recorded=True,
        direct=True,
        default=None,
    )
    true_cfg_scale: float | None = shared(
        "one true-CFG rule per call (FLUX: a second pass, or none)",
        feeds="true_cfg_scale",
        row="true_cfg_scale",
        recorded=True,
        direct=True,  # None (SD1.5, SDXL; FLUX without): not passed
        default=None,
    )
    scheduler: str = shared(
        "one sampler per call (the pipeline's scheduler)",
        feeds="pipe.scheduler",
        row="scheduler",
        recorded=True,
        default="default",
    )

    @property
    def mode(self) -> str:
        if self.mask is not None:
            return "inpaint"
        return "img2img" if self.init_image is not None else "text"


def batch_key(request: GenerationRequest | AdapterInput | ControlInput) -> tuple[object, ...]:
    """Rows with equal keys can share one diffusers call: the shared fields, and the shared
    part of the per-slot ones, as their fields declare."""
    key: list[object] = []
    for f in fields(request):
        value = getattr(request, f.name)
        call = declaration(f)
        if call.batch == "shared":
            key.append(json.dumps(value, sort_keys=True) if isinstance(value, dict) else value)
        else:
            key.append(None if call.shared_part is None else call.shared_part(request))
    return tuple(key)


def direct_arguments(request: GenerationRequest) -> dict[str, Any]:
    """The call's arguments that are request fields as they are (declared `direct`); absent
    (None) ones are left to diffusers' defaults."""
    arguments = {}
    for f in fields(request):
        call = declaration(f)
        value = getattr(request, f.name)
        if call.direct and value is not None:
            arguments[call.feeds] = value
    return arguments


def image_metadata(row: Row) -> dict[str, Any]:
    """What each image records of its row (beside job, row, image index and seed): every
    request field declared `recorded`, as the row wrote it."""
    metadata: dict[str, Any] = {}
    for f in fields(GenerationRequest):
        call = declaration(f)
        if call.recorded is True:
            assert isinstance(call.row, str), f"{f.name}: recorded=True needs one row field"
            value = getattr(row, call.row)
            if value is not None:
                metadata[call.row] = value
        elif call.recorded:
            metadata |= call.recorded(row)
    return metadata


def adapter_set(params: dict[str, Any] | None) -> tuple[str, ...]:
    """Which warm pipeline a row (as the ledger stores it, `items.params`) needs."""
    if not params:
        return ()
    if params.get("adapters"):
        return tuple(str(spec.get("adapter", "sd15")) for spec in params["adapters"])
    return (str(params.get("adapter", "sd15")),)


def build_request(
    row: Row,
    embeddings: Sequence[Sequence[Tensors]],
    prepared: Mapping[tuple[str, int, int], Tensors] | None = None,
    negatives: Sequence[Tensors | None] | None = None,
) -> GenerationRequest:
    """The request for `row`; `embeddings[a][r]` holds the cached tensors (pos, neg, and for
    FaceID-Plus clip_pos, clip_neg) of adapter a's reference r, fitted as the adapter says
    ([n, ...]: n tiles, or 1); `prepared[(role, owner, position)]` the cached pixels of each
    structure input (`pipeline.inputs.row_inputs`); `negatives[a]` the cached embedding of
    adapter a's negative reference (None: none). Fields declared with one `row` field are
    copied; the others are built here."""
    from pipeline.inputs import CONTROL, INIT, MASK, REGION, row_inputs, to_image

    specs = row.adapter_specs()
    negatives = list(negatives) if negatives is not None else [None] * len(specs)
    if (
        len(embeddings) != len(specs)
        or any(
            len(tensors) != len(spec.references)
            for spec, tensors in zip(specs, embeddings, strict=True)
        )
        or [n is not None for n in negatives] != [s.negative_reference is not None for s in specs]
    ):
        raise ItemError(ErrorCode.INTERNAL, "embeddings missing for this item; retry it")
    prepared = prepared or {}
    wanted = {i.slot for i in row_inputs(row)}
    if set(prepared) != wanted:
        raise ItemError(ErrorCode.INTERNAL, "prepared inputs missing for this item; retry it")
    images = {slot: to_image(tensors) for slot, tensors in prepared.items()}
    inputs = []
    one_picture = BASE_MODELS[row.family].embeds == "cfg_tensor"  # SD3.5: tiles averaged
    for a, (spec, tensors, negative) in enumerate(zip(specs, embeddings, negatives, strict=True)):
        if one_picture:
            tensors = [{k: v.mean(dim=0, keepdim=True) for k, v in t.items()} for t in tensors]
        parts = combine(tensors, spec.combine, spec.weights)
        if negative is not None:  # its own picture's embedding (its tiles' mean) for each token set
            mean = negative["pos"].mean(dim=0, keepdim=True)
            parts["neg"] = mean.expand_as(parts["pos"]).clone()
        inputs.append(
            AdapterInput(
                adapter=spec.adapter,
                scale=expand(spec.scale, row.family),
                pos=parts["pos"],
                neg=parts["neg"],
                clip_pos=parts.get("clip_pos"),
                clip_neg=parts.get("clip_neg"),
                shortcut_scale=spec.shortcut_scale,
                regions=[images[(REGION, a, r)] for r in range(len(spec.regions))] or None,
                window=spec.window,
            )
        )
    copied = {}  # the fields declared with one row field, as the row has them
    for f in fields(GenerationRequest):
        source = declaration(f).row
        if isinstance(source, str):
            copied[f.name] = getattr(row, source)
    return GenerationRequest(
        **copied,
        adapters=inputs,
        seed=row.effective_seed(),
        controls=tuple(
            ControlInput(c.model, images[(CONTROL, i, 0)], c.scale, c.start, c.end)
            for i, c in enumerate(row.control or [])
        ),
        init_image=images.get((INIT, 0, 0)),
        mask=images.get((MASK, 0, 0)),
        strength=row.effective_strength,
    )
