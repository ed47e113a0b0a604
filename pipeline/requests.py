"""From a manifest row to a diffusers call's inputs: the one place a row's fields become a
`GenerationRequest`. A new per-row input is added here (and declared per-slot or shared in
`pipeline.generator`), nowhere else.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from core.errors import ErrorCode, ItemError
from pipeline.manifest import Row

if TYPE_CHECKING:  # torch and diffusers load with the generate stage, not with an ingest worker
    import torch

    from pipeline.generator import GenerationRequest

Tensors = dict[str, "torch.Tensor"]


def adapter_set(params: dict[str, Any] | None) -> tuple[str, ...]:
    """Which warm pipeline a row (as the ledger stores it, `items.params`) needs."""
    if not params:
        return ()
    if params.get("adapters"):
        return tuple(str(spec.get("adapter", "sd15")) for spec in params["adapters"])
    return (str(params.get("adapter", "sd15")),)


def combine(tensors: Sequence[Tensors], how: str) -> Tensors:
    """Several references of one adapter: average them, or concatenate as extra tokens."""
    import torch

    joined = {name: torch.cat([t[name] for t in tensors]) for name in tensors[0]}
    if how == "average" and len(tensors) > 1:
        return {name: value.mean(dim=0, keepdim=True) for name, value in joined.items()}
    return joined


def build_request(
    row: Row,
    embeddings: Sequence[Sequence[Tensors]],
    prepared: Mapping[tuple[str, int, int], Tensors] | None = None,
) -> GenerationRequest:
    """The request for `row`; `embeddings[a][r]` holds the cached tensors (pos, neg, and for
    FaceID-Plus clip_pos, clip_neg) of adapter a's reference r; `prepared[(role, owner,
    position)]` the cached pixels of each structure input (`pipeline.inputs.row_inputs`)."""
    from pipeline.generator import AdapterInput, ControlInput, GenerationRequest
    from pipeline.inputs import CONTROL, INIT, MASK, REGION, row_inputs, to_image

    specs = row.adapter_specs()
    if len(embeddings) != len(specs) or any(
        len(tensors) != len(spec.references)
        for spec, tensors in zip(specs, embeddings, strict=True)
    ):
        raise ItemError(ErrorCode.INTERNAL, "embeddings missing for this item; retry it")
    prepared = prepared or {}
    wanted = {i.slot for i in row_inputs(row)}
    if set(prepared) != wanted:
        raise ItemError(ErrorCode.INTERNAL, "prepared inputs missing for this item; retry it")
    images = {slot: to_image(tensors) for slot, tensors in prepared.items()}
    inputs = []
    for a, (spec, tensors) in enumerate(zip(specs, embeddings, strict=True)):
        parts = combine(tensors, spec.combine)
        inputs.append(
            AdapterInput(
                adapter=spec.adapter,
                scale=spec.scale,
                pos=parts["pos"],
                neg=parts["neg"],
                clip_pos=parts.get("clip_pos"),
                clip_neg=parts.get("clip_neg"),
                shortcut_scale=spec.shortcut_scale,
                regions=[images[(REGION, a, r)] for r in range(len(spec.regions))] or None,
            )
        )
    controls = tuple(
        ControlInput(c.model, images[(CONTROL, i, 0)], c.scale, c.start, c.end)
        for i, c in enumerate(row.control or [])
    )
    return GenerationRequest(
        prompt=row.prompt,
        negative_prompt=row.negative_prompt,
        adapters=inputs,
        num_images=row.num_images,
        seed=row.effective_seed(),
        steps=row.steps,
        guidance_scale=row.guidance_scale,
        width=row.width,
        height=row.height,
        controls=controls,
        init_image=images.get((INIT, 0, 0)),
        mask=images.get((MASK, 0, 0)),
        strength=row.effective_strength,
    )
