"""Which adapter a manifest's name means: a published preset, or one trained with
`ipbatch train --name NAME` (`custom:NAME`).

A trained adapter is looked for in the models folder (`custom/NAME/`, for adapters shipped
with the models) and then under IPBATCH_ADAPTERS_URI (`NAME/`, where `ipbatch train` writes);
from S3 it is fetched once into `$IPBATCH_HOME/adapters-cache/<weights sha256>/`. Names are
never reused (`ipbatch train` refuses a taken name), so what a name meant once it always
means: a found adapter is kept for the life of the process. Its weights must have the sha256
its card says.
"""

from __future__ import annotations

from pathlib import Path

from core.config import Settings
from core.errors import ModelLoadError
from core.uris import is_s3, join_uri, local_path
from pipeline.custom import CARD_FILE, WEIGHTS_FILE, AdapterCard, custom_preset
from pipeline.models import ModelSource, file_sha256
from pipeline.presets import ADAPTERS, CUSTOM_PREFIX, AdapterPreset, adapter_error, is_custom
from storage.objectstore import ObjectStores


class AdapterCatalog:
    def __init__(self, *, settings: Settings, stores: ObjectStores, models: ModelSource) -> None:
        self.settings = settings
        self.stores = stores
        self.models = models
        self._found: dict[str, AdapterPreset] = {}

    def __call__(self, name: str) -> AdapterPreset:
        """The preset `name` means. KeyError: no adapter has that name (the row's fault); an
        unreachable store raises its outage error (the worker's)."""
        if not is_custom(name):
            if name not in ADAPTERS:
                raise KeyError(adapter_error(name))
            return ADAPTERS[name]
        if name not in self._found:
            short = name.removeprefix(CUSTOM_PREFIX)
            folder = self._locate(short)
            if folder is None:
                raise KeyError(
                    f"no trained adapter {name!r}: nothing at {self.location(short)} "
                    "(train one with `ipbatch train MANIFEST --name "
                    f"{short}`, or check IPBATCH_ADAPTERS_URI)"
                )
            card = AdapterCard.model_validate_json((folder / CARD_FILE).read_bytes())
            _check_weights(folder / WEIGHTS_FILE, card)
            self._found[name] = custom_preset(card, str(folder))
        return self._found[name]

    def location(self, short: str) -> str:
        """Where `ipbatch train --name <short>` writes its adapter."""
        return join_uri(self.settings.adapters_location(), short)

    def _locate(self, short: str) -> Path | None:
        if self.models.root is not None:
            shipped = self.models.root / "custom" / short
            if (shipped / CARD_FILE).is_file():
                return shipped
        uri = self.location(short)
        store = self.stores.for_uri(uri)
        if not store.exists(join_uri(uri, CARD_FILE)):
            return None
        if not is_s3(uri):
            return local_path(uri)
        # a local copy per weights file (content-addressed by the card's sha256): a copy made
        # from other weights is never taken for these
        card = AdapterCard.model_validate_json(store.get(join_uri(uri, CARD_FILE)))
        local = self.settings.resolved_home() / "adapters-cache" / card.weights_sha256
        if not (local / CARD_FILE).is_file():
            local.mkdir(parents=True, exist_ok=True)
            for file in (WEIGHTS_FILE, CARD_FILE):  # the card last: it marks a whole copy
                partial = local / f".{file}.part"
                partial.write_bytes(store.get(join_uri(uri, file)))
                partial.replace(local / file)
        return local


def _check_weights(path: Path, card: AdapterCard) -> None:
    try:
        found = file_sha256(path)
    except FileNotFoundError as exc:
        raise ModelLoadError(f"trained adapter {card.name!r} has no {path}") from exc
    if found != card.weights_sha256:
        raise ModelLoadError(
            f"{path} is not the file its card describes (sha256 {found[:12]}, "
            f"card {card.weights_sha256[:12]}): the adapter folder was changed"
        )
