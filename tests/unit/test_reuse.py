"""Reuse of identical generations across jobs, on one machine (SQLite, a local folder, the
tiny models): a second run of a manifest copies every image (bit for bit, scores and seeds
with it) without a single diffusers call; a row that changed, a job with --no-reuse, another
dtype or changed adapter weights generate again; an object that vanished is generated again,
never a failure. The fingerprint itself: every field of a row, changed alone, changes it."""

from __future__ import annotations

import hashlib
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import sqlalchemy as sa
from helpers.jobs import write_manifest

from core.config import Settings
from pipeline.fingerprint import generation_fingerprint
from pipeline.generator import Generator
from pipeline.images import output_pixels
from pipeline.manifest import Row
from pipeline.requests import NOT_CALL_INPUTS
from storage.ledger.jobs import JobOptions
from tests.unit.test_call_inputs import ROW_CHANGES
from workers.runner import local_context, run_local
from workers.stages import reuse

ROWS = [
    {"id": "red", "prompt": "a red shoe", "reference": "refs/red.png", "steps": 2},
    {"id": "blue", "prompt": "a bag", "reference": "refs/blue.png", "steps": 2, "num_images": 2},
    {"id": "green", "reference": "refs/green.png", "steps": 2, "output_format": "webp"},
]


class Calls(list[int]):
    """Every diffusers call this process makes (rows per call), and the seconds each took."""

    seconds: list[float]


@pytest.fixture()
def calls(monkeypatch: pytest.MonkeyPatch) -> Calls:
    """Counted where ipbatch makes them: `Generator.generate_batch` and `generate`."""
    made = Calls()
    made.seconds = []
    batch, solo = Generator.generate_batch, Generator.generate

    def timed(call: Any, rows: int) -> Any:
        made.append(rows)
        started = time.perf_counter()
        try:
            return call()
        finally:
            made.seconds.append(time.perf_counter() - started)

    def generate_batch(self: Generator, requests: list[Any]) -> Any:
        return timed(lambda: batch(self, requests), len(requests))

    def generate(self: Generator, request: Any) -> Any:
        return timed(lambda: solo(self, request), 1)

    monkeypatch.setattr(Generator, "generate_batch", generate_batch)
    monkeypatch.setattr(Generator, "generate", generate)
    return made


def _outputs(settings: Settings, job_id: str) -> dict[tuple[str, int], dict[str, Any]]:
    engine = sa.create_engine(settings.ledger_url())
    with engine.connect() as conn:
        rows = conn.execute(
            sa.text(
                "SELECT i.row_id, o.image_index, o.uri, o.sha256, o.seed, o.clip_i, o.clip_t,"
                " o.fingerprint, o.reused_from, o.id, o.gpu_seconds FROM outputs o JOIN items i"
                " ON i.id = o.item_id WHERE i.job_id = :job"
            ),
            {"job": job_id},
        ).mappings()
        found = {(r["row_id"], r["image_index"]): dict(r) for r in rows}
    engine.dispose()
    return found


def test_a_second_run_copies_every_image_and_makes_no_diffusers_call(
    tmp_path: Path, tiny_models: Path, reference_images: dict[str, Path], calls: Calls
) -> None:
    settings = Settings(home=tmp_path / "home", models=str(tiny_models))
    manifest = write_manifest(tmp_path / "night.jsonl", ROWS)
    run = lambda out, **kw: run_local(  # noqa: E731
        settings, manifest=str(manifest), output=str(tmp_path / out), progress=False, **kw
    )
    first = run("monday")
    assert first.status == "succeeded" and calls == [3]  # the three rows share one call
    made = _outputs(settings, first.job_id)
    assert len(made) == 4
    assert all(o["fingerprint"] and o["reused_from"] is None for o in made.values())
    # what each image cost: the call's seconds shared by its 4 images
    [call] = calls.seconds
    [per_image] = {o["gpu_seconds"] for o in made.values()}
    assert per_image == pytest.approx(call / 4, abs=1e-3)

    # 1. the same rows again (another output): every image copied, no diffusers call
    calls.clear()
    second = run("tuesday")
    assert second.status == "succeeded" and calls == []
    assert (second.images, second.reused, first.images, first.reused) == (4, 4, 4, 0)
    copied = _outputs(settings, second.job_id)
    assert copied.keys() == made.keys()
    for key, out in copied.items():
        before = made[key]
        assert out["reused_from"] == before["id"]
        assert out["uri"] != before["uri"]
        data = Path(out["uri"]).read_bytes()
        assert data == Path(before["uri"]).read_bytes()  # bit for bit
        assert hashlib.sha256(data).hexdigest() == out["sha256"] == before["sha256"]
        for column in ("seed", "clip_i", "clip_t", "fingerprint"):
            assert out[column] == before[column], column
    with local_context(settings) as ctx, ctx.sessions.begin() as session:
        from storage.ledger import queries, results

        cost = queries.images(session, job_id=first.job_id)
        assert cost["images"] == 4 and cost["reused"] == 0
        assert cost["gpu_seconds"] == pytest.approx(call, abs=1e-3)
        assert cost["images_per_gpu_hour"] == pytest.approx(3600 * 4 / call, rel=1e-3)
        assert cost["gpu_seconds_saved"] == 0.0  # nothing copied
        cost = queries.images(session, job_id=second.job_id)  # copies: no GPU time
        assert (cost["images"], cost["reused"], cost["gpu_seconds"]) == (4, 4, 0.0)
        assert cost["gpu_seconds_saved"] == pytest.approx(call, abs=1e-3)  # the sources' cost
        assert results.summary(session, job_id=second.job_id)["reused"] == 4
        lines = {line["id"]: line for line in results.rows(session, job_id=second.job_id)}
    assert all(line["reused"] and line["gpu_seconds"] == 0.0 for line in lines.values())

    # 2. one row changed (its prompt), one object gone: those two rows are generated again
    Path(copied[("green", 0)]["uri"]).unlink()  # the newest copy of green: gone
    changed = [ROWS[0] | {"prompt": "a red boot"}, *ROWS[1:]]
    write_manifest(manifest, changed)
    calls.clear()
    third = run("wednesday")
    assert third.status == "succeeded" and sum(calls) == 2  # rows red and green
    again = _outputs(settings, third.job_id)
    assert {key for key, o in again.items() if o["reused_from"] is None} == {
        ("red", 0),
        ("green", 0),
    }
    a = output_pixels(Path(again[("green", 0)]["uri"]).read_bytes())
    b = output_pixels(Path(made[("green", 0)]["uri"]).read_bytes())
    assert a is not None and b is not None
    # the same picture: its seed again, in another batch (2 images, not 4: the matmuls round
    # differently by batch size, so not bit for bit) and through WebP's lossy coding
    assert np.abs(a - b).mean() < 0.5 and np.abs(a - b).max() <= 12

    # 3. --no-reuse generates everything
    calls.clear()
    fourth = run("thursday", options=JobOptions(reuse=False))
    assert fourth.status == "succeeded" and sum(calls) == 3
    assert all(o["reused_from"] is None for o in _outputs(settings, fourth.job_id).values())


