"""The `ipbatch` command. Exit codes: 0 all good, 1 some items failed (or, for `verify`, some
outputs missing or broken), 2 usage/config error."""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pydantic import ValidationError
from pydantic_settings import SettingsError

from core.config import Settings, redact_url
from core.errors import Action, ConfigError, IpbatchError, classify, short
from core.uris import absolute_uri

log = logging.getLogger("ipbatch")


def _settings(args: argparse.Namespace) -> Settings:
    overrides: dict[str, Any] = {}
    if getattr(args, "models", None):
        overrides["models"] = args.models
    if getattr(args, "no_score", False):
        overrides["score"] = False
    return Settings(**overrides)


def cmd_run(args: argparse.Namespace) -> int:
    from workers.runner import run_local

    settings = _settings(args)
    summary = run_local(
        settings,
        manifest=args.manifest,
        output=args.output,
        progress=not args.quiet,
        check=args.verify,
    )
    code = _print_summary(summary)
    if summary.verified is not None:
        return max(code, _print_verified(summary.verified))
    return code


def _print_verified(verified: Any, *, limit: int = 20) -> int:
    """`verify`'s findings; 0 if every output is whole, 1 otherwise."""
    how = "size, sha256, decoding" if verified.deep else "exists, size"
    print(f"verify {verified.job_id}: {verified.checked} outputs checked ({how}): ", end="")
    print(f"{len(verified.problems)} problems" if verified.problems else "all whole")
    for p in verified.problems[:limit]:
        print(f"  {p.row_id}: {p.uri}: {p.what}")
    if len(verified.problems) > limit:
        print(f"  ... and {len(verified.problems) - limit} more (--json lists them all)")
    return 1 if verified.problems else 0


def cmd_verify(args: argparse.Namespace) -> int:
    """Every recorded output of a job is checked against its object; with --repair, the
    items of the broken ones are made again (here in one-machine mode, by the workers
    otherwise)."""
    settings = _settings(args)
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
    code = _print_verified(found)
    if args.repair and found.problems and summary is None:
        print(f"repair: {len(found.repaired)} items queued for the generate workers; ", end="")
        print(f"`ipbatch status {args.job}`, then `ipbatch verify {args.job}` again")
    if summary is not None and after is not None:
        print(f"repair: {len(found.repaired)} items made again")
        _print_summary(summary)
        return _print_verified(after)
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


def _print_summary(summary: Any) -> int:
    total = sum(summary.counts.values())
    print(f"job {summary.job_id}: {summary.status}")
    print(
        "items: "
        + ", ".join(f"{k} {v}" for k, v in sorted(summary.counts.items()))
        + f" (of {total})"
    )
    per_item = summary.seconds / total if total else 0.0
    print(
        f"images this run: {summary.images} in {summary.seconds:.1f} s ({per_item:.2f} s per item)"
    )
    for row_id, code, message in summary.failures:
        print(f"  failed {row_id or '(no id)'}: {code}: {message}")
    failed = summary.counts.get("failed", 0)
    if failed > len(summary.failures):
        print(f"  ... and {failed - len(summary.failures)} more: `ipbatch status {summary.job_id}`")
    print(f"images:   {summary.output_uri}")
    print(f"database: {redact_url(summary.database)}")
    return 0 if summary.status == "succeeded" else 1


def cmd_cancel(args: argparse.Namespace) -> int:
    from workers.context import StageContext
    from workers.stages import jobs

    settings = Settings()
    local = settings.database_url is None
    ctx = StageContext.create(settings, mode="local" if local else "distributed")
    try:
        cancelled = jobs.cancel(ctx, job_id=args.job)
        status = _job_status(ctx, args.job)
    finally:
        ctx.close()
    if cancelled is None:
        print(f"job {args.job} had already ended ({status}): nothing cancelled", file=sys.stderr)
        return 1
    if _is_training(settings, args.job):
        print(f"training job {args.job}: cancelled; it stops at its next heartbeat (every ", end="")
        print("--log-every steps), keeping its checkpoints; no adapter is written")
        return 0
    print(f"job {args.job}: cancelled; {cancelled} items cancelled now", end="")
    print("; items being generated stop after their batch")
    return 0


