"""Generate: the images of every claimed item, in batched diffusers calls, stored and recorded.

Rows that can share a call (same pipeline and `batch_key`) are batched, up to
`batch_images` images a call; each keeps its own references, prompt and seed. Uploading and
recording one batch (on a second thread) overlaps generating the next. Before anything is
uploaded for an item, the stage checks it still holds the item's claim (fencing): a worker
whose lease lapsed and was taken over uploads nothing, whatever the object store does with
conditional writes. A key that already holds something is kept only if it holds exactly the
bytes made here; a broken object is replaced, another picture fails the item as
`output_conflict` (`storage.publish`). The `outputs` row records the sha256 and size of the
bytes made here, never of what was read back.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

from core.errors import Action, ErrorCode, ObjectNotFound, classify
from pipeline.images import encode_output
from pipeline.manifest import Row, validate_row
from pipeline.requests import build_request, image_metadata
from storage.ledger import embeddings, items, jobs
from storage.ledger import outputs as output_ledger
from storage.lifecycle import EMBED, GENERATE, JOB_ACTIVE
from storage.publish import Outcome
from workers import metrics
from workers.claims import ClaimedWork, claimed
from workers.context import StageContext
from workers.stages import reuse, scoring
from workers.stages.common import finalize_jobs
from workers.stages.embed import NEGATIVE
from workers.stages.reuse import output_uri_for, publish_output

if TYPE_CHECKING:
    import torch

    from pipeline.call_inputs import GenerationResult
    from pipeline.generator import Generator
    from pipeline.requests import GenerationRequest

log = logging.getLogger(__name__)


@dataclass
class GenerateSummary:
    succeeded: int = 0
    images: int = 0
    held: list[int] = field(default_factory=list)  # another worker holds them (live lease)
    retry_in: float = 0.0
    embed_again: list[int] = field(default_factory=list)  # their cached embeddings were gone
    reused: int = 0  # of those succeeded: items whose images were made before, copied here
    deferred: list[int] = field(default_factory=list)  # another job's turn: to send again


@dataclass(frozen=True)
class Prepared:
    """A claimed item with its embeddings loaded: ready for a diffusers call."""

    item_id: int
    job_id: str
    row: Row
    output_uri: str
    references: list[tuple[str, str]]  # (content sha256, uri) of each distinct reference
    request: GenerationRequest
    fingerprints: tuple[str, ...]  # of each image (`pipeline.fingerprint`)

    @property
    def adapters(self) -> tuple[str, ...]:
        """Which warm pipeline it needs."""
        return tuple(a.adapter for a in self.request.adapters)


@dataclass(frozen=True)
class _Entry:
    item_id: int
    job_id: str
    row: Row
    output_uri: str
    embeddings: list[list[str]]  # cache URIs, [adapter][reference]
    negatives: list[str | None]  # cache URIs of each adapter's negative reference
    references: list[tuple[str, str]]
    inputs: dict[tuple[str, int, int], str]  # cache URIs of the prepared structure inputs
    reuse: bool  # its job copies images made before (not --no-reuse)
    fingerprints: tuple[str, ...]  # of each image (`pipeline.fingerprint`)


@dataclass(frozen=True)
class _Made:
    """An item's images, scored: what the finisher uploads and records."""

    item: Prepared
    result: GenerationResult
    scored: scoring.Scored | None
    gpu_seconds: float  # per image: its call's seconds shared by the call's images, + retries


def run(ctx: StageContext, *, item_ids: list[int]) -> GenerateSummary:
    """Generate, upload and record the images of every claimed item."""
    summary = GenerateSummary()
    with claimed(ctx, GENERATE, item_ids) as work:
        summary.held, summary.retry_in, summary.deferred = work.held, work.retry_in, work.deferred
        # 1. each item's row and its cached embeddings (fetched in parallel); an item whose
        #    cached embedding is gone goes back to the embed stage, which writes it again
        entries = _load(ctx, work.ids)
        job_ids = {entry.job_id for entry in entries}
        #    and a row whose every image was made before is copied (`reuse`), not generated
        reused = reuse.copy_made_before(ctx, work, [e for e in entries if e.reuse])
        copied_ids = set(reused.copied)
        copied = [e for e in entries if e.item_id in copied_ids]
        summary.reused += len(copied)
        summary.succeeded += len(copied)
        summary.images += sum(e.row.num_images for e in copied)
        entries = [e for e in entries if e.item_id not in reused.handled]
        prepared = _prepare(ctx, work, entries, summary)
        # 2. batches of rows that can share one diffusers call
        batches = plan_batches(prepared, max_images=ctx.batch_images)
        # 3. each batch generated and scored here, stored and recorded on the finisher thread
        with _finisher(ctx, work, summary) as finish:
            for batch in batches:
                batch = _drop_cancelled(ctx, work, batch)
                if batch:
                    finish(_score(ctx, work, _generate(ctx, work, batch)))
    finalize_jobs(ctx, job_ids)
    return summary


