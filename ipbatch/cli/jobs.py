"""Job commands: run (one machine), submit, status, cancel, retry, verify, report."""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from datetime import datetime
from pathlib import Path
from typing import Any

from core.config import Settings
from core.errors import ConfigError
from core.uris import absolute_uri
from ipbatch.cli.common import (
    print_summary,
    print_verified,
    settings_from,
    stage_context,
    write_report,
)
from ipbatch.exits import EXIT_CONFIG, EXIT_UNREACHABLE
from storage.ledger.jobs import JobOptions
from storage.lifecycle import JOB_ENDED, PRIORITIES

Subparsers = Any  # argparse's private _SubParsersAction


def cmd_run(args: argparse.Namespace) -> int:
    from workers.runner import run_local

    summary = run_local(
        settings_from(args),
        manifest=args.manifest,
        output=args.output,
        progress=not args.quiet,
        check=args.verify,
        options=_options(args, webhook_url=args.webhook),
    )
    code = print_summary(summary)
    if summary.verified is not None:
        return max(code, print_verified(summary.verified))
    return code


def cmd_submit(args: argparse.Namespace) -> int:
    from core.errors import Action, classify
    from workers.stages import jobs
    from workers.tasks import context, send_ingest

    if args.dry_run:  # checked as a job would find it; nothing registered, nothing sent
        from ipbatch.cli.admin import check_manifest

        return check_manifest(args.manifest, args.output)
    if "://" not in args.output:
        raise ConfigError(
            f"--output {args.output} is a path on this machine: the workers run elsewhere and "
            "would each write to their own disk. Give an s3:// URI, or file:///... for a folder "
            "every worker mounts at that same path"
        )
    registered: list[str] = []

    def send(job_id: str) -> None:
        registered.append(job_id)
        send_ingest(job_id)

    try:
        job_id, created = jobs.submit(
            context(),
            manifest_uri=absolute_uri(args.manifest),
            output_uri=args.output,
            name=args.name,
            send_ingest=send,
            rerun_ended=args.rerun,
            options=_options(
                args,
                webhook_url=jobs.webhook_for(context(), args.webhook),
                priority=args.priority,
            ),
        )
    except Exception as exc:
        decision = classify(exc)
        if not registered or decision.action not in (Action.RETRY, Action.CONFIG):
            raise
        then = (
            "once the broker answers, or let `ipbatch reaper` send it (after IPBATCH_REQUEUE_AFTER)"
            if decision.action is Action.RETRY
            else "once IPBATCH_BROKER_URL is fixed"
        )
        print(
            f"ipbatch: error: job {registered[0]} is registered, but its ingest could not be "
            f"sent ({decision.message}). Submit the same manifest again {then}: that sends it.",
            file=sys.stderr,
        )
        return EXIT_UNREACHABLE if decision.action is Action.RETRY else EXIT_CONFIG
    if not created:
        _say_existing(context(), job_id, args.name)
    print(job_id)
    return 0


def _say_existing(ctx: Any, job_id: str, name: str | None) -> None:
    """A submit that returned the job this manifest and output already have: say so (and
    that --name did not rename it); an ended one is run again with `ipbatch rerun`."""
    from storage.ledger import jobs as ledger_jobs

    with ctx.sessions.begin() as session:
        job = ledger_jobs.get(session, job_id=job_id)
        assert job is not None
        status, existing = str(job.status), job.name
    line = f"job {job_id} ({existing!r}, {status}) already has this manifest and output"
    if name and name != existing:
        line += f"; --name {name!r} is ignored"
    if status in JOB_ENDED:  # partial included
        line += f"; `ipbatch rerun {job_id}` (or submit --rerun) runs it again"
    print(line, file=sys.stderr)


def cmd_rerun(args: argparse.Namespace) -> int:
    """A new run of an ended job (its manifest and output; a new id and its own outputs):
    in one-machine mode here and now, otherwise queued for the workers."""
    settings = settings_from(args)
    if settings.database_url is None:
        from workers.runner import rerun_local

        summary = rerun_local(settings, job_id=args.job, name=args.name, progress=not args.quiet)
        return print_summary(summary)
    from workers.stages import jobs
    from workers.tasks import context, send_ingest

    again = jobs.rerun(context(), job_id=args.job, send_ingest=send_ingest, name=args.name)
    print(again)
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    from ipbatch import status
    from storage.ledger.db import make_engine

    engine = make_engine(Settings().ledger_url())
    try:
        if args.by:
            now = datetime.now().astimezone()
            try:
                until = status.next_time(args.by, now)
            except ValueError as exc:
                raise ConfigError(str(exc)) from exc
            ahead = status.forecast(engine, until=until, now=now)
            print(json.dumps(ahead, indent=2) if args.json else status.forecast_line(ahead))
            return 0
        if args.watch:
            if not args.job:
                raise ConfigError("--watch needs a job id")
            return status.watch(engine, job_id=args.job, interval=args.interval)
        found = status.collect(engine, job_id=args.job, limit=args.limit)
    finally:
        engine.dispose()
    if args.job and not found:
        print(f"no job {args.job}", file=sys.stderr)
        return 2
    if args.json:
        failures = (
            [{"error_code": code, "n": n} for code, n in found[0]["failures"].items()]
            if args.job
            else []
        )
        print(json.dumps({"jobs": found, "failures": failures}, default=str, indent=2))
        return 0
    print(status.bars(found[0]) if args.job else status.table(found))
    return 0


