"""What runs for each stage: one table, read by the Celery tasks (`workers.tasks`: one task per
stage, named `ipbatch.<stage>`) and by the one-machine runner (`workers.runner`). Item stages
take `item_ids`, job stages (ingest, train) a `job_id`."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from storage.lifecycle import EMBED, GENERATE, INGEST, TRAIN
from workers.stages import embed, generate, ingest, train

RUNS: dict[str, Callable[..., Any]] = {
    INGEST.name: ingest.run,
    EMBED.name: embed.run,
    GENERATE.name: generate.run,
    TRAIN.name: train.run,
}