def test_another_dtype_or_changed_adapter_weights_is_another_generation(
    tmp_path: Path, tiny_models: Path
) -> None:
    """What a worker computes for a row: the same again, another under bf16, another when
    the adapter's weight file changed (the digest memo notices a file replaced in place)."""
    models = tmp_path / "models"
    shutil.copytree(tiny_models, models)
    row = Row.model_validate({"id": "r", "reference": "a.png", "num_images": 2})
    inputs = ["cache/clip-a"]
    found = {}
    for name, dtype in (("fp32", "fp32"), ("again", "fp32"), ("bf16", "bf16")):
        with local_context(Settings(home=tmp_path / name, models=str(models), dtype=dtype)) as ctx:
            found[name] = reuse.fingerprints(ctx, row, inputs)
    assert found["fp32"] == found["again"] and len(set(found["fp32"])) == 2  # one per image
    assert found["bf16"][0] != found["fp32"][0]
    with local_context(Settings(home=tmp_path / "w", models=str(models), score=False)) as ctx:
        before = reuse.fingerprints(ctx, row, inputs)
        weights = next(models.rglob("ip-adapter_sd15.safetensors"))
        data = bytearray(weights.read_bytes())
        data[-1] ^= 1  # one bit of the adapter's weights
        weights.write_bytes(bytes(data))
        after = reuse.fingerprints(ctx, row, inputs)
        assert before != after
        assert reuse.fingerprints(ctx, row, ["cache/clip-b"]) != after  # another embedding


@pytest.mark.parametrize("name", sorted(ROW_CHANGES) + sorted(set(NOT_CALL_INPUTS) - {"id"}))
def test_each_row_field_changed_alone_changes_the_fingerprint(name: str) -> None:
    others = {
        "caption": ({"id": "r", "reference": "a.png"}, {"caption": "a shoe"}),
        "output_format": ({"id": "r", "reference": "a.png"}, {"output_format": "jpeg"}),
        "regenerate": ({"id": "r", "reference": "a.png"}, {"regenerate": False}),
    }
    base, change = (ROW_CHANGES | others)[name]
    base = {"seed": 7} | base  # a row without a seed gets one derived from its id
    changed = base | change
    if name == "adapters":  # the list form replaces the single form
        changed = {k: v for k, v in changed.items() if k not in ("reference", "combine", "region")}
    prints = {
        generation_fingerprint(
            weights="w",
            backend={"device": "cpu"},
            row=Row.model_validate({k: v for k, v in data.items() if v is not None}),
            inputs=[],
            scoring=None,
            image_index=0,
        )
        for data in (base, changed, base | {"id": "another-id"})
    }
    assert len(prints) == 2  # the change makes another one; another id (same seed) does not


def test_no_reuse_is_an_option_of_run_and_submit() -> None:
    from ipbatch.cli import build_parser
    from ipbatch.cli.jobs import _options

    parser = build_parser()
    for command in (["run", "m.jsonl"], ["submit", "s3://b/m.jsonl", "--output", "s3://b/o"]):
        default = parser.parse_args(command)
        off = parser.parse_args([*command, "--no-reuse"])
        assert _options(default, webhook_url=None).reuse is True
        assert _options(off, webhook_url=None).reuse is False