def _job_status(ctx: Any, job_id: str) -> str:
    from storage.ledger import jobs

    with ctx.sessions.begin() as session:
        job = jobs.get(session, job_id=job_id)
        return "unknown" if job is None else str(job.status)


def cmd_reaper(args: argparse.Namespace) -> int:
    """Every --every seconds (IPBATCH_REAPER_EVERY): send again the items and ingests of
    workers whose lease ran out, and the work whose message was lost (waiting, unmoved for
    IPBATCH_REQUEUE_AFTER seconds, with its queue empty), to the front of the queues. An
    outage of the database or the broker skips a pass."""
    import time

    from workers.celery_app import queue_depths
    from workers.stages import jobs
    from workers.tasks import context, send_ingest_urgent, send_train, send_urgent

    settings = context().settings
    every = args.every if args.every is not None else settings.reaper_every
    _configure_logging(settings.log_format)
    broker = settings.broker_url.get_secret_value()
    while True:
        try:
            reaped = jobs.reap(
                context(),
                send=send_urgent,
                send_ingest=send_ingest_urgent,
                queue_depth=lambda queue: queue_depths(broker, [queue])[queue],
                send_train=send_train,
            )
        except Exception as exc:
            if classify(exc).action is not Action.RETRY:
                raise
            if args.once:
                raise IpbatchError(f"reaper: database or broker unreachable: {short(exc)}") from exc
            log.warning("reaper: pass skipped (%s); next in %g s", short(exc), every)
            reaped = jobs.Reaped()
        if reaped.items or reaped.jobs:
            log.warning("reaper: %d items and %d ingests sent again", reaped.items, reaped.jobs)
        if args.once:
            print(f"{reaped.items} items and {reaped.jobs} ingests queued again")
            return 0
        time.sleep(every)


def cmd_retry(args: argparse.Namespace) -> int:
    """Failed items again: in one-machine mode (no IPBATCH_DATABASE_URL) run them here and
    now; otherwise queue them for the workers."""
    settings = _settings(args)
    if _is_training(settings, args.job):
        return _retry_training(settings, args.job)
    if settings.database_url is None:
        from workers.runner import retry_local

        return _print_summary(retry_local(settings, job_id=args.job, progress=not args.quiet))
    from workers.stages import jobs
    from workers.tasks import context, send

    retried, waiting = jobs.retry(context(), job_id=args.job, send=send)
    print(f"job {args.job}: {retried} failed items queued again", end="")
    print(f"; {waiting} items left waiting queued again too" if waiting else "")
    return 0


def _is_training(settings: Settings, job_id: str) -> bool:
    from storage.ledger import db, jobs
    from storage.models import JobKind

    engine = db.make_engine(settings.ledger_url())
    try:
        with db.make_sessions(engine).begin() as session:
            job = jobs.get(session, job_id=job_id)
            return job is not None and job.kind == JobKind.TRAIN
    except Exception as exc:  # no ledger yet (one-machine mode): not a training job
        if classify(exc).action is Action.RETRY and settings.database_url is not None:
            raise
        return False
    finally:
        engine.dispose()


def _retry_training(settings: Settings, job_id: str) -> int:
    """A failed (or stranded) training run, resumed from its last checkpoint: here in
    one-machine mode, by a `train` worker otherwise."""
    if settings.database_url is None:
        from workers.runner import retry_training_local

        summary = retry_training_local(settings, job_id=job_id)
        print(f"training job {job_id}: {summary.status} at step {summary.step}")
        return 0 if summary.status == "succeeded" else 1
    from storage.ledger import training
    from workers.tasks import context, send_train

    ctx = context()
    with ctx.sessions.begin() as session:
        training.retry(session, job_id=job_id, now=ctx.clock(), worker=ctx.worker)
    send_train(job_id)
    print(f"training job {job_id}: queued again; it resumes from its last checkpoint")
    return 0


