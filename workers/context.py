"""Everything a stage needs, built lazily inside the worker process (never at import).

Engines, S3 clients and models are created on first use, so a prefork parent never holds
them and each child builds its own after the fork.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal

from sqlalchemy import Engine
from sqlalchemy.orm import Session, sessionmaker

from core.clock import Clock, utcnow
from core.config import Settings
from core.errors import Action, Decision, classify
from core.uris import is_s3, join_uri, parse_s3
from pipeline.models import ModelSource, resolve_device, resolve_dtype
from pipeline.presets import FACE_PACK
from storage.embcache import EmbeddingCache
from storage.ledger import db
from storage.objectstore import ObjectStores
from workers.adapters import AdapterCatalog

if TYPE_CHECKING:  # the model stack (torch, diffusers, transformers) loads on first use
    from pipeline.embedder import ClipEmbedder, ReferenceEncoder
    from pipeline.faces import FaceEmbedder
    from pipeline.fingerprint import Weights
    from pipeline.pool import GeneratorPool
    from pipeline.scores import ClipScorer

log = logging.getLogger(__name__)


def quiet_model_libraries() -> None:
    """diffusers / transformers print progress bars and notices per load: keep logs readable."""
    import diffusers
    import transformers

    diffusers.utils.logging.set_verbosity_error()
    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


@dataclass
class StageContext:
    settings: Settings
    mode: Literal["local", "distributed"]
    engine: Engine
    sessions: sessionmaker[Session]
    stores: ObjectStores
    cache: EmbeddingCache
    models: ModelSource
    clock: Clock = utcnow  # the ledger's time: tests move it instead of racing it
    worker: str = field(default_factory=db.worker_name)
    _clips: dict[str, ClipEmbedder] = field(default_factory=dict)
    _face: FaceEmbedder | None = None
    _encoders: dict[str, ReferenceEncoder] = field(default_factory=dict)
    _pool: GeneratorPool | None = None
    _scorer: ClipScorer | None = None
    _adapters: AdapterCatalog | None = None
    _weights: Weights | None = None

    @classmethod
    def create(
        cls,
        settings: Settings,
        *,
        mode: Literal["local", "distributed"],
        clock: Clock = utcnow,
        worker: str | None = None,
    ) -> StageContext:
        engine = db.make_engine(settings.ledger_url())
        sessions = db.make_sessions(engine)
        stores = ObjectStores(
            s3_endpoint_url=settings.s3_endpoint_url, s3_region=settings.s3_region
        )
        return cls(
            settings=settings,
            mode=mode,
            engine=engine,
            sessions=sessions,
            stores=stores,
            cache=EmbeddingCache(stores, sessions, clock),
            models=ModelSource.parse(settings.models_spec()),
            clock=clock,
            worker=worker or db.worker_name(),
        )

    @property
    def local_mode(self) -> bool:
        return self.mode == "local"

    def cache_root(self, output_uri: str) -> str:
        if self.settings.cache_uri:
            return self.settings.cache_uri
        if is_s3(output_uri):
            return f"s3://{parse_s3(output_uri).bucket}/ipbatch-cache"
        return join_uri(str(self.settings.resolved_home()), "cache")

    def _clip(self, encoder: str, processor: str | None) -> ClipEmbedder:
        from pipeline.embedder import ClipEmbedder

        key = f"{encoder}|{processor}"
        if key not in self._clips:
            quiet_model_libraries()
            device = resolve_device(self.settings.device)
            log.info("loading image encoder %s", encoder)
            self._clips[key] = ClipEmbedder(
                encoder, processor, device=device, dtype=resolve_dtype(self.settings.dtype, device)
            )
        return self._clips[key]

    def _faces(self) -> FaceEmbedder:
        from pipeline.faces import FaceEmbedder

        if self._face is None:
            self._face = FaceEmbedder(self.models.face_root(), name=FACE_PACK)
        return self._face

    @property
    def adapters(self) -> AdapterCatalog:
        """Adapter name -> preset: the published ones and the trained `custom:` ones."""
        if self._adapters is None:
            self._adapters = AdapterCatalog(
                settings=self.settings, stores=self.stores, models=self.models
            )
        return self._adapters

    def encoder(self, adapter: str) -> ReferenceEncoder:
        """The reference encoder an adapter needs (models load on first use, then stay)."""
        from pipeline.embedder import ClipReferenceEncoder, FaceReferenceEncoder

        preset = self.adapters(adapter)
        if adapter not in self._encoders:
            clip = None
            if preset.image_encoder is not None:
                clip = self._clip(
                    self.models.image_encoder(preset),
                    self.models.feature_extractor(preset.family),
                )
            if preset.uses_faces:
                self._encoders[adapter] = FaceReferenceEncoder(self._faces(), preset.family, clip)
            else:
                assert clip is not None, f"{adapter} has a CLIP encoder"
                self._encoders[adapter] = ClipReferenceEncoder(
                    clip, preset.embed_kind, preset.family
                )
        return self._encoders[adapter]

    @property
    def has_generators(self) -> bool:
        """Whether this process has made its generator pool (generate workers)."""
        return self._pool is not None

    @property
    def generators(self) -> GeneratorPool:
        from pipeline.pipelines import Acceleration
        from pipeline.pool import GeneratorPool

        if self._pool is None:
            quiet_model_libraries()
            device = resolve_device(self.settings.device)
            self._pool = GeneratorPool(
                self.models,
                device=device,
                dtype=resolve_dtype(self.settings.dtype, device),
                capacity=self.settings.warm_pipelines,
                resolve=self.adapters,
                acceleration=Acceleration(
                    channels_last=self.settings.channels_last,
                    compile=self.settings.compile,
                    vae_slicing_above=self.settings.vae_slicing_above,
                    max_images=self.batch_images,
                ),
            )
        return self._pool

    @property
    def weights(self) -> Weights:
        """The models' weights by content, each file hashed once per process (reuse's
        fingerprints: `pipeline.fingerprint`)."""
        from pipeline.fingerprint import Weights

        if self._weights is None:
            self._weights = Weights(self.models)
        return self._weights

    @property
    def batch_images(self) -> int:
        """Images per diffusers call: the setting, or a default by device and memory."""
        from pipeline.pool import default_batch_images

        if self.settings.batch_images:
            return self.settings.batch_images
        return default_batch_images(resolve_device(self.settings.device))

    @property
    def scorer(self) -> ClipScorer | None:
        """The CLIP model that scores outputs (CLIP-I, CLIP-T); None with IPBATCH_SCORE=false."""
        if not self.settings.score:
            return None
        if self._scorer is None:
            from pipeline.scores import ClipScorer

            quiet_model_libraries()
            device = resolve_device(self.settings.device)
            self._scorer = ClipScorer(
                self.settings.score_model or self.models.score_model(),
                device=device,
                dtype=resolve_dtype(self.settings.dtype, device),
            )
        return self._scorer

    def probe(self, decision: Decision) -> bool:
        """After an outage: is the dependency that failed back? A probe that fails with an
        outage again says no; anything else says yes (the next try will tell)."""
        from sqlalchemy import text

        try:
            if decision.dependency == "database":
                with self.engine.connect() as connection:
                    connection.execute(text("SELECT 1"))
            elif decision.dependency == "s3" and decision.resource:
                self.stores.for_uri(decision.resource).exists(decision.resource)
        except Exception as exc:
            return classify(exc).action is not Action.RETRY
        return True

    def close(self) -> None:
        self.engine.dispose()
