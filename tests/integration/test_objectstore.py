"""Both object store backends behind one interface: the local folder and S3 over HTTP."""

from __future__ import annotations

from pathlib import Path

import pytest

from core.errors import ObjectNotFound
from core.uris import join_uri
from storage.objectstore import ObjectStores
from storage.publish import Outcome, publish
from workers.stages.reuse import output_uri_for


@pytest.fixture(params=["local", "s3"])
def root(request: pytest.FixtureRequest, tmp_path: Path) -> tuple[ObjectStores, str]:
    if request.param == "local":
        return ObjectStores(), str(tmp_path / "store")
    endpoint = request.getfixturevalue("s3_endpoint")
    bucket = request.getfixturevalue("s3_bucket")
    return ObjectStores(s3_endpoint_url=endpoint), f"s3://{bucket}/some/prefix"


def test_put_get_exists_list(root: tuple[ObjectStores, str]) -> None:
    stores, base = root
    store = stores.for_uri(base)
    a, b = join_uri(base, "x", "a.bin"), join_uri(base, "y", "b.bin")
    assert not store.exists(a)
    store.put(a, b"alpha", content_type="application/octet-stream")
    store.put(b, b"beta")
    store.put(a, b"alpha")  # same key, same bytes: idempotent
    assert store.exists(a) and store.get(a) == b"alpha" and store.get(b) == b"beta"
    assert sorted(store.list(base)) == sorted([a, b])
    with pytest.raises(ObjectNotFound):
        store.get(join_uri(base, "missing"))


def test_put_new_never_overwrites(root: tuple[ObjectStores, str]) -> None:
    """The first writer of a key wins; a later writer is told something is there."""
    stores, base = root
    store = stores.for_uri(base)
    key = join_uri(base, "job", "row", "0.png")
    assert store.stat(key) is None
    assert store.put_new(key, b"first", content_type="image/png") is True
    assert store.put_new(key, b"second", content_type="image/png") is False
    assert store.get(key) == b"first"
    stat = store.stat(key)
    assert stat is not None and stat.size == 5
    assert stat.md5_is(b"first") is (True if base.startswith("s3://") else None)
    assert sorted(store.list(base)) == [key]  # no temporary files left behind


def test_publish_leaves_the_key_holding_the_writers_bytes(root: tuple[ObjectStores, str]) -> None:
    stores, base = root
    store = stores.for_uri(base)
    key = join_uri(base, "job", "row", "0.png")
    assert publish(store, key, b"image", kind="test").outcome is Outcome.CREATED
    assert publish(store, key, b"image", kind="test").outcome is Outcome.KEPT
    store.put(key, b"")  # a cut-off upload, as s3rver leaves it
    again = publish(store, key, b"image", kind="test")
    assert (again.outcome, again.reason, store.get(key)) == (Outcome.REPAIRED, "empty", b"image")
    store.put(key, b"imagf")  # same size, other bytes
    lapsed = publish(store, key, b"image", kind="test", still_ours=lambda: False)
    assert (lapsed.outcome, store.get(key)) == (Outcome.NOT_OURS, b"imagf")


def test_streaming_open_yields_lines(root: tuple[ObjectStores, str]) -> None:
    stores, base = root
    store = stores.for_uri(base)
    uri = join_uri(base, "manifest.jsonl")
    lines = [f'{{"id": "r{i}"}}\n'.encode() for i in range(20_000)]
    store.put(uri, b"".join(lines))
    with store.open(uri) as stream:
        got = list(stream)
    assert got == lines
    with pytest.raises(ObjectNotFound), store.open(join_uri(base, "nope.jsonl")):
        pass


def test_output_keys_are_deterministic() -> None:
    assert (
        output_uri_for("s3://out/run/", "job1", "sku-1", 2, "png")
        == "s3://out/run/job1/sku-1/2.png"
    )
    assert output_uri_for("/data/out", "j", "r", 0, "webp") == "/data/out/j/r/0.webp"


def test_file_uris_and_unknown_schemes(tmp_path: Path) -> None:
    stores = ObjectStores()
    path = tmp_path / "f.txt"
    stores.local.put(f"file://{path}", b"hi")
    assert path.read_bytes() == b"hi"
    from core.errors import ConfigError

    with pytest.raises(ConfigError):
        stores.local.get("http://example.com/x.png")


def test_csv_manifest_streams_from_s3(s3_endpoint: str, s3_bucket: str) -> None:
    from pipeline.manifest_reader import read_manifest

    stores = ObjectStores(s3_endpoint_url=s3_endpoint)
    uri = f"s3://{s3_bucket}/jobs/catalog.csv"
    body = "id,reference,num_images\n" + "".join(
        f"row-{i},s3://{s3_bucket}/r.png,{1 + i % 3}\n" for i in range(5000)
    )
    stores.for_uri(uri).put(uri, body.encode())
    with stores.for_uri(uri).open(uri) as stream:
        parsed = list(read_manifest(stream, "csv"))
    assert len(parsed) == 5000 and all(p.row is not None for p in parsed)
    assert [p.row.num_images for p in parsed[:4] if p.row] == [1, 2, 3, 1]
