"""`ipbatch eval`: the paper's protocol (pipeline.evaluation) as an ordinary generation job.

The (image, caption) manifest is read like a training manifest (bad rows skipped and listed),
turned into generation rows (one per pair and adapter, the same seeds for every adapter) and
written next to the outputs as the job's manifest; the job then runs like any other (on one
machine in-process, or submitted to the workers), and its table comes from the scores the
generate stage records for every output.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from core.errors import ConfigError
from core.uris import join_uri
from pipeline.evaluation import AdapterScores, EvalSettings, generation_rows, summarize
from pipeline.manifest_reader import NotAManifest, detect_format, read_rows
from pipeline.sources import resolve_reference
from storage.ledger import queries
from workers.context import StageContext


@dataclass
class Prepared:
    manifest_uri: str  # the generation manifest written for the job
    output_uri: str
    pairs: int
    skipped: list[dict[str, Any]] = field(default_factory=list)


def default_output(
    ctx: StageContext, manifest_uri: str, adapters: Sequence[str], settings: EvalSettings
) -> str:
    """$IPBATCH_HOME/evals/<digest of the manifest, the adapters and the settings>: the same
    evaluation again is the same job (it resumes, or shows its finished table); other
    settings are another evaluation, in a folder of its own."""
    key = [manifest_uri, list(adapters), vars(settings)]
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()
    return join_uri(str(ctx.settings.resolved_home()), "evals", digest[:16])


def prepare(
    ctx: StageContext,
    *,
    manifest_uri: str,
    adapters: Sequence[str],
    settings: EvalSettings,
    output_uri: str,
) -> Prepared:
    from pipeline.train_schema import TrainRow

    pairs: list[TrainRow] = []
    skipped: list[dict[str, Any]] = []
    with ctx.stores.for_uri(manifest_uri).open(manifest_uri) as stream:
        try:
            parsed_rows = list(
                read_rows(stream, detect_format(manifest_uri), TrainRow.model_validate)
            )
        except NotAManifest as exc:
            raise ConfigError(f"{manifest_uri}: {exc}") from exc
        for parsed in parsed_rows:
            if parsed.row is None:
                skipped.append(
                    {"line": parsed.line_number, "id": parsed.row_id, "error": parsed.error}
                )
            else:
                pairs.append(parsed.row)
    rows = generation_rows(
        pairs,
        adapters,
        settings,
        resolve=lambda uri: resolve_reference(uri, manifest_uri=manifest_uri),
    )
    generated = join_uri(output_uri, "manifest.jsonl")
    data = "".join(json.dumps(row, sort_keys=True) + "\n" for row in rows).encode()
    ctx.stores.for_uri(generated).put(generated, data, content_type="application/x-ndjson")
    return Prepared(generated, output_uri, len(pairs), skipped)


def scores(
    ctx: StageContext, *, job_id: str, adapters: Sequence[str] = ()
) -> tuple[list[AdapterScores], EvalSettings | None]:
    """Mean and spread of CLIP-I / CLIP-T per adapter over the job's outputs (every image
    it made: its rows never regenerate), and the settings its rows were made with."""
    with ctx.sessions.begin() as session:
        found = queries.output_scores(session, job_id=job_id)
    scored = [(str(params.get("adapter")), ci, ct) for params, ci, ct in found]
    order = list(adapters) or list(dict.fromkeys(adapter for adapter, _, _ in scored))
    settings = EvalSettings.of_row(found[0][0]) if found else None
    return summarize(scored, order), settings
