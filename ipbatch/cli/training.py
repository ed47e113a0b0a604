"""Adapter commands: train (fine-tune an adapter) and eval (the paper's protocol)."""

from __future__ import annotations

import argparse
import json
import sys
import types
from pathlib import Path
from typing import Any, Literal, get_args, get_origin

from core.errors import ConfigError
from core.uris import absolute_uri
from ipbatch.cli.common import settings_from, stage_context, write_report
from pipeline.evaluation import EvalSettings
from pipeline.presets import SCHEDULERS
from pipeline.train_schema import TrainSettings

Subparsers = Any  # argparse's private _SubParsersAction


def cmd_train(args: argparse.Namespace) -> int:
    """Fine-tune an adapter: here and now (one machine), or queued for the `train` workers
    with --submit. Ctrl-C or a crash: the same command resumes from the last checkpoint."""
    # every TrainSettings field is an option of the same name; those not given keep its default
    given = {
        f: getattr(args, f) for f in TrainSettings.model_fields if getattr(args, f) is not None
    }
    train_settings = TrainSettings(**given)
    manifest = absolute_uri(args.manifest)
    if args.submit:
        from workers.stages import train as train_stage
        from workers.tasks import context, send_train

        job_id, _ = train_stage.register(
            context(), manifest_uri=manifest, name=args.name, settings=train_settings
        )
        send_train(job_id)
        print(job_id)
        return 0
    from workers.runner import train_local

    summary = train_local(
        settings_from(args), manifest=manifest, name=args.name, train_settings=train_settings
    )
    print(f"training job {summary.job_id}: {summary.status} at step {summary.step}", end="")
    resumed = summary.resumed_from
    print(f" (resumed from the checkpoint of step {resumed})" if resumed is not None else "")
    print(f"rows: {summary.examples} trained on, {len(summary.skipped)} skipped")
    if train_settings.mixed_precision == "fp16":
        print(f"fp16: {summary.skipped_steps} steps skipped (their scaled gradients overflowed)")
    for bad in summary.skipped[:20]:
        print(f"  skipped line {bad['line']} ({bad['id'] or 'no id'}): {bad['error']}")
    if summary.adapter_uri:
        print(f"adapter: {summary.adapter_uri}")
        print(f'use it:  {{"adapter": "custom:{args.name}", ...}} in a manifest')
    return 0 if summary.status == "succeeded" else 1


def cmd_eval(args: argparse.Namespace) -> int:
    """The paper's CLIP-I / CLIP-T protocol for one or more adapters, side by side: the table
    of a job (--job), a job queued for the workers (--submit), or run here."""
    if args.job:
        return _eval_table(args)
    if not args.manifest or not args.adapter:
        raise ConfigError("give a MANIFEST and at least one --adapter (or --job JOB)")
    protocol = EvalSettings(
        samples=args.samples,
        steps=args.steps,
        guidance_scale=args.guidance,
        scheduler=args.scheduler,
        scale=args.scale,
        size=args.size,
    )
    try:
        protocol.check()
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    if args.submit:
        return _eval_submit(args, protocol)
    return _eval_here(args, protocol)


def _eval_table(args: argparse.Namespace) -> int:
    """The table of an evaluation that ran (or runs) on the workers."""
    from pipeline.evaluation import table
    from workers import evaluation

    with stage_context(settings_from(args)) as ctx:
        scores, protocol = evaluation.scores(ctx, job_id=args.job, adapters=args.adapter or [])
    if args.json:
        print(json.dumps([vars(x) for x in scores]))
    else:
        print(table(scores, protocol))
    return 0


