"""The embedding cache: content-addressed tensors in an object store, indexed in the ledger.

Key = (sha256 of the reference bytes, encoder fingerprint, kind). The tensors live as one
safetensors file per key under `{cache_root}/embeddings/{encoder}/{kind}/{aa}/{sha}.safetensors`;
the `embeddings` table says which keys exist. A reference used by 1,000 rows, or by last
night's job, is encoded once.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from sqlalchemy.orm import Session

from core.uris import join_uri
from storage import ledger
from storage.objectstore import ObjectStores

if TYPE_CHECKING:  # torch is imported on first use: an ingest-only worker never loads it
    import torch


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


def serialize(tensors: dict[str, torch.Tensor], key: CacheKey) -> bytes:
    from safetensors.torch import save as save_safetensors

    metadata = {"content_sha256": key.content_sha256, "encoder": key.encoder, "kind": key.kind}
    return save_safetensors({k: v.contiguous() for k, v in tensors.items()}, metadata=metadata)


def deserialize(data: bytes) -> dict[str, torch.Tensor]:
    from safetensors.torch import load as load_safetensors

    return load_safetensors(data)


class EmbeddingCache:
    def __init__(self, stores: ObjectStores) -> None:
        self.stores = stores

    def get_or_compute(
        self,
        session: Session,
        *,
        key: CacheKey,
        cache_root: str,
        compute: Callable[[], dict[str, torch.Tensor]],
    ) -> tuple[int, bool]:
        """Return (embedding id, was_cached). Computes and stores the tensors on a miss."""
        found = ledger.find_embedding(
            session, content_sha256=key.content_sha256, encoder=key.encoder, kind=key.kind
        )
        if found is not None:
            return found.id, True
        tensors = compute()
        uri = key.uri(cache_root)
        self.stores.for_uri(uri).put(uri, serialize(tensors, key))  # same key, same bytes
        pos = tensors["pos"]
        embedding_id = ledger.record_embedding(
            session,
            content_sha256=key.content_sha256,
            encoder=key.encoder,
            kind=key.kind,
            uri=uri,
            shape=list(pos.shape),
            dtype=str(pos.dtype).removeprefix("torch."),
        )
        return embedding_id, False

    def load(self, uri: str) -> dict[str, torch.Tensor]:
        return deserialize(self.stores.for_uri(uri).get(uri))
