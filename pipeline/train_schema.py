"""A training job's manifest row and settings: the schema the command line, the ledger and
the training stage share, without torch (the command line validates a run before any model
library loads). The recipe itself is `pipeline.training`."""

from __future__ import annotations

from typing import Any, Literal, get_args

from pydantic import BaseModel, ConfigDict, Field, model_validator

from pipeline.manifest import RowId, Uri

# the published architectures a run can train (tencent's tutorial_train.py, _plus.py, _sdxl.py)
TrainKind = Literal["sd15", "sd15-plus", "sdxl"]
TRAINABLE_KINDS: tuple[str, ...] = get_args(TrainKind)


class TrainRow(BaseModel):
    """One line of a training manifest (JSON Lines, or CSV with these columns)."""

    model_config = ConfigDict(extra="forbid")

    id: RowId
    image: Uri = Field(description="the target picture the adapter learns to make")
    prompt: str = Field("", description="its caption")
    reference: Uri | None = Field(
        None, description="the image prompt (default: the target itself, as in the paper)"
    )

    @property
    def reference_uri(self) -> str:
        return self.reference or self.image


def training_json_schema() -> dict[str, Any]:
    schema = TrainRow.model_json_schema()
    schema["title"] = "ipbatch training manifest row"
    return schema


class TrainSettings(BaseModel):
    """A training run's settings; the defaults are the paper's."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    kind: TrainKind = Field("sd15", description="adapter architecture")
    init: str = Field(
        "fresh", description="fresh (the paper's init), an adapter preset, or a weight file"
    )
    steps: int = Field(1000, ge=1, le=10_000_000, description="optimizer steps")
    batch_size: int = Field(8, ge=1, le=1024, description="rows per step")
    learning_rate: float = Field(1e-4, gt=0, le=1, description="AdamW's learning rate")
    weight_decay: float = Field(0.01, ge=0, le=1, description="AdamW's weight decay")
    drop_image: float = Field(0.05, ge=0, le=1, description="image embedding dropped alone")
    drop_text: float = Field(0.05, ge=0, le=1, description="text dropped alone")
    drop_both: float = Field(0.05, ge=0, le=1, description="both dropped")
    mixed_precision: Literal["no", "fp16", "bf16"] = Field(
        "no",
        description="autocast for the frozen UNet (its weights and the adapter stay fp32); "
        "fp16 scales the loss and skips steps whose gradients overflow",
    )
    gradient_checkpointing: bool = Field(
        False, description="recompute activations in the backward pass: less memory, same result"
    )
    seed: int = Field(0, ge=0, le=2**32 - 1, description="seeds every random draw of the run")
    resolution: int | None = Field(
        None, ge=64, le=2048, multiple_of=8, description="square training size (native)"
    )
    checkpoint_every: int = Field(500, ge=1, description="steps between checkpoints")
    keep_checkpoints: int = Field(2, ge=1, description="the newest checkpoints kept")
    validate_every: int = Field(0, ge=0, description="0: validate once, at the end")
    validation_rows: int = Field(4, ge=0, le=64, description="the manifest's first rows")
    validation_steps: int = Field(30, ge=1, le=150, description="denoising steps per render")
    log_every: int = Field(
        10, ge=1, description="steps per point of the loss curve (their mean) and per heartbeat"
    )
    save_dtype: Literal["fp16", "fp32"] = Field("fp16", description="the adapter file's precision")

    @model_validator(mode="after")
    def _drops(self) -> TrainSettings:
        if self.drop_image + self.drop_text + self.drop_both > 1:
            raise ValueError("drop_image + drop_text + drop_both must be at most 1")
        return self
