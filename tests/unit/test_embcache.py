"""Embedding cache keys: content + encoder fingerprint + kind; one computation per key; a lost
object is computed and written again."""

from __future__ import annotations

from pathlib import Path

import torch

from core.clock import utcnow
from storage.embcache import CacheKey, EmbeddingCache
from storage.ledger import db, embeddings
from storage.migrate import upgrade
from storage.objectstore import ObjectStores


def test_key_uri_layout() -> None:
    key = CacheKey("ab" + "0" * 62, "clip-enc-123", "clip_image_embeds")
    assert key.uri("s3://b/cache") == (
        "s3://b/cache/embeddings/clip-enc-123/clip_image_embeds/ab/"
        + "ab"
        + "0" * 62
        + ".safetensors"
    )


def _cache(tmp_path: Path) -> tuple[EmbeddingCache, object]:
    url = f"sqlite:///{tmp_path / 'l.db'}"
    upgrade(url)
    engine = db.make_engine(url)
    return EmbeddingCache(ObjectStores(), db.make_sessions(engine), utcnow), engine


def test_ensure_computes_once_per_key(tmp_path: Path) -> None:
    cache, engine = _cache(tmp_path)
    calls: list[str] = []

    def compute(tag: str) -> dict[str, torch.Tensor]:
        calls.append(tag)
        return {"pos": torch.full((1, 4), float(len(calls))), "neg": torch.zeros(1, 4)}

    keys = [
        CacheKey("a" * 64, "enc1", "clip_image_embeds"),
        CacheKey("a" * 64, "enc1", "clip_image_embeds"),  # same: cached
        CacheKey("a" * 64, "enc2", "clip_image_embeds"),  # another encoder
        CacheKey("a" * 64, "enc1", "clip_hidden_states"),  # another kind
        CacheKey("b" * 64, "enc1", "clip_image_embeds"),  # other bytes
    ]
    results = [
        cache.ensure(key=key, cache_root=str(tmp_path / "c"), compute=lambda i=i: compute(str(i)))
        for i, key in enumerate(keys)
    ]
    assert [r.hit for r in results] == [False, True, False, False, False]
    assert results[0].embedding_id == results[1].embedding_id
    assert len({r.embedding_id for r in results}) == 4
    assert calls == ["0", "2", "3", "4"]
    with cache.sessions.begin() as s:
        row = embeddings.find(s, content_sha256="a" * 64, encoder="enc2", kind="clip_image_embeds")
        assert row is not None and row.shape == [1, 4] and row.dtype == "float32"
    assert torch.equal(cache.load(row.uri)["pos"], torch.full((1, 4), 2.0))
    engine.dispose()  # type: ignore[attr-defined]


def test_a_lost_object_is_computed_and_written_again(tmp_path: Path) -> None:
    """The ledger knows the key but the object is gone (a bucket lifecycle rule, a wiped
    store): the cache computes it again under the same key instead of failing."""
    cache, engine = _cache(tmp_path)
    key = CacheKey("c" * 64, "enc", "clip_image_embeds")
    tensors = {"pos": torch.ones(1, 4), "neg": torch.zeros(1, 4)}
    first = cache.ensure(key=key, cache_root=str(tmp_path / "c"), compute=lambda: tensors)
    Path(first.uri).unlink()
    again = cache.ensure(key=key, cache_root=str(tmp_path / "c"), compute=lambda: tensors)
    assert (again.embedding_id, again.uri, again.hit) == (first.embedding_id, first.uri, False)
    assert torch.equal(cache.load(first.uri)["pos"], tensors["pos"])
    Path(first.uri).unlink()
    fetched, hit = cache.fetch(key=key, cache_root=str(tmp_path / "c"), compute=lambda: tensors)
    assert not hit and torch.equal(fetched["pos"], tensors["pos"]) and Path(first.uri).is_file()
    assert cache.fetch(key=key, cache_root=str(tmp_path / "c"), compute=lambda: {})[1]  # hit
    engine.dispose()  # type: ignore[attr-defined]
