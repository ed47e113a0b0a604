"""`ipbatch verify` at scale: N recorded outputs checked against an S3 server, side by side.

    .venv/bin/python bench/verify.py [--outputs 5000] [--latency-ms 20] [--pg URL]

Starts moto's S3 server in a process of its own, behind the tests' S3 proxy, which holds every
request `--latency-ms` (a real S3 endpoint answers a HEAD in 10-30 ms; moto on this machine in
a few), and a throwaway PostgreSQL database; records N outputs of one job (items + outputs rows,
~5 KiB PNGs), then times `verify` with 1, 8 and 32 requests in flight and `--deep` with 32.
Prints outputs/s, the speed-up over one request at a time, the time a job of 1,000,000 images
would take at that rate, and the process's peak RSS before and after (constant memory is the
point of the paged ledger reads). No assertions.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import os
import resource
import subprocess
import sys
import time
import urllib.request
import uuid
from concurrent.futures import ThreadPoolExecutor

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.join(ROOT, "tests")]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--outputs", type=int, default=5_000)
    parser.add_argument("--latency-ms", type=float, default=20.0)
    parser.add_argument("--pg", default="postgresql+psycopg://postgres@127.0.0.1:5432")
    args = parser.parse_args()

    import boto3
    import numpy as np
    import sqlalchemy as sa
    from helpers.cli import free_port
    from helpers.s3proxy import S3Proxy
    from PIL import Image

    os.environ.setdefault("AWS_ACCESS_KEY_ID", "bench")
    os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "bench")
    port = free_port()
    moto = subprocess.Popen(  # its own process: its work does not share this one's GIL
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    proxy = S3Proxy(f"http://127.0.0.1:{port}")
    endpoint = proxy.endpoint
    for _ in range(100):
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=1)
            break
        except OSError:
            time.sleep(0.2)
    bucket = "bench"
    s3 = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1")
    s3.create_bucket(Bucket=bucket)

    name = f"ipbatch_bench_{uuid.uuid4().hex[:8]}"
    admin = sa.create_engine(f"{args.pg}/postgres", isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(sa.text(f'CREATE DATABASE "{name}"'))
    os.environ.update(
        {"IPBATCH_DATABASE_URL": f"{args.pg}/{name}", "IPBATCH_S3_ENDPOINT_URL": endpoint}
    )
    try:
        from storage.ledger import bulk
        from storage.ledger import jobs as job_ledger
        from storage.migrate import upgrade
        from storage.models import Item, ItemStatus, Output
        from workers import tasks
        from workers.stages import verify

        upgrade(os.environ["IPBATCH_DATABASE_URL"])
        ctx = tasks.context()
        now = ctx.clock()
        noise = np.random.default_rng(0).integers(0, 256, (40, 40, 3), dtype=np.uint8)
        png = io.BytesIO()
        Image.fromarray(noise).save(png, format="PNG")  # an image (--deep decodes it), ~4.8 KiB
        body = png.getvalue()
        sha = hashlib.sha256(body).hexdigest()
        with ctx.sessions.begin() as session:
            job_id, _ = job_ledger.create(
                session,
                name="bench",
                manifest_uri=f"s3://{bucket}/m.jsonl",
                manifest_sha256=uuid.uuid4().hex,
                output_uri=f"s3://{bucket}/out",
                now=now,
            )
            ids = bulk.add_items(
                session,
                job_id=job_id,
                rows=[
                    {
                        "row_id": f"r{i}",
                        "row_index": i,
                        "status": ItemStatus.PENDING,
                        "params": {},
                        "error_code": None,
                        "error_message": None,
                    }
                    for i in range(args.outputs)
                ],
                now=now,
            )
            # as if generated (the status counters are not kept here: verify does not read them)
            session.execute(sa.update(Item).values(status=ItemStatus.SUCCEEDED))
            keys = [f"out/{job_id}/r{i}/0.png" for i in range(args.outputs)]
            session.execute(
                sa.insert(Output),
                [
                    {
                        "item_id": item_id,
                        "image_index": 0,
                        "uri": f"s3://{bucket}/{key}",
                        "sha256": sha,
                        "size": len(body),
                        "seed": 0,
                        "width": 64,
                        "height": 64,
                        "created_at": now,
                    }
                    for item_id, key in zip(ids, keys, strict=True)
                ],
            )
        started = time.perf_counter()
        with ThreadPoolExecutor(32) as pool:
            list(pool.map(lambda k: s3.put_object(Bucket=bucket, Key=k, Body=body), keys))
        print(
            f"{args.outputs:,} outputs recorded and stored in {time.perf_counter() - started:.0f} s"
        )
        proxy.delay = args.latency_ms / 1000
        print(f"every S3 request now held {args.latency_ms:.0f} ms by the proxy")
        rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

        base = None
        for threads, deep in ((1, False), (8, False), (32, False), (32, True)):
            started = time.perf_counter()
            found = verify.verify(ctx, job_id=job_id, deep=deep, threads=threads)
            seconds = time.perf_counter() - started
            rate = found.checked / seconds
            base = base or rate
            print(
                f"verify{' --deep' if deep else '       '} threads {threads:2}: "
                f"{found.checked:,} checked in {seconds:6.1f} s = {rate:6,.0f} outputs/s "
                f"({rate / base:4.1f}x one at a time); 1,000,000 images: "
                f"{1e6 / rate / 60:5.1f} min; problems {len(found.problems)}"
            )
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        print(f"peak RSS: {rss_before:.0f} MB before verifying, {peak:.0f} MB after")
        ctx.close()
    finally:
        with admin.connect() as conn:
            conn.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        proxy.close()
        moto.terminate()


if __name__ == "__main__":
    main()