def cmd_cancel(args: argparse.Namespace) -> int:
    from storage.models import JobKind
    from workers.stages import jobs

    with stage_context(Settings()) as ctx:
        cancelled = jobs.cancel(ctx, job_id=args.job)
        found = jobs.describe(ctx, job_id=args.job)
    if cancelled is None:
        status = "unknown" if found is None else str(found[1])
        print(f"job {args.job} had already ended ({status}): nothing cancelled", file=sys.stderr)
        return 1
    if found is not None and found[0] is JobKind.TRAIN:
        print(f"training job {args.job}: cancelled; it stops at its next heartbeat (every ", end="")
        print("--log-every steps), keeping its checkpoints; no adapter is written")
        return 0
    print(f"job {args.job}: cancelled; {cancelled} items cancelled now", end="")
    print("; items being generated stop after their batch")
    return 0


def cmd_retry(args: argparse.Namespace) -> int:
    """Failed items again (a training job: resumed from its last checkpoint): in one-machine
    mode (no IPBATCH_DATABASE_URL) here and now; otherwise queued for the workers."""
    from storage.models import JobKind

    settings = settings_from(args)
    if settings.database_url is None:
        from workers.runner import job_kind_local, retry_local, retry_training_local

        if job_kind_local(settings, job_id=args.job) is JobKind.TRAIN:
            trained = retry_training_local(settings, job_id=args.job)
            print(f"training job {args.job}: {trained.status} at step {trained.step}")
            return 0 if trained.status == "succeeded" else 1
        return print_summary(retry_local(settings, job_id=args.job, progress=not args.quiet))
    from workers.stages import jobs, train
    from workers.tasks import context, send, send_train

    found = jobs.describe(context(), job_id=args.job)
    if found is not None and found[0] is JobKind.TRAIN:
        train.requeue(context(), job_id=args.job, send_train=send_train)
        print(f"training job {args.job}: queued again; it resumes from its last checkpoint")
        return 0
    retried, waiting = jobs.retry(context(), job_id=args.job, send=send)
    print(f"job {args.job}: {retried} failed items queued again", end="")
    print(f"; {waiting} items left waiting queued again too" if waiting else "")
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    """Every recorded output of a job is checked against its object; with --repair, the
    items of the broken ones are made again (here in one-machine mode, by the workers
    otherwise)."""
    settings = settings_from(args)
    threads = max(1, min(args.threads, 64))  # the S3 client keeps 64 connections
    if settings.database_url is None:
        from workers.runner import verify_local

        found, summary, after = verify_local(
            settings,
            job_id=args.job,
            deep=args.deep,
            repair=args.repair,
            threads=threads,
            progress=False,
        )
    else:
        from workers.stages import verify
        from workers.tasks import context, send_urgent

        found = verify.verify(context(), job_id=args.job, deep=args.deep, threads=threads)
        if args.repair:
            verify.repair(context(), verified=found, send=send_urgent)
        summary = after = None
    if args.json:
        print(json.dumps(_verified_json(found, after), indent=2))
        return 1 if (after or found).problems else 0
    code = print_verified(found)
    if args.repair and found.problems and summary is None:
        print(f"repair: {len(found.repaired)} items queued for the generate workers; ", end="")
        print(f"`ipbatch status {args.job}`, then `ipbatch verify {args.job}` again")
    if summary is not None and after is not None:
        print(f"repair: {len(found.repaired)} items made again")
        print_summary(summary)
        return print_verified(after)
    return code


def _verified_json(found: Any, after: Any) -> dict[str, Any]:
    def one(v: Any) -> dict[str, Any]:
        return {
            "job_id": v.job_id,
            "checked": v.checked,
            "deep": v.deep,
            "problems": [dataclasses.asdict(p) for p in v.problems],
        }

    out = one(found)
    out["repaired_items"] = found.repaired
    if after is not None:
        out["after_repair"] = one(after)
    return out


def cmd_report(args: argparse.Namespace) -> int:
    """Write the job's HTML report (self-contained: thumbnails embedded)."""
    try:
        print(write_report(Settings(), args.job, Path(args.output), limit=args.limit))
    except LookupError as exc:
        print(str(exc), file=sys.stderr)
        return 2
    return 0


def _max_failures(text: str) -> float:
    """`10` (rows), `0.05` or `5%` (a share of the manifest's rows)."""
    try:
        value = float(text[:-1]) / 100 if text.endswith("%") else float(text)
    except ValueError:
        value = -1.0
    if not (0 < value < 1 or (value >= 1 and value == int(value))):
        raise argparse.ArgumentTypeError(
            f"{text!r}: a number of rows (1, 2, ...) or a share below 1 (0.05, or 5%)"
        )
    return value


