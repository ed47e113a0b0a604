"""A deployment in a test: real `ipbatch worker` / `ipbatch reaper` processes over PostgreSQL,
a broker and an S3 server, started and stopped here; and what tests ask of it."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

import boto3
import sqlalchemy as sa
from helpers.cli import free_port, ipbatch_ok

ENDED = ("succeeded", "partial", "failed", "cancelled")
REAPER_EVERY = "reaper --every"  # a cluster_settings key: also run `ipbatch reaper`


class Cluster:
    def __init__(
        self,
        *,
        tmp_path: Path,
        database_url: str,
        broker_url: str,
        s3_endpoint: str,
        bucket: str,
        models: Path,
        settings: dict[str, str],
    ) -> None:
        self.tmp_path = tmp_path
        self.bucket = bucket
        self.env = {
            **os.environ,
            "IPBATCH_DATABASE_URL": database_url,
            "IPBATCH_BROKER_URL": broker_url,
            "IPBATCH_S3_ENDPOINT_URL": s3_endpoint,
            "IPBATCH_MODELS": str(models),
            "IPBATCH_HOME": str(tmp_path / "home"),
            "IPBATCH_ALLOWED_SOURCES": f"s3://{bucket}/refs/",
            "IPBATCH_GENERATE_BATCH": "2",
            "IPBATCH_EMBED_BATCH": "2",
            "IPBATCH_LOG_FORMAT": "json",
            **settings,
        }
        self.s3 = boto3.client("s3", endpoint_url=s3_endpoint, region_name="us-east-1")
        # pre-ping: survives a PostgreSQL restart or connections terminated by a test
        self.engine = sa.create_engine(database_url, pool_pre_ping=True)
        self.processes: dict[str, subprocess.Popen[bytes]] = {}
        self.logs: dict[str, Path] = {}
        self.metrics: dict[str, int] = {}
        self._handles: list[IO[str]] = []
        self.cli("db", "upgrade")

    # --- processes ------------------------------------------------------------------------

    def start(self, name: str, *args: str, env: dict[str, str] | None = None) -> None:
        """`ipbatch ARGS` in a session of its own, its output in `<name>.log`."""
        log = (self.tmp_path / f"{name}.log").open("a")
        self._handles.append(log)
        self.logs[name] = self.tmp_path / f"{name}.log"
        self.processes[name] = subprocess.Popen(
            [sys.executable, "-m", "ipbatch.cli", *args],
            env={**self.env, **(env or {})},
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    def start_worker(self, name: str, queues: str, env: dict[str, str] | None = None) -> None:
        self.metrics[name] = free_port()
        self.start(
            name,
            "worker",
            "--queues",
            queues,
            "--concurrency",
            "1",
            "--hostname",
            f"{name}@%h",
            "--metrics-port",
            str(self.metrics[name]),
            env=env,
        )

    def pool(self, name: str) -> list[int]:
        """The pool processes of a Celery worker (the ones that run the stages)."""
        pid = self.processes[name].pid
        found = []
        for stat in Path("/proc").glob("[0-9]*/stat"):
            try:
                fields = stat.read_text().rsplit(")", 1)[1].split()
            except (OSError, IndexError):
                continue
            if int(fields[1]) == pid:
                found.append(int(stat.parent.name))
        return found

    def stop(self, name: str) -> None:
        proc = self.processes.pop(name)
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGCONT)
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()

    def close(self) -> None:
        for name in list(self.processes):
            self.stop(name)
        for handle in self._handles:
            handle.close()
        self.engine.dispose()

    def cli(self, *args: str) -> str:
        return ipbatch_ok(*args, env=self.env)

    def log_tail(self, chars: int = 3000) -> str:
        return "\n".join(f"--- {n}\n{p.read_text()[-chars:]}" for n, p in self.logs.items())

    # --- jobs -----------------------------------------------------------------------------

    def put_manifest(self, key: str, rows: list[dict[str, Any]]) -> str:
        body = "".join(json.dumps(r) + "\n" for r in rows).encode()
        self.s3.put_object(Bucket=self.bucket, Key=key, Body=body)
        return f"s3://{self.bucket}/{key}"

    def upload_references(self, images: dict[str, Path]) -> None:
        for name, path in images.items():
            self.s3.upload_file(str(path), self.bucket, f"refs/{name}.png")

    def submit(self, key: str, rows: list[dict[str, Any]], output: str) -> str:
        manifest = self.put_manifest(key, rows)
        return self.cli("submit", manifest, "--output", f"s3://{self.bucket}/{output}").strip()

    def progress(self, job_id: str) -> dict[str, Any]:
        with self.engine.connect() as conn:
            row = conn.execute(
                sa.text("SELECT * FROM job_progress WHERE job_id = :j"), {"j": job_id}
            ).mappings()
            return dict(row.one_or_none() or {})

    def wait_for_job(self, job_id: str, timeout: float = 300) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for name, proc in self.processes.items():
                assert proc.poll() is None, f"{name} died:\n{self.log_tail()}"
            row = self.progress(job_id)
            if row and row["status"] in ENDED:
                return row
            time.sleep(1)
        raise AssertionError(
            f"job {job_id} did not finish in {timeout} s; items not succeeded:\n"
            f"{self.not_succeeded(job_id)}\nlogs:\n{self.log_tail()}"
        )

    def wait_until(
        self, job_id: str, condition: Callable[[dict[str, Any]], bool], *, deadline: float
    ) -> dict[str, Any]:
        """job_progress once `condition` holds (or the job ended, or at the deadline)."""
        while True:
            p = self.progress(job_id)
            if (p and condition(p)) or time.monotonic() > deadline:
                return p
            if p and p["status"] in ENDED:
                return p
            time.sleep(0.2)

    def wait_until_generating(
        self, job_id: str, *, succeeded: int, deadline: float
    ) -> dict[str, Any]:
        """Once `succeeded` items are done and a batch is generating."""
        return self.wait_until(
            job_id, lambda p: p["succeeded"] >= succeeded and p["running"] > 0, deadline=deadline
        )

    def not_succeeded(self, job_id: str) -> str:
        """The items waiting, held or failed, each with its events: what a failure report needs."""
        with self.engine.connect() as conn:
            rows = conn.execute(
                sa.text(
                    "SELECT i.id, i.status, i.attempts, i.lease_until, e.from_status, e.to_status,"
                    " e.worker, e.message, e.created_at FROM items i JOIN item_events e"
                    " ON e.item_id = i.id WHERE i.job_id = :j"
                    " AND i.status <> 'succeeded' ORDER BY i.id, e.id"
                ),
                {"j": job_id},
            ).all()
        return "\n".join(" | ".join(str(v) for v in row) for row in rows)

    def count(self, sql: str, **params: Any) -> int:
        with self.engine.connect() as conn:
            return int(conn.execute(sa.text(sql), params).scalar_one())

    def assert_one_set_of_outputs(self, job_id: str, *, prefix: str, asked: int) -> None:
        """outputs rows = stored objects = images asked, and every object is the one recorded."""
        with self.engine.connect() as conn:
            outputs = conn.execute(
                sa.text(
                    "SELECT o.uri, o.sha256 FROM outputs o JOIN items i ON i.id = o.item_id "
                    "WHERE i.job_id = :j"
                ),
                {"j": job_id},
            ).all()
        keys = set()
        for page in self.s3.get_paginator("list_objects_v2").paginate(
            Bucket=self.bucket, Prefix=f"{prefix}/{job_id}/"
        ):
            keys |= {o["Key"] for o in page.get("Contents", [])}
        keys.discard(f"{prefix}/{job_id}/results.jsonl")  # the job's results, not an image
        assert len(outputs) == asked == len(keys), (len(outputs), asked, len(keys))
        assert {uri.removeprefix(f"s3://{self.bucket}/") for uri, _ in outputs} == keys
        for uri, sha in outputs:
            key = uri.removeprefix(f"s3://{self.bucket}/")
            body = self.s3.get_object(Bucket=self.bucket, Key=key)["Body"]
            assert hashlib.sha256(body.read()).hexdigest() == sha

    def scrape(self, name: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
        """Every sample a worker's /metrics serves, keyed by (name, sorted labels)."""
        import urllib.request

        from prometheus_client.parser import text_string_to_metric_families

        url = f"http://127.0.0.1:{self.metrics[name]}/metrics"
        body = urllib.request.urlopen(url, timeout=10).read().decode()
        return {
            (sample.name, tuple(sorted(sample.labels.items()))): sample.value
            for family in text_string_to_metric_families(body)
            for sample in family.samples
        }


class FlakyS3:
    """A second moto server over the same in-process S3 state, which a test can stop."""

    def __init__(self) -> None:
        self.port = free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self.server = self._start()

    def _start(self) -> Any:
        from moto.server import ThreadedMotoServer

        server = ThreadedMotoServer(ip_address="127.0.0.1", port=self.port, verbose=False)
        server.start()
        return server

    def stop(self) -> None:
        self.server.stop()

    def restart(self) -> None:
        self.server = self._start()

    def outage(
        self, seconds: float, *, until: Callable[[], bool] | None = None, limit: float = 60
    ) -> None:
        """Gone for `seconds`, and then (with `until`) until that holds, at most `limit` s:
        on a slow machine one batch can outlast the outage and never notice it."""
        self.stop()
        time.sleep(seconds)
        deadline = time.monotonic() + limit - seconds
        while until is not None and not until() and time.monotonic() < deadline:
            time.sleep(0.5)
        self.restart()
