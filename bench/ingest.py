"""Ingest at scale: a 100,000-row manifest from an S3 server to "all queued".

    .venv/bin/python bench/ingest.py [--rows 100000] [--broker amqp://...] [--pg URL]

Starts moto's S3 server on a free local port, uploads a generated manifest (10% of rows
invalid), creates a throwaway PostgreSQL database, then times the ingest stage streaming the
manifest, validating every row, writing items (+ events) to the ledger and sending the embed
messages to a real broker (a throwaway RabbitMQ vhost). Prints seconds, rows/s and the
process's peak RSS (which includes moto's S3 server, running in this process). No assertions.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
import uuid

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


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


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--pg", default="postgresql+psycopg://postgres@127.0.0.1:5432")
    parser.add_argument("--rabbit", default="amqp://guest:guest@127.0.0.1:5672")
    args = parser.parse_args()

    import boto3
    import sqlalchemy as sa
    from moto.server import ThreadedMotoServer

    os.environ.setdefault("AWS_ACCESS_KEY_ID", "bench")
    os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "bench")
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{server._server.server_port}"  # type: ignore[union-attr]
    bucket = "bench"
    s3 = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1")
    s3.create_bucket(Bucket=bucket)
    body = manifest_bytes(args.rows, bucket)
    s3.put_object(Bucket=bucket, Key="jobs/big.jsonl", Body=body)

    name = f"ipbatch_bench_{uuid.uuid4().hex[:8]}"
    vhost = f"ipbatch-bench-{uuid.uuid4().hex[:8]}"
    admin = sa.create_engine(f"{args.pg}/postgres", isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(sa.text(f'CREATE DATABASE "{name}"'))
    subprocess.run(["rabbitmqctl", "-q", "add_vhost", vhost], check=True)
    subprocess.run(
        ["rabbitmqctl", "-q", "set_permissions", "-p", vhost, "guest", ".*", ".*", ".*"], check=True
    )
    os.environ.update(
        {
            "IPBATCH_DATABASE_URL": f"{args.pg}/{name}",
            "IPBATCH_BROKER_URL": f"{args.rabbit}/{vhost}",
            "IPBATCH_S3_ENDPOINT_URL": endpoint,
        }
    )
    try:
        from storage.lifecycle import Stage
        from storage.migrate import upgrade
        from workers import tasks
        from workers.stages import ingest, jobs

        upgrade(os.environ["IPBATCH_DATABASE_URL"])
        ctx = tasks.context()
        job_id, _ = jobs.register(
            ctx, manifest_uri=f"s3://{bucket}/jobs/big.jsonl", output_uri=f"s3://{bucket}/out"
        )
        rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        sent = [0]

        def send(stage: Stage, ids: list[int]) -> None:
            tasks.send(stage, ids)
            sent[0] += len(ids)

        started = time.perf_counter()
        summary = ingest.run(ctx, job_id=job_id, send=send)
        seconds = time.perf_counter() - started
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        print(f"manifest: {args.rows} rows, {len(body) / 2**20:.1f} MiB on the S3 server")
        print(
            f"ingest to all queued: {seconds:.2f} s ({args.rows / seconds:,.0f} rows/s); "
            f"{summary.valid} valid, {summary.invalid} invalid, {sent[0]} items queued in "
            f"messages of {ctx.settings.generate_batch}"
        )
        print(
            f"peak RSS: {peak:.0f} MB (before ingest, with moto's S3 server and the manifest "
            f"in this process: {rss_before:.0f} MB)"
        )
        ctx.close()
    finally:
        with admin.connect() as conn:
            conn.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        subprocess.run(["rabbitmqctl", "-q", "delete_vhost", vhost])
        server.stop()


if __name__ == "__main__":
    main()
