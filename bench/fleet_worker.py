"""`ipbatch worker` for bench/fleet.py: the real worker with a null generator and counters.

    python bench/fleet_worker.py STATS_DIR DELAY_SECONDS worker --queues generate ...

Bench only: nothing in ipbatch's settings can select this. The generator is replaced by one
that sleeps DELAY_SECONDS per image (the GPU's time) and returns a tiny fixed image, so that
everything else, the ledger, the broker, the object store, the cache, runs as in production.
Each pool process counts the SQL statements it sends and the messages it publishes and
receives, and writes them to STATS_DIR/<pid>.json after every task (with FLEET_PROFILE set,
its tasks' cProfile statistics to STATS_DIR/<pid>.prof as well).
"""

from __future__ import annotations

import cProfile
import json
import os
import sys
import time
from collections.abc import Sequence
from typing import Any

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


class NullGenerator:
    """A generator with the shape of `pipeline.generator.Generator` and no model."""

    def __init__(self, delay: float) -> None:
        from PIL import Image

        self.delay = delay
        self.image = Image.new("RGB", (8, 8), (255, 255, 255))

    def generate_batch(self, requests: Sequence[Any]) -> list[Any]:
        time.sleep(self.delay * sum(r.num_images for r in requests))
        return [self._result(r) for r in requests]

    def generate(self, request: Any) -> Any:
        return self.generate_batch([request])[0]

    def _result(self, request: Any) -> Any:
        from pipeline.call_inputs import GenerationResult, image_seeds

        seeds = image_seeds(request.seed, request.num_images)
        return GenerationResult([self.image] * len(seeds), seeds, 8, 8)


def install(stats_dir: str, delay: float) -> None:
    import sqlalchemy
    from celery import signals

    from pipeline.pool import GeneratorPool

    # the worker's pool as it is (device, dtype, adapters resolved: the fingerprints read
    # them), but every adapter set gets the null generator instead of a diffusers pipeline
    null = NullGenerator(delay)
    GeneratorPool.get = lambda self, adapters: null  # type: ignore[assignment,method-assign]

    counts = {"sql": 0, "published": 0, "delivered": 0, "tasks": 0}

    def statement(*_: Any) -> None:
        counts["sql"] += 1

    sqlalchemy.event.listen(sqlalchemy.engine.Engine, "before_cursor_execute", statement)

    @signals.after_task_publish.connect(weak=False)
    def published(**_: Any) -> None:
        counts["published"] += 1

    profile = cProfile.Profile() if os.environ.get("FLEET_PROFILE") else None

    @signals.task_prerun.connect(weak=False)
    def delivered(**_: Any) -> None:
        counts["delivered"] += 1
        if profile is not None:
            profile.enable()

    @signals.task_postrun.connect(weak=False)
    def flush(**_: Any) -> None:
        counts["tasks"] += 1
        if profile is not None:
            profile.disable()
            profile.dump_stats(os.path.join(stats_dir, f"{os.getpid()}.prof"))
        path = os.path.join(stats_dir, f"{os.getpid()}.json")
        with open(path + ".tmp", "w") as f:
            json.dump({**counts, "queues": os.environ.get("FLEET_ROLE", "")}, f)
        os.replace(path + ".tmp", path)


def main() -> None:
    stats_dir, delay = sys.argv[1], float(sys.argv[2])
    install(stats_dir, delay)
    from ipbatch.cli import main as cli

    sys.exit(cli(sys.argv[3:]))


if __name__ == "__main__":
    main()
