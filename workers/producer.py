"""`ipbatch producer --watch s3://bucket/prefix/`: submit every new manifest there, once.

"Once" comes from the ledger: a job is keyed by the manifest's bytes and output, so a
manifest seen again (this process, a restarted producer, a second producer) maps to the job
it already has and is not queued again.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

from workers import stages
from workers.context import StageContext

log = logging.getLogger(__name__)
MANIFEST_SUFFIXES = (".jsonl", ".csv")


def scan_once(
    ctx: StageContext,
    *,
    prefix_uri: str,
    output_uri: str,
    submit: Callable[[str], None],
    seen: set[str],
) -> list[str]:
    """Register every manifest under the prefix not seen before; returns new job ids."""
    new_jobs = []
    for uri in ctx.stores.for_uri(prefix_uri).list(prefix_uri):
        if uri in seen or not uri.lower().endswith(MANIFEST_SUFFIXES):
            continue
        job_id, created = stages.register_job(ctx, manifest_uri=uri, output_uri=output_uri)
        seen.add(uri)
        if created:
            log.info("submitted %s as job %s", uri, job_id)
            submit(job_id)
            new_jobs.append(job_id)
    return new_jobs


def watch(
    ctx: StageContext,
    *,
    prefix_uri: str,
    output_uri: str,
    submit: Callable[[str], None],
    interval: float,
    iterations: int | None = None,
) -> None:
    seen: set[str] = set()
    done = 0
    while iterations is None or done < iterations:
        scan_once(ctx, prefix_uri=prefix_uri, output_uri=output_uri, submit=submit, seen=seen)
        done += 1
        if iterations is None or done < iterations:
            time.sleep(interval)
