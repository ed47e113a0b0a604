"""Control-plane headroom: how many items/s the ledger and the broker carry with no GPU cost.

    .venv/bin/python bench/fleet.py [--rows 100000] [--generate 2] [--store moto|tmpfs|both]
                                    [--delay 0] [--refs 1000]

The real PostgreSQL and RabbitMQ of this machine (a throwaway database and vhost), real
`ipbatch worker` processes (one ingest, one embed, --generate generate workers) whose
generator is a null one (bench/fleet_worker.py: a tiny fixed image after --delay seconds per
image, standing in for the GPU; bench only), and one job of --rows rows, one image each, over
--refs distinct reference pictures (embedded once each by the tiny CLIP encoder, then found in
the cache). The object store is moto's S3 server in a process of its own, over HTTP, or a local
folder in memory (tmpfs: the store at no cost, so the ledger and broker alone bound the rate).

Prints, per store: items/s from submit to the last item succeeded (and the generate stage's
own rate once it runs), SQL statements and broker messages per item, each process group's CPU
seconds and share (the ledger's share among them), against the goal of 2,000 items/s (a fleet
of ~100 GPUs at 20 images/s each). Where the server runs with autovacuum off (this machine's CI
configuration) the bench runs VACUUM ANALYZE every 30 s, as autovacuum would. No assertions.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

GOAL = 2000  # items/s: ~100 H100s at ~20 images/s each
VACUUM_EVERY = 30.0  # seconds: VACUUM ANALYZE when the server's autovacuum is off


def reference_png(i: int) -> bytes:
    from PIL import Image

    image = Image.new("RGB", (32, 32), ((i * 37) % 256, (i * 91) % 256, (i * 13) % 256))
    out = io.BytesIO()
    image.save(out, format="PNG")
    return out.getvalue()


def manifest(rows: int, refs: list[str]) -> bytes:
    lines = (
        json.dumps(
            {
                "id": f"sku-{i}",
                "prompt": f"product {i} on white",
                "reference": refs[i % len(refs)],
                "seed": i,
                "steps": 2,
            }
        )
        for i in range(rows)
    )
    return ("\n".join(lines) + "\n").encode()


# --- one run --------------------------------------------------------------------------------


def run(args: argparse.Namespace, store: str, models: Path) -> dict[str, object]:
    import sqlalchemy as sa

    from bench.benchdb import CpuMeter, moto_server, throwaway_database, throwaway_vhost

    work = Path(tempfile.mkdtemp(prefix="ipbatch-fleet-", dir="/dev/shm"))
    stats = work / "stats"
    stats.mkdir()
    database_url, drop = throwaway_database(args.pg + "/postgres")
    broker_url, delete_vhost = throwaway_vhost(args.rabbit)
    processes: list[subprocess.Popen[bytes]] = []
    env = {
        **os.environ,
        "IPBATCH_DATABASE_URL": database_url,
        "IPBATCH_BROKER_URL": broker_url,
        "IPBATCH_MODELS": str(models),
        "IPBATCH_HOME": str(work / "home"),
        "IPBATCH_SCORE": "false",
        "IPBATCH_GENERATE_BATCH": str(args.batch),
        "IPBATCH_LOG_FORMAT": "json",
        "AWS_ACCESS_KEY_ID": "bench",
        "AWS_SECRET_ACCESS_KEY": "bench",
        "OMP_NUM_THREADS": "1",
    }
    try:
        if store == "moto":
            server, endpoint, s3 = moto_server("fleet")
            processes.append(server)
            env["IPBATCH_S3_ENDPOINT_URL"] = endpoint
            refs = [f"s3://fleet/refs/{i}.png" for i in range(args.refs)]
            for i, uri in enumerate(refs):
                s3.put_object(Bucket="fleet", Key=uri.split("/", 3)[3], Body=reference_png(i))
            s3.put_object(Bucket="fleet", Key="jobs/night.jsonl", Body=manifest(args.rows, refs))
            manifest_uri, output_uri = "s3://fleet/jobs/night.jsonl", "s3://fleet/out"
            env["IPBATCH_ALLOWED_SOURCES"] = "s3://fleet/refs/"
        else:
            (work / "refs").mkdir()
            refs = []
            for i in range(args.refs):
                (work / "refs" / f"{i}.png").write_bytes(reference_png(i))
                refs.append(str(work / "refs" / f"{i}.png"))
            (work / "night.jsonl").write_bytes(manifest(args.rows, refs))
            manifest_uri, output_uri = str(work / "night.jsonl"), str(work / "out")
            env["IPBATCH_ALLOWED_SOURCES"] = str(work / "refs") + "/"
        os.environ.update(env)  # this process registers the job and watches the ledger

        from storage.migrate import upgrade
        from workers import tasks
        from workers.stages import jobs

        upgrade(database_url)
        ctx = tasks.context()
        roles = [("ingest", 1), ("embed", 1), ("generate", args.generate)]
        for queue, count in roles:
            for n in range(count):
                log = (work / f"{queue}-{n}.log").open("wb")
                processes.append(
                    subprocess.Popen(
                        [
                            sys.executable,
                            str(ROOT / "bench" / "fleet_worker.py"),
                            str(stats),
                            str(args.delay),
                            "worker",
                            "--queues",
                            queue,
                            "--hostname",
                            f"{queue}-{n}@fleet",
                            "--loglevel",
                            "WARNING",
                        ],
                        env={**env, "FLEET_ROLE": queue},
                        stdout=log,
                        stderr=subprocess.STDOUT,
                        cwd=ROOT,
                    )
                )
        # every worker up (its heartbeat in the workers table) before the clock starts
        engine = sa.create_engine(database_url)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            with engine.connect() as conn:
                up = conn.execute(sa.text("SELECT count(*) FROM workers")).scalar_one()
            if up >= 2 + args.generate:
                break
            time.sleep(0.5)
        time.sleep(3)  # the pool processes forked and consuming
        # a server with autovacuum off (this machine's CI configuration) never refreshes the
        # planner's statistics nor clears dead rows while the job runs; production servers
        # do. The bench stands in for it (its cost lands in PostgreSQL's CPU, as autovacuum's)
        with engine.connect() as conn:
            stand_in = conn.execute(sa.text("SHOW autovacuum")).scalar_one() == "off"
        meter = CpuMeter()
        started = time.perf_counter()
        job_id, _ = jobs.register(ctx, manifest_uri=manifest_uri, output_uri=output_uri)
        tasks.send_ingest(job_id)
        marks: dict[str, float] = {}
        counts: dict[str, int] = {}
        vacuumed = 0.0
        while True:
            time.sleep(1.0)
            meter.sample()
            if stand_in and time.perf_counter() - vacuumed >= VACUUM_EVERY:
                with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
                    conn.execute(sa.text("VACUUM ANALYZE"))
                vacuumed = time.perf_counter()
            with engine.connect() as conn:
                counts = dict(  # the job's counters, as `ipbatch status` reads them (counting
                    conn.execute(  # 100,000 items every second would weigh on the ledger)
                        sa.text("SELECT status, n FROM job_item_counts WHERE job_id = :j"),
                        {"j": job_id},
                    ).all()
                )
                status = conn.execute(
                    sa.text("SELECT status FROM jobs WHERE id = :j"), {"j": job_id}
                ).scalar_one()
            now = time.perf_counter() - started
            if sum(counts.values()) >= args.rows and "ingested" not in marks:
                marks["ingested"] = now
            if counts.get("succeeded", 0) and "first image" not in marks:
                marks["first image"] = now
            if not counts.get("pending") and not counts.get("embedding") and "ingested" in marks:
                marks.setdefault("embedded", now)
            if status in ("succeeded", "partial", "failed", "cancelled"):
                marks["ended"] = now
                break
            if now > args.timeout:
                marks["stopped"] = now
                break
        cpu, busy = meter.groups()
        with engine.connect() as conn:
            done = conn.execute(
                sa.text("SELECT count(*) FROM items WHERE job_id = :j AND status = 'succeeded'"),
                {"j": job_id},
            ).scalar_one()
        engine.dispose()
        ctx.close()
        if os.environ.get("FLEET_PROFILE"):
            _print_profiles(stats)
        totals = {"sql": 0, "published": 0, "delivered": 0}
        for path in stats.glob("*.json"):
            one = json.loads(path.read_text())
            for key in totals:
                totals[key] += one[key]
        return {
            "store": store,
            "rows": args.rows,
            "succeeded": done,
            "counts": {status: n for status, n in counts.items() if n},
            "marks": marks,
            "cpu": cpu,
            "busy": busy,
            "vacuum": stand_in,
            "totals": totals,
        }
    finally:
        for p in processes:
            p.terminate()
        for p in processes:
            try:
                p.wait(timeout=20)
            except subprocess.TimeoutExpired:
                p.kill()
        drop()
        delete_vhost()
        if not os.environ.get("FLEET_KEEP"):
            shutil.rmtree(work, ignore_errors=True)


def _print_profiles(stats: Path) -> None:
    """With FLEET_PROFILE=1: where each worker group's task time goes (cProfile)."""
    import pstats

    for path in sorted(stats.glob("*.prof")):
        role = json.loads(path.with_suffix(".json").read_text())["queues"]
        print(f"\n-- {role} worker {path.stem}: the tasks' time by function (cumulative)")
        pstats.Stats(str(path), stream=sys.stdout).sort_stats("cumulative").print_stats(40)


