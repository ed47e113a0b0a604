"""The long-running commands of a deployment: worker, producer, reaper."""

from __future__ import annotations

import argparse
import logging
from typing import Any

from core.config import Settings
from core.errors import Action, ConfigError, IpbatchError, classify, short
from ipbatch.cli.common import configure_logging

log = logging.getLogger("ipbatch")
Subparsers = Any  # argparse's private _SubParsersAction


def cmd_worker(args: argparse.Namespace) -> int:
    import os
    import tempfile

    settings = Settings()
    port = args.metrics_port or settings.metrics_port
    if port:  # before anything imports prometheus_client: the pool children count into files
        os.environ.setdefault(
            "PROMETHEUS_MULTIPROC_DIR", tempfile.mkdtemp(prefix="ipbatch-metrics-")
        )
    configure_logging(settings.log_format, args.loglevel)

    from storage.lifecycle import QUEUES
    from workers.celery_app import app

    queues = [q.strip() for q in args.queues.split(",") if q.strip()]
    unknown = set(queues) - set(QUEUES)
    if unknown:
        raise ConfigError(f"unknown queue(s) {sorted(unknown)}; queues are {', '.join(QUEUES)}")
    if port:
        from workers.metrics import serve

        serve(
            port,
            database_url=settings.ledger_url(),
            broker_url=settings.broker_url.get_secret_value(),
            queues=QUEUES,
        )
    argv = [
        "worker",
        "-Q",
        ",".join(queues),
        "--concurrency",
        str(args.concurrency),
        "--loglevel",
        args.loglevel,
        "--without-gossip",
        "--without-mingle",
    ]
    if args.hostname:
        argv += ["-n", args.hostname]
    app.worker_main(argv)
    return 0


def cmd_producer(args: argparse.Namespace) -> int:
    from workers.producer import watch
    from workers.tasks import context, send_ingest

    configure_logging(context().settings.log_format)
    output = args.output
    if output is None:
        if not args.watch.startswith("s3://"):
            raise ConfigError("--output is required when watching a local folder")
        output = f"s3://{args.watch.removeprefix('s3://').split('/', 1)[0]}/outputs"
    watch(
        context(),
        prefix_uri=args.watch,
        output_uri=output,
        send_ingest=send_ingest,
        interval=args.interval,
        iterations=1 if args.once else None,
    )
    return 0


def cmd_reaper(args: argparse.Namespace) -> int:
    """Every --every seconds (IPBATCH_REAPER_EVERY): send again the items and ingests of
    workers whose lease ran out, and the work whose message was lost (waiting, unmoved for
    IPBATCH_REQUEUE_AFTER seconds, with its queue empty), to the front of the queues. An
    outage of the database or the broker skips a pass."""
    import time

    from workers.celery_app import queue_depths
    from workers.stages import jobs
    from workers.tasks import context, send_job_urgent, send_urgent

    settings = context().settings
    every = args.every if args.every is not None else settings.reaper_every
    configure_logging(settings.log_format)
    broker = settings.broker_url.get_secret_value()
    while True:
        try:
            reaped = jobs.reap(
                context(),
                send=send_urgent,
                send_job=send_job_urgent,
                queue_depth=lambda queue: queue_depths(broker, [queue])[queue],
            )
        except Exception as exc:
            if classify(exc).action is not Action.RETRY:
                raise
            if args.once:
                raise IpbatchError(f"reaper: database or broker unreachable: {short(exc)}") from exc
            log.warning("reaper: pass skipped (%s); next in %g s", short(exc), every)
            reaped = jobs.Reaped()
        if reaped.items or reaped.jobs:
            log.warning("reaper: %d items and %d jobs sent again", reaped.items, reaped.jobs)
        if args.once:
            print(f"{reaped.items} items and {reaped.jobs} jobs queued again")
            return 0
        time.sleep(every)


def add_parsers(sub: Subparsers) -> None:
    p = sub.add_parser("producer", help="submit every new manifest under a prefix, once")
    p.add_argument("--watch", required=True, help="s3://bucket/prefix/ to watch")
    p.add_argument("--output", help="where jobs write images (default s3://<bucket>/outputs)")
    p.add_argument("--interval", type=float, default=10.0, help="seconds between scans")
    p.add_argument("--once", action="store_true", help="scan once and exit")
    p.set_defaults(func=cmd_producer)

    p = sub.add_parser("worker", help="a Celery worker")
    p.add_argument("--queues", default="ingest,embed,generate")
    p.add_argument(
        "--concurrency",
        type=int,
        default=1,
        help="worker processes; each uses IPBATCH_DEVICE, so on a GPU machine run one "
        "generate worker per GPU with CUDA_VISIBLE_DEVICES",
    )
    p.add_argument(
        "--metrics-port", type=int, help="serve Prometheus metrics here (IPBATCH_METRICS_PORT)"
    )
    p.add_argument("--loglevel", default="INFO")
    p.add_argument("--hostname", help="Celery node name")
    p.set_defaults(func=cmd_worker)

    p = sub.add_parser(
        "reaper", help="queue again the items of workers that died, and lost messages"
    )
    p.add_argument(
        "--every", type=float, help="seconds between passes (default IPBATCH_REAPER_EVERY, 60)"
    )
    p.add_argument("--once", action="store_true", help="one pass, then exit")
    p.set_defaults(func=cmd_reaper)
