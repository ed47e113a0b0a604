"""The producer as a service: what it submits and skips is logged (with the reason), `.json`
manifests are read like `.jsonl`, a manifest uploaded again over its key is a new manifest,
and an outage skips a pass instead of stopping it."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import pytest
from helpers.jobs import local_context

from core.errors import ConfigError, RetryableError
from workers import producer


def _write(path: Path, rows: list[dict[str, Any]]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_the_producer_submits_new_and_replaced_manifests_and_says_what_it_skips(
    tmp_path: Path, tiny_models: Path, caplog: pytest.LogCaptureFixture
) -> None:
    incoming = tmp_path / "incoming"
    incoming.mkdir()
    _write(incoming / "a.jsonl", [{"id": "a", "reference": "r.png"}])
    _write(incoming / "b.json", [{"id": "b", "reference": "r.png"}])
    (incoming / "c.csv").write_text("id,reference\nc,r.png\n")
    (incoming / "notes.txt").write_text("not a manifest")
    ctx = local_context(tmp_path / "home", tiny_models)
    sent: list[str] = []
    seen: dict[str, str] = {}
    scan = {
        "prefix_uri": str(incoming),
        "output_uri": str(tmp_path / "out"),
        "send_ingest": sent.append,
        "seen": seen,
    }
    with caplog.at_level(logging.INFO, logger="workers.producer"):
        first = producer.scan_once(ctx, **scan)
        assert producer.scan_once(ctx, **scan) == []  # nothing new
        _write(
            incoming / "a.jsonl",
            [{"id": "a2", "reference": "r.png"}, {"id": "a3", "reference": "r.png"}],
        )
        replaced = producer.scan_once(ctx, **scan)
    ctx.close()
    assert len(first) == 3 and len(replaced) == 1 and sent == [*first, *replaced]
    assert f"skipped {incoming / 'notes.txt'}: not a manifest (.jsonl, .json, .csv)" in caplog.text
    assert caplog.text.count("skipped") == 1  # said once, not at every pass
    assert f"submitted {incoming / 'b.json'} as job" in caplog.text
    assert f"submitted {incoming / 'a.jsonl'} (uploaded again) as job {replaced[0]}" in caplog.text


def test_an_outage_skips_a_pass_and_a_configuration_error_stops_it(
    tmp_path: Path,
    tiny_models: Path,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    ctx = local_context(tmp_path / "home", tiny_models)
    passes: list[int] = []

    def scan(*_: Any, **__: Any) -> list[str]:
        passes.append(len(passes))
        if len(passes) == 2:
            raise RetryableError("S3 unreachable for s3://in/", dependency="s3")
        return []

    monkeypatch.setattr(producer, "scan_once", scan)
    watch = {"prefix_uri": "s3://in/", "output_uri": "s3://out/", "send_ingest": print}
    with caplog.at_level(logging.WARNING, logger="workers.producer"):
        producer.watch(ctx, interval=60, iterations=3, sleep=lambda _: None, **watch)
    assert passes == [0, 1, 2]  # the second pass failed, the third ran
    assert "producer: pass skipped (S3 unreachable for s3://in/); next in 60 s" in caplog.text

    def refused(*_: Any, **__: Any) -> list[str]:
        raise ConfigError("bucket of s3://in/ does not exist")

    monkeypatch.setattr(producer, "scan_once", refused)
    with pytest.raises(ConfigError):
        producer.watch(ctx, interval=60, iterations=3, sleep=lambda _: None, **watch)
    ctx.close()