def cmd_submit(args: argparse.Namespace) -> int:
    from workers.stages import jobs
    from workers.tasks import context, send_ingest

    manifest = absolute_uri(args.manifest)
    registered: list[str] = []

    def send(job_id: str) -> None:
        registered.append(job_id)
        send_ingest(job_id)

    try:
        job_id, _ = jobs.submit(
            context(),
            manifest_uri=manifest,
            output_uri=args.output,
            name=args.name,
            send_ingest=send,
        )
    except Exception as exc:
        if not registered or classify(exc).action is not Action.RETRY:
            raise
        print(
            f"ipbatch: error: job {registered[0]} is registered, but its ingest could not be "
            f"sent ({classify(exc).message}). Submit the same manifest again once the broker "
            "answers, or let `ipbatch reaper` send it (after IPBATCH_REQUEUE_AFTER).",
            file=sys.stderr,
        )
        return 2
    print(job_id)
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    """Fine-tune an adapter: here and now (one machine), or queued for the `train` workers
    with --submit. Ctrl-C or a crash: the same command resumes from the last checkpoint."""
    from pipeline.train_schema import TrainSettings

    # every TrainSettings field is an option of the same name; those not given keep its default
    fields = TrainSettings.model_fields
    given = {f: getattr(args, f) for f in fields if getattr(args, f, None) is not None}
    train_settings = TrainSettings(**given)
    manifest = absolute_uri(args.manifest)
    if args.submit:
        from workers.stages import train as train_stage
        from workers.tasks import context, send_train

        job_id, created = train_stage.register(
            context(), manifest_uri=manifest, name=args.name, settings=train_settings
        )
        send_train(job_id)
        print(job_id)
        return 0
    from workers.runner import train_local

    summary = train_local(
        _settings(args), manifest=manifest, name=args.name, train_settings=train_settings
    )
    print(f"training job {summary.job_id}: {summary.status} at step {summary.step}", end="")
    resumed = summary.resumed_from
    print(f" (resumed from the checkpoint of step {resumed})" if resumed is not None else "")
    print(f"rows: {summary.examples} trained on, {len(summary.skipped)} skipped")
    for bad in summary.skipped[:20]:
        print(f"  skipped line {bad['line']} ({bad['id'] or 'no id'}): {bad['error']}")
    if summary.adapter_uri:
        print(f"adapter: {summary.adapter_uri}")
        print(f'use it:  {{"adapter": "custom:{args.name}", ...}} in a manifest')
    return 0 if summary.status == "succeeded" else 1


def cmd_eval(args: argparse.Namespace) -> int:
    """The paper's CLIP-I / CLIP-T protocol for one or more adapters, side by side."""
    from pipeline.evaluation import EvalSettings, table

    if args.job:  # the table of an evaluation that ran (or runs) on the workers
        from workers import evaluation
        from workers.context import StageContext

        settings = _settings(args)
        local = settings.database_url is None
        ctx = StageContext.create(settings, mode="local" if local else "distributed")
        try:
            scores = evaluation.scores(ctx, job_id=args.job, adapters=args.adapter or [])
        finally:
            ctx.close()
        print(json.dumps([vars(x) for x in scores]) if args.json else table(scores))
        return 0
    if not args.manifest or not args.adapter:
        raise ConfigError("give a MANIFEST and at least one --adapter (or --job JOB)")
    eval_settings = EvalSettings(
        samples=args.samples, steps=args.steps, scale=args.scale, size=args.size
    )
    manifest = absolute_uri(args.manifest)
    if args.submit:
        from workers import evaluation
        from workers.stages import jobs
        from workers.tasks import context, send_ingest

        ctx = context()
        output = args.output or evaluation.default_output(ctx, manifest, args.adapter)
        prepared = evaluation.prepare(
            ctx,
            manifest_uri=manifest,
            adapters=args.adapter,
            settings=eval_settings,
            output_uri=output,
        )
        job_id, _ = jobs.submit(
            ctx,
            manifest_uri=prepared.manifest_uri,
            output_uri=output,
            name=f"eval {' vs '.join(args.adapter)}",
            send_ingest=send_ingest,
        )
        print(job_id)
        print(f"when it has finished: ipbatch eval --job {job_id}", file=sys.stderr)
        return 0
    from workers.runner import eval_local

    summary, scores, prepared = eval_local(
        _settings(args),
        manifest=manifest,
        adapters=args.adapter,
        eval_settings=eval_settings,
        output=args.output,
        progress=not args.quiet,
    )
    info = sys.stderr if args.json else sys.stdout  # stdout: the JSON alone
    print(
        f"evaluation job {summary.job_id}: {summary.status}, {prepared.pairs} pairs x "
        f"{len(args.adapter)} adapters x {eval_settings.samples} samples",
        file=info,
    )
    for bad in prepared.skipped[:20]:
        print(f"  skipped line {bad['line']} ({bad['id'] or 'no id'}): {bad['error']}", file=info)
    for row_id, code, message in summary.failures:
        print(f"  failed {row_id or '(no id)'}: {code}: {message}", file=info)
    if args.json:
        print(json.dumps({"job_id": summary.job_id, "scores": [vars(x) for x in scores]}))
    else:
        print(table(scores))
    if args.report:
        print(
            _write_report(_settings(args), summary.job_id, Path(args.report), limit=500), file=info
        )
    return 0 if summary.status == "succeeded" else 1


