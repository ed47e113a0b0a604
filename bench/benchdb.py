"""Throwaway services for one benchmark run: a PostgreSQL database, a RabbitMQ vhost and moto's
S3 server, each its own, and the call that removes it; and the CPU each group of processes
used meanwhile (`CpuMeter`)."""

from __future__ import annotations

import glob
import os
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import sqlalchemy as sa

from tests.helpers.cli import free_port


def throwaway_database(pg_url: str) -> tuple[str, Callable[[], None]]:
    """Create an empty database next to `pg_url`'s: its URL, and the call that drops it."""
    name = f"ipbatch_bench_{uuid.uuid4().hex[:8]}"
    admin = sa.create_engine(pg_url, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(sa.text(f'CREATE DATABASE "{name}"'))

    def drop() -> None:
        with admin.connect() as conn:
            conn.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}"'))
        admin.dispose()

    return sa.make_url(pg_url).set(database=name).render_as_string(hide_password=False), drop


def throwaway_vhost(rabbit_url: str) -> tuple[str, Callable[[], None]]:
    """A RabbitMQ vhost of its own (`rabbitmqctl`, guest may use it): the broker URL under
    `rabbit_url` (no vhost part), and the call that deletes it."""
    vhost = f"ipbatch-bench-{uuid.uuid4().hex[:8]}"
    subprocess.run(["rabbitmqctl", "-q", "add_vhost", vhost], check=True)
    subprocess.run(
        ["rabbitmqctl", "-q", "set_permissions", "-p", vhost, "guest", ".*", ".*", ".*"], check=True
    )
    return f"{rabbit_url}/{vhost}", lambda: subprocess.run(
        ["rabbitmqctl", "-q", "delete_vhost", vhost], check=False
    )


def moto_server(bucket: str) -> tuple[subprocess.Popen[bytes], str, Any]:
    """moto's S3 server in a process of its own (its work does not share the bench's GIL nor
    count in its memory) with `bucket` made: the process, its endpoint and a boto3 client."""
    import boto3

    port = free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    endpoint = f"http://127.0.0.1:{port}"
    s3 = boto3.client(
        "s3",
        endpoint_url=endpoint,
        region_name="us-east-1",
        aws_access_key_id="bench",
        aws_secret_access_key="bench",
    )
    for _ in range(100):  # until it answers
        try:
            s3.create_bucket(Bucket=bucket)
            return server, endpoint, s3
        except Exception:
            time.sleep(0.1)
    server.kill()
    raise RuntimeError("moto's S3 server did not start")


TICK = os.sysconf("SC_CLK_TCK")


def _cpu_of_processes() -> dict[int, tuple[str, float]]:
    """pid -> (group, CPU seconds so far) for every process of interest."""
    found = {}
    for stat in glob.glob("/proc/[0-9]*/stat"):
        pid = int(stat.split("/")[2])
        try:
            fields = Path(stat).read_text().rsplit(")", 1)[1].split()
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        group = _group(cmdline)
        if group:
            found[pid] = (group, (int(fields[11]) + int(fields[12])) / TICK)
    return found


def _group(cmdline: str) -> str | None:
    if cmdline.startswith("postgres") or "/postgres" in cmdline.split(" ")[0]:
        return "PostgreSQL (ledger)"
    if "beam.smp" in cmdline or "rabbitmq" in cmdline:
        return "RabbitMQ (broker)"
    if "moto" in cmdline:
        return "S3 server (moto)"
    if "fleet_worker.py" in cmdline:
        queue = cmdline.split("--queues ", 1)[1].split(" ", 1)[0]
        return f"{queue} workers"
    if "ingest.py --job" in cmdline:
        return "ingest process"
    return None


def _system_busy() -> float:
    parts = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = parts[3] + parts[4]
    return (sum(parts[:8]) - idle) / TICK


@dataclass
class CpuMeter:
    """CPU seconds by process group (the ledger, the broker, the S3 server, the bench's
    workers) since it was made; `sample()` now and then keeps the processes that end."""

    start: dict[int, tuple[str, float]] = field(default_factory=_cpu_of_processes)
    busy: float = field(default_factory=_system_busy)
    last: dict[int, tuple[str, float]] = field(default_factory=dict)

    def sample(self) -> None:
        """Remember every process seen (a process gone by the end keeps its last reading)."""
        self.last.update(_cpu_of_processes())

    def groups(self) -> tuple[dict[str, float], float]:
        self.sample()
        used: dict[str, float] = {}
        for pid, (group, seconds) in self.last.items():
            before = self.start.get(pid, (group, 0.0))[1]
            used[group] = used.get(group, 0.0) + seconds - before
        return used, _system_busy() - self.busy
