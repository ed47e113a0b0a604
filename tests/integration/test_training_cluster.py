"""Training as a queued job over real services: `ipbatch train --submit` from S3 to a worker
on the `train` queue (PostgreSQL, RabbitMQ, moto's S3 server); the worker is killed with
SIGKILL after a checkpoint, the broker redelivers the message to a new worker, which waits
for the dead one's lease to run out and resumes; the adapter equals an uninterrupted run's,
and the generate worker then uses it as `custom:NAME`, fetched from S3."""

from __future__ import annotations

import json
import os
import signal
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from helpers.cluster import Cluster
from PIL import Image
from safetensors.torch import load as load_safetensors

TRAIN = [
    "--steps", "40", "--batch-size", "2", "--resolution", "64", "--learning-rate", "1e-2",
    "--checkpoint-every", "5", "--log-every", "5", "--validation-rows", "0",
]  # fmt: skip


def _training_set(cluster: Cluster, tmp_path: Path) -> str:
    rng = np.random.default_rng(11)
    rows = []
    for i in range(4):
        pixels = np.full((64, 64, 3), rng.integers(0, 255, 3), np.uint8)
        pixels[8:40, 24:56] = rng.integers(0, 255, 3)
        path = tmp_path / f"t{i}.png"
        Image.fromarray(pixels).save(path)
        cluster.s3.upload_file(str(path), cluster.bucket, f"refs/train/t{i}.png")
        rows.append({"id": f"t{i}", "image": f"s3://{cluster.bucket}/refs/train/t{i}.png",
                     "prompt": f"product {i}"})  # fmt: skip
    return cluster.put_manifest("training/set.jsonl", rows)


def _status(cluster: Cluster, job_id: str) -> str:
    return str(cluster.progress(job_id)["status"])


def _wait(cluster: Cluster, job_id: str, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while _status(cluster, job_id) not in ("succeeded", "failed") and time.monotonic() < deadline:
        time.sleep(0.5)
    assert _status(cluster, job_id) == "succeeded", cluster.log_tail()


def test_a_training_job_survives_its_worker_and_its_adapter_is_used_by_name(
    make_cluster: Callable[..., Cluster], tmp_path: Path
) -> None:
    cluster = make_cluster(IPBATCH_LEASE_SECONDS="8")  # a dead worker's claim lapses soon
    cluster.env["IPBATCH_ADAPTERS_URI"] = f"s3://{cluster.bucket}/adapters"
    manifest = _training_set(cluster, tmp_path)
    cluster.start_worker("trainer", "train")
    job_id = cluster.cli("train", manifest, "--name", "shop", *TRAIN, "--submit").strip()

    deadline = time.monotonic() + 240
    while time.monotonic() < deadline:
        if cluster.count("SELECT COUNT(*) FROM training_checkpoints WHERE job_id = :j", j=job_id):
            break
        time.sleep(0.1)
    assert _status(cluster, job_id) == "running", cluster.log_tail()
    trainer = cluster.processes.pop("trainer")
    os.killpg(trainer.pid, signal.SIGKILL)  # the whole worker, mid-run
    trainer.wait()
    killed_at = cluster.count("SELECT step FROM training_runs WHERE job_id = :j", j=job_id)
    assert killed_at < 40

    cluster.start_worker("trainer2", "train")  # RabbitMQ redelivers the unacked message
    _wait(cluster, job_id)
    with cluster.engine.connect() as conn:
        messages = [m for (m,) in conn.exec_driver_sql(
            f"SELECT message FROM job_events WHERE job_id = '{job_id}' ORDER BY id")]  # fmt: skip
    assert any("resumed from its last checkpoint" in m for m in messages), messages

    # the same manifest and settings, never interrupted, under another name
    straight = cluster.cli("train", manifest, "--name", "straight", *TRAIN, "--submit").strip()
    _wait(cluster, straight)

    def adapter(name: str) -> dict[str, torch.Tensor]:
        key = f"adapters/{name}/adapter.safetensors"
        return load_safetensors(
            cluster.s3.get_object(Bucket=cluster.bucket, Key=key)["Body"].read()
        )

    resumed, uninterrupted = adapter("shop"), adapter("straight")
    assert resumed.keys() == uninterrupted.keys()
    assert all(torch.equal(resumed[k], uninterrupted[k]) for k in resumed)
    card = json.loads(
        cluster.s3.get_object(Bucket=cluster.bucket, Key="adapters/shop/card.json")["Body"].read()
    )
    assert card["steps"] == 40 and card["examples"] == 4

    # next night's job: the generate worker fetches custom:shop from S3
    cluster.start_worker("embedder", "ingest,embed")
    cluster.start_worker("generator", "generate")
    reference = f"s3://{cluster.bucket}/refs/train/t1.png"
    rows = [
        {"id": "a", "reference": reference, "adapter": "custom:shop", "steps": 2},
        {"id": "b", "reference": reference, "adapter": "custom:nothing", "steps": 2},
    ]
    gen = cluster.submit("jobs/custom.jsonl", rows, "out")
    done = cluster.wait_for_job(gen)
    assert (done["succeeded"], done["failed"]) == (1, 1), cluster.log_tail()
    with cluster.engine.connect() as conn:
        error = conn.exec_driver_sql(
            f"SELECT error_code, error_message FROM items WHERE job_id = '{gen}' AND row_id = 'b'"
        ).one()
    assert error[0] == "invalid_row" and "custom:nothing" in error[1]