def cmd_producer(args: argparse.Namespace) -> int:
    from workers.producer import watch
    from workers.tasks import context, send_ingest

    _configure_logging(context().settings.log_format)
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


def cmd_worker(args: argparse.Namespace) -> int:
    import os
    import tempfile

    settings = Settings()
    port = args.metrics_port or settings.metrics_port
    if port:  # before anything imports prometheus_client: the pool children count into files
        os.environ.setdefault(
            "PROMETHEUS_MULTIPROC_DIR", tempfile.mkdtemp(prefix="ipbatch-metrics-")
        )
    _configure_logging(settings.log_format, args.loglevel)

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


def _configure_logging(fmt: str, level: str | None = None) -> None:
    """IPBATCH_LOG_FORMAT for the long-running commands (worker, producer, reaper)."""
    root = logging.getLogger()
    if level is not None:
        root.setLevel(level.upper())
    if fmt == "json":
        from workers.metrics import JsonFormatter

        for handler in root.handlers:
            handler.setFormatter(JsonFormatter())


def cmd_status(args: argparse.Namespace) -> int:
    from ipbatch import status
    from storage.ledger.db import make_engine

    engine = make_engine(Settings().ledger_url())
    try:
        if args.watch:
            if not args.job:
                raise ConfigError("--watch needs a job id")
            return status.watch(engine, job_id=args.job, interval=args.interval)
        jobs = status.collect(engine, job_id=args.job, limit=args.limit)
    finally:
        engine.dispose()
    if args.job and not jobs:
        print(f"no job {args.job}", file=sys.stderr)
        return 2
    if args.json:
        failures = (
            [{"error_code": code, "n": n} for code, n in jobs[0]["failures"].items()]
            if args.job
            else []
        )
        print(json.dumps({"jobs": jobs, "failures": failures}, default=str, indent=2))
        return 0
    print(status.bars(jobs[0]) if args.job else status.table(jobs))
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    """Write the job's HTML report (self-contained: thumbnails embedded)."""
    try:
        print(_write_report(Settings(), args.job, Path(args.output), limit=args.limit))
    except LookupError as exc:
        print(str(exc), file=sys.stderr)
        return 2
    return 0


def _write_report(settings: Settings, job_id: str | None, path: Path, *, limit: int) -> str:
    """The job's report page at `path` (job None: the most recently started job); returns
    what to say about it."""
    from ipbatch.report import Thumbnails, render
    from storage.ledger.db import make_engine
    from storage.objectstore import ObjectStores

    engine = make_engine(settings.ledger_url())
    stores = ObjectStores(s3_endpoint_url=settings.s3_endpoint_url, s3_region=settings.s3_region)
    try:
        if job_id is None:
            from ipbatch import status

            latest = status.collect(engine, limit=1)
            if not latest:
                raise LookupError("no jobs yet")
            job_id = latest[0]["job_id"]
        thumbnails = Thumbnails(stores, settings.max_image_pixels, settings.max_reference_bytes)
        page = render(engine, thumbnails, job_id=job_id, limit=limit)
    finally:
        engine.dispose()
    path.write_text(page, encoding="utf-8")
    return f"{path}: {len(page) / 1024:.0f} KiB"


