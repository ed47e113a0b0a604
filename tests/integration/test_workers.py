"""Workers that say when they cannot work, as real `ipbatch worker` processes over PostgreSQL,
RabbitMQ and S3: a configuration error found at start exits 2 with one line naming the
setting; an outage at start is waited out and SIGTERM ends the wait at once; a live worker is
in `ipbatch workers`, answers /healthz and /readyz and counts as its queues' consumer;
`ipbatch status` names a queue nobody takes work from."""

from __future__ import annotations

import json
import signal
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from helpers.cli import free_port
from helpers.webhook import Hook

EXIT_CONFIG = 2


def _exit_code(cluster: Any, name: str, timeout: float = 90) -> int:
    return int(cluster.processes[name].wait(timeout=timeout))


def _get(port: int, path: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as answer:
            return answer.status, answer.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()
    except OSError:
        return 0, ""


def test_a_worker_that_cannot_work_exits_2_naming_the_setting(
    make_cluster: Any, tmp_path: Path
) -> None:
    cluster = make_cluster()
    wrong_user = sa.make_url(cluster.env["IPBATCH_DATABASE_URL"]).set(username="nobody")
    cases = {
        "no-models": (
            {"IPBATCH_MODELS": str(tmp_path / "no-models-here")},
            "generate",
            "IPBATCH_MODELS: configuration error: no base model can be loaded from",
        ),
        "broker-password": (
            {"IPBATCH_BROKER_URL": cluster.env["IPBATCH_BROKER_URL"].replace(":guest@", ":no@")},
            "embed",
            "IPBATCH_BROKER_URL: configuration error: the broker refused the login",
        ),
        "database-user": (
            {"IPBATCH_DATABASE_URL": wrong_user.render_as_string(hide_password=False)},
            "ingest",
            "IPBATCH_DATABASE_URL: configuration error: the database refused the connection",
        ),
    }
    for name, (env, queues, _) in cases.items():
        cluster.start_worker(name, queues, env=env)
    for name, (_, _, expected) in cases.items():
        assert _exit_code(cluster, name) == EXIT_CONFIG, cluster.log_tail()
        log = cluster.logs[name].read_text()
        assert expected in log, log[-3000:]
        assert "Traceback" not in log
    assert 'role \\"nobody\\" does not exist' in cluster.logs["database-user"].read_text()  # JSON
    # the two that could reach the ledger said why they stopped there
    listed = {w["name"].split("@")[0]: w for w in json.loads(cluster.cli("workers", "--json"))}
    assert set(listed) == {"no-models", "broker-password"}
    assert listed["no-models"]["state"] == "stopped" and not listed["no-models"]["live"]
    assert "IPBATCH_MODELS: configuration error" in listed["no-models"]["problem"]
    assert "IPBATCH_BROKER_URL" in listed["broker-password"]["problem"]
    # a job submitted now waits on a queue nobody takes work from, and status says so
    job = cluster.submit("m.jsonl", [{"id": "a", "reference": "s3://x/refs/a.png"}], "out")
    assert "no worker is consuming ingest" in cluster.cli("status", job)


def test_an_outage_at_start_is_waited_out_and_sigterm_ends_the_wait(make_cluster: Any) -> None:
    cluster = make_cluster()
    nobody = f"amqp://guest:guest@127.0.0.1:{free_port()}//"
    cluster.start_worker("patient", "embed", env={"IPBATCH_BROKER_URL": nobody})
    deadline = time.monotonic() + 60
    while "IPBATCH_BROKER_URL: unreachable" not in cluster.logs["patient"].read_text():
        assert time.monotonic() < deadline, cluster.log_tail()
        assert cluster.processes["patient"].poll() is None, cluster.log_tail()
        time.sleep(0.5)
    status, body = _get(cluster.metrics["patient"], "/readyz")
    assert status == 0  # nothing is served before the worker can work
    [waiting] = json.loads(cluster.cli("workers", "--json"))
    assert waiting["state"] == "waiting" and "IPBATCH_BROKER_URL" in waiting["problem"]
    cluster.processes["patient"].send_signal(signal.SIGTERM)
    assert _exit_code(cluster, "patient", timeout=15) != 0  # stopped, not "done"


def test_a_live_worker_reports_itself_and_answers_health(make_cluster: Any) -> None:
    cluster = make_cluster()
    cluster.start_worker("live", "ingest,embed")
    port = cluster.metrics["live"]
    deadline = time.monotonic() + 90
    while _get(port, "/readyz")[0] != 200:
        assert time.monotonic() < deadline, cluster.log_tail()
        assert cluster.processes["live"].poll() is None, cluster.log_tail()
        time.sleep(0.5)
    assert _get(port, "/healthz") == (200, "ok\n")
    [worker] = json.loads(cluster.cli("workers", "--json"))
    assert worker["name"].startswith("live@") and worker["state"] == "ready" and worker["live"]
    assert worker["queues"] == ["ingest", "embed"]
    text = cluster.cli("workers")
    assert worker["name"] in text and "ready" in text and "queues ingest,embed" in text
    samples = cluster.scrape("live")
    assert samples[("ipbatch_queue_consumers", (("queue", "embed"),))] == 1
    assert samples[("ipbatch_queue_consumers", (("queue", "generate"),))] == 0
    assert samples[("ipbatch_workers_stopped_by_configuration", ())] == 0


def test_a_configuration_error_met_at_work_exits_2_and_the_message_goes_back(
    make_cluster: Any, tmp_path: Path, tiny_models: Path, reference_images: dict[str, Path]
) -> None:
    """An embed worker whose models folder lacks the face pack passes its start-up check (the
    base models are there) and meets the error on a FaceID row: it exits 2 naming the pack, and
    the row's message, back in its queue, is done by a worker that has the pack."""
    faceless = tmp_path / "models-without-faces"
    faceless.mkdir()
    for entry in tiny_models.iterdir():
        if entry.name != "insightface":
            (faceless / entry.name).symlink_to(entry)
    cluster = make_cluster()
    cluster.upload_references(reference_images)
    cluster.start_worker("ingester", "ingest")
    cluster.start_worker("faceless", "embed", env={"IPBATCH_MODELS": str(faceless)})
    reference = f"s3://{cluster.bucket}/refs/red.png"
    row = {"id": "f", "adapter": "sd15-faceid", "reference": reference, "steps": 2}
    hook = Hook([])
    manifest = cluster.put_manifest("faces.jsonl", [row])
    output = f"s3://{cluster.bucket}/out"
    job = cluster.cli("submit", manifest, "--output", output, "--webhook", hook.url).strip()
    assert _exit_code(cluster, "faceless", timeout=180) == EXIT_CONFIG, cluster.log_tail()
    log = cluster.logs.pop("faceless").read_text()
    assert "CONFIGURATION ERROR" in log and "buffalo_l" in log, log[-3000:]
    cluster.processes.pop("faceless")
    [stopped] = [w for w in json.loads(cluster.cli("workers", "--json")) if "faceless" in w["name"]]
    assert stopped["state"] == "stopped" and "buffalo_l" in stopped["problem"]
    cluster.start_worker("embedder", "embed")
    cluster.start_worker("generator", "generate")
    ended = cluster.wait_for_job(job, timeout=300)
    assert ended["succeeded"] + ended["failed"] == 1  # the message was not lost
    # the ended job's results next to its images, and its webhook told (by the worker that
    # ended it, right after)
    deadline = time.monotonic() + 60
    while not hook.received:
        assert time.monotonic() < deadline, cluster.log_tail()
        time.sleep(0.5)
    hook.close()
    [(_, summary)] = hook.received
    assert (summary["job_id"], summary["status"]) == (job, ended["status"])
    body = cluster.s3.get_object(Bucket=cluster.bucket, Key=f"out/{job}/results.jsonl")["Body"]
    [line] = body.read().decode().splitlines()
    assert json.loads(line)["id"] == "f" and summary["results"] == f"{output}/{job}/results.jsonl"
    # the item's history names the workers by their --hostname, as `ipbatch workers` does
    with cluster.engine.connect() as conn:
        names = {n for (n,) in conn.execute(sa.text("SELECT DISTINCT worker FROM item_events"))}
    assert {n.split("@")[0] for n in names if n} >= {"faceless", "embedder"}, names
