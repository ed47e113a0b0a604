"""Ingest at scale: a 100,000-row manifest from an S3 server to "all queued".

    .venv/bin/python bench/ingest.py [--rows 100000] [--broker amqp://...] [--pg URL]

Starts moto's S3 server in a process of its own, uploads a generated manifest (10% of rows
invalid), creates a throwaway PostgreSQL database, then times the ingest stage, in a process of
its own, streaming the manifest, validating every row, writing items (+ events) to the ledger
and sending the embed messages to a real broker (a throwaway RabbitMQ vhost). Prints seconds,
rows/s, the ingest process's CPU and peak RSS, and the CPU seconds of PostgreSQL, RabbitMQ and
the S3 server meanwhile (INGEST_PROFILE=name: a cProfile of the reading thread, and the callers
of `name`). The goal (issue 21): 1,000,000 rows in <= 60 s, peak RSS <= 400 MB. No
assertions.
"""

from __future__ import annotations

import argparse
import cProfile
import json
import os
import pstats
import subprocess
import sys
import time
from typing import TYPE_CHECKING

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

if TYPE_CHECKING:
    from storage.lifecycle import Stage


def peak_rss_mb() -> float:
    """This process's peak resident set (VmHWM: unlike getrusage's ru_maxrss, it is not
    carried over from the parent through fork and exec)."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def manifest_bytes(rows: int, bucket: str) -> bytes:
    lines = []
    for i in range(rows):
        if i % 10 == 9:
            lines.append(json.dumps({"id": f"row-{i}", "reference": "r.png", "steps": 0}))
        else:
            lines.append(
                json.dumps(
                    {
                        "id": f"row-{i}",
                        "prompt": f"product {i} on white",
                        "reference": f"s3://{bucket}/refs/{i % 997}.png",
                        "num_images": 1 + i % 4,
                        "adapter": "sd15-plus",
                    }
                )
            )
    return ("\n".join(lines) + "\n").encode()


def ingest_here(args: argparse.Namespace) -> None:
    """The measured part, in a process of its own (its peak RSS is the ingest's): ingest the
    job and print what it took as JSON."""
    from workers import tasks
    from workers.stages import ingest

    ctx = tasks.context()
    rss_before = peak_rss_mb()
    sent = [0, 0]

    at_level = tasks.send_for_job(args.job)  # what the ingest task sends with

    sending = [0.0]

    def send(stage: Stage, ids: list[int]) -> None:
        started = time.perf_counter()
        at_level(stage, ids)
        sending[0] += time.perf_counter() - started
        sent[0] += len(ids)
        sent[1] += 1

    profile = cProfile.Profile() if os.environ.get("INGEST_PROFILE") else None
    if profile is not None:
        profile.enable()
    started, cpu_started = time.perf_counter(), time.process_time()
    summary = ingest.run(ctx, job_id=args.job, send=send)
    seconds, cpu = time.perf_counter() - started, time.process_time() - cpu_started
    if profile is not None:
        profile.disable()
        stats = pstats.Stats(profile, stream=sys.stderr).sort_stats("tottime")
        stats.print_stats(25)
        stats.sort_stats("cumulative").print_callers(os.environ["INGEST_PROFILE"])
    print(
        json.dumps(
            {
                "seconds": seconds,
                "cpu": cpu,
                "valid": summary.valid,
                "invalid": summary.invalid,
                "queued": sent[0],
                "messages": sent[1],
                "sending": sending[0],
                "batch": ctx.settings.embed_batch,
                "rss_before": rss_before,
                "rss_peak": peak_rss_mb(),
            }
        )
    )
    ctx.close()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--pg", default="postgresql+psycopg://postgres@127.0.0.1:5432")
    parser.add_argument("--rabbit", default="amqp://guest:guest@127.0.0.1:5672")
    parser.add_argument("--job", help=argparse.SUPPRESS)  # the ingest process: this job
    args = parser.parse_args()
    if args.job:
        ingest_here(args)
        return

    from bench.benchdb import CpuMeter, moto_server, throwaway_database, throwaway_vhost

    bucket = "bench"
    server, endpoint, s3 = moto_server(bucket)
    body = manifest_bytes(args.rows, bucket)
    size = len(body)
    s3.put_object(Bucket=bucket, Key="jobs/big.jsonl", Body=body)
    del body

    database_url, drop = throwaway_database(f"{args.pg}/postgres")
    broker_url, delete_vhost = throwaway_vhost(args.rabbit)
    os.environ.update(
        {
            "AWS_ACCESS_KEY_ID": "bench",
            "AWS_SECRET_ACCESS_KEY": "bench",
            "IPBATCH_DATABASE_URL": database_url,
            "IPBATCH_BROKER_URL": broker_url,
            "IPBATCH_S3_ENDPOINT_URL": endpoint,
        }
    )
    from workers import tasks

    try:
        from storage.migrate import upgrade
        from workers.stages import jobs

        upgrade(database_url)
        job_id, _ = jobs.register(
            tasks.context(),
            manifest_uri=f"s3://{bucket}/jobs/big.jsonl",
            output_uri=f"s3://{bucket}/out",
        )
        meter = CpuMeter()
        child = subprocess.Popen(
            [sys.executable, __file__, "--job", job_id], stdout=subprocess.PIPE, text=True
        )
        while child.poll() is None:  # the ingest's server connections end with it
            meter.sample()
            time.sleep(0.5)
        out, _ = child.communicate()
        if child.returncode:
            raise SystemExit(f"the ingest process failed ({child.returncode})")
        cpu, busy = meter.groups()
        got = json.loads(out.strip().splitlines()[-1])
        seconds = got["seconds"]
        print(
            f"manifest: {args.rows:,} rows, {size / 2**20:.1f} MiB on moto's S3 server "
            "(a process of its own)"
        )
        print(
            f"ingest to all queued: {seconds:.2f} s ({args.rows / seconds:,.0f} rows/s); "
            f"{got['valid']:,} valid, {got['invalid']:,} invalid, {got['queued']:,} items "
            f"queued in {got['messages']:,} messages of up to {got['batch']}"
        )
        print(
            f"  the ingest process's own CPU: {got['cpu']:.2f} s ({got['cpu'] / seconds:.0%} "
            "of the wall time; the rest it waited on PostgreSQL, the broker or S3)"
        )
        print(
            f"  publishing the messages (a thread of its own, alongside the reading and the "
            f"writing): {got['sending']:.2f} s, "
            f"{got['sending'] / got['messages'] * 1e3:.2f} ms each"
        )
        print(
            "CPU seconds meanwhile: "
            + ", ".join(f"{group} {seconds:.1f}" for group, seconds in sorted(cpu.items()))
            + f"; the machine's {os.cpu_count()} cores busy {busy:.1f} of "
            + f"{seconds * (os.cpu_count() or 1):.1f}"
        )
        print(
            f"the ingest process's peak RSS: {got['rss_peak']:.0f} MB (at start, imports "
            f"and connections: {got['rss_before']:.0f} MB)"
        )
    finally:
        tasks.context().close()
        drop()
        delete_vhost()
        server.terminate()
        server.wait()


if __name__ == "__main__":
    main()