def _eval_submit(args: argparse.Namespace, protocol: EvalSettings) -> int:
    """The evaluation's generation manifest written, its job queued for the workers."""
    from workers import evaluation
    from workers.stages import jobs
    from workers.tasks import context, send_ingest

    ctx = context()
    manifest = absolute_uri(args.manifest)
    output = args.output or evaluation.default_output(ctx, manifest, args.adapter, protocol)
    prepared = evaluation.prepare(
        ctx, manifest_uri=manifest, adapters=args.adapter, settings=protocol, output_uri=output
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


def _eval_here(args: argparse.Namespace, protocol: EvalSettings) -> int:
    """The evaluation run on this machine, its table printed."""
    from pipeline.evaluation import table
    from workers.runner import eval_local

    summary, scores, prepared = eval_local(
        settings_from(args),
        manifest=absolute_uri(args.manifest),
        adapters=args.adapter,
        eval_settings=protocol,
        output=args.output,
        progress=not args.quiet,
    )
    info = sys.stderr if args.json else sys.stdout  # stdout: the JSON alone
    print(
        f"evaluation job {summary.job_id}: {summary.status}, {prepared.pairs} pairs x "
        f"{len(args.adapter)} adapters x {protocol.samples} samples",
        file=info,
    )
    for bad in prepared.skipped[:20]:
        print(f"  skipped line {bad['line']} ({bad['id'] or 'no id'}): {bad['error']}", file=info)
    for row_id, code, message in summary.failures:
        print(f"  failed {row_id or '(no id)'}: {code}: {message}", file=info)
    if args.json:
        described = {"job_id": summary.job_id, "settings": vars(protocol)}
        print(json.dumps(described | {"scores": [vars(x) for x in scores]}))
    else:
        print(table(scores, protocol))
    if args.report:
        page = write_report(settings_from(args), summary.job_id, Path(args.report), limit=500)
        print(page, file=info)
    return 0 if summary.status == "succeeded" else 1


def _settings_options(p: argparse.ArgumentParser) -> None:
    """One option per TrainSettings field, named after it, with its description and default
    (the schema is the one place they are declared); an option not given keeps the default."""
    for name, f in TrainSettings.model_fields.items():
        flags = ["--" + name.replace("_", "-")] + (["--lr"] if name == "learning_rate" else [])
        default = "" if f.default is None else f" (default {f.default})"
        text = f"{f.description}{default}"
        annotation: Any = f.annotation
        if annotation is bool:
            p.add_argument(*flags, action="store_true", default=None, help=text)
        elif get_origin(annotation) is Literal:
            p.add_argument(*flags, choices=get_args(annotation), help=text)
        else:
            if isinstance(annotation, types.UnionType):  # `int | None`: the int
                [annotation] = [a for a in get_args(annotation) if a is not type(None)]
            p.add_argument(*flags, type=annotation, help=text)


def add_parsers(sub: Subparsers) -> None:
    p = sub.add_parser(
        "train", help="fine-tune an adapter on a manifest of (image, prompt) rows: custom:NAME"
    )
    p.add_argument("manifest", help="JSON Lines or CSV: id, image, prompt, optional reference")
    p.add_argument("--name", required=True, help="the adapter's name: custom:NAME")
    _settings_options(p)
    p.add_argument("--models", help="models folder (one-machine mode)")
    p.add_argument("--no-score", action="store_true", help="no validation scores")
    p.add_argument("--submit", action="store_true", help="queue it for `train` workers")
    p.set_defaults(func=cmd_train)

    defaults = EvalSettings()
    p = sub.add_parser(
        "eval", help="the paper's CLIP-I / CLIP-T protocol for adapters, side by side"
    )
    p.add_argument("manifest", nargs="?", help="(image, caption) rows: id, image, prompt")
    p.add_argument(
        "--adapter", action="append", help="a preset or custom:NAME; give it again to compare"
    )
    p.add_argument(
        "--samples", type=int, default=defaults.samples, help="images per pair (the paper: 4)"
    )
    p.add_argument(
        "--steps", type=int, default=defaults.steps, help="denoising steps (the paper: 50)"
    )
    p.add_argument(
        "--scheduler",
        choices=list(SCHEDULERS),
        default=defaults.scheduler,
        help="the sampler (the paper: ddim; default: the model folder's own)",
    )
    p.add_argument(
        "--guidance",
        type=float,
        default=defaults.guidance_scale,
        help="classifier-free guidance scale (the paper: 7.5)",
    )
    p.add_argument(
        "--scale", type=float, default=defaults.scale, help="adapter scale (image prompt only)"
    )
    p.add_argument("--size", type=int, help="width = height (default: native)")
    p.add_argument("--output", help="where the samples go (default $IPBATCH_HOME/evals/...)")
    p.add_argument("--report", help="also write the samples' HTML report here")
    p.add_argument("--submit", action="store_true", help="queue it for the workers")
    p.add_argument("--job", help="print the table of an evaluation job")
    p.add_argument("--json", action="store_true", help="the scores as JSON (for scripts)")
    p.add_argument("--models", help="models folder (one-machine mode)")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_eval)
