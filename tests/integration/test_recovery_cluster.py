"""Recovery over real worker processes, PostgreSQL, a broker and S3 over HTTP: a submit whose
publish failed, a worker whose models are broken, an S3 outage (back-pressure, not churn),
and work sent again going to the front of its queue."""

from __future__ import annotations

import json
import shutil
import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from helpers.cli import free_port, ipbatch
from helpers.cluster import Cluster, FlakyS3

from core.config import Settings
from workers.celery_app import make_app, priority

REFS = ("red", "blue", "green")


def rows(bucket: str, n: int, prefix: str = "r", steps: int = 2) -> list[dict[str, Any]]:
    return [
        {
            "id": f"{prefix}{i}",
            "prompt": f"product {i}",
            "reference": f"s3://{bucket}/refs/{REFS[i % 3]}.png",
            "steps": steps,
        }
        for i in range(n)
    ]


def test_a_job_whose_ingest_publish_failed_is_finished_by_a_resubmit_or_the_reaper(
    make_cluster: Callable[..., Cluster], reference_images: dict[str, Path]
) -> None:
    """`ipbatch submit` registers the job, then the broker is unreachable: exit 3 and a
    message that says what to do. Before, the same manifest submitted again returned the job
    and sent nothing, and the reaper only looked at items: the job stayed pending for ever."""
    cluster = make_cluster(IPBATCH_REQUEUE_AFTER="1")
    cluster.upload_references(reference_images)
    down = {"IPBATCH_BROKER_URL": f"amqp://guest:guest@127.0.0.1:{free_port()}//"}
    output = f"s3://{cluster.bucket}/out"

    first = cluster.put_manifest("jobs/a.jsonl", rows(cluster.bucket, 3, "a"))
    failed = ipbatch("submit", first, "--output", output, env={**cluster.env, **down})
    assert (
        failed.returncode == 3
        and "is registered, but its ingest could not be sent" in failed.stderr
    )
    assert "Traceback" not in failed.stderr
    job_a = failed.stderr.split("job ", 1)[1].split()[0]
    assert cluster.progress(job_a)["status"] == "pending"

    second = cluster.put_manifest("jobs/b.jsonl", rows(cluster.bucket, 3, "b"))
    assert (
        ipbatch("submit", second, "--output", output, env={**cluster.env, **down}).returncode == 3
    )
    with cluster.engine.connect() as conn:
        job_b = conn.execute(
            sa.text("SELECT id FROM jobs WHERE manifest_uri = :m"), {"m": second}
        ).scalar_one()

    cluster.start_worker("worker", "ingest,embed,generate")
    assert cluster.cli("submit", first, "--output", output).strip() == job_a  # sent this time
    assert cluster.wait_for_job(job_a)["status"] == "succeeded"
    time.sleep(1.5)  # job b has now waited longer than IPBATCH_REQUEUE_AFTER (1 s)
    assert "1 jobs queued again" in cluster.cli("reaper", "--once")
    assert cluster.wait_for_job(job_b)["status"] == "succeeded"
    with cluster.engine.connect() as conn:
        events = (
            conn.execute(
                sa.text("SELECT message FROM job_events WHERE job_id = :j ORDER BY id"),
                {"j": job_b},
            )
            .scalars()
            .all()
        )
    assert events[:2] == [
        "registered",
        "no ingest message for 1 s and the ingest queue is empty: queued again by the reaper",
    ]