def _load(ctx: StageContext, claimed_ids: list[int]) -> list[_Entry]:
    with ctx.sessions.begin() as session:
        entries = []
        loaded = items.load_items(session, item_ids=claimed_ids)
        linked = embeddings.of_items(session, item_ids=claimed_ids)
        prepared_inputs = embeddings.inputs_of_items(session, item_ids=claimed_ids)
        for item in loaded:
            job = jobs.get(session, job_id=item.job_id)  # (the session's identity map: once)
            assert job is not None and item.params is not None
            row = validate_row(item.params, ctx.adapters)
            links = linked[item.id]
            uris: list[list[str]] = [[] for _ in row.adapter_specs()]
            negatives: list[str | None] = [None for _ in row.adapter_specs()]
            for link, embedding in links:
                if link.reference_index == NEGATIVE:
                    negatives[link.adapter_index] = embedding.uri
                else:
                    uris[link.adapter_index].append(embedding.uri)
            references = list(
                dict.fromkeys(
                    (emb.content_sha256, link.reference_uri)
                    for link, emb in links
                    if link.reference_index != NEGATIVE
                )
            )
            prepared = {
                (link.role, link.owner_index, link.position): embedding.uri
                for link, embedding in prepared_inputs[item.id]
            }
            entries.append(
                _Entry(
                    item.id,
                    job.id,
                    row,
                    job.output_uri,
                    uris,
                    negatives,
                    references,
                    prepared,
                    reuse=job.reuse,
                    fingerprints=(),
                )
            )
    # each image's fingerprint, out of the transaction (a worker's first one hashes weights;
    # the weights' digests are looked at once per message: `memo`)
    memo: dict[object, str] = {}
    return [
        replace(e, fingerprints=reuse.fingerprints(ctx, e.row, _keys(e), memo=memo))
        for e in entries
    ]


def _keys(entry: _Entry) -> list[str]:
    """The cache keys of an entry's embeddings and prepared inputs, in a fixed order."""
    embedded = [uri for refs in entry.embeddings for uri in refs]
    negatives = [uri for uri in entry.negatives if uri is not None]
    return embedded + negatives + [entry.inputs[slot] for slot in sorted(entry.inputs)]


def _prepare(
    ctx: StageContext, work: ClaimedWork, entries: list[_Entry], summary: GenerateSummary
) -> list[Prepared]:
    wanted = {uri for e in entries for refs in e.embeddings for uri in refs}
    wanted |= {uri for e in entries for uri in e.negatives if uri is not None}
    loaded = _prefetch(ctx, wanted | {uri for e in entries for uri in e.inputs.values()})

    def load(uri: str) -> dict[str, torch.Tensor]:
        return loaded[uri] if uri in loaded else ctx.cache.load(uri)

    prepared = []
    for entry in entries:
        with work.item(entry.item_id):
            try:
                tensors = [[load(uri) for uri in refs] for refs in entry.embeddings]
                negatives = [None if uri is None else load(uri) for uri in entry.negatives]
                pixels = {slot: load(uri) for slot, uri in entry.inputs.items()}
            except ObjectNotFound:
                summary.embed_again += work.send_back(
                    [entry.item_id], EMBED.waiting, "a cached embedding is gone: embed it again"
                )
                continue
            request = build_request(entry.row, tensors, pixels, negatives)
            prepared.append(
                Prepared(
                    entry.item_id,
                    entry.job_id,
                    entry.row,
                    entry.output_uri,
                    entry.references,
                    request,
                    entry.fingerprints,
                )
            )
    return prepared


def _prefetch(ctx: StageContext, uris: set[str]) -> dict[str, dict[str, torch.Tensor]]:
    """Load cached embeddings on a few threads, so that S3 round trips overlap. A fetch that
    fails is left out: `_prepare` fetches it again, where its error is handled."""

    def fetch(uri: str) -> tuple[str, dict[str, torch.Tensor] | None]:
        try:
            return uri, ctx.cache.load(uri)
        except Exception:
            return uri, None

    if len(uris) <= 1:
        return {}
    with ThreadPoolExecutor(max_workers=min(8, len(uris)), thread_name_prefix="fetch") as pool:
        return {uri: t for uri, t in pool.map(fetch, sorted(uris)) if t is not None}


