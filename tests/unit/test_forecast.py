"""`ipbatch status --by HH:MM`: what the fleet makes by then at the running jobs' rate, and
whether their images left are all done by then. The ledger's clock is a ManualClock: the job
started at a time the test gives, and the forecast is asked at another."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from helpers.clock import ManualClock
from helpers.jobs import ingest_job, local_context, write_manifest

from ipbatch.status import forecast, forecast_line, next_time
from workers.stages import embed, generate


def test_the_running_jobs_rate_says_what_is_made_by_then(
    tmp_path: Path, tiny_models: Path, reference_images: dict[str, Path]
) -> None:
    clock = ManualClock(datetime(2026, 12, 6, 22, 0, tzinfo=UTC))
    ctx = local_context(tmp_path / "home", tiny_models, clock=clock, score=False)
    rows = [
        {"id": f"r{i}", "reference": str(reference_images["red"]), "steps": 1, "num_images": 2}
        for i in range(4)
    ]
    _, pending = ingest_job(
        ctx, manifest=write_manifest(tmp_path / "m.jsonl", rows), output=tmp_path
    )
    ready = embed.run(ctx, item_ids=pending).ready
    assert generate.run(ctx, item_ids=ready[:2]).succeeded == 2  # 4 images, 2 rows left
    now = clock.now + timedelta(seconds=100)  # 4 images in 100 s since the job started
    ahead = forecast(ctx.engine, until=now + timedelta(hours=1), now=now)
    ctx.close()
    assert ahead["active_jobs"] == 1
    assert ahead["images_per_second"] == pytest.approx(0.04)
    assert ahead["images_by_then"] == 144  # 0.04 images/s for 3,600 s
    assert ahead["images_left"] == 4  # 2 rows at 2 images per row so far
    assert datetime.fromisoformat(ahead["all_done_at"]) == now + timedelta(seconds=100)
    line = forecast_line(ahead)
    assert "about 144 images at the 1 running jobs' 0.04 images/s; 4 images left" in line
    assert line.endswith("all done by 22:03")


def test_a_forecast_with_nothing_running(tmp_path: Path, tiny_models: Path) -> None:
    ctx = local_context(tmp_path / "home", tiny_models)
    now = datetime(2026, 12, 6, 22, 0, tzinfo=UTC)
    ahead = forecast(ctx.engine, until=now + timedelta(hours=9), now=now)
    ctx.close()
    assert (ahead["active_jobs"], ahead["images_by_then"], ahead["all_done_at"]) == (0, 0, None)
    assert forecast_line(ahead) == "by 07:00 (in 9h00m): no job is running"


def test_by_is_the_next_such_time_of_day() -> None:
    evening = datetime(2026, 12, 6, 22, 30, tzinfo=UTC)
    assert next_time("07:00", evening) == datetime(2026, 12, 7, 7, 0, tzinfo=UTC)
    assert next_time("23:15", evening) == datetime(2026, 12, 6, 23, 15, tzinfo=UTC)
    for bad in ("7", "25:00", "seven"):
        with pytest.raises(ValueError, match="HH:MM"):
            next_time(bad, evening)
