"""The embedding cache on PostgreSQL: workers that miss the same key at once compute it once."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import torch

from core.clock import utcnow
from storage.embcache import Cached, CacheKey, EmbeddingCache
from storage.ledger import db
from storage.migrate import upgrade
from storage.objectstore import ObjectStores


def test_workers_missing_the_same_key_at_once_compute_it_once(
    fresh_pg_url: str, tmp_path: Path
) -> None:
    """Two workers miss one key together: the second waits for the first's lock on the key
    and finds its result, instead of encoding the same reference again."""
    upgrade(fresh_pg_url)
    engine = db.make_engine(fresh_pg_url)
    cache = EmbeddingCache(ObjectStores(), db.make_sessions(engine), utcnow)
    key = CacheKey("d" * 64, "enc", "clip_image_embeds")
    start = threading.Barrier(2)
    computed: list[int] = []
    results: list[Cached] = []

    def compute() -> dict[str, torch.Tensor]:
        computed.append(threading.get_ident())
        time.sleep(0.5)  # long enough for the other worker to miss the key too
        return {"pos": torch.ones(1, 4), "neg": torch.zeros(1, 4)}

    def worker() -> None:
        start.wait()
        results.append(cache.ensure(key=key, cache_root=str(tmp_path / "c"), compute=compute))

    threads = [threading.Thread(target=worker) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    engine.dispose()
    assert len(computed) == 1
    assert sorted(r.hit for r in results) == [False, True]
    assert len({r.embedding_id for r in results}) == 1
