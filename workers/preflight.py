"""What a worker checks before it takes work: what its queues need, each failure one line
naming the setting to fix.

- every queue: the ledger (IPBATCH_DATABASE_URL: reachable, the login accepted, the schema at
  this version's head) and the broker (IPBATCH_BROKER_URL: reachable, the login accepted);
- `embed` / `generate`: the embedding cache's store when it is set (IPBATCH_CACHE_URI: the
  bucket exists and may be written), the models (IPBATCH_MODELS: a base model with its image
  encoder), and for `generate` with scoring on, the CLIP scorer (IPBATCH_SCORE_MODEL);
- `train`: SD1.5 and its image encoder, and where adapters are written (IPBATCH_ADAPTERS_URI).

A problem is either an outage (a service that does not answer: the worker waits for it) or
a configuration error (a service that answers no, a folder that is not there: the worker
exits non-zero so that a supervisor sees it). With `IPBATCH_MODELS=hub` the models are not
checked at start (they download on first use).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from core.config import Settings
from core.errors import Action, ConfigError, classify, short
from storage.lifecycle import EMBED, GENERATE, TRAIN


@dataclass(frozen=True)
class Problem:
    setting: str  # the environment variable to look at
    message: str
    outage: bool  # True: a service away (wait for it); False: a configuration error

    def line(self) -> str:
        kind = "unreachable" if self.outage else "configuration error"
        return f"{self.setting}: {kind}: {self.message}"


def check(settings: Settings, queues: Sequence[str]) -> list[Problem]:
    """Every problem found for a worker of `queues` (empty: it can work)."""
    problems = [
        *_attempt("IPBATCH_DATABASE_URL", lambda: _ledger(settings)),
        *_attempt("IPBATCH_BROKER_URL", lambda: _broker(settings)),
    ]
    if EMBED.queue in queues or GENERATE.queue in queues:
        cache = settings.cache_uri
        if cache:
            problems += _attempt("IPBATCH_CACHE_URI", functools.partial(_writable, settings, cache))
        problems += _attempt("IPBATCH_MODELS", lambda: _generation_models(settings))
    if GENERATE.queue in queues and settings.score:
        setting = "IPBATCH_SCORE_MODEL" if settings.score_model else "IPBATCH_MODELS"
        problems += _attempt(setting, lambda: _scorer(settings))
    if TRAIN.queue in queues:
        problems += _attempt("IPBATCH_MODELS", lambda: _training_models(settings))
        location = settings.adapters_location()
        problems += _attempt("IPBATCH_ADAPTERS_URI", lambda: _writable(settings, location))
    return problems


def _attempt(setting: str, probe: Callable[[], str | None]) -> list[Problem]:
    """Run one probe: its message (a configuration error found without an exception), or
    the exception it raised, classified by the one error policy."""
    try:
        message = probe()
    except Exception as exc:
        decision = classify(exc)
        if decision.action is Action.RETRY:
            return [Problem(setting, decision.message, outage=True)]
        text = decision.message if decision.action is Action.CONFIG else short(exc)
        return [Problem(setting, text, outage=False)]
    return [] if message is None else [Problem(setting, message, outage=False)]


def _ledger(settings: Settings) -> str | None:
    from alembic.runtime.migration import MigrationContext
    from alembic.script import ScriptDirectory

    from storage.ledger import db
    from storage.migrate import alembic_config

    url = settings.ledger_url()
    engine = db.make_engine(url, pooled=False)
    try:
        with engine.connect() as connection:
            current = MigrationContext.configure(connection).get_current_revision()
    finally:
        engine.dispose()
    head = ScriptDirectory.from_config(alembic_config(url)).get_current_head()
    if current != head:
        return (
            f"the ledger's schema is at revision {current or 'none'}, this ipbatch needs {head}: "
            "run `ipbatch db upgrade`"
        )
    return None


def _broker(settings: Settings) -> None:
    from kombu import Connection

    with Connection(settings.broker_url.get_secret_value(), connect_timeout=5) as connection:
        connection.ensure_connection(max_retries=1)


def _writable(settings: Settings, uri: str) -> None:
    from storage.objectstore import ObjectStores

    stores = ObjectStores(s3_endpoint_url=settings.s3_endpoint_url, s3_region=settings.s3_region)
    stores.for_uri(uri).probe_writes(uri)


def _generation_models(settings: Settings) -> str | None:
    """At least one base model with its IP-Adapter image encoder (a worker may serve SD1.5
    only, or SDXL only); None if one is there."""
    from pipeline.families import BASE_MODELS
    from pipeline.models import ModelSource
    from pipeline.presets import ADAPTERS

    models = ModelSource.parse(settings.models_spec())
    if models.root is None:
        return None
    found = []
    for family in BASE_MODELS:
        first = next(a for a in ADAPTERS.values() if a.family == family and a.image_encoder)
        try:
            models.base_model(family)
            models.image_encoder(first)
        except ConfigError as exc:
            found.append(str(exc))
            continue
        return None
    return f"no base model can be loaded from {models.root}: {found[0]}"


def _training_models(settings: Settings) -> None:
    """At least one trainable architecture's base model and image encoder (a train worker
    may train SD1.5 only, or SDXL only); the first one's error if none is there."""
    from pipeline.models import ModelSource
    from pipeline.presets import ADAPTERS
    from pipeline.train_schema import TRAINABLE_KINDS

    models = ModelSource.parse(settings.models_spec())
    if models.root is None:
        return
    errors = []
    for kind in TRAINABLE_KINDS:
        try:
            models.base_model(ADAPTERS[kind].family)
            models.image_encoder(ADAPTERS[kind])
        except ConfigError as exc:
            errors.append(exc)
            continue
        return
    raise errors[0]


def _scorer(settings: Settings) -> str | None:
    from pathlib import Path

    from pipeline.models import ModelSource

    if settings.score_model:
        if not (Path(settings.score_model) / "config.json").is_file():
            return f"no CLIP model at {settings.score_model} (its config.json is missing)"
        return None
    models = ModelSource.parse(settings.models_spec())
    if models.root is not None:
        models.score_model()
    return None
