"""The life of items and jobs, as data: the stages, and the status moves each may make.

One table of stages is read by the stages themselves, the one-machine runner, the reaper, the
metrics, `ipbatch status` and the `job_progress` view (its `pending` column counts items
waiting for a stage, `running` the items a stage holds). The ledger refuses any move that is
not in `ITEM_MOVES` / `JOB_MOVES`.

    pending --embed--> ready --generate--> succeeded
       (embedding)        (running)
    any waiting or working status -> failed | cancelled;  failed -> pending (retry)
    succeeded -> ready (`ipbatch verify --repair`: an output object missing or broken)
"""

from __future__ import annotations

from dataclasses import dataclass

from storage.models import ItemStatus, JobKind, JobStatus


@dataclass(frozen=True)
class Stage:
    """A stage items go through: they wait in `waiting`, a worker holds them (under a lease)
    in `working`, and they leave for `next`. Messages for it go to `queue`."""

    name: str
    waiting: ItemStatus
    working: ItemStatus
    queue: str
    next: ItemStatus


EMBED = Stage(
    name="embed",
    waiting=ItemStatus.PENDING,
    working=ItemStatus.EMBEDDING,
    queue="embed",
    next=ItemStatus.READY,
)
GENERATE = Stage(
    name="generate",
    waiting=ItemStatus.READY,
    working=ItemStatus.RUNNING,
    queue="generate",
    next=ItemStatus.SUCCEEDED,
)
STAGES: tuple[Stage, ...] = (EMBED, GENERATE)


@dataclass(frozen=True)
class JobStage:
    """A stage that takes a whole job, not items: it claims the job row itself (a lease with
    a fencing token, renewed as it works: `storage.ledger.job_claims`), works, and ends the
    claim. It takes jobs of `kind`; messages for it go to `queue`; `label` names it in the
    job's events and messages."""

    name: str
    kind: JobKind
    queue: str
    label: str
    started: str  # the job event of a claim that starts the job
    resumed: str  # ... and of one that takes a job back up


INGEST = JobStage(
    name="ingest",
    kind=JobKind.GENERATE,
    queue="ingest",
    label="ingest",
    started="ingest started",
    resumed="ingest resumed where the last one stopped",
)
TRAIN = JobStage(
    name="train",
    kind=JobKind.TRAIN,
    queue="train",
    label="training",
    started="training started",
    resumed="training resumed from its last checkpoint",
)
JOB_STAGES: tuple[JobStage, ...] = (INGEST, TRAIN)
QUEUES: tuple[str, ...] = (INGEST.queue, *(stage.queue for stage in STAGES), TRAIN.queue)


def job_stage_for(kind: JobKind) -> JobStage:
    """The stage that takes a job of `kind` (its ingest, or its training run)."""
    return next(stage for stage in JOB_STAGES if stage.kind == kind)


WAITING = tuple(stage.waiting for stage in STAGES)
WORKING = tuple(stage.working for stage in STAGES)
TERMINAL = (ItemStatus.SUCCEEDED, ItemStatus.FAILED, ItemStatus.CANCELLED)
ENDED = (ItemStatus.FAILED, ItemStatus.CANCELLED)  # where any stage may send an item


def stage_named(name: str) -> Stage:
    for stage in STAGES:
        if stage.name == name:
            return stage
    raise KeyError(f"no stage {name!r}; stages are {', '.join(s.name for s in STAGES)}")


def stage_holding(status: ItemStatus) -> Stage | None:
    """The stage whose workers hold items in `status` (None for a waiting or final status)."""
    return next((stage for stage in STAGES if stage.working == status), None)


# Every allowed item move. A move from a status to itself is guarded by the lease: a waiting
# item queued again (its message was lost), a working item re-claimed (its lease ran out).
ITEM_MOVES: dict[ItemStatus, frozenset[ItemStatus]] = {
    ItemStatus.PENDING: frozenset(
        {ItemStatus.PENDING, ItemStatus.EMBEDDING, *ENDED}  # queued again / claimed
    ),
    ItemStatus.EMBEDDING: frozenset(
        {
            ItemStatus.EMBEDDING,  # re-claimed after its lease ran out
            ItemStatus.READY,  # embedded
            ItemStatus.PENDING,  # released: an outage, a configuration error, a lapsed lease
            *ENDED,
        }
    ),
    ItemStatus.READY: frozenset({ItemStatus.READY, ItemStatus.RUNNING, *ENDED}),
    ItemStatus.RUNNING: frozenset(
        {
            ItemStatus.RUNNING,  # re-claimed after its lease ran out
            ItemStatus.SUCCEEDED,  # images stored and recorded
            ItemStatus.READY,  # released
            ItemStatus.PENDING,  # a cached embedding it needs is gone: embed it again
            *ENDED,
        }
    ),
    ItemStatus.FAILED: frozenset({ItemStatus.PENDING}),  # `ipbatch retry`
    ItemStatus.SUCCEEDED: frozenset({ItemStatus.READY}),  # `ipbatch verify --repair`
    ItemStatus.CANCELLED: frozenset(),
}

# Every allowed job move. pending: registered, its ingest not started (or queued again);
# running: ingest claimed it, then its items are in flight.
JOB_MOVES: dict[JobStatus, frozenset[JobStatus]] = {
    JobStatus.PENDING: frozenset(
        {
            JobStatus.PENDING,  # ingest queued again (a lost message, a resubmit)
            JobStatus.RUNNING,  # ingest started
            JobStatus.FAILED,  # the manifest cannot be read
            JobStatus.CANCELLED,
        }
    ),
    JobStatus.RUNNING: frozenset(
        {
            JobStatus.RUNNING,  # an unfinished ingest queued again
            JobStatus.SUCCEEDED,
            JobStatus.PARTIAL,
            JobStatus.FAILED,  # no item succeeded, or stopped early (--max-failures)
            JobStatus.CANCELLED,
        }
    ),
    JobStatus.FAILED: frozenset({JobStatus.RUNNING}),  # `ipbatch retry`, `verify --repair`
    JobStatus.PARTIAL: frozenset({JobStatus.RUNNING}),  # `ipbatch retry`, `verify --repair`
    JobStatus.SUCCEEDED: frozenset({JobStatus.RUNNING}),  # `ipbatch verify --repair`
    JobStatus.CANCELLED: frozenset(),
}
JOB_ACTIVE = (JobStatus.PENDING, JobStatus.RUNNING)
# a job's priority (`submit --priority`): its messages go before those of lower ones
PRIORITIES = {"low": 0, "normal": 1, "high": 2}
NORMAL = PRIORITIES["normal"]
JOB_ENDED = (JobStatus.SUCCEEDED, JobStatus.PARTIAL, JobStatus.FAILED, JobStatus.CANCELLED)


class IllegalTransition(ValueError):
    """A move that is not in the tables above: a bug in the caller, never bad input."""


def check_item_move(from_status: ItemStatus, to_status: ItemStatus) -> None:
    if to_status not in ITEM_MOVES[from_status]:
        raise IllegalTransition(f"item status {from_status} cannot become {to_status}")


def check_job_move(from_status: JobStatus, to_status: JobStatus) -> None:
    if to_status not in JOB_MOVES[from_status]:
        raise IllegalTransition(f"job status {from_status} cannot become {to_status}")
