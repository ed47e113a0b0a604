"""Maintenance commands: db (upgrade, recount), models (tiny), manifest (schema)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from core.config import Settings, redact_url
from ipbatch.cli.common import stage_context

Subparsers = Any  # argparse's private _SubParsersAction


def cmd_db_upgrade(args: argparse.Namespace) -> int:
    from storage.migrate import upgrade

    url = Settings().ledger_url()
    upgrade(url)
    print(f"ledger at {redact_url(url)} is up to date")
    return 0


def cmd_db_recount(args: argparse.Namespace) -> int:
    """Rebuild the status counters behind job_progress from the items (after hand edits)."""
    from workers.stages import jobs

    with stage_context(Settings()) as ctx:
        recounted = jobs.recount(ctx, job_id=args.job)
    for job_id, counts in recounted.items():
        summary = ", ".join(f"{k.value} {v}" for k, v in sorted(counts.items()))
        print(f"{job_id}: {summary or 'no items'}")
    return 0


def cmd_models_tiny(args: argparse.Namespace) -> int:
    from pipeline.tiny import write_tiny_models
    from workers.context import quiet_model_libraries

    quiet_model_libraries()
    from pipeline.faces import INSIGHTFACE_LICENCE

    root = write_tiny_models(Path(args.dir))
    print(f"tiny random-weight models written to {root}")
    # the tiny face pack is a toy of ipbatch's; the real ones users put there are insightface's
    print(f"note: the face pack here is a toy; real ones are insightface's. {INSIGHTFACE_LICENCE}.")
    return 0


def cmd_manifest_schema(args: argparse.Namespace) -> int:
    if args.training:  # the rows `ipbatch train` and `ipbatch eval` read
        from pipeline.train_schema import training_json_schema

        print(json.dumps(training_json_schema(), indent=2))
        return 0
    from pipeline.manifest import manifest_json_schema

    print(json.dumps(manifest_json_schema(), indent=2))
    return 0


def cmd_manifest_check(args: argparse.Namespace) -> int:
    """A manifest checked as a job would find it, nothing registered: exit 0 if all is well,
    1 if some rows or pictures are not (listed), 2 if it is not a manifest at all."""
    return check_manifest(args.manifest, args.output)


def check_manifest(manifest: str, output: str | None) -> int:
    from core.uris import absolute_uri
    from ipbatch.cli.common import settings_from, stage_context
    from workers.stages.check import check

    with stage_context(settings_from(argparse.Namespace())) as ctx:
        checked = check(
            ctx,
            manifest_uri=absolute_uri(manifest),
            output_uri=None if output is None else absolute_uri(output),
        )
    print(f"{checked.rows} rows: {checked.valid} valid, {len(checked.invalid)} invalid")
    for line, why in checked.invalid[:20]:
        print(f"  {why}" if why.startswith("line ") else f"  line {line}: {why}")
    print(f"{checked.sources} distinct pictures: {len(checked.unusable)} unusable")
    for uri, why in checked.unusable[:20]:
        print(f"  {uri}: {why}")
    if output is not None:
        print(f"output {output}: {checked.output or 'writable'}")
    print("ok: a job of this manifest would start clean" if checked.ok else "not ok")
    return 0 if checked.ok else 1


def add_parsers(sub: Subparsers) -> None:
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
    p = manifest.add_parser(
        "check", help="validate a manifest, its pictures and the output; register nothing"
    )
    p.add_argument("manifest")
    p.add_argument("--output", help="also check that this output can be written")
    p.set_defaults(func=cmd_manifest_check)
