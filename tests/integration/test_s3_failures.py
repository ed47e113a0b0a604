"""S3 failing in the ways real endpoints fail, through a proxy in front of moto's server:
reads cut off half way, an endpoint gone in the middle of a stage, a server that ignores
conditional writes, a bucket that does not exist. The stages run in-process on a SQLite
ledger; every S3 call goes over HTTP."""

from __future__ import annotations

import hashlib
import io
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import boto3
import pytest
import sqlalchemy as sa
from helpers.clock import ManualClock
from helpers.s3proxy import S3Proxy
from PIL import Image
from safetensors.torch import load as safetensors_load

from core.config import Settings
from core.errors import ConfigError, ObjectNotFound, RetryableError
from pipeline.images import output_pixels
from storage.ledger import items, job_claims
from storage.ledger import jobs as job_ledger
from storage.lifecycle import EMBED
from storage.migrate import upgrade
from storage.models import Item, ItemEvent, Output
from storage.objectstore import ObjectStores
from storage.publish import REPAIRED, Outcome, publish
from workers.context import StageContext
from workers.stages import embed, generate, ingest, jobs
from workers.stages.common import no_send


@pytest.fixture()
def proxy(s3_endpoint: str) -> Iterator[S3Proxy]:
    proxy = S3Proxy(s3_endpoint)
    yield proxy
    proxy.close()


def make_ctx(tmp_path: Path, tiny_models: Path, endpoint: str, **options: Any) -> StageContext:
    extra = {k: options.pop(k) for k in ("clock", "worker") if k in options}
    settings = Settings(
        home=tmp_path / "home",
        database_url=f"sqlite:///{tmp_path / 'ledger.db'}",  # type: ignore[arg-type]
        models=str(tiny_models),
        s3_endpoint_url=endpoint,
        **options,
    )
    upgrade(settings.ledger_url())
    return StageContext.create(settings, mode="distributed", **extra)


@pytest.fixture()
def ctx(
    tmp_path: Path, tiny_models: Path, proxy: S3Proxy, clock: ManualClock
) -> Iterator[StageContext]:
    context = make_ctx(tmp_path, tiny_models, proxy.endpoint, lease_seconds=5, clock=clock)
    yield context
    context.close()


@pytest.fixture()
def bucket(s3_endpoint: str, s3_bucket: str, reference_images: dict[str, Path]) -> str:
    s3 = boto3.client("s3", endpoint_url=s3_endpoint, region_name="us-east-1")
    for name, path in reference_images.items():
        s3.upload_file(str(path), s3_bucket, f"refs/{name}.png")
    return s3_bucket


def put_manifest(
    bucket: str, endpoint: str, rows: list[dict[str, Any]], key: str = "m.jsonl"
) -> str:
    body = "".join(json.dumps(r) + "\n" for r in rows).encode()
    boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1").put_object(
        Bucket=bucket, Key=key, Body=body
    )
    return f"s3://{bucket}/{key}"


def rows(bucket: str, n: int, refs: tuple[str, ...] = ("red",)) -> list[dict[str, Any]]:
    return [
        {"id": f"r{i}", "reference": f"s3://{bucket}/refs/{refs[i % len(refs)]}.png", "steps": 1}
        for i in range(n)
    ]


def is_get(part: str) -> Any:
    def predicate(method: str, path: str) -> bool:
        return method == "GET" and part in path

    return predicate


def state(ctx: StageContext, ids: list[int]) -> list[tuple[str, int, str | None]]:
    with ctx.sessions.begin() as s:
        return [
            (str(i.status), i.attempts, i.error_code) for i in items.load_items(s, item_ids=ids)
        ]


def submit(ctx: StageContext, manifest: str, bucket: str) -> str:
    job_id, _ = jobs.submit(
        ctx, manifest_uri=manifest, output_uri=f"s3://{bucket}/out", send_ingest=lambda j: None
    )
    return job_id


def pending_of(ctx: StageContext, job_id: str) -> list[int]:
    with ctx.sessions.begin() as s:
        return items.all_ids(s, job_id=job_id, status=EMBED.waiting)


# --- 2. reads cut off half way --------------------------------------------------------------


