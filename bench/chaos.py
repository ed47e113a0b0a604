"""A large chaos run: the harness of tests/integration/test_chaos.py (tests/helpers/chaos.py)
at the size of a night's work, by hand.

    .venv/bin/python bench/chaos.py [--seed N] [--jobs 4] [--rows 250] [--minutes 10]

Creates a throwaway PostgreSQL database and RabbitMQ vhost, starts moto's S3 server, writes
tiny models, then runs three workers and the reaper while faults happen at seeded moments
(SIGKILL of pool processes and of whole workers, SIGSTOP past the lease, database
connections cut, the S3 server gone for a few seconds). Prints the faults, the figures, and
fails loudly (an AssertionError naming the seed) if a row was lost, made twice or recorded
differently from what was stored. Same seed, same plan.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seed", type=int, default=int(time.time()) % 100_000)
    parser.add_argument("--jobs", type=int, default=4)
    parser.add_argument("--rows", type=int, default=250, help="rows per job")
    parser.add_argument("--minutes", type=float, default=10, help="how long faults go on")
    args = parser.parse_args()

    import boto3
    from helpers import chaos
    from helpers.cluster import Cluster, FlakyS3
    from helpers.services import ensure_services, temporary_database
    from moto.server import ThreadedMotoServer
    from PIL import Image, ImageDraw

    from pipeline.tiny import write_tiny_models
    from workers.context import quiet_model_libraries

    os.environ.setdefault("AWS_ACCESS_KEY_ID", "bench")
    os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "bench")
    ensure_services()
    work = Path(tempfile.mkdtemp(prefix="ipbatch-chaos-"))
    quiet_model_libraries()
    models = write_tiny_models(work / "models")
    references = {}
    for name, colour in (("red", (200, 30, 40)), ("blue", (30, 60, 170)), ("green", (40, 150, 70))):
        image = Image.new("RGB", (96, 80), (240, 240, 235))
        ImageDraw.Draw(image).ellipse((10, 10, 80, 70), fill=colour)
        references[name] = work / f"{name}.png"
        image.save(references[name])

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{server._server.server_port}"  # type: ignore[union-attr]
    bucket = "chaos"
    boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1").create_bucket(Bucket=bucket)
    vhost = f"ipbatch-chaos-{uuid.uuid4().hex[:8]}"
    subprocess.run(["rabbitmqctl", "-q", "add_vhost", vhost], check=True)
    subprocess.run(
        ["rabbitmqctl", "-q", "set_permissions", "-p", vhost, "guest", ".*", ".*", ".*"], check=True
    )
    flaky = FlakyS3()
    plan = chaos.Plan(
        seed=args.seed,
        jobs=args.jobs,
        rows=args.rows,
        faults_for=args.minutes * 60,
        finish_within=max(600.0, args.jobs * args.rows * 2.0),
    )
    print(
        f"chaos: seed {plan.seed}, {plan.jobs} jobs x {plan.rows} rows, faults for "
        f"{plan.faults_for:.0f} s; logs in {work}"
    )
    try:
        with temporary_database() as database_url:
            cluster = Cluster(
                tmp_path=work,
                database_url=database_url,
                broker_url=f"amqp://guest:guest@127.0.0.1:5672/{vhost}",
                s3_endpoint=endpoint,
                bucket=bucket,
                models=models,
                settings=chaos.settings(plan, flaky),
            )
            try:
                report = chaos.run(cluster, flaky, plan, references, database_url)
            finally:
                cluster.close()
        print(report.summary())
        for when, fault, target in report.faults:
            print(f"  {when:7.1f} s  {fault:13} {target}")
    finally:
        flaky.stop()
        subprocess.run(["rabbitmqctl", "-q", "delete_vhost", vhost])
        server.stop()


if __name__ == "__main__":
    main()
