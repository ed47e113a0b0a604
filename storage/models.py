"""Ledger tables (SQLAlchemy 2, typed). One schema for PostgreSQL and SQLite, via Alembic.

The ledger is the truth: queues carry only ids, and every stage claims work with a guarded
status transition here (see `storage.ledger`).
"""

from __future__ import annotations

import enum
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    DateTime,
    Enum,
    Float,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Text,
    TypeDecorator,
    UniqueConstraint,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from core.clock import utcnow

NAMING_CONVENTION = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}

# BIGINT ids on PostgreSQL; SQLite only autoincrements INTEGER PRIMARY KEY.
BigId = BigInteger().with_variant(Integer(), "sqlite")


class UtcDateTime(TypeDecorator[datetime]):
    """Timezone-aware timestamps on both dialects (SQLite returns naive ones otherwise)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Any) -> datetime | None:
        if value is not None and value.tzinfo is None:
            raise ValueError("naive datetime given to the ledger")
        return value.astimezone(UTC) if value is not None else None

    def process_result_value(self, value: datetime | None, dialect: Any) -> datetime | None:
        if value is not None and value.tzinfo is None:
            return value.replace(tzinfo=UTC)
        return value


class JobStatus(enum.StrEnum):
    PENDING = "pending"  # registered, manifest not read yet
    RUNNING = "running"  # rows ingested, items in progress
    SUCCEEDED = "succeeded"  # every item succeeded
    FAILED = "failed"  # no item succeeded, the manifest could not be read, or stopped early
    CANCELLED = "cancelled"
    PARTIAL = "partial"  # finished, some items succeeded and some failed


class ItemStatus(enum.StrEnum):
    PENDING = "pending"  # waiting for its embeddings
    EMBEDDING = "embedding"  # an embed worker holds it
    READY = "ready"  # embeddings cached, waiting for a generate worker
    RUNNING = "running"  # a generate worker holds it
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"


def _enum(cls: type[enum.Enum], name: str) -> Enum:
    return Enum(
        cls,
        name=name,
        values_callable=lambda e: [m.value for m in e],
        create_constraint=True,  # SQLite: a CHECK constraint rejects unknown values
        native_enum=True,
        validate_strings=True,
    )


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)


class JobKind(enum.StrEnum):
    GENERATE = "generate"  # a manifest of rows -> images (ingest, embed, generate)
    TRAIN = "train"  # a training manifest -> an adapter (the train stage; no items)


class Job(Base):
    __tablename__ = "jobs"

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    name: Mapped[str] = mapped_column(String(256))
    kind: Mapped[str] = mapped_column(String(16), default=JobKind.GENERATE)
    manifest_uri: Mapped[str] = mapped_column(Text)
    manifest_sha256: Mapped[str] = mapped_column(String(64))
    output_uri: Mapped[str] = mapped_column(Text)
    status: Mapped[JobStatus] = mapped_column(_enum(JobStatus, "job_status"), index=True)
    error_message: Mapped[str | None] = mapped_column(Text)
    # set when the whole manifest has been read: the job can finish only after that
    total_rows: Mapped[int | None] = mapped_column(Integer)
    created_at: Mapped[datetime] = mapped_column(UtcDateTime(), default=utcnow)
    started_at: Mapped[datetime | None] = mapped_column(UtcDateTime())
    finished_at: Mapped[datetime | None] = mapped_column(UtcDateTime())
    # the ingest's claim on the job, like an item's (see storage.ledger.job_claims)
    lease_token: Mapped[str | None] = mapped_column(String(32))
    lease_until: Mapped[datetime | None] = mapped_column(UtcDateTime())
    updated_at: Mapped[datetime] = mapped_column(UtcDateTime(), default=utcnow)
    # run N of this manifest and output (`ipbatch rerun`), and the run it repeats
    run: Mapped[int] = mapped_column(Integer, default=1)
    # lifecycle.PRIORITIES: its messages are delivered before lower ones' (low 0 .. high 2)
    priority: Mapped[int] = mapped_column(Integer, default=1)
    # stop early past this many failed rows (>= 1), or this share of the rows (< 1)
    max_failures: Mapped[float | None] = mapped_column(Float)
    # copy an image made before with the same fingerprint instead of generating it (--no-reuse)
    reuse: Mapped[bool] = mapped_column(Boolean, default=True)
    # when it has ended: its results.jsonl, and the webhook told (`workers.stages.results`)
    results_uri: Mapped[str | None] = mapped_column(Text)
    webhook_url: Mapped[str | None] = mapped_column(Text)  # a secret: never logged whole
    webhook_attempts: Mapped[int] = mapped_column(Integer, default=0)
    webhook_after: Mapped[datetime | None] = mapped_column(UtcDateTime())  # next try
    notified_at: Mapped[datetime | None] = mapped_column(UtcDateTime())
    rerun_of: Mapped[str | None] = mapped_column(ForeignKey("jobs.id", ondelete="SET NULL"))

    __table_args__ = (UniqueConstraint("manifest_sha256", "output_uri", "run"),)


class Item(Base):
    __tablename__ = "items"

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"))
    row_id: Mapped[str | None] = mapped_column(String(128))
    row_index: Mapped[int] = mapped_column(Integer)
    status: Mapped[ItemStatus] = mapped_column(_enum(ItemStatus, "item_status"))
    error_code: Mapped[str | None] = mapped_column(String(64))
    error_message: Mapped[str | None] = mapped_column(Text)
    warning: Mapped[str | None] = mapped_column(Text)  # succeeded, but read this
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    params: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    # a claim: who may write (the token, fencing off a worker whose lease lapsed) and until
    # when it lasts without a heartbeat
    lease_token: Mapped[str | None] = mapped_column(String(32))
    lease_until: Mapped[datetime | None] = mapped_column(UtcDateTime())
    updated_at: Mapped[datetime] = mapped_column(UtcDateTime(), default=utcnow)

    __table_args__ = (
        UniqueConstraint("job_id", "row_index"),
        # a job's items in a status, in id order (progress counts, a fair turn's claim)
        Index("ix_items_job_id_status_id", "job_id", "status", "id"),
        Index("ix_items_status_lease_until", "status", "lease_until"),  # the reaper's query
    )


class ItemEvent(Base):
    """Append-only history of every item transition (who, when, from, to, why)."""

    __tablename__ = "item_events"

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    item_id: Mapped[int] = mapped_column(ForeignKey("items.id", ondelete="CASCADE"), index=True)
    from_status: Mapped[str | None] = mapped_column(String(16))
    to_status: Mapped[str] = mapped_column(String(16))
    worker: Mapped[str | None] = mapped_column(String(256))
    message: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(UtcDateTime(), default=utcnow)


class JobEvent(Base):
    """Append-only history of every job transition (who, when, from, to, why)."""

    __tablename__ = "job_events"

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), index=True)
    from_status: Mapped[str | None] = mapped_column(String(16))
    to_status: Mapped[str] = mapped_column(String(16))
    worker: Mapped[str | None] = mapped_column(String(256))
    message: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(UtcDateTime(), default=utcnow)


class Embedding(Base):
    __tablename__ = "embeddings"

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    content_sha256: Mapped[str] = mapped_column(String(64))
    encoder: Mapped[str] = mapped_column(String(128))
    kind: Mapped[str] = mapped_column(String(64))
    uri: Mapped[str] = mapped_column(Text)
    shape: Mapped[list[int]] = mapped_column(JSON)
    dtype: Mapped[str] = mapped_column(String(16))
    created_at: Mapped[datetime] = mapped_column(UtcDateTime(), default=utcnow)

    __table_args__ = (UniqueConstraint("content_sha256", "encoder", "kind"),)


class ItemEmbedding(Base):
    """Which cached embedding feeds which adapter/reference slot of an item."""

    __tablename__ = "item_embeddings"

    item_id: Mapped[int] = mapped_column(
        ForeignKey("items.id", ondelete="CASCADE"), primary_key=True
    )
    adapter_index: Mapped[int] = mapped_column(Integer, primary_key=True)
    # -1: the adapter's negative reference (`negative_reference`)
    reference_index: Mapped[int] = mapped_column(Integer, primary_key=True)
    embedding_id: Mapped[int] = mapped_column(ForeignKey("embeddings.id"), index=True)
    reference_uri: Mapped[str] = mapped_column(Text)


class ItemInput(Base):
    """Which cached, prepared input (control image, region mask, init image, inpaint mask)
    feeds which place of an item; `source_uri` is the image the row named."""

    __tablename__ = "item_inputs"

    item_id: Mapped[int] = mapped_column(
        ForeignKey("items.id", ondelete="CASCADE"), primary_key=True
    )
    role: Mapped[str] = mapped_column(String(16), primary_key=True)  # control|region|init|mask
    owner_index: Mapped[int] = mapped_column(Integer, primary_key=True)  # control / adapter
    position: Mapped[int] = mapped_column(Integer, primary_key=True)  # region of the adapter
    embedding_id: Mapped[int] = mapped_column(ForeignKey("embeddings.id"), index=True)
    source_uri: Mapped[str] = mapped_column(Text)


class Output(Base):
    __tablename__ = "outputs"

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    item_id: Mapped[int] = mapped_column(ForeignKey("items.id", ondelete="CASCADE"))
    image_index: Mapped[int] = mapped_column(Integer)
    uri: Mapped[str] = mapped_column(Text)
    sha256: Mapped[str] = mapped_column(String(64))
    size: Mapped[int | None] = mapped_column(BigInteger)  # bytes; NULL before revision 0010
    seed: Mapped[int] = mapped_column(BigInteger)
    width: Mapped[int] = mapped_column(Integer)
    height: Mapped[int] = mapped_column(Integer)
    clip_i: Mapped[float | None] = mapped_column(Float)
    clip_t: Mapped[float | None] = mapped_column(Float)
    # what decides its pixels (`pipeline.fingerprint`): an output with the same one is copied
    # instead of generated; NULL before revision 0018
    fingerprint: Mapped[str | None] = mapped_column(String(64), index=True)
    reused_from: Mapped[int | None] = mapped_column(BigInteger)  # outputs.id it was copied from
    # what it cost the GPU: its call's seconds shared by the call's images (0: a copy)
    gpu_seconds: Mapped[float | None] = mapped_column(Float)
    created_at: Mapped[datetime] = mapped_column(UtcDateTime(), default=utcnow)

    __table_args__ = (UniqueConstraint("item_id", "image_index"),)


class OutputAttempt(Base):
    """Every image generated for an output slot (IPBATCH_SCORE_THRESHOLD regenerates those
    below it with the next seed); `kept` marks the one in `outputs`."""

    __tablename__ = "output_attempts"

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    item_id: Mapped[int] = mapped_column(ForeignKey("items.id", ondelete="CASCADE"))
    image_index: Mapped[int] = mapped_column(Integer)
    attempt: Mapped[int] = mapped_column(Integer)
    seed: Mapped[int] = mapped_column(BigInteger)
    clip_i: Mapped[float | None] = mapped_column(Float)
    clip_t: Mapped[float | None] = mapped_column(Float)
    kept: Mapped[bool] = mapped_column(Boolean)
    created_at: Mapped[datetime] = mapped_column(UtcDateTime(), default=utcnow)

    __table_args__ = (UniqueConstraint("item_id", "image_index", "attempt"),)


class JobItemCount(Base):
    """How many items of a job are in each status: kept by `ledger.add_items` and
    `ledger.transition` in the same transaction as the items, so `job_progress` reads a
    handful of rows instead of counting a million items (380 ms -> under a millisecond)."""

    __tablename__ = "job_item_counts"

    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), primary_key=True)
    status: Mapped[str] = mapped_column(String(16), primary_key=True)
    n: Mapped[int] = mapped_column(BigInteger)


class JobTurn(Base):
    """When a job last had a turn in an item stage (embed, generate): a distributed worker
    gives each message's turn to the job of the highest priority that waited longest
    (`storage.ledger.items.next_turn`), so jobs of one level share the workers."""

    __tablename__ = "job_turns"

    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), primary_key=True)
    stage: Mapped[str] = mapped_column(String(16), primary_key=True)
    served_at: Mapped[datetime] = mapped_column(UtcDateTime())


class TrainingRun(Base):
    """A training job's run (jobs.kind = 'train'): its settings and where it stands. The
    adapter it makes is `custom:<name>`."""

    __tablename__ = "training_runs"

    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), primary_key=True)
    name: Mapped[str] = mapped_column(String(128), unique=True)
    settings: Mapped[dict[str, Any]] = mapped_column(JSON)
    total_steps: Mapped[int] = mapped_column(Integer)
    step: Mapped[int] = mapped_column(Integer, default=0)
    loss: Mapped[float | None] = mapped_column(Float)  # the last logged one
    learning_rate: Mapped[float | None] = mapped_column(Float)
    skipped_steps: Mapped[int] = mapped_column(Integer, default=0)  # fp16 overflows, in all
    examples: Mapped[int | None] = mapped_column(Integer)  # valid rows trained on
    skipped: Mapped[list[dict[str, Any]] | None] = mapped_column(JSON)  # bad rows: line, id, error
    adapter_uri: Mapped[str | None] = mapped_column(Text)  # the exported adapter.safetensors
    card: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    updated_at: Mapped[datetime] = mapped_column(UtcDateTime(), default=utcnow)


class TrainingLog(Base):
    """The loss and learning rate every `log_every` steps (the loss curve), and how many
    of those steps the optimizer skipped (fp16: their gradients overflowed)."""

    __tablename__ = "training_log"

    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), primary_key=True)
    step: Mapped[int] = mapped_column(Integer, primary_key=True)
    loss: Mapped[float] = mapped_column(Float)
    learning_rate: Mapped[float] = mapped_column(Float)
    skipped_steps: Mapped[int] = mapped_column(Integer, default=0)
    created_at: Mapped[datetime] = mapped_column(UtcDateTime(), default=utcnow)


class TrainingCheckpoint(Base):
    """A checkpoint in the object store (the adapter, AdamW's state, the RNG and the step);
    the last `keep_checkpoints` are kept, older ones deleted with their objects."""

    __tablename__ = "training_checkpoints"

    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), primary_key=True)
    step: Mapped[int] = mapped_column(Integer, primary_key=True)
    uri: Mapped[str] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(UtcDateTime(), default=utcnow)


class TrainingValidation(Base):
    """CLIP-I / CLIP-T of the validation set rendered with the adapter exported at `step`."""

    __tablename__ = "training_validations"

    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), primary_key=True)
    step: Mapped[int] = mapped_column(Integer, primary_key=True)
    clip_i: Mapped[float] = mapped_column(Float)
    clip_t: Mapped[float | None] = mapped_column(Float)
    samples: Mapped[list[str]] = mapped_column(JSON)  # the rendered images' URIs
    created_at: Mapped[datetime] = mapped_column(UtcDateTime(), default=utcnow)


class Worker(Base):
    """A worker process as it last said it was (`ipbatch workers`): its queues, what it is
    doing, what it has loaded, and its heartbeat. `state`: ready (taking work), waiting (a
    service it needs is away), stopped (exited; `problem` says why when it was a
    configuration error). Live: a heartbeat within `storage.ledger.workers.LIVE_SECONDS`."""

    __tablename__ = "workers"

    name: Mapped[str] = mapped_column(String(255), primary_key=True)  # Celery's --hostname
    queues: Mapped[list[str]] = mapped_column(JSON)
    pid: Mapped[int] = mapped_column(Integer)
    state: Mapped[str] = mapped_column(String(16))
    problem: Mapped[str | None] = mapped_column(Text)
    models: Mapped[list[str] | None] = mapped_column(JSON)  # warm adapter sets
    current: Mapped[dict[str, Any] | None] = mapped_column(JSON)  # the message at work
    started_at: Mapped[datetime] = mapped_column(UtcDateTime())
    heartbeat_at: Mapped[datetime] = mapped_column(UtcDateTime())