def plan_batches(prepared: Sequence[Prepared], *, max_images: int) -> list[list[Prepared]]:
    """Group rows that can share a diffusers call (same pipeline and `batch_key`), in manifest
    order within a group, into batches of at most `max_images` images (a bigger row: alone)."""
    from pipeline.requests import batch_key

    groups: dict[tuple[object, ...], list[Prepared]] = {}
    for p in prepared:  # the key names the adapters: one warm pipeline per group
        groups.setdefault(batch_key(p.request), []).append(p)
    batches: list[list[Prepared]] = []
    for key in sorted(groups, key=lambda k: groups[k][0].adapters):
        batch: list[Prepared] = []
        for p in groups[key]:
            if batch and sum(b.row.num_images for b in batch) + p.row.num_images > max_images:
                batches.append(batch)
                batch = []
            batch.append(p)
        if batch:
            batches.append(batch)
    return batches


def _drop_cancelled(ctx: StageContext, work: ClaimedWork, batch: list[Prepared]) -> list[Prepared]:
    """At a batch boundary, items whose job was cancelled are cancelled instead of generated
    (`ipbatch cancel` stops running items here). Returns the rest of the batch."""
    with ctx.sessions.begin() as session:
        cancelled = set()
        for job_id in {p.job_id for p in batch}:
            job = jobs.get(session, job_id=job_id)
            if job is not None and job.status not in JOB_ACTIVE:  # cancelled, stopped early
                cancelled.add(job_id)
    if cancelled:
        work.cancel([p.item_id for p in batch if p.job_id in cancelled], "job cancelled")
    return [p for p in batch if p.job_id not in cancelled]


def _generate(
    ctx: StageContext, work: ClaimedWork, batch: list[Prepared]
) -> list[tuple[Prepared, GenerationResult, float]]:
    """One diffusers call for the batch; if it fails because of a row, each row alone, so a
    bad row fails by itself. A pipeline that does not load is this worker's configuration
    (ModelLoadError): it goes up to the claim scope, which gives every item back. With each
    row's result, the call's seconds per image (what each image cost the GPU)."""
    generator = ctx.generators.get(batch[0].adapters)
    try:
        started = time.perf_counter()
        with metrics.BATCH_SECONDS.time():
            results = generator.generate_batch([p.request for p in batch])
        per_image = (time.perf_counter() - started) / sum(p.row.num_images for p in batch)
        return [(p, result, per_image) for p, result in zip(batch, results, strict=True)]
    except Exception as exc:
        decision = classify(exc, unexpected=ErrorCode.MODEL_ERROR)
        if decision.action is not Action.FAIL:
            raise
        if len(batch) == 1:
            log.error("item %d failed to generate", batch[0].item_id, exc_info=exc)
            work.fail([batch[0].item_id], decision)
            return []
        log.warning("a batch of %d rows failed (%s); running them one by one", len(batch), exc)
    made = []
    for p in batch:
        with work.item(p.item_id, unexpected=ErrorCode.MODEL_ERROR):
            started = time.perf_counter()
            result = generator.generate(p.request)
            made.append((p, result, (time.perf_counter() - started) / p.row.num_images))
    return made


def _score(
    ctx: StageContext, work: ClaimedWork, made: list[tuple[Prepared, GenerationResult, float]]
) -> list[_Made]:
    """CLIP-I and CLIP-T of every image (none with scoring off); with a score threshold,
    images below it are made again with the next seed, unless the row says `regenerate:
    false` (an evaluation's rows). Runs here: regenerating needs the GPU."""
    scorer = ctx.scorer
    if scorer is None:
        return [_Made(p, result, None, seconds) for p, result, seconds in made]
    memo: dict[str, torch.Tensor] = {}
    scored = []
    for p, result, seconds in made:
        with work.item(p.item_id):
            again = _Timed(functools.partial(_again, ctx.generators.get(p.adapters), p.request))
            references = scoring.reference_embeds(
                ctx, scorer, p.references, cache_root=ctx.cache_root(p.output_uri), memo=memo
            )
            kept = scoring.keep_best(
                result.images,
                result.seeds,
                scoring.Judge(scorer, references, p.row.scored_text),
                threshold=ctx.settings.score_threshold if p.row.regenerate else None,
                tries=ctx.settings.score_tries,
                again=again,
            )
            result = replace(result, images=kept.images, seeds=kept.seeds)
            seconds += again.seconds / p.row.num_images  # images made again: the row's cost
            scored.append(_Made(p, result, kept, seconds))
    return scored


