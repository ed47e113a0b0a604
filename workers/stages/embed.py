"""Embed: the reference embeddings every claimed item needs, found in the cache or computed;
and its structure inputs (control images, regions, init image, inpaint mask), prepared the
same way (`pipeline.inputs`).

Cache entries are content-addressed (sha256 of the image bytes + encoder fingerprint + kind):
a reference used by 1,000 rows, or by last night's job, is encoded once. A cached object that
has gone missing is computed and written again.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from pipeline import inputs, references
from pipeline.manifest import Row, validate_row
from storage.embcache import CacheKey
from storage.ledger import embeddings, items, jobs
from storage.lifecycle import EMBED, GENERATE
from workers import metrics
from workers.claims import claimed
from workers.context import StageContext
from workers.stages.common import cache_image, decode, finalize_jobs

if TYPE_CHECKING:
    import torch
    from sqlalchemy.orm import Session

    from pipeline.embedder import ReferenceEncoder
    from pipeline.references import Fit
    from storage.embcache import Cached

log = logging.getLogger(__name__)
NEGATIVE = -1  # the reference index of an adapter's negative reference in item_embeddings


@dataclass
class EmbedSummary:
    ready: list[int] = field(default_factory=list)  # to send to the generate stage
    held: list[int] = field(default_factory=list)  # another worker holds them (live lease)
    retry_in: float = 0.0  # seconds until the first of those leases runs out
    deferred: list[int] = field(default_factory=list)  # another job's turn: to send again
    computed: int = 0
    cached: int = 0
    images: int = 0  # (none: the runner adds up the stages' images)


@dataclass
class _Memo:
    """One message's memo: each picture's hash (read once) and each cache entry (looked up
    once), whichever of its rows names them."""

    hashes: dict[str, str] = field(default_factory=dict)
    entries: dict[CacheKey, Cached] = field(default_factory=dict)


@dataclass(frozen=True)
class _Entry:
    item_id: int
    job_id: str
    row: Row
    manifest_uri: str
    output_uri: str


def run(ctx: StageContext, *, item_ids: list[int]) -> EmbedSummary:
    """Compute (or find cached) the embeddings of every claimed item; mark them ready."""
    summary = EmbedSummary()
    with claimed(ctx, EMBED, item_ids) as work:
        # 1. what the claimed items need; items an earlier delivery embedded go on as they are
        summary.held, summary.retry_in, summary.deferred = work.held, work.retry_in, work.deferred
        entries, summary.ready = _load(ctx, work.ids, work.others)
        # 2. each item's references, embedded or found in the cache; a bad item fails alone
        memo = _Memo()  # a reference shared by the message's rows is read and looked up once
        links: dict[int, list[dict[str, Any]]] = {}
        input_links: dict[int, list[dict[str, Any]]] = {}
        for entry in entries:
            with work.item(entry.item_id):
                references = _embed_references(ctx, entry, memo, summary)
                # 3. its structure inputs (control images, regions, init image, mask), the same way
                prepared = _prepare_inputs(ctx, entry, memo, summary)
                links[entry.item_id], input_links[entry.item_id] = references, prepared
        # 4. every item embedded: ready for generation, with its links to the cache, in one
        #    transaction for the message (a statement per table, not per item)
        record = functools.partial(_link, links=links, input_links=input_links)
        ready = work.done(sorted(links), record=record)
        summary.ready += ready
        metrics.ITEMS.labels(EMBED.name, "done").inc(len(ready))
    finalize_jobs(ctx, {entry.job_id for entry in entries})
    return summary


def _load(
    ctx: StageContext, claimed_ids: list[int], others: list[int]
) -> tuple[list[_Entry], list[int]]:
    """The claimed items' rows and jobs; and of the others, those already embedded (by a
    delivery whose worker died before sending them on)."""
    with ctx.sessions.begin() as session:
        entries = []
        for item in items.load_items(session, item_ids=claimed_ids):
            job = jobs.get(session, job_id=item.job_id)
            assert job is not None and item.params is not None, "pending items carry their row"
            row = validate_row(item.params, ctx.adapters)
            entries.append(_Entry(item.id, job.id, row, job.manifest_uri, job.output_uri))
        ready = [
            i.id for i in items.load_items(session, item_ids=others) if i.status == GENERATE.waiting
        ]
    return entries, ready


def _embed_references(
    ctx: StageContext, entry: _Entry, memo: _Memo, summary: EmbedSummary
) -> list[dict[str, Any]]:
    """Every (adapter, reference) of the row, and each adapter's negative reference (at
    reference index -1): allowed? read, hashed, embedded (fitted as the adapter says) or
    cached. The built-in "noise" picture is made here, not read."""
    links: list[dict[str, Any]] = []
    for adapter_index, spec in enumerate(entry.row.adapter_specs()):
        encoder = ctx.encoder(spec.adapter)
        fit = spec.effective_fit
        pictures = list(enumerate(spec.references))
        if spec.negative_reference is not None:
            pictures.append((NEGATIVE, spec.negative_reference))
        for reference_index, reference in pictures:
            noise = reference == references.NOISE and reference_index == NEGATIVE
            embedding_id, uri = _ensure_cached(
                ctx,
                entry,
                reference,
                memo,
                summary,
                key_of=functools.partial(reference_key, encoder, fit=fit),
                make=functools.partial(embed_image, ctx, encoder, fit=fit),
                given=references.noise_picture() if noise else None,
            )
            links.append(
                {
                    "adapter_index": adapter_index,
                    "reference_index": reference_index,
                    "embedding_id": embedding_id,
                    "reference_uri": uri,
                }
            )
    return links


def _prepare_inputs(
    ctx: StageContext, entry: _Entry, memo: _Memo, summary: EmbedSummary
) -> list[dict[str, Any]]:
    """Every structure input of the row (control images, regions, init image, inpaint mask):
    allowed? read, hashed, prepared or found in the cache."""
    links: list[dict[str, Any]] = []
    for row_input in inputs.row_inputs(entry.row):
        embedding_id, uri = _ensure_cached(
            ctx,
            entry,
            row_input.uri,
            memo,
            summary,
            key_of=functools.partial(_input_key, row_input.kind),
            make=functools.partial(_prepare, ctx, row_input.kind),
        )
        links.append(
            {
                "role": row_input.role,
                "owner_index": row_input.owner,
                "position": row_input.position,
                "embedding_id": embedding_id,
                "source_uri": uri,
            }
        )
    return links


def _ensure_cached(
    ctx: StageContext,
    entry: _Entry,
    written: str,
    memo: _Memo,
    summary: EmbedSummary,
    *,
    key_of: Callable[[str], CacheKey],
    make: Callable[[bytes, str], dict[str, torch.Tensor]],
    given: bytes | None = None,
) -> tuple[int, str]:
    """The cache entry of one image the row names, as (embedding id, resolved URI)."""
    found = cache_image(
        ctx,
        written,
        manifest_uri=entry.manifest_uri,
        cache_root=ctx.cache_root(entry.output_uri),
        seen=memo.hashes,
        found=memo.entries,
        key_of=key_of,
        make=make,
        given=given,
    )
    if found.cached.hit:
        summary.cached += 1
    else:
        summary.computed += 1
    return found.cached.embedding_id, found.uri


def _input_key(kind: str, content_sha256: str) -> CacheKey:
    return CacheKey(content_sha256, inputs.ENCODER, kind)


def reference_key(encoder: ReferenceEncoder, content_sha256: str, fit: Fit = "crop") -> CacheKey:
    """Where a reference's embedding by `encoder` is cached, fitted as `fit` says (its kind
    carries a fit other than crop: `clip_image_embeds+pad`). Training reads the same (crop)
    entries, so an adapter is trained on exactly the tensors generation will feed it."""
    kind = encoder.kind.value if fit == "crop" else f"{encoder.kind.value}+{fit}"
    return CacheKey(content_sha256, encoder.fingerprint, kind)


def embed_image(
    ctx: StageContext, encoder: ReferenceEncoder, data: bytes, uri: str, fit: Fit = "crop"
) -> dict[str, torch.Tensor]:
    """The picture's embedding: each of its fitted pictures (one, or its tiles) encoded, their
    tensors one after another ([n, ...])."""
    import torch

    image = decode(ctx, data, name=uri)
    parts = [encoder.encode(p, name=uri) for p in references.fit_picture(image, fit)]
    return {name: torch.cat([p[name] for p in parts]) for name in parts[0]}


def _prepare(ctx: StageContext, kind: str, data: bytes, uri: str) -> dict[str, torch.Tensor]:
    return inputs.prepare(
        data,
        kind,
        name=uri,
        max_pixels=ctx.settings.max_image_pixels,
        max_bytes=ctx.settings.max_reference_bytes,
    )


def _link(
    session: Session,
    moved: list[int],
    *,
    links: dict[int, list[dict[str, Any]]],
    input_links: dict[int, list[dict[str, Any]]],
) -> None:
    embeddings.link(session, links={i: links[i] for i in moved})
    embeddings.link_inputs(session, links={i: input_links[i] for i in moved})
