"""Read-only questions: what `ipbatch status`, `ipbatch report` and the metrics ask the ledger.

Every answer comes from the tables and the `job_progress` view; nothing here writes. The
per-status counts come from `job_item_counts`, so a job of a million items costs a few rows.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import func, or_, select, text
from sqlalchemy.orm import Session

from core.errors import ErrorCode
from storage.ledger import training
from storage.lifecycle import STAGES
from storage.models import (
    Item,
    ItemEmbedding,
    ItemInput,
    ItemStatus,
    Job,
    JobItemCount,
    JobStatus,
    Output,
)


def _when(value: Any) -> datetime | None:
    """Timestamps read through the view: datetimes on PostgreSQL, ISO strings on SQLite."""
    if value is None:
        return None
    if isinstance(value, str):
        value = datetime.fromisoformat(value)
    return value if value.tzinfo else value.replace(tzinfo=UTC)


def progress(
    session: Session, *, job_id: str | None = None, limit: int = 20
) -> list[dict[str, Any]]:
    """Rows of `job_progress`: the given job, or the `limit` most recently started jobs."""
    query = "SELECT * FROM job_progress"
    params: dict[str, Any] = {}
    if job_id:
        query += " WHERE job_id = :job"
        params["job"] = job_id
    else:
        query += " ORDER BY started_at IS NULL, started_at DESC LIMIT :limit"
        params["limit"] = limit
    rows = []
    for row in session.execute(text(query), params).mappings():
        entry = dict(row)
        entry["started_at"] = _when(entry["started_at"])
        entry["finished_at"] = _when(entry["finished_at"])
        entry["percent_done"] = float(entry["percent_done"] or 0)
        # why the job as a whole failed (its manifest, stopped early), and its run
        job = session.get(Job, entry["job_id"])
        entry["error"] = None if job is None else job.error_message
        entry["run"] = None if job is None else job.run
        entry["priority"] = None if job is None else job.priority
        rows.append(entry)
    return rows


def job_ids(session: Session) -> list[str]:
    return list(session.scalars(select(Job.id).order_by(Job.created_at)))


def status_counts(session: Session, *, job_id: str) -> dict[str, int]:
    """Items of a job in every status (0 for none), in the order of the item's life."""
    counts = dict.fromkeys((str(s) for s in ItemStatus), 0)
    for status, n in session.execute(
        select(JobItemCount.status, JobItemCount.n).where(JobItemCount.job_id == job_id)
    ):
        counts[str(status)] = int(n)
    return counts


def items_in_status(
    session: Session, *, job_id: str, statuses: Sequence[ItemStatus], limit: int
) -> list[Item]:
    """The first `limit` items of a job in the given statuses, in manifest order."""
    return list(
        session.scalars(
            select(Item)
            .where(Item.job_id == job_id, Item.status.in_(list(statuses)))
            .order_by(Item.row_index)
            .limit(limit)
        )
    )


def failures_by_code(session: Session, *, job_id: str) -> dict[str, int]:
    """Failed items of a job per error code, most frequent first."""
    n = func.count().label("n")
    rows = session.execute(
        select(Item.error_code, n)
        .where(Item.job_id == job_id, Item.status == ItemStatus.FAILED)
        .group_by(Item.error_code)
        .order_by(n.desc(), Item.error_code)
    )
    return {str(code): int(count) for code, count in rows}


def items_of_running_jobs(session: Session) -> dict[str, int]:
    """Items of running jobs by status (a metrics gauge)."""
    rows = session.execute(
        select(JobItemCount.status, func.sum(JobItemCount.n))
        .join(Job, Job.id == JobItemCount.job_id)
        .where(Job.status == JobStatus.RUNNING)
        .group_by(JobItemCount.status)
    )
    return {str(status): int(n or 0) for status, n in rows}


def backlog(session: Session) -> dict[str, int]:
    """Items waiting for each stage, from the ledger: the real backlog, whatever the broker's
    queues show (a message a worker holds for later is not in the queue, its item is here)."""
    waiting = items_of_running_jobs(session)
    return {stage.name: waiting.get(str(stage.waiting), 0) for stage in STAGES}


# --- the report ----------------------------------------------------------------------------


@dataclass
class ReportRow:
    item_id: int
    row_index: int
    row_id: str | None
    status: str
    error_code: str | None
    error_message: str | None
    warning: str | None
    params: dict[str, Any]
    references: list[str] = field(default_factory=list)  # recorded by the embed stage
    # structure inputs recorded by the embed stage: (role, owner_index, source uri), role one
    # of control | region | init | mask
    inputs: list[tuple[str, int, str]] = field(default_factory=list)
    outputs: list[dict[str, Any]] = field(default_factory=list)


@dataclass
class ReportData:
    manifest_uri: str
    total_items: int
    total_images: int
    rows: list[ReportRow]
    cost: dict[str, Any] = field(default_factory=dict)  # `images`: GPU-seconds, reuse