def test_a_worker_with_broken_models_gives_its_items_back_and_exits_2(
    make_cluster: Callable[..., Cluster],
    reference_images: dict[str, Path],
    tiny_models: Path,
    tmp_path: Path,
) -> None:
    """A generate worker whose adapter file is corrupt: its items go back to waiting (never
    failed, never `internal`), it says so loudly and exits 2 (a supervisor sees it); a
    healthy worker started later finishes the job."""
    broken = tmp_path / "broken-models"
    broken.mkdir()
    for entry in tiny_models.iterdir():
        if entry.name == "IP-Adapter":
            shutil.copytree(entry, broken / entry.name)
        else:
            (broken / entry.name).symlink_to(entry)
    weights = broken / "IP-Adapter" / "models" / "ip-adapter_sd15.safetensors"
    weights.write_bytes(b"\x00" * 64)
    cluster = make_cluster()
    cluster.upload_references(reference_images)
    cluster.start_worker("embedder", "ingest,embed")
    cluster.start_worker("broken", "generate", env={"IPBATCH_MODELS": str(broken)})
    job_id = cluster.submit("jobs/broken.jsonl", rows(cluster.bucket, 4), "out")
    assert cluster.processes.pop("broken").wait(timeout=180) == 2, cluster.log_tail()
    log = cluster.logs["broken"]
    assert "CONFIGURATION ERROR, this worker stops (exit code 2)" in log.read_text()
    assert str(weights) in log.read_text()
    p = cluster.progress(job_id)  # the items wait, none failed
    assert (p["failed"], p["succeeded"], p["running"]) == (0, 0, 0), p
    released = cluster.count(
        "SELECT COUNT(*) FROM item_events e JOIN items i ON i.id = e.item_id WHERE i.job_id = :j"
        " AND e.message LIKE 'released: this worker''s configuration%'",
        j=job_id,
    )
    assert released >= 1
    cluster.start_worker("healthy", "generate")
    assert cluster.wait_for_job(job_id)["status"] == "succeeded"
    assert cluster.count("SELECT MAX(attempts) FROM items WHERE job_id = :j", j=job_id) == 1


@pytest.fixture()
def outage_cluster(make_cluster: Callable[..., Cluster], flaky_s3: FlakyS3) -> Cluster:
    cluster = make_cluster(
        IPBATCH_S3_ENDPOINT_URL=flaky_s3.endpoint,
        IPBATCH_GENERATE_BATCH="4",
        IPBATCH_EMBED_BATCH="4",
        IPBATCH_BATCH_IMAGES="4",
        IPBATCH_BACKOFF_MAX="4",
    )
    cluster.start_worker("embedder", "ingest,embed")
    cluster.start_worker("generator", "generate")
    return cluster


def test_an_s3_outage_is_waited_out_without_churning_claims(
    outage_cluster: Cluster, flaky_s3: FlakyS3, reference_images: dict[str, Path]
) -> None:
    """S3 goes away while items generate. The worker gives back the items of the message it
    holds (once), takes no other work and checks S3 with backoff until it answers, instead of
    claiming and releasing in a loop (before: 16-423 claim/release events for one 10-s
    outage). Bound: per item and stage, at most one release and two claims. Meanwhile the
    backlog metric reads the ready items from the ledger, whatever the queue shows."""
    cluster = outage_cluster
    cluster.upload_references(reference_images)
    job_id = cluster.submit("jobs/outage.jsonl", rows(cluster.bucket, 16, steps=3), "out")
    deadline = time.monotonic() + 240
    cluster.wait_until_generating(job_id, succeeded=2, deadline=deadline)
    flaky_s3.stop()
    released = 0
    try:
        limit = time.monotonic() + 60
        while released == 0 and time.monotonic() < limit:  # until a worker noticed
            time.sleep(0.5)
            released = cluster.count(
                "SELECT COUNT(*) FROM item_events e JOIN items i ON i.id = e.item_id"
                " WHERE i.job_id = :j AND e.message LIKE 'retrying: S3 unreachable%'",
                j=job_id,
            )
        time.sleep(6)  # the outage goes on: nothing may churn meanwhile
        metrics = cluster.scrape("generator")
        ready = cluster.count(
            "SELECT COALESCE(SUM(n), 0) FROM job_item_counts"
            " WHERE job_id = :j AND status = 'ready'",
            j=job_id,
        )
    finally:
        flaky_s3.restart()
    assert released > 0, "the outage went unnoticed"
    assert metrics[("ipbatch_backlog", (("stage", "generate"),))] == ready > 0
    progress = cluster.wait_for_job(job_id, timeout=max(180.0, deadline - time.monotonic()))
    assert (progress["status"], progress["succeeded"]) == ("succeeded", 16)
    cluster.assert_one_set_of_outputs(job_id, prefix="out", asked=16)
    with cluster.engine.connect() as conn:
        per_item = conn.execute(
            sa.text(
                "SELECT e.item_id, e.to_status, e.from_status, COUNT(*) FROM item_events e"
                " JOIN items i ON i.id = e.item_id WHERE i.job_id = :j"
                " AND e.to_status IN ('embedding', 'running', 'pending', 'ready')"
                " GROUP BY e.item_id, e.to_status, e.from_status"
            ),
            {"j": job_id},
        ).all()
    claims = {(i, to): n for i, to, frm, n in per_item if to in ("embedding", "running")}
    releases = {
        (i, to): n
        for i, to, frm, n in per_item
        if (frm, to) in (("embedding", "pending"), ("running", "ready"))
    }
    print(f"claims per item and stage: max {max(claims.values())}; releases: {releases}")
    assert max(claims.values()) <= 2 and max(releases.values(), default=0) <= 1


