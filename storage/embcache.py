"""The embedding cache: content-addressed tensors in an object store, indexed in the ledger.

Key = (sha256 of the reference bytes, encoder fingerprint, kind). The tensors live as one
safetensors file per key under `{cache_root}/embeddings/{encoder}/{kind}/{aa}/{sha}.safetensors`;
the `embeddings` table says which keys exist. A reference used by 1,000 rows, or by last
night's job, is encoded once. The cache heals: a key the ledger knows whose object is gone (a
bucket lifecycle rule, a wiped store) or cannot be decoded (a write cut off half way) is
computed and written again, never an error, and never trusted.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from sqlalchemy.orm import Session, sessionmaker

from core.clock import Clock
from core.errors import ObjectNotFound
from core.uris import join_uri
from storage.ledger import embeddings
from storage.objectstore import ObjectStores
from storage.publish import REPAIRED, publish

if TYPE_CHECKING:  # torch is imported on first use: an ingest-only worker never loads it
    import torch

log = logging.getLogger(__name__)
Tensors = dict[str, "torch.Tensor"]


@dataclass(frozen=True)
class CacheKey:
    content_sha256: str
    encoder: str
    kind: str

    def uri(self, cache_root: str) -> str:
        sha = self.content_sha256
        return join_uri(
            cache_root, "embeddings", self.encoder, self.kind, sha[:2], f"{sha}.safetensors"
        )


def serialize(tensors: Tensors, key: CacheKey) -> bytes:
    from safetensors.torch import save as save_safetensors

    metadata = {"content_sha256": key.content_sha256, "encoder": key.encoder, "kind": key.kind}
    return save_safetensors({k: v.contiguous() for k, v in tensors.items()}, metadata=metadata)


def deserialize(data: bytes) -> Tensors:
    from safetensors.torch import load as load_safetensors

    return load_safetensors(data)


@dataclass(frozen=True)
class Cached:
    embedding_id: int
    uri: str
    hit: bool  # False: computed by this call (a new key, or a lost object written again)


class EmbeddingCache:
    def __init__(self, stores: ObjectStores, sessions: sessionmaker[Session], clock: Clock):
        self.stores = stores
        self.sessions = sessions
        self.clock = clock

    def ensure(self, *, key: CacheKey, cache_root: str, compute: Callable[[], Tensors]) -> Cached:
        """Make sure the key's tensors are stored: found (the object is there), or computed
        and stored now. A miss is computed under a lock on the key (PostgreSQL), so workers
        that miss the same key at once compute it once: the second finds the first's."""
        names = {"content_sha256": key.content_sha256, "encoder": key.encoder, "kind": key.kind}
        with self.sessions.begin() as session:
            found = embeddings.find(session, **names)
            known = (found.id, found.uri) if found is not None else None
        if known is not None and self.stores.for_uri(known[1]).exists(known[1]):
            return Cached(*known, hit=True)
        with self.sessions.begin() as session:
            if not embeddings.lock_key(session, **names):
                log.warning("embedding %s is being computed elsewhere for long: computing", key)
            found = embeddings.find(session, **names)  # computed meanwhile?
            if found is not None and self.stores.for_uri(found.uri).exists(found.uri):
                return Cached(found.id, found.uri, hit=True)
            if found is not None:
                log.warning("cached embedding %s is gone: computing it again", found.uri)
            tensors = compute()
            uri = found.uri if found is not None else key.uri(cache_root)
            self._store(uri, tensors, key)
            if found is not None:
                return Cached(found.id, uri, hit=False)
            first = tensors["pos"] if "pos" in tensors else next(iter(tensors.values()))
            embedding_id = embeddings.record(
                session,
                **names,
                uri=uri,
                shape=list(first.shape),
                dtype=str(first.dtype).removeprefix("torch."),
                now=self.clock(),
            )
        return Cached(embedding_id, uri, hit=False)

    def fetch(
        self, *, key: CacheKey, cache_root: str, compute: Callable[[], Tensors]
    ) -> tuple[Tensors, bool]:
        """The key's tensors, loaded from the cache or computed (and stored) now; whether
        they came from the cache."""
        computed: Tensors = {}

        def remember() -> Tensors:
            computed.update(compute())
            return computed

        for _ in range(3):
            cached = self.ensure(key=key, cache_root=cache_root, compute=remember)
            if computed:
                return computed, False
            try:
                return self.load(cached.uri), True
            except ObjectNotFound:  # gone (or broken, and removed) since: `ensure` rewrites it
                continue
        raise ObjectNotFound(f"cached embedding {key} keeps vanishing after being written")

    def load(self, uri: str) -> Tensors:
        """The tensors stored under `uri`. ObjectNotFound if the object is gone, or cannot be
        decoded (a write cut off on a server that keeps what it received): such an object is
        removed here and counted, so that `ensure` computes and writes it again under the
        key's lock instead of trusting it."""
        store = self.stores.for_uri(uri)
        data = store.get(uri)
        try:
            return deserialize(data)
        except Exception as exc:  # safetensors raises its own error, or ValueError, on junk
            reason = "empty" if not data else "undecodable"
            log.warning(
                "cached object %s is %s (%d bytes): removed, to be computed again",
                uri,
                reason,
                len(data),
            )
            store.delete(uri)
            REPAIRED.labels("embedding", reason).inc()
            raise ObjectNotFound(f"cached object {uri} was {reason}") from exc

    def _store(self, uri: str, tensors: Tensors, key: CacheKey) -> None:
        """Called under the key's lock: the object ends holding exactly these bytes (one
        left by a cut-off write, or that does not decode, is replaced and counted)."""
        publish(
            self.stores.for_uri(uri),
            uri,
            serialize(tensors, key),
            kind="embedding",
            inspect=_what_is_stored,
        )


def _what_is_stored(stored: bytes) -> str:
    if not stored:
        return "empty"
    try:
        deserialize(stored)
    except Exception:
        return "undecodable"
    return "other values"
