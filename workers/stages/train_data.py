"""Train, steps 2 and 3: a training manifest's rows and their precomputed tensors.

Every picture goes through the embed stage's caching step (`cache_image`): the reference's
image embedding is the very cache entry generation reads, so an adapter is trained on exactly
the tensors it will be fed; the target's VAE latent and the prompt's text embedding are cached
content-addressed the same way. Rows that fail validation, or whose pictures cannot be read,
are skipped and listed with the reason.
"""

from __future__ import annotations

import functools
import hashlib
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from core.errors import ItemError, ObjectNotFound
from pipeline.manifest_reader import NotAManifest, ParsedRow, detect_format, read_rows
from pipeline.models import resolve_device
from pipeline.presets import ADAPTERS
from pipeline.train_schema import TrainRow, TrainSettings
from storage.embcache import CacheKey
from workers.context import StageContext
from workers.stages.common import CachedImage, cache_image, decode
from workers.stages.embed import embed_image, reference_key

if TYPE_CHECKING:
    import torch

    from pipeline.training import Example, TrainingEncoders


@dataclass(frozen=True)
class TrainRun:
    """A claimed training job: what the run works from, and its claim's fencing token."""

    job_id: str
    name: str
    token: str
    manifest_uri: str
    manifest_sha256: str
    output_uri: str
    settings: TrainSettings


@dataclass
class Encoders:
    text: TrainingEncoders
    reference: Any  # ReferenceEncoder of the trained kind
    family: str


def load_encoders(ctx: StageContext, kind: str) -> Encoders:
    from pipeline.training import TrainingEncoders
    from workers.context import quiet_model_libraries

    quiet_model_libraries()
    family = ADAPTERS[kind].family
    text = TrainingEncoders(
        ctx.models.base_model(family),
        device=resolve_device(ctx.settings.device),
        local_files_only=ctx.models.local_files_only,
    )
    return Encoders(text, ctx.encoder(kind), family)


def read_training_rows(ctx: StageContext, uri: str) -> list[ParsedRow[TrainRow]]:
    """Every row of a training manifest; a file that is not one fails the run, said once."""
    from workers.claims import JobInputError

    with ctx.stores.for_uri(uri).open(uri) as stream:
        try:
            return list(read_rows(stream, detect_format(uri), TrainRow.model_validate))
        except NotAManifest as exc:
            raise JobInputError(f"{uri}: {exc}") from exc


@dataclass
class Data:
    """The valid rows, their tensors and their references as (sha256, URI); the skipped rows
    with the reason."""

    rows: list[TrainRow] = field(default_factory=list)
    examples: list[Example] = field(default_factory=list)
    references: list[tuple[str, str]] = field(default_factory=list)
    skipped: list[dict[str, Any]] = field(default_factory=list)


def read_examples(ctx: StageContext, run: TrainRun, encoders: Encoders, resolution: int) -> Data:
    from pipeline.training import Example

    data = Data()
    skipped = data.skipped
    seen: dict[str, str] = {}  # every picture's hash, read once for the whole manifest
    for parsed in read_training_rows(ctx, run.manifest_uri):
        if parsed.row is None:
            skipped.append({"line": parsed.line_number, "id": parsed.row_id, "error": parsed.error})
            continue
        row = parsed.row
        # the embed stage's caching step: the reference's entry is the one generation reads
        through = functools.partial(
            _tensors,
            ctx,
            manifest_uri=run.manifest_uri,
            cache_root=ctx.cache_root(run.output_uri),
            seen=seen,
            keep={},  # this row's pictures' bytes: the target is often the reference too
        )
        try:
            reference, image = through(
                row.reference_uri,
                key_of=functools.partial(reference_key, encoders.reference),
                make=functools.partial(embed_image, ctx, encoders.reference),
            )
            _, latent = through(
                row.image,
                key_of=lambda sha: CacheKey(
                    sha,
                    encoders.text.vae_fingerprint,
                    f"latent-{encoders.text.latent_version}-{resolution}",
                ),
                make=lambda data, uri: encoders.text.latent(
                    decode(ctx, data, name=uri), resolution
                ),
            )
        except ItemError as exc:
            skipped.append({"line": parsed.line_number, "id": row.id, "error": str(exc)})
            continue
        text, _ = ctx.cache.fetch(
            key=CacheKey(
                hashlib.sha256(row.prompt.encode()).hexdigest(),
                encoders.text.text_fingerprint,
                "text",
            ),
            cache_root=ctx.cache_root(run.output_uri),
            compute=functools.partial(_text, encoders.text, row.prompt),
        )
        data.rows.append(row)
        data.examples.append(
            Example(
                latent["mean"],
                latent["std"],
                text["text"],
                image["pos"],
                image["neg"],
                pooled=text.get("pooled"),
                time_ids=latent.get("time_ids"),
            )
        )
        data.references.append((reference.sha256, reference.uri))
    return data


def _text(encoders: TrainingEncoders, prompt: str) -> dict[str, torch.Tensor]:
    return encoders.text(prompt)


def _tensors(
    ctx: StageContext, written: str, **how: Any
) -> tuple[CachedImage, dict[str, torch.Tensor]]:
    """A picture's tensors through the cache (`cache_image`), loaded; an entry that vanished
    (or was found broken and removed) since is made again."""
    for _ in range(3):
        found = cache_image(ctx, written, **how)
        try:
            return found, ctx.cache.load(found.cached.uri)
        except ObjectNotFound:
            continue
    raise ObjectNotFound(f"the cached tensors of {written} keep vanishing")