def _job_options(p: argparse.ArgumentParser) -> None:
    """The options `run` and `submit` share (what `JobOptions` records)."""
    p.add_argument(
        "--webhook",
        help="when the job ends, POST its summary (JSON) to this http(s) URL (default "
        "IPBATCH_WEBHOOK_URL)",
    )
    p.add_argument(
        "--max-failures",
        type=_max_failures,
        help="stop the job early once more rows than this have failed (a count, or a share "
        "of the rows: 0.05 or 5%%); the rest are cancelled, the job fails",
    )
    p.add_argument(
        "--no-reuse",
        action="store_true",
        help="generate every image, even those made before with the same weights, inputs "
        "and settings (by default those are copied)",
    )


def _options(
    args: argparse.Namespace, *, webhook_url: str | None, priority: str = "normal"
) -> JobOptions:
    return JobOptions(
        max_failures=args.max_failures,
        webhook_url=webhook_url,
        priority=PRIORITIES[priority],
        reuse=not args.no_reuse,
    )


def add_parsers(sub: Subparsers) -> None:
    p = sub.add_parser("run", help="run a whole job on this machine (SQLite + local folder)")
    p.add_argument("manifest", help="manifest path or s3:// URI (.jsonl or .csv)")
    p.add_argument("--output", help="output folder or s3:// URI (default $IPBATCH_HOME/outputs)")
    p.add_argument("--models", help="models folder, or `hub` (default $IPBATCH_MODELS)")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    p.add_argument(
        "--no-score", action="store_true", help="skip CLIP-I / CLIP-T scores (IPBATCH_SCORE)"
    )
    p.add_argument(
        "--verify", action="store_true", help="read every output back at the end (verify --deep)"
    )
    _job_options(p)
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("submit", help="register a job and queue it for the Celery workers")
    p.add_argument("manifest", help="s3://bucket/key of the manifest (or a shared path)")
    p.add_argument("--output", required=True, help="s3://bucket/prefix for the images")
    p.add_argument("--name", help="job name (default: the manifest's file name)")
    p.add_argument(
        "--rerun",
        action="store_true",
        help="if this manifest and output already ran (ended), run them again as a new job",
    )
    p.add_argument(
        "--priority",
        choices=list(PRIORITIES),
        default="normal",
        help="its messages go before those of lower-priority jobs (default normal)",
    )
    p.add_argument(
        "--dry-run",
        action="store_true",
        help="check the manifest, its pictures and the output as a job would; submit nothing",
    )
    _job_options(p)
    p.set_defaults(func=cmd_submit)

    p = sub.add_parser("rerun", help="run an ended job again: a new job, its own outputs")
    p.add_argument("job")
    p.add_argument("--name", help="the new job's name (default: the job's)")
    p.add_argument("--models", help="models folder (one-machine mode)")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_rerun)

    p = sub.add_parser("status", help="progress, rate, ETA and failures of jobs")
    p.add_argument("job", nargs="?", help="one job (default: the most recent ones)")
    p.add_argument("--json", action="store_true", help="for scripts")
    p.add_argument("--watch", action="store_true", help="live bars per stage until the job ends")
    p.add_argument("--interval", type=float, default=2.0, help="seconds between --watch redraws")
    p.add_argument("--limit", type=int, default=20, help="jobs listed without a job id")
    p.add_argument(
        "--by",
        metavar="HH:MM",
        help="how many images the fleet makes by then at the running jobs' current rate, and "
        "whether they all finish",
    )
    p.set_defaults(func=cmd_status)

    p = sub.add_parser(
        "cancel", help="cancel a job: queued items now, running ones after their batch"
    )
    p.add_argument("job")
    p.set_defaults(func=cmd_cancel)

    p = sub.add_parser("retry", help="run a job's failed items again (not invalid rows)")
    p.add_argument("job")
    p.add_argument("--models", help="models folder (one-machine mode)")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_retry)

    p = sub.add_parser("verify", help="check that every recorded output is a complete image")
    p.add_argument("job")
    p.add_argument("--deep", action="store_true", help="also read each object: sha256, decoding")
    p.add_argument("--repair", action="store_true", help="make the broken outputs' items again")
    p.add_argument(
        "--threads", type=int, default=32, help="requests in flight (default 32, at most 64)"
    )
    p.add_argument("--json", action="store_true", help="the findings as JSON (for scripts)")
    p.add_argument("--models", help="models folder (one-machine mode, --repair)")
    p.set_defaults(func=cmd_verify)

    p = sub.add_parser("report", help="a self-contained HTML page of a job's results")
    p.add_argument("job", nargs="?", help="job id (default: the most recently started job)")
    p.add_argument("-o", "--output", default="report.html", help="the HTML file to write")
    p.add_argument("--limit", type=int, default=500, help="rows shown, in manifest order")
    p.set_defaults(func=cmd_report)