def test_a_manifest_read_cut_off_half_way_is_retried_not_stranded(
    ctx: StageContext, proxy: S3Proxy, bucket: str, s3_endpoint: str
) -> None:
    """Before: botocore's read error escaped the S3 error mapping; the ingest task was not
    retried and the job stayed `running` with no row count for ever. Now the ingest gives the
    job back (it waits for ingest again), the error is an outage, and the next ingest reads
    the manifest from where the first stopped, without a duplicate row."""
    manifest = put_manifest(bucket, s3_endpoint, rows(bucket, 3000))
    job_id = submit(ctx, manifest, bucket)
    proxy.cut(is_get("/m.jsonl"))
    with pytest.raises(RetryableError):
        ingest.run(ctx, job_id=job_id, send=no_send)
    with ctx.sessions.begin() as s:
        job = job_ledger.get(s, job_id=job_id)
        assert job is not None and job_claims.waits(job, now=ctx.clock())
        recorded = items.max_row_index(s, job_id=job_id) + 1
    summary = ingest.run(ctx, job_id=job_id, send=no_send)
    assert (summary.rows, summary.skipped) == (3000, recorded)
    with ctx.sessions.begin() as s:
        job = job_ledger.get(s, job_id=job_id)
        assert job is not None and job.total_rows == 3000
        assert s.scalar(sa.select(sa.func.count()).where(Item.job_id == job_id)) == 3000


def test_a_reference_read_cut_off_half_way_releases_the_items(
    ctx: StageContext, proxy: S3Proxy, bucket: str, s3_endpoint: str
) -> None:
    """Before: the item failed as `internal`. Now the items go back to waiting, refunded."""
    job_id = submit(ctx, put_manifest(bucket, s3_endpoint, rows(bucket, 3)), bucket)
    ingest.run(ctx, job_id=job_id, send=no_send)
    pending = pending_of(ctx, job_id)
    proxy.cut(is_get("/refs/red.png"))
    with pytest.raises(RetryableError):
        embed.run(ctx, item_ids=pending)
    assert state(ctx, pending) == [("pending", 0, None)] * 3
    assert embed.run(ctx, item_ids=pending).ready == pending


def test_a_cached_embedding_read_cut_off_half_way_releases_the_items(
    ctx: StageContext, proxy: S3Proxy, bucket: str, s3_endpoint: str
) -> None:
    """Before: the item failed as `internal` (the prefetch swallowed the error, the second
    read raised it unmapped). Now the items go back to waiting, refunded, and finish later."""
    job_id = submit(ctx, put_manifest(bucket, s3_endpoint, rows(bucket, 2)), bucket)
    ingest.run(ctx, job_id=job_id, send=no_send)
    ready = embed.run(ctx, item_ids=pending_of(ctx, job_id)).ready
    proxy.cut(is_get("/ipbatch-cache/embeddings/"))
    with pytest.raises(RetryableError):
        generate.run(ctx, item_ids=ready)
    assert state(ctx, ready) == [("ready", 0, None)] * 2
    assert generate.run(ctx, item_ids=ready).succeeded == 2


# --- 3. an outage half way through preparing a batch ---------------------------------------


def test_an_outage_while_preparing_gives_every_claimed_item_back_at_once(
    ctx: StageContext,
    proxy: S3Proxy,
    bucket: str,
    s3_endpoint: str,
    reference_images: dict[str, Path],
) -> None:
    """Four items (red, blue, green, red again); the first two are prepared, then S3 fails
    every read of green's cached embedding. Before: only the items not prepared yet were
    released; the two prepared ones stayed `running` with no heartbeat until their lease
    lapsed, then were re-claimed with an attempt never refunded. Now all four go back at
    once, refunded."""
    refs = ("red", "blue", "green", "red")
    job_id = submit(ctx, put_manifest(bucket, s3_endpoint, rows(bucket, 4, refs)), bucket)
    ingest.run(ctx, job_id=job_id, send=no_send)
    ready = embed.run(ctx, item_ids=pending_of(ctx, job_id)).ready
    assert len(ready) == 4
    green = hashlib.sha256(reference_images["green"].read_bytes()).hexdigest()

    def green_embedding(method: str, path: str) -> bool:
        return method == "GET" and "/ipbatch-cache/embeddings/" in path and green in path

    proxy.fail(green_embedding, times=1000)
    with pytest.raises(RetryableError):
        generate.run(ctx, item_ids=ready)
    assert state(ctx, ready) == [("ready", 0, None)] * 4
    with ctx.sessions.begin() as s:
        released = s.execute(
            sa.select(ItemEvent.item_id, ItemEvent.created_at).where(
                ItemEvent.item_id.in_(ready), ItemEvent.from_status == "running"
            )
        ).all()
    assert sorted(i for i, _ in released) == ready and len({t for _, t in released}) == 1
    proxy.clear()
    assert generate.run(ctx, item_ids=ready).succeeded == 4


