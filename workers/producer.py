"""`ipbatch producer --watch s3://bucket/prefix/`: submit every new manifest there, once.

"Once" comes from the ledger: a job is keyed by the manifest's bytes and output, so a
manifest seen again (a restarted producer, a second producer) maps to the job it already has;
its ingest is sent again only if the job still waits for one (its first message was lost). A
manifest uploaded again over the same key (a new ETag) is read again: new bytes are a new job.

It runs unattended: it logs each manifest it submits and each object it skips (and why), and
waits out an outage (the database, S3 or the broker away: that pass is skipped, the next one
tries again) like the workers do; a configuration error (a bucket that does not exist,
credentials refused) stops it with exit code 2.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

from core.errors import Action, classify, short
from pipeline.manifest_reader import MANIFEST_SUFFIXES
from storage.ledger.jobs import JobOptions
from workers.context import StageContext
from workers.stages import jobs
from workers.stages.common import SendJob

log = logging.getLogger(__name__)


def scan_once(
    ctx: StageContext,
    *,
    prefix_uri: str,
    output_uri: str,
    send_ingest: SendJob,
    seen: dict[str, str],
) -> list[str]:
    """Submit every manifest under the prefix not seen before in this version (`seen`: URI ->
    ETag, this process's memory: a restarted producer submits them again, which gives their
    jobs, and re-sends an ingest only to a job still waiting for one); returns the new job
    ids."""
    new_jobs = []
    for uri, version in ctx.stores.for_uri(prefix_uri).list_versions(prefix_uri):
        if seen.get(uri) == version:
            continue
        if not uri.lower().endswith(MANIFEST_SUFFIXES):
            log.info("skipped %s: not a manifest (%s)", uri, ", ".join(MANIFEST_SUFFIXES))
            seen[uri] = version
            continue
        again = uri in seen
        job_id, created = jobs.submit(
            ctx,
            manifest_uri=uri,
            output_uri=output_uri,
            send_ingest=send_ingest,
            options=JobOptions(webhook_url=jobs.webhook_for(ctx, None)),
        )
        seen[uri] = version
        if created:
            log.info(
                "submitted %s%s as job %s",
                uri,
                " (uploaded again)" if again else "",
                job_id,
                extra={"job_id": job_id},
            )
            new_jobs.append(job_id)
        else:
            log.info("%s is already job %s: not submitted again", uri, job_id)
    return new_jobs


def watch(
    ctx: StageContext,
    *,
    prefix_uri: str,
    output_uri: str,
    send_ingest: SendJob,
    interval: float,
    iterations: int | None = None,
    sleep: Callable[[float], None] = time.sleep,
) -> None:
    """Scan every `interval` seconds (`iterations` passes, or for ever). An outage skips a
    pass; anything else (a configuration error) goes up and stops the producer."""
    seen: dict[str, str] = {}
    done = 0
    log.info("watching %s for manifests; jobs write to %s", prefix_uri, output_uri)
    while iterations is None or done < iterations:
        try:
            scan_once(
                ctx,
                prefix_uri=prefix_uri,
                output_uri=output_uri,
                send_ingest=send_ingest,
                seen=seen,
            )
        except Exception as exc:
            decision = classify(exc)
            if decision.action is not Action.RETRY:
                raise
            log.warning("producer: pass skipped (%s); next in %g s", short(exc), interval)
        done += 1
        if iterations is None or done < iterations:
            sleep(interval)
