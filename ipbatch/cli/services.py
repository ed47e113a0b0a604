"""The long-running commands of a deployment: worker, producer, reaper."""

from __future__ import annotations

import argparse
import logging
from typing import Any

from core.config import Settings
from core.errors import Action, ConfigError, RetryableError, classify, short
from ipbatch.cli.common import configure_logging
from ipbatch.exits import EXIT_CONFIG

log = logging.getLogger("ipbatch")
Subparsers = Any  # argparse's private _SubParsersAction


def cmd_worker(args: argparse.Namespace) -> int:
    """A Celery worker for `--queues`, that says when it cannot work: it checks what its
    queues need first (a configuration error: each problem on one line naming the setting,
    exit 2; an outage: it waits), beats in the ledger while it runs, and exits 2 when a
    configuration error stops it later (`workers.lifeline`)."""
    import os
    import tempfile

    from celery.utils.nodenames import default_nodename, host_format

    settings = Settings()
    port = args.metrics_port or settings.metrics_port
    if port:  # before anything imports prometheus_client: the pool children count into files
        os.environ.setdefault(
            "PROMETHEUS_MULTIPROC_DIR", tempfile.mkdtemp(prefix="ipbatch-metrics-")
        )
    configure_logging(settings.log_format, args.loglevel)

    from storage.lifecycle import QUEUES
    from workers import lifeline

    queues = [q.strip() for q in args.queues.split(",") if q.strip()]
    unknown = set(queues) - set(QUEUES)
    if unknown:
        raise ConfigError(f"unknown queue(s) {sorted(unknown)}; queues are {', '.join(QUEUES)}")
    name = host_format(args.hostname or default_nodename(None))
    life = lifeline.Lifeline(settings, name=name, queues=queues)
    problems = life.wait_until_able()
    if problems:
        for problem in problems:
            log.error("worker %s cannot start: %s", name, problem.line())
        life.stopped([p.line() for p in problems])
        return EXIT_CONFIG
    if port:
        from workers.metrics import serve

        serve(
            port,
            database_url=settings.ledger_url(),
            broker_url=settings.broker_url.get_secret_value(),
            queues=QUEUES,
            health=life.health,
        )
    stop_file = os.path.join(tempfile.mkdtemp(prefix="ipbatch-worker-"), "stopped")
    os.environ.update(
        {
            lifeline.STOP_FILE: stop_file,
            lifeline.PARENT_PID: str(os.getpid()),
            lifeline.WORKER_NAME: name,
        }
    )
    from workers.celery_app import app

    argv = ["worker", "-Q", ",".join(queues), "--concurrency", str(args.concurrency)]
    argv += ["--loglevel", args.loglevel, "--without-gossip", "--without-mingle", "-n", name]
    life.start_beating()
    code = 0
    try:
        app.worker_main(argv)
    except SystemExit as exc:  # celery's own exit code
        code = exc.code if isinstance(exc.code, int) else 1
    stopped_for = lifeline.stop_file_problem(stop_file)
    life.stopped([stopped_for] if stopped_for else [])
    if stopped_for:
        log.error("worker %s stopped on a configuration error: %s", name, stopped_for)
        return EXIT_CONFIG
    return code


def cmd_producer(args: argparse.Namespace) -> int:
    from workers.producer import watch
    from workers.tasks import context, send_ingest

    configure_logging(context().settings.log_format, args.loglevel)  # INFO: what it submits
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
    configure_logging(settings.log_format, args.loglevel)
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
                raise RetryableError(
                    f"reaper: database or broker unreachable: {short(exc)}"
                ) from exc
            log.warning("reaper: pass skipped (%s); next in %g s", short(exc), every)
            reaped = jobs.Reaped()
        if reaped.items or reaped.jobs:
            log.warning("reaper: %d items and %d jobs sent again", reaped.items, reaped.jobs)
        if args.once:
            print(f"{reaped.items} items and {reaped.jobs} jobs queued again")
            return 0
        time.sleep(every)


def cmd_workers(args: argparse.Namespace) -> int:
    """Every worker the ledger knows: live ones with their queues, state, what they are
    doing and what they keep loaded; stopped ones with the configuration error they stopped
    on; gone ones (no heartbeat for a while: killed, their machine down)."""
    import json
    from dataclasses import asdict

    from ipbatch.cli.common import settings_from, stage_context
    from storage.ledger import workers

    with stage_context(settings_from(args)) as ctx, ctx.sessions.begin() as session:
        now = ctx.clock()
        views = workers.listing(session, now=now)
    if args.json:
        print(json.dumps([asdict(v) for v in views], default=str))
        return 0
    if not views:
        print("no worker has reported to this ledger")
        return 0
    for v in views:
        age = (now - v.heartbeat_at).total_seconds()
        print(
            f"{v.name}  {v.state}  queues {','.join(v.queues)}  pid {v.pid}  beat {age:.0f} s ago"
        )
        if v.current:
            current = v.current
            print(f"    working on {current['task']} {current['args']} since {current['since']}")
        if v.models:
            print(f"    loaded: {', '.join(v.models)}")
        if v.problem:
            print(f"    {v.problem}")
    return 0


def add_parsers(sub: Subparsers) -> None:
    p = sub.add_parser("workers", help="the workers: queues, state, current work, heartbeat")
    p.add_argument("--json", action="store_true", help="as JSON")
    p.set_defaults(func=cmd_workers)

    p = sub.add_parser("producer", help="submit every new manifest under a prefix, once")
    p.add_argument("--watch", required=True, help="s3://bucket/prefix/ to watch")
    p.add_argument("--output", help="where jobs write images (default s3://<bucket>/outputs)")
    p.add_argument("--interval", type=float, default=10.0, help="seconds between scans")
    p.add_argument("--once", action="store_true", help="scan once and exit")
    p.add_argument("--loglevel", default="INFO")
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
    p.add_argument("--loglevel", default="INFO")
    p.set_defaults(func=cmd_reaper)