# --- 7. a server that ignores conditional writes, and a stale worker -----------------------


def test_a_stale_worker_uploads_nothing_even_where_conditional_writes_are_ignored(
    tmp_path: Path,
    tiny_models: Path,
    proxy: S3Proxy,
    bucket: str,
    s3_endpoint: str,
    clock: ManualClock,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The S3 endpoint drops `If-None-Match` (s3rver and some S3-compatible stores do).
    Worker A generates a batch, pauses past its lease; B takes the items over, stores and
    records their images. When A comes back it checks its claim before uploading and writes
    nothing: one PUT per image, B's. Before, A re-uploaded every image over B's."""
    proxy.strip_conditions = True
    a = make_ctx(tmp_path, tiny_models, proxy.endpoint, lease_seconds=5, clock=clock, worker="a")
    b = make_ctx(tmp_path, tiny_models, proxy.endpoint, lease_seconds=60, clock=clock, worker="b")
    job_id = submit(a, put_manifest(bucket, s3_endpoint, rows(bucket, 3)), bucket)
    ingest.run(a, job_id=job_id, send=no_send)
    ready = embed.run(a, item_ids=pending_of(a, job_id)).ready
    real = generate._generate

    def paused_after_generating(ctx_: StageContext, work: Any, batch: Any) -> Any:
        made = real(ctx_, work, batch)
        if ctx_ is a:
            clock.advance(6)  # A pauses past its lease ...
            assert generate.run(b, item_ids=ready).succeeded == 3  # ... and B does the work
        return made

    monkeypatch.setattr(generate, "_generate", paused_after_generating)
    assert generate.run(a, item_ids=ready).succeeded == 0
    puts = [r.path for r in proxy.requests("PUT", f"/out/{job_id}/")]
    puts = [p for p in puts if not p.endswith("/results.jsonl")]  # the job's, not an image
    assert len(puts) == len(set(puts)) == 3  # B's, once each
    with a.sessions.begin() as s:
        recorded = s.execute(sa.select(Output.uri, Output.sha256)).all()
    s3 = boto3.client("s3", endpoint_url=s3_endpoint, region_name="us-east-1")
    for uri, sha in recorded:
        body = s3.get_object(Bucket=bucket, Key=uri.removeprefix(f"s3://{bucket}/"))["Body"].read()
        assert hashlib.sha256(body).hexdigest() == sha
    a.close()
    b.close()


def test_whether_the_store_honours_conditional_writes_is_found_out(
    s3_endpoint: str, s3_bucket: str, proxy: S3Proxy, caplog: pytest.LogCaptureFixture
) -> None:
    key = f"s3://{s3_bucket}/out/x.png"
    assert ObjectStores(s3_endpoint_url=s3_endpoint).for_uri(key).honours_conditional_writes(key)  # type: ignore[attr-defined]
    proxy.strip_conditions = True
    ignoring = ObjectStores(s3_endpoint_url=proxy.endpoint).for_uri(key)
    with caplog.at_level("WARNING"):
        assert not ignoring.honours_conditional_writes(key)  # type: ignore[attr-defined]
    assert "ignores If-None-Match" in caplog.text
    # where the condition is ignored, put_new still keeps the first writer's bytes (a HEAD first)
    assert ignoring.put_new(key, b"first") is True
    assert ignoring.put_new(key, b"second") is False
    assert ignoring.get(key) == b"first"
    assert not any(
        obj["Key"].startswith(".ipbatch-probe/")
        for obj in boto3.client("s3", endpoint_url=s3_endpoint, region_name="us-east-1")
        .list_objects_v2(Bucket=s3_bucket)
        .get("Contents", [])
    )


def test_a_missing_output_bucket_is_a_clear_configuration_error(s3_endpoint: str) -> None:
    store = ObjectStores(s3_endpoint_url=s3_endpoint).for_uri("s3://nobody-made-this/x")
    with pytest.raises(ConfigError, match="ipbatch never creates buckets"):
        store.put("s3://nobody-made-this/out/x.png", b"image")
    with pytest.raises(ObjectNotFound):  # a reference there is a missing reference
        store.get("s3://nobody-made-this/refs/a.png")


# --- one bad row or job never stops a worker -----------------------------------------------


def test_a_reference_the_workers_cannot_read_fails_its_item_not_the_worker(
    ctx: StageContext, bucket: str, s3_endpoint: str
) -> None:
    """A malformed or forbidden S3 reference is the row's problem: its item fails as
    `reference_forbidden` and the other rows go on. (As a configuration error it would have
    stopped every worker that met it.)"""
    bad = {"id": "bad", "reference": "s3:///no-bucket.png", "steps": 1}
    job_id = submit(ctx, put_manifest(bucket, s3_endpoint, [*rows(bucket, 2), bad]), bucket)
    ingest.run(ctx, job_id=job_id, send=no_send)
    pending = pending_of(ctx, job_id)
    summary = embed.run(ctx, item_ids=pending)
    assert len(summary.ready) == 2
    [(status, _, code)] = [s for s in state(ctx, pending) if s[0] == "failed"]
    assert code == "reference_forbidden"


def test_a_job_whose_manifest_vanished_fails_with_the_reason(
    ctx: StageContext, bucket: str, s3_endpoint: str
) -> None:
    manifest = put_manifest(bucket, s3_endpoint, rows(bucket, 2))
    job_id = submit(ctx, manifest, bucket)
    boto3.client("s3", endpoint_url=s3_endpoint, region_name="us-east-1").delete_object(
        Bucket=bucket, Key="m.jsonl"
    )
    ingest.run(ctx, job_id=job_id, send=no_send)
    with ctx.sessions.begin() as s:
        job = job_ledger.get(s, job_id=job_id)
    assert job is not None and job.status == "failed"
    assert job.error_message is not None and "manifest unreadable" in job.error_message


def test_a_job_cannot_be_submitted_to_a_bucket_that_does_not_exist(
    ctx: StageContext, bucket: str, s3_endpoint: str
) -> None:
    manifest = put_manifest(bucket, s3_endpoint, rows(bucket, 1))
    with pytest.raises(ConfigError, match="ipbatch never creates buckets"):
        jobs.submit(
            ctx,
            manifest_uri=manifest,
            output_uri="s3://nobody-made-this/out",
            send_ingest=lambda j: None,
        )
    with ctx.sessions.begin() as s:
        assert s.scalar(sa.select(sa.func.count()).select_from(Item)) == 0
        assert s.scalar(sa.text("SELECT COUNT(*) FROM jobs")) == 0


# --- 8. a key that already holds something: kept only if it is the worker's bytes -----------


def s3_client(endpoint: str) -> Any:
    return boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1")


def recorded_output(ctx: StageContext, row_id: str) -> tuple[str, str, int | None]:
    with ctx.sessions.begin() as s:
        uri, sha, size = s.execute(
            sa.select(Output.uri, Output.sha256, Output.size)
            .join(Item, Item.id == Output.item_id)
            .where(Item.row_id == row_id)
        ).one()
    return uri, sha, size


def repaired(kind: str, reason: str) -> float:
    return float(REPAIRED.labels(kind, reason)._value.get())


@pytest.mark.parametrize(
    ("conditions", "left", "reason"),
    [
        ("ignored", "empty", "empty"),
        ("ignored", "cut", "undecodable"),
        ("honoured", "empty", "empty"),
    ],
)
def test_an_upload_cut_off_is_replaced_by_the_image_not_recorded(
    ctx: StageContext,
    proxy: S3Proxy,
    bucket: str,
    s3_endpoint: str,
    reference_images: dict[str, Path],
    conditions: str,
    left: str,
    reason: str,
) -> None:
    """A worker killed while uploading r0's image left what the server kept of it: a 0-byte
    object (s3rver), or the first bytes of other ones. The item is delivered again. Before:
    the next worker found the key (HEAD, or a 412), kept "what is there" and recorded its
    sha256: the ledger said succeeded, the image was empty. Now the object is compared with
    the bytes made, replaced (while the claim holds), counted; the row records what it made."""
    proxy.strip_conditions = conditions == "ignored"
    job_id = submit(ctx, put_manifest(bucket, s3_endpoint, rows(bucket, 2)), bucket)
    ingest.run(ctx, job_id=job_id, send=no_send)
    ready = embed.run(ctx, item_ids=pending_of(ctx, job_id)).ready
    s3 = s3_client(s3_endpoint)
    junk = b"" if left == "empty" else reference_images["blue"].read_bytes()[:300]
    s3.put_object(Bucket=bucket, Key=f"out/{job_id}/r0/0.png", Body=junk)
    before = repaired("output", reason)
    assert generate.run(ctx, item_ids=ready).succeeded == 2
    uri, sha, size = recorded_output(ctx, "r0")
    stored = s3.get_object(Bucket=bucket, Key=uri.removeprefix(f"s3://{bucket}/"))["Body"].read()
    assert stored != junk
    assert (hashlib.sha256(stored).hexdigest(), len(stored)) == (sha, size)
    assert output_pixels(stored) is not None  # a whole image
    assert repaired("output", reason) == before + 1


def test_another_picture_at_the_key_fails_the_row_loudly_and_is_left(
    ctx: StageContext, bucket: str, s3_endpoint: str
) -> None:
    """moto honours If-None-Match: the PUT gets a 412. What is there is a whole image, but
    another picture than the row makes with its seed (a changed model, a bug): the row fails
    as `output_conflict` naming the key; nothing is recorded, the object is not touched."""
    job_id = submit(ctx, put_manifest(bucket, s3_endpoint, rows(bucket, 2)), bucket)
    ingest.run(ctx, job_id=job_id, send=no_send)
    ready = embed.run(ctx, item_ids=pending_of(ctx, job_id)).ready
    other = io.BytesIO()
    Image.new("RGB", (64, 64), (250, 10, 10)).save(other, format="PNG")
    key = f"out/{job_id}/r0/0.png"
    s3 = s3_client(s3_endpoint)
    s3.put_object(Bucket=bucket, Key=key, Body=other.getvalue())
    assert generate.run(ctx, item_ids=ready).succeeded == 1
    [(status, _, code), (status1, _, _)] = state(ctx, ready)
    assert (status, code, status1) == ("failed", "output_conflict", "succeeded")
    with ctx.sessions.begin() as s:
        message = s.scalar(sa.select(Item.error_message).where(Item.id == ready[0]))
        assert s.scalar(sa.select(sa.func.count()).select_from(Output)) == 1
    assert message is not None and f"s3://{bucket}/{key} already holds another picture" in message
    assert s3.get_object(Bucket=bucket, Key=key)["Body"].read() == other.getvalue()


@pytest.mark.parametrize("conditions", ["honoured", "ignored"])
def test_publish_keeps_equal_bytes_replaces_others_and_only_under_the_claim(
    s3_bucket: str, proxy: S3Proxy, conditions: str
) -> None:
    proxy.strip_conditions = conditions == "ignored"
    uri = f"s3://{s3_bucket}/out/{conditions}.bin"
    store = ObjectStores(s3_endpoint_url=proxy.endpoint).for_uri(uri)
    assert publish(store, uri, b"image", kind="test").outcome is Outcome.CREATED
    gets = len(proxy.requests("GET", f"/out/{conditions}.bin"))
    # the same bytes: the ETag (a single-part upload's MD5) says so, no read-back, no PUT
    assert publish(store, uri, b"image", kind="test").outcome is Outcome.KEPT
    assert len(proxy.requests("GET", f"/out/{conditions}.bin")) == gets
    unconditional = [
        r for r in proxy.requests("PUT", f"/out/{conditions}.bin") if not r.conditional
    ]
    assert unconditional == []
    # a worker whose claim lapsed leaves other bytes alone; the claim holder replaces them
    lost = publish(store, uri, b"other", kind="test", still_ours=lambda: False)
    assert (lost.outcome, store.get(uri)) == (Outcome.NOT_OURS, b"image")
    done = publish(store, uri, b"other", kind="test")
    assert (done.outcome, done.reason, store.get(uri)) == (
        Outcome.REPAIRED,
        "other bytes",
        b"other",
    )


def test_a_cached_embedding_cut_short_is_computed_again_not_trusted(
    ctx: StageContext, bucket: str, s3_endpoint: str
) -> None:
    """Every cached object of the job (reference embeddings, score embeddings) cut to its
    first bytes behind the ledger's back. Before: safetensors' error failed the items as
    `internal`. Now the broken object is removed, the items go back to embed, which writes
    it again under the key's lock; then they succeed."""
    job_id = submit(ctx, put_manifest(bucket, s3_endpoint, rows(bucket, 2)), bucket)
    ingest.run(ctx, job_id=job_id, send=no_send)
    ready = embed.run(ctx, item_ids=pending_of(ctx, job_id)).ready
    s3 = s3_client(s3_endpoint)
    cached = [
        o["Key"]
        for o in s3.list_objects_v2(Bucket=bucket, Prefix="ipbatch-cache/embeddings/")["Contents"]
    ]
    for key in cached:
        body = s3.get_object(Bucket=bucket, Key=key)["Body"].read()
        s3.put_object(Bucket=bucket, Key=key, Body=body[:40])
    before = repaired("embedding", "undecodable")
    summary = generate.run(ctx, item_ids=ready)
    assert (summary.succeeded, summary.embed_again) == (0, ready)
    assert embed.run(ctx, item_ids=ready).ready == ready
    assert generate.run(ctx, item_ids=ready).succeeded == 2
    assert repaired("embedding", "undecodable") > before
    for key in cached:
        safetensors_load(s3.get_object(Bucket=bucket, Key=key)["Body"].read())  # whole again


def test_a_stale_worker_copies_nothing_either(
    tmp_path: Path,
    tiny_models: Path,
    proxy: S3Proxy,
    bucket: str,
    s3_endpoint: str,
    clock: ManualClock,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Reuse obeys the claim as generation does: worker A finds a second job's rows made
    before, pauses past its lease while B takes them over and copies them; when A comes back
    it copies and records nothing (one PUT per image, B's), on a store ignoring If-None-Match."""
    from workers.stages import reuse

    proxy.strip_conditions = True
    a = make_ctx(tmp_path, tiny_models, proxy.endpoint, lease_seconds=5, clock=clock, worker="a")
    b = make_ctx(tmp_path, tiny_models, proxy.endpoint, lease_seconds=60, clock=clock, worker="b")
    manifest = put_manifest(bucket, s3_endpoint, rows(bucket, 3))
    first = submit(b, manifest, bucket)
    ingest.run(b, job_id=first, send=no_send)
    assert generate.run(b, item_ids=embed.run(b, item_ids=pending_of(b, first)).ready).succeeded
    second, _ = jobs.submit(
        b, manifest_uri=manifest, output_uri=f"s3://{bucket}/again", send_ingest=lambda j: None
    )
    ingest.run(b, job_id=second, send=no_send)
    ready = embed.run(b, item_ids=pending_of(b, second)).ready
    real = reuse._made_before

    def paused_after_looking(ctx_: StageContext, wanted: Any) -> Any:
        found = real(ctx_, wanted)
        if ctx_ is a:
            clock.advance(6)  # A pauses past its lease ...
            assert generate.run(b, item_ids=ready).reused == 3  # ... and B copies the rows
        return found

    monkeypatch.setattr(reuse, "_made_before", paused_after_looking)
    assert generate.run(a, item_ids=ready).reused == 0
    puts = [r.path for r in proxy.requests("PUT", f"/again/{second}/")]
    puts = [p for p in puts if not p.endswith("/results.jsonl")]
    assert len(puts) == len(set(puts)) == 3  # B's, once each
    with a.sessions.begin() as s:
        recorded = s.execute(
            sa.select(Output.uri, Output.reused_from)
            .join(Item, Item.id == Output.item_id)
            .where(Item.job_id == second)
        ).all()
    assert len(recorded) == 3 and all(source is not None for _, source in recorded)
    a.close()
    b.close()
