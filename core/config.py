"""Settings: one object, read from `IPBATCH_*` environment variables (pydantic-settings).

Secrets (the database and broker URLs may carry passwords) are SecretStr so they never show
in a repr or a log line; `redact_url` is what logs and the CLI print instead.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal
from urllib.parse import urlsplit, urlunsplit

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="IPBATCH_", extra="ignore")

    home: Path = Field(
        Path(".ipbatch"),
        description="One-machine mode keeps its SQLite ledger, outputs and cache here.",
    )
    database_url: SecretStr | None = Field(
        None,
        description="SQLAlchemy URL of the ledger, e.g. postgresql+psycopg://user@host/db. "
        "Unset: SQLite at $IPBATCH_HOME/ipbatch.db.",
    )
    broker_url: SecretStr = Field(
        SecretStr("amqp://guest:guest@127.0.0.1:5672//"),
        description="Celery broker. RabbitMQ redelivers a dead worker's task at once; "
        "redis://... also works.",
    )
    s3_endpoint_url: str | None = Field(
        None, description="S3 endpoint (MinIO, moto, any S3). Unset: AWS."
    )
    s3_region: str = Field("us-east-1", description="S3 region name.")
    models: str = Field(
        "",
        description="A models folder laid out like the public repositories (see "
        "`ipbatch models tiny`), or the preset `hub` to use the public repositories. "
        "Unset: $IPBATCH_HOME/models (written by `ipbatch models tiny`).",
    )
    adapters_uri: str | None = Field(
        None,
        description="Where `ipbatch train --name NAME` writes adapters and generation reads "
        "`custom:NAME` from: <uri>/NAME/adapter.safetensors + card.json (s3://bucket/prefix "
        "or a folder). Unset: $IPBATCH_HOME/adapters. A models folder's custom/NAME/ is "
        "looked at first.",
    )
    cache_uri: str | None = Field(
        None,
        description="Where embeddings are cached (s3://bucket/prefix or a folder). Unset: "
        "$IPBATCH_HOME/cache locally, s3://<output bucket>/ipbatch-cache for S3 outputs.",
    )
    allowed_sources: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="URI prefixes a manifest may read references from (s3://bucket/prefix, "
        "/abs/folder), comma-separated. Empty: any S3 object the credentials reach; "
        "local paths only in one-machine mode.",
    )
    device: str = Field("auto", description="torch device: auto, cpu, cuda, cuda:1 ...")
    dtype: str = Field("auto", description="auto (fp16 on CUDA, fp32 on CPU), fp32, fp16, bf16.")
    max_image_pixels: int = Field(
        40_000_000, description="References above this many pixels fail reference_too_large."
    )
    max_reference_bytes: int = Field(
        50 * 1024 * 1024, description="References above this size fail reference_too_large."
    )
    warm_pipelines: int = Field(
        2, ge=1, description="Pipelines (adapter sets) a generate worker keeps loaded."
    )
    ingest_chunk: int = Field(
        2000, ge=1, description="Rows per ledger insert (the ingest's one transaction per chunk)."
    )
    embed_batch: int = Field(
        64,
        ge=1,
        description="Items per embed message (a message's items are claimed and moved on in "
        "one transaction; fewer, bigger messages are cheaper to publish).",
    )
    generate_batch: int = Field(
        16, ge=1, description="Items per generate message (one stage call batches within it)."
    )
    batch_images: int = Field(
        0, ge=0, description="Images per diffusers call; 0: by device (16 on CPU, 8-16 on CUDA)."
    )
    lease_seconds: int = Field(
        300,
        ge=5,
        description="How long a worker's claim on its items lasts without a heartbeat; the "
        "heartbeat renews it every third of that. A killed worker's items are taken over "
        "once it runs out.",
    )
    requeue_after: float = Field(
        600,
        ge=1,
        description="The reaper queues again items that have waited this long without moving "
        "while their stage's queue is empty (their message was lost).",
    )
    reaper_every: float = Field(
        60,
        gt=0,
        description="`ipbatch reaper`: seconds between passes. A dead worker's items come back "
        "within IPBATCH_LEASE_SECONDS + this (a redelivered message usually takes them sooner).",
    )
    outage_patience: float = Field(
        600,
        gt=0,
        description="While S3, the database or the broker is away, a worker holds its one "
        "message and takes no other work, trying again with backoff; after this many seconds "
        "it gives the message back to the front of the queue.",
    )
    backoff_max: float = Field(
        60, gt=0, description="The longest wait between two tries while a dependency is away."
    )
    max_deliveries: int = Field(
        5,
        ge=1,
        description="An item claimed more than this many times in one stage (its worker died "
        "each time) fails as `internal` instead of being delivered again.",
    )
    score: bool = Field(
        True, description="Score every output: CLIP-I and CLIP-T in outputs.clip_i / clip_t."
    )
    score_model: str | None = Field(
        None,
        description="Folder of the CLIP model (both towers) that scores; default: "
        "clip-vit-large-patch14 in the models folder, as the IP-Adapter paper used.",
    )
    score_threshold: float | None = Field(
        None,
        description="If set, an image whose CLIP-I is below it is generated again with the "
        "next seed, up to score_tries attempts in all; the best one is kept, every attempt "
        "recorded in output_attempts.",
    )
    score_tries: int = Field(3, ge=1, le=10, description="Attempts per image with a threshold.")
    webhook_url: SecretStr | None = Field(
        None,
        description="When a job ends, POST its summary (JSON) here; `submit --webhook` gives "
        "a job its own. Read when the job is submitted; retried with backoff by the reaper.",
    )
    metrics_port: int | None = Field(
        None, description="`ipbatch worker`: serve Prometheus metrics on this port."
    )
    log_format: Literal["text", "json"] = Field(
        "text", description="Worker logs: text, or one JSON object per line (job and item ids)."
    )
    channels_last: bool = Field(
        True, description="CUDA: keep the UNet in channels_last memory format (faster convs)."
    )
    compile: bool = Field(
        False,
        description="torch.compile the UNet. The first call of each batch size compiles "
        "(minutes); batches are padded to fixed sizes (1, 2, 4, ... batch_images) so that "
        "a job compiles a handful of times, once per size and resolution.",
    )
    vae_slicing_above: int | None = Field(
        None,
        ge=0,
        description="Decode one image at a time when a call makes more images than this "
        "(bounds the VAE's memory peak on big batches); 0: never; unset: 8 on CUDA, "
        "never on CPU.",
    )

    @field_validator("allowed_sources", mode="before")
    @classmethod
    def _split_csv(cls, value: object) -> object:
        if isinstance(value, str):
            return [part.strip() for part in value.split(",") if part.strip()]
        return value

    def resolved_home(self) -> Path:
        return self.home.expanduser().resolve()

    def ledger_url(self) -> str:
        if self.database_url is not None:
            return self.database_url.get_secret_value()
        return f"sqlite:///{self.resolved_home() / 'ipbatch.db'}"

    def adapters_location(self) -> str:
        return self.adapters_uri or str(self.resolved_home() / "adapters")

    def models_spec(self) -> str:
        return self.models or str(self.resolved_home() / "models")


def redact_url(url: str) -> str:
    """`postgresql://user:secret@host/db` -> `postgresql://user:***@host/db`."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.replace(f":{parts.password}@", ":***@", 1)
    return urlunsplit(parts._replace(netloc=netloc))
