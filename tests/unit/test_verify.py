"""`ipbatch verify`: outputs deleted, cut short or altered behind the ledger's back are found,
and `--repair` makes them again, bitwise. The real `ipbatch` command, SQLite, a local folder."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import sqlalchemy as sa
from helpers.cli import ipbatch

# each row alone in its diffusers call (steps and guidance differ), as it will be when it
# is made again: float rounding depends on a batch's composition, so bitwise needs the same
ROWS = [
    {"id": "one", "prompt": "a red shoe", "reference": "refs/red.png", "steps": 2},
    {
        "id": "two",
        "prompt": "a blue bag",
        "reference": "refs/blue.png",
        "steps": 3,
        "num_images": 2,
    },
    {
        "id": "three",
        "reference": "refs/green.png",
        "steps": 2,
        "guidance_scale": 3.0,
        "output_format": "webp",
    },
]


@pytest.fixture()
def job(
    tmp_path: Path, reference_images: dict[str, Path], tiny_models: Path
) -> tuple[Path, dict[str, str]]:
    (tmp_path / "m.jsonl").write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    env = {
        **os.environ,
        "IPBATCH_HOME": str(tmp_path / "home"),
        "IPBATCH_MODELS": str(tiny_models),
        "IPBATCH_SCORE": "false",
    }
    return tmp_path, env


def outputs(db: Path) -> dict[tuple[str, int], tuple[Path, str, int]]:
    engine = sa.create_engine(f"sqlite:///{db}")
    with engine.connect() as conn:
        rows = conn.execute(
            sa.text(
                "SELECT i.row_id, o.image_index, o.uri, o.sha256, o.size "
                "FROM outputs o JOIN items i ON i.id = o.item_id"
            )
        ).all()
    engine.dispose()
    return {(r, k): (Path(uri), sha, size) for r, k, uri, sha, size in rows}


@pytest.mark.slow
def test_verify_finds_what_changed_behind_the_ledger_and_repair_makes_it_again_bitwise(
    job: tuple[Path, dict[str, str]],
) -> None:
    tmp, env = job
    run = ipbatch("run", "-q", "--verify", "m.jsonl", env=env, cwd=tmp)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "4 outputs checked (size, sha256, decoding): all whole" in run.stdout
    job_id = run.stdout.split()[1].rstrip(":")
    db = tmp / "home" / "ipbatch.db"
    before = outputs(db)
    original = {key: path.read_bytes() for key, (path, _, _) in before.items()}
    for key, (_path, _sha, size) in before.items():
        assert size == len(original[key])

    before[("one", 0)][0].unlink()  # deleted
    cut = before[("two", 1)][0]
    cut.write_bytes(original[("two", 1)][:100])  # an upload cut off
    altered = bytearray(original[("three", 0)])
    altered[len(altered) // 2] ^= 0xFF  # same size, other bytes: only --deep sees it
    before[("three", 0)][0].write_bytes(bytes(altered))

    quick = ipbatch("verify", job_id, env=env, cwd=tmp)
    assert quick.returncode == 1
    assert "4 outputs checked (exists, size): 2 problems" in quick.stdout
    assert f"one: {before[('one', 0)][0]}: missing" in quick.stdout
    assert f"two: {cut}: 100 bytes where {len(original[('two', 1)]):,} were recorded" in (
        quick.stdout
    )
    deep = ipbatch("verify", job_id, "--deep", "--json", env=env, cwd=tmp)
    assert deep.returncode == 1
    found = json.loads(deep.stdout)
    assert {(p["row_id"], p["what"]) for p in found["problems"]} == {
        ("one", "missing"),
        ("two", f"100 bytes where {len(original[('two', 1)]):,} were recorded"),
        ("three", "sha256 differs from the recorded one"),
    }

    repaired = ipbatch("verify", job_id, "--deep", "--repair", env=env, cwd=tmp)
    assert repaired.returncode == 0, repaired.stdout + repaired.stderr
    assert "repair: 3 items made again" in repaired.stdout
    assert "4 outputs checked (size, sha256, decoding): all whole" in repaired.stdout
    after = outputs(db)
    assert {key: (sha, size) for key, (_, sha, size) in after.items()} == {
        key: (sha, size) for key, (_, sha, size) in before.items()
    }
    for key, (path, _, _) in after.items():
        assert path.read_bytes() == original[key], key  # bitwise the images first made
    engine = sa.create_engine(f"sqlite:///{db}")
    with engine.connect() as conn:
        assert conn.execute(sa.text("SELECT status FROM jobs")).scalar() == "succeeded"
        repairs = conn.execute(
            sa.text("SELECT COUNT(*) FROM item_events WHERE message LIKE 'verify --repair%'")
        ).scalar()
    engine.dispose()
    assert repairs == 3


def test_verify_refuses_a_job_it_does_not_know(job: tuple[Path, dict[str, str]]) -> None:
    tmp, env = job
    missing = ipbatch("verify", "no-such-job", env=env, cwd=tmp)
    assert missing.returncode == 2
    assert "no job no-such-job" in missing.stderr
