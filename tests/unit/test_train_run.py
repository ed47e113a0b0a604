"""`ipbatch train` on one machine (the real command, SQLite and a local folder): the run as a
job in the ledger, bad rows skipped and listed, checkpoints kept and pruned, validations,
the adapter used by name in the next manifest, the embed stage's cache shared, and a run
killed with SIGKILL resuming to the same adapter as an uninterrupted one."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers.cli import ipbatch
from PIL import Image
from safetensors.torch import load_file

TRAIN_OPTIONS = ["--batch-size", "2", "--resolution", "64", "--learning-rate", "1e-2"]


def _pictures(folder: Path, n: int) -> list[Path]:
    rng = np.random.default_rng(3)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        pixels = np.zeros((72, 64, 3), np.uint8)
        pixels[:] = rng.integers(0, 255, 3)
        pixels[20:50, 12:40] = rng.integers(0, 255, 3)
        path = folder / f"item-{i}.png"
        Image.fromarray(pixels).save(path)
        paths.append(path)
    return paths


def _manifest(path: Path, pictures: list[Path], *, bad: bool = False) -> Path:
    rows = [
        {"id": f"item-{i}", "image": str(p), "prompt": f"product {i} on white"}
        for i, p in enumerate(pictures)
    ]
    rows[1]["reference"] = str(pictures[0])  # a reference other than the target
    if bad:
        rows += [
            {"id": "no good", "image": str(pictures[0])},  # the id breaks the pattern
            {"id": "gone", "image": str(path.parent / "missing.png"), "prompt": "x"},
            {"id": "extra", "image": str(pictures[0]), "colour": "red"},  # unknown field
        ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _ledger(home: Path) -> sqlite3.Connection:
    return sqlite3.connect(f"file:{home / 'ipbatch.db'}?mode=ro", uri=True, timeout=30)


@pytest.mark.slow
def test_train_then_generate_with_the_adapter_by_name(tiny_models: Path, tmp_path: Path) -> None:
    home = tmp_path / "home"
    env = {"IPBATCH_HOME": str(home), "IPBATCH_MODELS": str(tiny_models)}
    manifest = _manifest(tmp_path / "train.jsonl", _pictures(tmp_path / "pics", 4), bad=True)
    args = [
        "train", str(manifest), "--name", "shop", *TRAIN_OPTIONS, "--steps", "12",
        "--checkpoint-every", "4", "--keep-checkpoints", "1", "--validate-every", "4",
        "--validation-rows", "2", "--validation-steps", "2", "--log-every", "2",
        "--mixed-precision", "fp16",
    ]  # fmt: skip
    result = ipbatch(*args, env=env)
    assert result.returncode == 0, result.stderr
    assert "succeeded at step 12" in result.stdout
    [skipped_line] = [line for line in result.stdout.splitlines() if line.startswith("fp16: ")]
    skipped = int(skipped_line.split()[1])
    assert "rows: 4 trained on, 3 skipped" in result.stdout
    assert "missing.png does not exist" in result.stdout  # each skipped row says why
    assert "(extra): line 7: colour: unknown field" in result.stdout

    folder = home / "adapters" / "shop"
    card = json.loads((folder / "card.json").read_text())
    data = (folder / "adapter.safetensors").read_bytes()
    assert card["weights_sha256"] == hashlib.sha256(data).hexdigest()
    assert card["manifest_sha256"] == hashlib.sha256(manifest.read_bytes()).hexdigest()
    assert (card["kind"], card["examples"], card["steps"], card["dtype"]) == ("sd15", 4, 12, "fp16")
    assert card["trainable_parameters"] == 50_368
    weights = load_file(folder / "adapter.safetensors")
    assert {v.dtype for v in weights.values()} == {torch.float16}
    assert sum(k.startswith("ip_adapter.") for k in weights) == 32  # k and v of 16 layers

    with _ledger(home) as db:
        [(job_id, kind, status)] = db.execute("SELECT id, kind, status FROM jobs").fetchall()
        assert (kind, status) == ("train", "succeeded")
        steps = [s for (s,) in db.execute("SELECT step FROM training_log ORDER BY step")]
        assert steps == [2, 4, 6, 8, 10, 12]
        # the skipped steps (fp16 overflows): per logged point, and in all on the run
        [(total,)] = db.execute("SELECT skipped_steps FROM training_runs").fetchall()
        [(points,)] = db.execute("SELECT SUM(skipped_steps) FROM training_log").fetchall()
        assert total == points == skipped
        checkpoints = db.execute("SELECT step, uri FROM training_checkpoints").fetchall()
        assert [s for s, _ in checkpoints] == [8]  # one kept; step 4's was deleted
        assert Path(checkpoints[0][1]).is_file()
        assert not (folder / "checkpoints" / "step-00000004.safetensors").exists()
        validations = db.execute(
            "SELECT step, clip_i, clip_t, samples FROM training_validations ORDER BY step"
        ).fetchall()
        assert [v[0] for v in validations] == [4, 8, 12]
        for _, clip_i, clip_t, samples in validations:
            assert -1 <= clip_i <= 1 and clip_t is not None
            assert [Path(s).name for s in json.loads(samples)] == ["item-0.png", "item-1.png"]
            assert all(Path(s).is_file() for s in json.loads(samples))
    assert card["scores"]["clip_i"] == validations[-1][1]

    # watched and reported like any job
    status = json.loads(ipbatch("status", job_id, "--json", env=env).stdout)["jobs"][0]
    assert status["training"]["step"] == 12 and status["percent_done"] == 100.0
    report = tmp_path / "report.html"
    assert ipbatch("report", job_id, "-o", str(report), env=env).returncode == 0
    page = report.read_text()
    assert "training loss" in page and "validation" in page and "missing.png" in page

    # the same command again: the same job, nothing retrained
    again = ipbatch(*args, env=env)
    assert again.returncode == 0 and "succeeded at step 12" in again.stdout
    # the name is taken for another manifest
    other = _manifest(tmp_path / "other.jsonl", _pictures(tmp_path / "pics2", 2))
    taken = ipbatch("train", str(other), "--name", "shop", "--steps", "2", env=env)
    assert taken.returncode == 2 and "already trained" in taken.stderr

    # next night's manifest uses it by name; an unknown name fails its row alone
    gen = tmp_path / "gen.jsonl"
    reference = str(tmp_path / "pics" / "item-2.png")
    common = {"reference": reference, "steps": 2, "width": 64, "height": 64}
    # the last validation's sample of item-1 is what a job makes of the row `ipbatch eval`
    # writes for that pair: the image prompt alone at scale 1.0, guidance 7.5, DDIM, the seed
    # from the pair's id (the protocol, written out here)
    eval_row = {
        "id": "item-1-as-eval",
        "adapter": "custom:shop",
        "reference": str(tmp_path / "pics" / "item-0.png"),  # item-1's reference
        "scale": 1.0,
        "prompt": "",
        "seed": int.from_bytes(hashlib.sha256(b"eval:item-1").digest()[:4], "big"),
        "steps": 2,
        "guidance_scale": 7.5,
        "scheduler": "ddim",
        "width": 64,
        "height": 64,
    }
    gen.write_text(
        json.dumps({"id": "ok", "adapter": "custom:shop", **common})
        + "\n"
        + json.dumps({"id": "nope", "adapter": "custom:nope", **common})
        + "\n"
        + json.dumps(eval_row)
        + "\n"
    )
    run = ipbatch("run", str(gen), "--no-score", "-q", env=env)
    assert run.returncode == 1, run.stderr
    assert (
        "failed nope: invalid_row" in run.stdout
        and "no trained adapter 'custom:nope'" in run.stdout
    )
    with _ledger(home) as db:
        params = db.execute("SELECT params FROM items WHERE row_id = 'ok'").fetchone()[0]
        assert json.loads(params)["adapter"] == "custom:shop"
        assert db.execute(
            "SELECT count(*) FROM outputs JOIN items ON items.id = outputs.item_id "
            "WHERE row_id = 'ok'"
        ).fetchone() == (1,)
        [[uri]] = db.execute(
            "SELECT uri FROM outputs JOIN items ON items.id = outputs.item_id "
            "WHERE row_id = 'item-1-as-eval'"
        ).fetchall()
    sample = json.loads(validations[-1][3])[1]
    made = np.asarray(Image.open(uri), dtype=np.int16)
    validated = np.asarray(Image.open(sample), dtype=np.int16)
    # the validation batched its two rows: float32 rounds differently per batch size (at most
    # a level here and there, never another picture)
    assert np.abs(made - validated).max() <= 1 and np.abs(made - validated).mean() < 0.01


@pytest.mark.slow
def test_training_reads_the_embeddings_generation_cached(tiny_models: Path, tmp_path: Path) -> None:
    """The reference embedding is the embed stage's cache entry: generation embedded it, the
    training run finds it (one entry), so both see the very same tensors."""
    home = tmp_path / "home"
    env = {"IPBATCH_HOME": str(home), "IPBATCH_MODELS": str(tiny_models)}
    pictures = _pictures(tmp_path / "pics", 2)
    gen = tmp_path / "gen.jsonl"
    gen.write_text(json.dumps({"id": "g", "reference": str(pictures[0]), "steps": 1}) + "\n")
    assert ipbatch("run", str(gen), "--no-score", "-q", env=env).returncode == 0
    sha = hashlib.sha256(pictures[0].read_bytes()).hexdigest()
    query = "SELECT id, encoder FROM embeddings WHERE content_sha256 = ? AND kind = ?"
    with _ledger(home) as db:
        before = db.execute(query, (sha, "clip_image_embeds")).fetchall()
    assert len(before) == 1
    manifest = _manifest(tmp_path / "train.jsonl", pictures)
    result = ipbatch(
        "train", str(manifest), "--name", "t", *TRAIN_OPTIONS, "--steps", "2",
        "--validation-rows", "0", env=env,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    with _ledger(home) as db:
        assert db.execute(query, (sha, "clip_image_embeds")).fetchall() == before
        kinds = {k for (k,) in db.execute("SELECT DISTINCT kind FROM embeddings")}
    assert {"clip_image_embeds", "latent-v2-64", "text"} <= kinds


def _train_command(manifest: Path, name: str) -> list[str]:
    return [
        sys.executable, "-m", "ipbatch.cli", "train", str(manifest), "--name", name,
        *TRAIN_OPTIONS, "--steps", "60", "--checkpoint-every", "5", "--log-every", "5",
        "--validation-rows", "0", "--no-score",
    ]  # fmt: skip


@pytest.mark.slow
def test_a_killed_run_resumes_to_the_same_adapter(tiny_models: Path, tmp_path: Path) -> None:
    """SIGKILL after a checkpoint; the same command again resumes from it (the ledger says
    which) and ends with the adapter an uninterrupted run makes: bitwise, on the CPU (every
    random draw comes from the run's generator, which the checkpoint holds)."""
    manifest = _manifest(tmp_path / "train.jsonl", _pictures(tmp_path / "pics", 4))
    killed_home, straight_home = tmp_path / "killed", tmp_path / "straight"
    env = {**os.environ, "IPBATCH_MODELS": str(tiny_models)}

    process = subprocess.Popen(
        _train_command(manifest, "a"),
        env={**env, "IPBATCH_HOME": str(killed_home)},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and process.poll() is None:
            if (killed_home / "ipbatch.db").exists():
                with _ledger(killed_home) as db:
                    try:
                        found = db.execute("SELECT count(*) FROM training_checkpoints").fetchone()
                    except sqlite3.OperationalError:  # tables not made yet
                        found = (0,)
                if found[0]:
                    break
            time.sleep(0.02)
        assert process.poll() is None, "the run ended before a checkpoint was seen"
        process.send_signal(signal.SIGKILL)
    finally:
        process.wait(timeout=60)
    with _ledger(killed_home) as db:
        [(killed_at,)] = db.execute("SELECT step FROM training_runs").fetchall()
    assert killed_at < 60

    resumed = subprocess.run(
        _train_command(manifest, "a"),
        env={**env, "IPBATCH_HOME": str(killed_home)},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert resumed.returncode == 0, resumed.stderr
    assert "resumed from the checkpoint of step" in resumed.stdout
    straight = subprocess.run(
        _train_command(manifest, "a"),
        env={**env, "IPBATCH_HOME": str(straight_home)},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert straight.returncode == 0, straight.stderr
    a = load_file(killed_home / "adapters" / "a" / "adapter.safetensors")
    b = load_file(straight_home / "adapters" / "a" / "adapter.safetensors")
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    with _ledger(killed_home) as db:
        events = [m for (m,) in db.execute("SELECT message FROM job_events ORDER BY id")]
    assert any("released: the previous run was interrupted" in m for m in events)
    assert any("resumed from its last checkpoint" in m for m in events)


def test_fine_tuning_starts_from_a_published_adapter(tiny_models: Path, tmp_path: Path) -> None:
    """--init sd15: the run starts from h94's file (after 0 effective steps, lr tiny, the
    export equals it to fp16 rounding); an --init of another architecture is refused before
    anything runs; the training schema is printed."""
    home = tmp_path / "home"
    env = {"IPBATCH_HOME": str(home), "IPBATCH_MODELS": str(tiny_models)}
    manifest = _manifest(tmp_path / "train.jsonl", _pictures(tmp_path / "pics", 2))
    result = ipbatch(
        "train", str(manifest), "--name", "ft", "--init", "sd15", "--batch-size", "1",
        "--resolution", "64", "--steps", "1", "--learning-rate", "1e-12", "--weight-decay", "0",
        "--validation-rows", "0", "--save-dtype", "fp32", env=env,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    published = load_file(tiny_models / "IP-Adapter/models/ip-adapter_sd15.safetensors")
    tuned = load_file(home / "adapters" / "ft" / "adapter.safetensors")
    assert tuned.keys() == published.keys()
    for key, value in published.items():
        torch.testing.assert_close(tuned[key], value.float(), atol=1e-6, rtol=0)
    assert json.loads((home / "adapters/ft/card.json").read_text())["init"] == "sd15"

    wrong = ipbatch("train", str(manifest), "--name", "w", "--init", "sd15-plus", env=env)
    assert wrong.returncode == 2 and "needs a linear one" in wrong.stderr
    missing = ipbatch(
        "train", str(manifest), "--name", "m", "--init", "/no/such.safetensors", env=env
    )
    assert missing.returncode == 2 and "no such file" in missing.stderr
    schema = json.loads(ipbatch("manifest", "schema", "--training", env=env).stdout)
    assert set(schema["properties"]) == {"id", "image", "prompt", "reference"}


def test_a_cancelled_run_stops_at_its_next_heartbeat(tiny_models: Path, tmp_path: Path) -> None:
    home = tmp_path / "home"
    env = {**os.environ, "IPBATCH_HOME": str(home), "IPBATCH_MODELS": str(tiny_models)}
    manifest = _manifest(tmp_path / "train.jsonl", _pictures(tmp_path / "pics", 2))
    command = [
        sys.executable, "-m", "ipbatch.cli", "train", str(manifest), "--name", "c",
        *TRAIN_OPTIONS, "--steps", "100000", "--log-every", "2", "--no-score",
    ]  # fmt: skip
    process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, text=True)
    try:
        job_id = None
        deadline = time.monotonic() + 300
        while job_id is None and time.monotonic() < deadline and process.poll() is None:
            if (home / "ipbatch.db").exists():
                with _ledger(home) as db:
                    try:
                        found = db.execute("SELECT job_id FROM training_log LIMIT 1").fetchone()
                    except sqlite3.OperationalError:
                        found = None
                job_id = found[0] if found else None
            time.sleep(0.1)
        assert job_id is not None, "no step was logged"
        cancel = ipbatch("cancel", job_id, env={"IPBATCH_HOME": str(home)})
        assert cancel.returncode == 0 and "stops at its next heartbeat" in cancel.stdout
        out, _ = process.communicate(timeout=120)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == 1 and "cancelled at step" in out
    with _ledger(home) as db:
        assert db.execute("SELECT status FROM jobs").fetchone() == ("cancelled",)
        [(step,)] = db.execute("SELECT step FROM training_runs").fetchall()
    assert 0 < step < 100000
    assert f"cancelled at step {step}" in out  # it stopped at the heartbeat that saw it
    assert not (home / "adapters" / "c" / "card.json").exists()


@pytest.mark.slow
def test_retry_runs_a_failed_training_job_again(tiny_models: Path, tmp_path: Path) -> None:
    """`ipbatch retry` of a training job (one machine) resumes the run here: a manifest whose
    pictures were all missing fails the job; once they are there, retry trains it."""
    home = tmp_path / "home"
    env = {"IPBATCH_HOME": str(home), "IPBATCH_MODELS": str(tiny_models)}
    pictures = [tmp_path / "later" / f"item-{i}.png" for i in range(2)]
    manifest = _manifest(tmp_path / "train.jsonl", pictures)
    args = ["train", str(manifest), "--name", "r", *TRAIN_OPTIONS, "--steps", "2"]
    failed = ipbatch(*args, "--validation-rows", "0", env=env)
    assert failed.returncode == 1 and "training job" in failed.stdout and "failed" in failed.stdout
    with _ledger(home) as db:
        [(job_id, status)] = db.execute("SELECT id, status FROM jobs").fetchall()
    assert status == "failed"
    _pictures(tmp_path / "later", 2)  # the pictures arrive
    retried = ipbatch("retry", job_id, env=env)
    assert retried.returncode == 0, retried.stdout + retried.stderr
    assert f"training job {job_id}: succeeded at step 2" in retried.stdout
    assert (home / "adapters" / "r" / "card.json").is_file()