def images(session: Session, *, job_id: str) -> dict[str, Any]:
    """What a job's images cost: how many are recorded, how many of them were copied from
    outputs made before (`workers.stages.reuse`), the GPU-seconds the others took (each
    diffusers call's seconds shared by its images), images per GPU-hour, and the GPU-seconds
    the copies saved at the job's own rate (a job that generated nothing: at the rate their
    sources were made). Reads the job's outputs: for one job at a time."""
    mine = (
        select(Output.reused_from, Output.gpu_seconds)
        .join(Item, Item.id == Output.item_id)
        .where(Item.job_id == job_id)
        .subquery()
    )
    total, reused, seconds = session.execute(
        select(func.count(), func.count(mine.c.reused_from), func.sum(mine.c.gpu_seconds))
    ).one()
    made = int(total) - int(reused)
    per_image = float(seconds) / made if made and seconds else None
    if per_image is None and reused:  # all copied: what their sources cost
        per_image = session.scalar(
            select(func.avg(Output.gpu_seconds)).join(mine, mine.c.reused_from == Output.id)
        )
    return {
        "images": int(total),
        "reused": int(reused),
        "gpu_seconds": round(float(seconds or 0.0), 3),
        "images_per_gpu_hour": round(3600 / per_image, 1) if per_image else None,
        "gpu_seconds_saved": round(int(reused) * per_image, 3) if per_image else None,
    }


def report(session: Session, *, job_id: str, limit: int) -> ReportData | None:
    """The first `limit` rows of a job in manifest order, with their references and outputs."""
    manifest_uri = session.scalar(select(Job.manifest_uri).where(Job.id == job_id))
    if manifest_uri is None:
        return None
    total_items = session.scalar(select(func.count()).where(Item.job_id == job_id)) or 0
    counted = images(session, job_id=job_id)
    items = session.execute(
        select(
            Item.id,
            Item.row_index,
            Item.row_id,
            Item.status,
            Item.error_code,
            Item.error_message,
            Item.warning,
            Item.params,
        )
        .where(Item.job_id == job_id)
        .order_by(Item.row_index)
        .limit(limit)
    ).all()
    rows = {
        i.id: ReportRow(
            item_id=i.id,
            row_index=i.row_index,
            row_id=i.row_id,
            status=str(i.status),
            error_code=i.error_code,
            error_message=i.error_message,
            warning=i.warning,
            params=json.loads(i.params) if isinstance(i.params, str) else (i.params or {}),
        )
        for i in items
    }
    ids = list(rows)
    for o in session.execute(
        select(
            Output.item_id,
            Output.image_index,
            Output.uri,
            Output.seed,
            Output.clip_i,
            Output.clip_t,
            Output.reused_from,
        )
        .where(Output.item_id.in_(ids))
        .order_by(Output.item_id, Output.image_index)
    ).mappings():
        rows[o["item_id"]].outputs.append(dict(o))
    for item_id, uri in session.execute(
        select(ItemEmbedding.item_id, ItemEmbedding.reference_uri)
        .where(ItemEmbedding.item_id.in_(ids), ItemEmbedding.reference_index >= 0)  # not negatives
        .order_by(ItemEmbedding.item_id, ItemEmbedding.adapter_index, ItemEmbedding.reference_index)
    ):
        if uri not in rows[item_id].references:
            rows[item_id].references.append(uri)
    for item_id, role, owner, uri in session.execute(
        select(ItemInput.item_id, ItemInput.role, ItemInput.owner_index, ItemInput.source_uri)
        .where(ItemInput.item_id.in_(ids))
        .order_by(ItemInput.item_id, ItemInput.role, ItemInput.owner_index, ItemInput.position)
    ):
        rows[item_id].inputs.append((role, owner, uri))
    return ReportData(
        str(manifest_uri),
        int(total_items),
        counted["images"],
        list(rows.values()),
        cost=counted,
    )


def item_params(session: Session, *, job_id: str) -> Iterator[dict[str, Any]]:
    """Each valid item's stored row (`items.params`; an invalid row's is what it wrote), read
    a page at a time."""
    valid = or_(Item.error_code.is_(None), Item.error_code != ErrorCode.INVALID_ROW.value)
    found = session.execute(
        select(Item.params).where(Item.job_id == job_id, valid).execution_options(yield_per=1000)
    )
    for (params,) in found:
        if params:
            yield params


def training_summary(
    session: Session, *, job_id: str, curve: bool = False
) -> dict[str, Any] | None:
    """Where a training job stands (None for another kind of job): its run's step, loss and
    learning rate, rows, newest checkpoint, validations, adapter, and with `curve` the loss
    curve (every logged point: the report draws it, status does not read it)."""
    run = training.get(session, job_id=job_id)
    if run is None:
        return None
    checkpoints = training.checkpoints(session, job_id=job_id)
    return {
        "name": run.name,
        "adapter": f"custom:{run.name}",
        "step": run.step,
        "total_steps": run.total_steps,
        "loss": run.loss,
        "learning_rate": run.learning_rate,
        "skipped_steps": run.skipped_steps or 0,
        "examples": run.examples,
        "skipped": run.skipped or [],
        "checkpoint_step": checkpoints[0].step if checkpoints else None,
        "adapter_uri": run.adapter_uri,
        "settings": run.settings,
        "curve": [(r.step, r.loss, r.learning_rate) for r in training.log(session, job_id=job_id)]
        if curve
        else None,
        "validations": [
            {"step": v.step, "clip_i": v.clip_i, "clip_t": v.clip_t, "samples": v.samples}
            for v in training.validations(session, job_id=job_id)
        ],
    }


def output_scores(
    session: Session, *, job_id: str
) -> list[tuple[dict[str, Any], float | None, float | None]]:
    """(the row's params, CLIP-I, CLIP-T) of every output image of a job, in manifest order."""
    query = (
        select(Item.params, Output.clip_i, Output.clip_t)
        .join(Output, Output.item_id == Item.id)
        .where(Item.job_id == job_id)
        .order_by(Item.row_index, Output.image_index)
    )
    return [(params or {}, ci, ct) for params, ci, ct in session.execute(query)]