def test_sigterm_during_an_outage_stops_the_worker_at_once(
    outage_cluster: Cluster, flaky_s3: FlakyS3, reference_images: dict[str, Path]
) -> None:
    """A worker waiting out an S3 outage with a message in hand is asked to stop (SIGTERM to
    the worker process, as a supervisor sends it): the wait ends at once instead of after
    IPBATCH_OUTAGE_PATIENCE (600 s), the message goes back to its queue, and another worker
    finishes the job once S3 answers."""
    cluster = outage_cluster
    cluster.upload_references(reference_images)
    job_id = cluster.submit("jobs/sigterm.jsonl", rows(cluster.bucket, 8, steps=3), "out")
    deadline = time.monotonic() + 240
    cluster.wait_until_generating(job_id, succeeded=1, deadline=deadline)
    flaky_s3.stop()
    try:
        waiting = (
            "SELECT COUNT(*) FROM item_events e JOIN items i ON i.id = e.item_id WHERE i.job_id"
            " = :j AND e.message LIKE 'retrying: S3 unreachable%' AND e.worker LIKE 'generator@%'"
        )
        limit = time.monotonic() + 60
        while cluster.count(waiting, j=job_id) == 0:
            assert time.monotonic() < limit, cluster.log_tail()
            time.sleep(0.5)
        generator = cluster.processes.pop("generator")
        generator.send_signal(signal.SIGTERM)
        assert generator.wait(timeout=30) == 0, cluster.log_tail()
    finally:
        flaky_s3.restart()
    assert "back to its queue: the worker is shutting down" in cluster.logs["generator"].read_text()
    cluster.start_worker("generator-2", "generate")
    progress = cluster.wait_for_job(job_id, timeout=max(180.0, deadline - time.monotonic()))
    assert (progress["status"], progress["succeeded"]) == ("succeeded", 8)
    cluster.assert_one_set_of_outputs(job_id, prefix="out", asked=8)


@pytest.mark.parametrize("broker", ["rabbitmq", "redis"], indirect=True)
def test_work_sent_again_goes_to_the_front_of_its_queue(broker: str) -> None:
    """Five ordinary messages wait in the generate queue; one urgent message (what the
    reaper and a held item's re-send publish) is sent after them and delivered first."""
    app = make_app(Settings(broker_url=broker))  # type: ignore[arg-type]
    with app.connection_for_write() as connection:
        channel = connection.default_channel
        for queue in app.conf.task_queues:
            queue(channel).declare()
            queue(channel).purge()
        for n in range(5):
            app.send_task(
                "ipbatch.generate",
                ([n],),
                priority=priority(broker, urgent=False),
                connection=connection,
            )
        app.send_task(
            "ipbatch.generate",
            ([99],),
            priority=priority(broker, urgent=True),
            connection=connection,
        )
        time.sleep(0.5)
        first = channel.basic_get("generate", no_ack=True)
        assert first is not None
        assert json.loads(first.body)[0] == [[99]]
        rest = [json.loads(channel.basic_get("generate", no_ack=True).body)[0] for _ in range(5)]
        assert rest == [[[n]] for n in range(5)]