class _Timed:
    """A callable that adds up the seconds its calls take (the GPU's, for regenerations)."""

    def __init__(self, call: Callable[..., Any]) -> None:
        self.call = call
        self.seconds = 0.0

    def __call__(self, *args: Any) -> Any:
        started = time.perf_counter()
        try:
            return self.call(*args)
        finally:
            self.seconds += time.perf_counter() - started


def _again(generator: Generator, request: GenerationRequest, k: int, attempt: int) -> Any:
    """Image k of a row made again, with the next seed after the row's: seed + k + n * attempt."""
    seed = (request.seed + k + attempt * request.num_images) % 2**32
    again = generator.generate(replace(request, seed=seed, num_images=1))
    return again.images[0], seed


@contextmanager
def _finisher(ctx: StageContext, work: ClaimedWork, summary: GenerateSummary) -> Iterator[Any]:
    """A second thread that uploads and records each batch while the next one generates.
    Yields `finish(made)`; an error there (an outage) stops the generating loop at the next
    batch and goes up to the claim scope, which gives back what is left."""
    pending: list[Future[None]] = []

    def finish(made: list[_Made]) -> None:
        _raise_first(f for f in pending if f.done())
        pending.append(pool.submit(_store_and_record, ctx, work, made, summary))

    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="finish") as pool:
        yield finish
    _raise_first(pending)


def _raise_first(futures: Iterator[Future[None]] | list[Future[None]]) -> None:
    for future in futures:
        error = future.exception()
        if error is not None:
            raise error


def _store_and_record(
    ctx: StageContext, work: ClaimedWork, made: list[_Made], summary: GenerateSummary
) -> None:
    """For the batch: check the claims are still ours, upload each item's images (first
    writer wins), and record them with their scores in the one transaction that marks the
    items succeeded."""
    mine = set(work.still_held([m.item.item_id for m in made]))
    stored: dict[int, tuple[_Made, list[dict[str, Any]]]] = {}
    for m in made:
        if m.item.item_id not in mine:
            continue  # taken over: the other worker stores and records it
        with work.item(m.item.item_id, unexpected=ErrorCode.MODEL_ERROR):
            held = functools.partial(_held, work, m.item.item_id)
            outputs = _upload(ctx, m, still_ours=held)
            if outputs is not None:  # (None: taken over while uploading: the other records it)
                stored[m.item.item_id] = (m, outputs)
    record = functools.partial(
        reuse.record_made,
        made={
            item_id: output_ledger.ItemOutputs(
                outputs, m.result.warning, m.scored.attempts if m.scored is not None else []
            )
            for item_id, (m, outputs) in stored.items()
        },
        now=ctx.clock(),
    )
    for item_id in work.done(sorted(stored), record=record):
        m, outputs = stored[item_id]
        summary.succeeded += 1
        summary.images += len(outputs)
        metrics.ITEMS.labels(GENERATE.name, "done").inc()
        metrics.IMAGES.inc(len(outputs))
        log.info(
            "stored %d images of item %d",
            len(outputs),
            item_id,
            extra={"job_ids": [m.item.job_id], "item_ids": [item_id], "worker": ctx.worker},
        )


def _held(work: ClaimedWork, item_id: int) -> bool:
    return bool(work.still_held([item_id]))


def _upload(
    ctx: StageContext, m: _Made, *, still_ours: Callable[[], bool]
) -> list[dict[str, Any]] | None:
    """Encode and store every image of the item; the `outputs` rows to record (None if the
    claim lapsed before a broken object could be replaced). Each row records the sha256 and
    size of the bytes made here, which `publish` makes the object hold."""
    p, result = m.item, m.result
    stored = []
    for k, (image, seed) in enumerate(zip(result.images, result.seeds, strict=True)):
        metadata = {
            "job_id": p.job_id,
            "row_id": p.row.id,
            "image_index": k,
            "seed": seed,
            **image_metadata(p.row),  # the row's call inputs, as requests.py declares them
        }
        data = encode_output(image, p.row.output_format, metadata)
        uri = output_uri_for(p.output_uri, p.job_id, p.row.id, k, p.row.output_format)
        published = publish_output(ctx, uri, data, p.row.output_format, still_ours=still_ours)
        if published.outcome is Outcome.NOT_OURS:
            return None
        scores = m.scored.scores[k] if m.scored is not None else (None, None)
        stored.append(
            {
                "image_index": k,
                "uri": uri,
                "sha256": hashlib.sha256(data).hexdigest(),
                "size": len(data),
                "seed": seed,
                "width": result.width,
                "height": result.height,
                "clip_i": scores[0],
                "clip_t": scores[1],
                "fingerprint": p.fingerprints[k],
                "gpu_seconds": m.gpu_seconds,
            }
        )
    return stored