def report(result: dict[str, object], generate: int, delay: float, batch: int) -> None:
    marks: dict[str, float] = result["marks"]  # type: ignore[assignment]
    rows, done = int(result["rows"]), int(result["succeeded"])  # type: ignore[call-overload]
    wall = marks.get("ended", marks.get("stopped", 0.0))
    totals: dict[str, int] = result["totals"]  # type: ignore[assignment]
    cpu: dict[str, float] = result["cpu"]  # type: ignore[assignment]
    busy = float(result["busy"])  # type: ignore[arg-type]
    rate = done / wall if wall else 0.0
    gen_from = marks.get("first image", 0.0)
    gen_rate = done / (wall - gen_from) if wall > gen_from else 0.0
    print(
        f"\n== store: {result['store']}; {generate} generate workers, null generator "
        f"({delay * 1000:.0f} ms/image), {batch} items per message =="
    )
    print(
        f"{done:,} of {rows:,} items succeeded in {wall:.1f} s "
        f"(counts at the end: {result['counts']})"
    )
    print("  " + "; ".join(f"{name} at {t:.1f} s" for name, t in marks.items()))
    if result.get("vacuum"):
        print(f"  (autovacuum is off on this server: VACUUM ANALYZE every {VACUUM_EVERY:.0f} s)")
    print(
        f"  submit -> all succeeded: {rate:,.0f} items/s ({rate / GOAL:.1%} of the "
        f"{GOAL:,} items/s goal); generate stage from its first image: {gen_rate:,.0f} items/s"
    )
    per = max(done, 1)
    print(
        f"  SQL statements per item: {totals['sql'] / per:.1f} ({totals['sql']:,}); broker "
        f"messages per item: {totals['published'] / per:.3f} published, "
        f"{totals['delivered'] / per:.3f} delivered"
    )
    central = sum(v for k, v in cpu.items() if "ledger" in k or "broker" in k) / per
    cores = os.cpu_count() or 1
    print(
        f"  the control plane (PostgreSQL + RabbitMQ): {central * 1e3:.2f} ms CPU per item: a "
        f"{cores}-core host running only them would carry ~{cores / central:,.0f} items/s if "
        f"CPU were its only limit (the workers run on the GPU hosts)"
    )
    print(f"  CPU seconds (the machine was busy {busy:.0f} of {wall * cores:.0f}):")
    for group, seconds in sorted(cpu.items(), key=lambda kv: -kv[1]):
        print(
            f"    {group:<22} {seconds:7.1f} s  {seconds / busy:6.1%}  "
            f"{seconds / per * 1e3:6.2f} ms/item"
        )


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--refs", type=int, default=1000)
    parser.add_argument("--generate", type=int, default=2, help="generate worker processes")
    parser.add_argument("--delay", type=float, default=0.0, help="seconds per image")
    parser.add_argument(
        "--batch", type=int, default=16, help="items per message (IPBATCH_GENERATE_BATCH)"
    )
    parser.add_argument("--store", choices=["moto", "tmpfs", "both"], default="both")
    parser.add_argument("--timeout", type=float, default=1800)
    parser.add_argument("--models", type=Path, default=ROOT / ".ipbatch" / "models")
    parser.add_argument("--pg", default="postgresql+psycopg://postgres@127.0.0.1:5432")
    parser.add_argument("--rabbit", default="amqp://guest:guest@127.0.0.1:5672")
    parser.add_argument("--json-out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if not (args.models / "TINY_MODELS.json").exists():
        subprocess.run(
            [sys.executable, "-m", "ipbatch.cli", "models", "tiny", str(args.models)], check=True
        )
    if args.json_out:  # one store per process: the Celery app reads its broker at import
        args.json_out.write_text(json.dumps(run(args, args.store, args.models)))
        return
    results = []
    for store in ["tmpfs", "moto"] if args.store == "both" else [args.store]:
        with tempfile.NamedTemporaryFile(suffix=".json") as out:
            options = {k: v for k, v in vars(args).items() if k not in ("store", "json_out")}
            argv = [f"--{k.replace('_', '-')}={v}" for k, v in options.items()]
            subprocess.run(
                [sys.executable, __file__, *argv, "--store", store, "--json-out", out.name],
                check=True,
            )
            results.append(json.loads(Path(out.name).read_text()))
    for result in results:
        report(result, args.generate, args.delay, args.batch)


if __name__ == "__main__":
    main()