def cmd_db_recount(args: argparse.Namespace) -> int:
    """Rebuild the status counters behind job_progress from the items (after hand edits)."""
    from storage.ledger import counters, db, jobs, queries

    engine = db.make_engine(Settings().ledger_url())
    try:
        with db.make_sessions(engine).begin() as session:
            job_ids = [args.job] if args.job else queries.job_ids(session)
            for job_id in job_ids:
                if jobs.get(session, job_id=job_id) is None:
                    print(f"no job {job_id}", file=sys.stderr)
                    return 2
                counts = counters.recount(session, job_id=job_id)
                summary = ", ".join(f"{k.value} {v}" for k, v in sorted(counts.items()))
                print(f"{job_id}: {summary or 'no items'}")
    finally:
        engine.dispose()
    return 0


def cmd_db_upgrade(args: argparse.Namespace) -> int:
    from storage.migrate import upgrade

    url = Settings().ledger_url()
    upgrade(url)
    print(f"ledger at {redact_url(url)} is up to date")
    return 0


def cmd_models_tiny(args: argparse.Namespace) -> int:
    from pipeline.tiny import write_tiny_models
    from workers.context import quiet_model_libraries

    quiet_model_libraries()
    root = write_tiny_models(Path(args.dir))
    print(f"tiny random-weight models written to {root}")
    return 0


