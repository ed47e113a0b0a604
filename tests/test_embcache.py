"""Embedding cache keys: content + encoder fingerprint + kind; one computation per key."""

from __future__ import annotations

from pathlib import Path

import torch

from storage import ledger
from storage.embcache import CacheKey, EmbeddingCache
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


def test_get_or_compute_computes_once_per_key(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'l.db'}"
    upgrade(url)
    engine = ledger.make_engine(url)
    sessions = ledger.make_sessions(engine)
    cache = EmbeddingCache(ObjectStores())
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
    results = []
    for i, key in enumerate(keys):
        with sessions.begin() as s:
            results.append(
                cache.get_or_compute(
                    s, key=key, cache_root=str(tmp_path / "c"), compute=lambda i=i: compute(str(i))
                )
            )
    assert [cached for _, cached in results] == [False, True, False, False, False]
    assert results[0][0] == results[1][0]
    assert len({eid for eid, _ in results}) == 4
    assert calls == ["0", "2", "3", "4"]
    with sessions.begin() as s:
        row = ledger.find_embedding(
            s, content_sha256="a" * 64, encoder="enc2", kind="clip_image_embeds"
        )
        assert row is not None and row.shape == [1, 4] and row.dtype == "float32"
        loaded = cache.load(row.uri)
    assert torch.equal(loaded["pos"], torch.full((1, 4), 2.0))
    engine.dispose()
