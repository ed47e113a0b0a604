"""Adapters trained with `ipbatch train --name NAME`, used as `"adapter": "custom:NAME"`.

A trained adapter is a folder: `adapter.safetensors` in h94's key layout (diffusers'
`load_ip_adapter` and tencent's IP-Adapter code read it unchanged) and `card.json`, what it
is: the architecture it was trained as (a published preset's: same base model, image
encoder, embedding kind and projection), the fingerprints of the base model and the image
encoder it was trained with, its settings, its manifest's sha256 and its scores. Names are
never reused, so a name always means the same weights.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from pydantic import BaseModel, ConfigDict

from pipeline.presets import ADAPTERS, CUSTOM_PREFIX, AdapterPreset, RepoPath

WEIGHTS_FILE = "adapter.safetensors"
CARD_FILE = "card.json"


class AdapterCard(BaseModel):
    """card.json (stored data: unknown fields are tolerated, for cards of later versions)."""

    model_config = ConfigDict(extra="ignore")

    name: str
    kind: str  # the published preset whose architecture it has: sd15, sd15-plus
    family: str  # base model: sd15
    base_model: str  # fingerprint of the base model's UNet it was trained on
    image_encoder: str  # fingerprint of the reference encoder (cache keys use it too)
    tokens: int
    weights_sha256: str
    dtype: str
    init: str
    settings: dict[str, Any]
    manifest_uri: str
    manifest_sha256: str
    examples: int
    steps: int
    scores: dict[str, float | None]  # final validation CLIP-I / CLIP-T
    trainable_parameters: int
    created_at: str


def custom_preset(card: AdapterCard, folder: str) -> AdapterPreset:
    """The preset `custom:<name>` means: its kind's preset with this folder's weights."""
    base = ADAPTERS[card.kind]
    return dataclasses.replace(
        base,
        name=f"{CUSTOM_PREFIX}{card.name}",
        weights=RepoPath(hub_repo="", folder=folder, path=""),
        weight_name=WEIGHTS_FILE,
        summary=f"trained with ipbatch from {card.examples} rows ({card.steps} steps, "
        f"{card.kind} architecture)",
        custom_sha256=card.weights_sha256,
    )