def cmd_manifest_schema(args: argparse.Namespace) -> int:
    if args.training:  # the rows `ipbatch train` and `ipbatch eval` read
        from pipeline.train_schema import training_json_schema

        print(json.dumps(training_json_schema(), indent=2))
        return 0
    from pipeline.manifest import manifest_json_schema

    print(json.dumps(manifest_json_schema(), indent=2))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ipbatch", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)

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
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("submit", help="register a job and queue it for the Celery workers")
    p.add_argument("manifest", help="s3://bucket/key of the manifest (or a shared path)")
    p.add_argument("--output", required=True, help="s3://bucket/prefix for the images")
    p.add_argument("--name", help="job name (default: the manifest's file name)")
    p.set_defaults(func=cmd_submit)

    p = sub.add_parser(
        "train", help="fine-tune an adapter on a manifest of (image, prompt) rows: custom:NAME"
    )
    p.add_argument("manifest", help="JSON Lines or CSV: id, image, prompt, optional reference")
    p.add_argument("--name", required=True, help="the adapter's name: custom:NAME")
    p.add_argument("--kind", choices=["sd15", "sd15-plus"], help="architecture (default sd15)")
    p.add_argument(
        "--init", help="fresh (default: the paper's init), a preset, custom:NAME or a file"
    )
    p.add_argument("--steps", type=int, help="optimizer steps (default 1000)")
    p.add_argument("--batch-size", type=int, help="rows per step (default 8)")
    p.add_argument("--learning-rate", "--lr", type=float, help="AdamW (default 1e-4)")
    p.add_argument("--weight-decay", type=float, help="AdamW (default 0.01)")
    p.add_argument("--drop-image", type=float, help="image dropped alone (default 0.05)")
    p.add_argument("--drop-text", type=float, help="text dropped alone (default 0.05)")
    p.add_argument("--drop-both", type=float, help="both dropped (default 0.05)")
    p.add_argument("--mixed-precision", choices=["no", "fp16", "bf16"])
    p.add_argument("--gradient-checkpointing", action="store_true", default=None)
    p.add_argument("--seed", type=int)
    p.add_argument("--resolution", type=int, help="square training size (default: native)")
    p.add_argument("--checkpoint-every", type=int, help="steps (default 500)")
    p.add_argument("--keep-checkpoints", type=int, help="newest kept (default 2)")
    p.add_argument("--validate-every", type=int, help="steps; 0 = at the end only (default)")
    p.add_argument("--validation-rows", type=int, help="first rows rendered (default 4)")
    p.add_argument("--validation-steps", type=int, help="denoising steps (default 30)")
    p.add_argument("--log-every", type=int, help="steps between loss records (default 10)")
    p.add_argument("--save-dtype", choices=["fp16", "fp32"], help="adapter file (default fp16)")
    p.add_argument("--models", help="models folder (one-machine mode)")
    p.add_argument("--no-score", action="store_true", help="no validation scores")
    p.add_argument("--submit", action="store_true", help="queue it for `train` workers")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser(
        "eval", help="the paper's CLIP-I / CLIP-T protocol for adapters, side by side"
    )
    p.add_argument("manifest", nargs="?", help="(image, caption) rows: id, image, prompt")
    p.add_argument(
        "--adapter", action="append", help="a preset or custom:NAME; give it again to compare"
    )
    p.add_argument("--samples", type=int, default=4, help="images per pair (the paper: 4)")
    p.add_argument("--steps", type=int, default=30, help="denoising steps")
    p.add_argument("--scale", type=float, default=1.0, help="adapter scale (image prompt only)")
    p.add_argument("--size", type=int, help="width = height (default: native)")
    p.add_argument("--output", help="where the samples go (default $IPBATCH_HOME/evals/...)")
    p.add_argument("--report", help="also write the samples' HTML report here")
    p.add_argument("--submit", action="store_true", help="queue it for the workers")
    p.add_argument("--job", help="print the table of an evaluation job")
    p.add_argument("--json", action="store_true", help="the scores as JSON (for scripts)")
    p.add_argument("--models", help="models folder (one-machine mode)")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_eval)

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

    p = sub.add_parser("status", help="progress, rate, ETA and failures of jobs")
    p.add_argument("job", nargs="?", help="one job (default: the most recent ones)")
    p.add_argument("--json", action="store_true", help="for scripts")
    p.add_argument("--watch", action="store_true", help="live bars per stage until the job ends")
    p.add_argument("--interval", type=float, default=2.0, help="seconds between --watch redraws")
    p.add_argument("--limit", type=int, default=20, help="jobs listed without a job id")
    p.set_defaults(func=cmd_status)

    p = sub.add_parser(
        "cancel", help="cancel a job: queued items now, running ones after their batch"
    )
    p.add_argument("job")
    p.set_defaults(func=cmd_cancel)

    p = sub.add_parser(
        "reaper", help="queue again the items of workers that died, and lost messages"
    )
    p.add_argument(
        "--every", type=float, help="seconds between passes (default IPBATCH_REAPER_EVERY, 60)"
    )
    p.add_argument("--once", action="store_true", help="one pass, then exit")
    p.set_defaults(func=cmd_reaper)

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

    db = sub.add_parser("db", help="ledger maintenance").add_subparsers(dest="db", required=True)
    db.add_parser("upgrade", help="run the Alembic migrations").set_defaults(func=cmd_db_upgrade)
    p = db.add_parser("recount", help="rebuild job_progress's counters from the items")
    p.add_argument("job", nargs="?", help="one job id (default: every job)")
    p.set_defaults(func=cmd_db_recount)

    models = sub.add_parser("models", help="model folders").add_subparsers(
        dest="models_cmd", required=True
    )
    p = models.add_parser("tiny", help="write tiny random-weight models for offline runs")
    p.add_argument("dir")
    p.set_defaults(func=cmd_models_tiny)

    manifest = sub.add_parser("manifest", help="manifest tools").add_subparsers(
        dest="manifest_cmd", required=True
    )
    p = manifest.add_parser("schema", help="print the manifest row JSON Schema")
    p.add_argument(
        "--training", action="store_true", help="the training (and eval) manifest's instead"
    )
    p.set_defaults(func=cmd_manifest_schema)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        return int(args.func(args))
    except (ConfigError, IpbatchError) as exc:
        print(f"ipbatch: error: {exc}", file=sys.stderr)
        return 2
    except (ValidationError, SettingsError) as exc:
        print(f"ipbatch: error: bad IPBATCH_* setting: {exc}", file=sys.stderr)
        return 2
    except SystemExit:
        raise
    except KeyboardInterrupt:
        return 130
    except Exception as exc:  # an outage (the database, the broker, S3): said, not a trace
        decision = classify(exc)
        if decision.action not in (Action.RETRY, Action.CONFIG):
            raise
        print(f"ipbatch: error: {decision.message}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
