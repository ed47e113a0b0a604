"""One-machine mode end to end: the real `ipbatch` command, SQLite, a local folder."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pytest
import sqlalchemy as sa
from helpers.cli import ipbatch
from helpers.jobs import ingest_job, local_context
from PIL import Image

ROWS = [
    {"id": "red-1", "prompt": "a red shoe", "reference": "refs/red.png", "steps": 2},
    {
        "id": "red-2",
        "prompt": "red again",
        "reference": "refs/red.png",
        "steps": 2,
        "num_images": 3,
        "seed": 40,
        "clip_skip": 1,  # rows with and without it: separate calls, same run
    },
    {
        "id": "blue-1",
        "prompt": "a blue bag",
        "reference": "refs/blue.png",
        "steps": 2,
        "output_format": "webp",
    },
    {"id": "blue-2", "reference": "refs/blue.png", "steps": 2, "guidance_scale": 1.0},
    {
        "id": "green-1",
        "prompt": "a lamp",
        "reference": "refs/green.png",
        "steps": 2,
        "output_format": "jpeg",
        "num_images": 2,
    },
    {"id": "green-2", "prompt": "lamp", "reference": "refs/green.png", "steps": 2, "scale": 1.0},
    {"id": "mixed", "prompt": "both", "reference": ["refs/red.png", "refs/green.png"], "steps": 2},
    {"id": "broken", "reference": "refs/red.png", "steps": 2, "num_images": 99},
]
IMAGES_ASKED = 1 + 3 + 1 + 1 + 2 + 1 + 1


@pytest.fixture()
def job_dir(
    tmp_path: Path, reference_images: dict[str, Path], tiny_models: Path
) -> tuple[Path, dict[str, str]]:
    manifest = tmp_path / "catalog.jsonl"
    manifest.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    env = {**os.environ, "IPBATCH_HOME": str(tmp_path / "home"), "IPBATCH_MODELS": str(tiny_models)}
    return tmp_path, env


def query(db: Path, sql: str) -> list[tuple]:
    engine = sa.create_engine(f"sqlite:///{db}")
    with engine.connect() as conn:
        rows = [tuple(r) for r in conn.execute(sa.text(sql))]
    engine.dispose()
    return rows


def test_run_end_to_end_then_rerun_redoes_nothing(job_dir: tuple[Path, dict[str, str]]) -> None:
    tmp, env = job_dir
    first = ipbatch("run", "-q", "catalog.jsonl", env=env, cwd=tmp)
    assert first.returncode == 1, first.stderr  # one row failed
    assert "failed broken: invalid_row: line 8: num_images" in first.stdout
    db = tmp / "home" / "ipbatch.db"
    assert query(db, "SELECT status, COUNT(*) FROM items GROUP BY status ORDER BY status") == [
        ("failed", 1),
        ("succeeded", 7),
    ]
    assert query(db, "SELECT row_id, error_code FROM items WHERE status = 'failed'") == [
        ("broken", "invalid_row")
    ]
    # 3 distinct references: each embedded once for the adapter, once for the scores
    assert query(db, "SELECT kind, COUNT(*) FROM embeddings GROUP BY kind ORDER BY kind") == [
        ("clip_image_embeds", 3),
        ("clip_score", 3),
    ]
    outputs = query(
        db,
        "SELECT o.uri, o.sha256, o.seed, i.row_id, o.image_index "
        "FROM outputs o JOIN items i ON i.id = o.item_id",
    )
    assert len(outputs) == IMAGES_ASKED
    for uri, sha, _seed, row_id, k in outputs:
        path = Path(uri)
        assert path.parent.name == row_id and path.stem == str(k)
        assert hashlib.sha256(path.read_bytes()).hexdigest() == sha
    files = sorted(p for p in (tmp / "home" / "outputs").rglob("*") if p.is_file())
    [results] = [p for p in files if p.name == "results.jsonl"]  # the job's, beside its images
    files.remove(results)
    assert len(files) == IMAGES_ASKED
    assert {p.suffix for p in files} == {".png", ".webp", ".jpeg"}
    assert sorted(s for _, _, s, r, _ in outputs if r == "red-2") == [40, 41, 42]
    # each PNG records its row's call inputs (the declared ones)
    meta = {
        row_id: json.loads(Image.open(uri).text["ipbatch"])
        for uri, _, _, row_id, k in outputs
        if k == 0 and uri.endswith(".png")
    }
    assert meta["red-2"]["clip_skip"] == 1 and "clip_skip" not in meta["red-1"]
    assert (meta["red-2"]["steps"], meta["red-2"]["seed"]) == (2, 40)
    [(status, pct)] = query(db, "SELECT status, percent_done FROM job_progress")
    assert (status, float(pct)) == ("partial", 100.0)

    mtimes = {p: p.stat().st_mtime_ns for p in files}
    events = query(db, "SELECT COUNT(*) FROM item_events")
    second = ipbatch("run", "-q", "catalog.jsonl", env=env, cwd=tmp)
    assert second.returncode == 1
    assert "images this run: 0" in second.stdout
    assert query(db, "SELECT COUNT(*) FROM jobs") == [(1,)]
    assert query(db, "SELECT COUNT(*) FROM item_events") == events
    assert {p: p.stat().st_mtime_ns for p in files} == mtimes


def test_interrupted_run_resumes_without_redoing(job_dir: tuple[Path, dict[str, str]]) -> None:
    """A run killed mid-generation (items left `running`, the job's ingest claim held) is
    finished by the next run."""
    from storage.ledger import items, jobs
    from storage.lifecycle import GENERATE
    from workers.stages import embed, generate

    tmp, env = job_dir
    ctx = local_context(tmp / "home", Path(env["IPBATCH_MODELS"]))
    job_id, pending = ingest_job(
        ctx, manifest=tmp / "catalog.jsonl", output=tmp / "home" / "outputs"
    )
    embed.run(ctx, item_ids=pending[:4])  # the rest stay pending
    done = generate.run(ctx, item_ids=pending[:2])
    assert done.succeeded == 2
    with ctx.sessions.begin() as s:  # a "killed" worker held this one
        items.claim(
            s,
            item_ids=pending[2:3],
            stage=GENERATE,
            worker="killed",
            lease_seconds=3600,
            now=ctx.clock(),
        )
        assert jobs.get(s, job_id=job_id).total_rows == len(ROWS)  # type: ignore[union-attr]
    ctx.close()
    db = tmp / "home" / "ipbatch.db"
    before = query(db, "SELECT item_id, uri, created_at FROM outputs ORDER BY id")

    result = ipbatch("run", "-q", "catalog.jsonl", env=env, cwd=tmp)
    assert result.returncode == 1, result.stderr
    assert query(db, "SELECT status, COUNT(*) FROM items GROUP BY status ORDER BY status") == [
        ("failed", 1),
        ("succeeded", 7),
    ]
    after = query(db, "SELECT item_id, uri, created_at FROM outputs ORDER BY id")
    assert after[: len(before)] == before  # finished items were not redone
    assert len(after) == IMAGES_ASKED
    released = query(db, "SELECT COUNT(*) FROM item_events WHERE message LIKE 'released:%'")
    assert released == [(1,)]


def test_run_with_missing_models_is_a_config_error(tmp_path: Path) -> None:
    (tmp_path / "m.jsonl").write_text('{"id": "a", "reference": "x.png"}\n')
    env = {
        **os.environ,
        "IPBATCH_HOME": str(tmp_path / "home"),
        "IPBATCH_MODELS": str(tmp_path / "nowhere"),
    }
    result = ipbatch("run", "-q", "m.jsonl", env=env, cwd=tmp_path)
    assert result.returncode == 2
    assert "ipbatch models tiny" in result.stderr
