"""`ipbatch producer --watch s3://bucket/prefix/`: submit every new manifest there, once.

"Once" comes from the ledger: a job is keyed by the manifest's bytes and output, so a
manifest seen again (a restarted producer, a second producer) maps to the job it already has;
its ingest is sent again only if the job still waits for one (its first message was lost).
"""

from __future__ import annotations

import logging
import time

from workers.context import StageContext
from workers.stages import jobs
from workers.stages.common import SendJob

log = logging.getLogger(__name__)
MANIFEST_SUFFIXES = (".jsonl", ".csv")


def scan_once(
    ctx: StageContext,
    *,
    prefix_uri: str,
    output_uri: str,
    send_ingest: SendJob,
    seen: set[str],
) -> list[str]:
    """Submit every manifest under the prefix not seen before (by this process: a restarted
    producer submits them again, which gives their jobs, and re-sends an ingest only to a job
    still waiting for one); returns the new job ids."""
    new_jobs = []
    for uri in ctx.stores.for_uri(prefix_uri).list(prefix_uri):
        if uri in seen or not uri.lower().endswith(MANIFEST_SUFFIXES):
            continue
        job_id, created = jobs.submit(
            ctx, manifest_uri=uri, output_uri=output_uri, send_ingest=send_ingest
        )
        seen.add(uri)
        if created:
            log.info("submitted %s as job %s", uri, job_id)
            new_jobs.append(job_id)
    return new_jobs


def watch(
    ctx: StageContext,
    *,
    prefix_uri: str,
    output_uri: str,
    send_ingest: SendJob,
    interval: float,
    iterations: int | None = None,
) -> None:
    seen: set[str] = set()
    done = 0
    while iterations is None or done < iterations:
        scan_once(
            ctx, prefix_uri=prefix_uri, output_uri=output_uri, send_ingest=send_ingest, seen=seen
        )
        done += 1
        if iterations is None or done < iterations:
            time.sleep(interval)
