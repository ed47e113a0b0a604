"""`ipbatch verify JOB`: every recorded output of a job is a complete image, or it is listed.

Each outputs row of a succeeded item is checked against its object: it exists and has the
recorded size (one HEAD, on many threads at once), and with `deep` its bytes hash to the
recorded sha256 and decode as an image (one GET). Outputs are read from the ledger a page at
a time and checked with a bounded number of requests in flight, so a job of a million images
runs in constant memory. `repair` sends the items of the problems back to the generate stage
(their outputs rows forgotten): the images are made again from the same inputs and seeds,
and `storage.publish` replaces whatever broken object is left at the keys.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from core.errors import ConfigError, ObjectNotFound
from pipeline.images import output_pixels
from storage.ledger import jobs, outputs
from storage.ledger.outputs import Recorded
from storage.lifecycle import GENERATE
from storage.models import JobKind, JobStatus
from workers.context import StageContext
from workers.stages.common import Send, send_in_messages


@dataclass(frozen=True)
class Problem:
    item_id: int
    row_id: str | None
    uri: str
    what: str  # "missing", "3 bytes where 7,123 were recorded", "sha256 differs", ...


@dataclass
class Verified:
    job_id: str
    checked: int = 0
    deep: bool = False
    problems: list[Problem] = field(default_factory=list)
    repaired: list[int] = field(default_factory=list)  # items sent back to generate

    @property
    def ok(self) -> bool:
        return not self.problems


def verify(
    ctx: StageContext,
    *,
    job_id: str,
    deep: bool = False,
    threads: int = 32,
    progress: Callable[[int], None] | None = None,
) -> Verified:
    """Check every recorded output of `job_id` (see the module's text)."""
    with ctx.sessions.begin() as session:
        job = jobs.get(session, job_id=job_id)
        if job is None:
            raise ConfigError(f"no job {job_id}")
        if job.kind != JobKind.GENERATE:
            raise ConfigError(
                f"job {job_id} is a {job.kind} job: only generation jobs have outputs"
            )
    result = Verified(job_id, deep=deep)

    def check(recorded: Recorded) -> Problem | None:
        what = _check(ctx, recorded, deep=deep)
        return (
            None if what is None else Problem(recorded.item_id, recorded.row_id, recorded.uri, what)
        )

    with ThreadPoolExecutor(max_workers=threads, thread_name_prefix="verify") as pool:
        with ctx.sessions.begin() as session:
            for page in outputs.pages_of_job(session, job_id=job_id):
                result.problems += [p for p in pool.map(check, page) if p is not None]
                result.checked += len(page)
                if progress is not None:
                    progress(len(page))
    return result


def _check(ctx: StageContext, recorded: Recorded, *, deep: bool) -> str | None:
    """What is wrong with one recorded output's object (None: nothing)."""
    store = ctx.stores.for_uri(recorded.uri)
    stat = store.stat(recorded.uri)
    if stat is None:
        return "missing"
    if recorded.size is not None and stat.size != recorded.size:
        return f"{stat.size:,} bytes where {recorded.size:,} were recorded"
    if not deep:
        return None
    try:
        data = store.get(recorded.uri)
    except ObjectNotFound:
        return "missing"
    if hashlib.sha256(data).hexdigest() != recorded.sha256:
        return "sha256 differs from the recorded one"
    if output_pixels(data) is None:
        return "does not decode as an image"
    return None


def repair(ctx: StageContext, *, verified: Verified, send: Send) -> list[int]:
    """The items of `verified`'s problems back to the generate stage, and sent there. The
    job runs again and ends as it did once they are made. Returns the items sent.

    The broken objects are removed first: they are not what the ledger recorded, so nothing
    in them is evidence of anything, and a broken object that still decodes (a flipped byte
    in a WebP decodes to another picture) must not read as a conflict when the row is made
    again."""
    item_ids = sorted({p.item_id for p in verified.problems})
    if not item_ids:
        return []
    with ctx.sessions.begin() as session:
        job = jobs.get(session, job_id=verified.job_id)
        assert job is not None
        if job.status not in (JobStatus.SUCCEEDED, JobStatus.PARTIAL, JobStatus.FAILED):
            raise ConfigError(
                f"job {verified.job_id} is {job.status}: only an ended job (succeeded, partial "
                "or failed) is repaired"
            )
        for problem in verified.problems:
            ctx.stores.for_uri(problem.uri).delete(problem.uri)
        moved = jobs.regenerate(
            session,
            job_id=verified.job_id,
            item_ids=item_ids,
            now=ctx.clock(),
            worker=ctx.worker,
            reason="verify --repair: an output object is missing or broken",
        )
    send_in_messages(ctx.settings, send, GENERATE, moved)
    verified.repaired = moved
    return moved
