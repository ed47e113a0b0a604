"""Distributed end to end: PostgreSQL + RabbitMQ + an S3 server over HTTP + real `ipbatch
worker` processes, started and stopped here. Nothing is mocked and nothing runs eagerly."""

from __future__ import annotations

import hashlib
import io
import json
import os
import signal
import time
from pathlib import Path

import pytest
import sqlalchemy as sa
from helpers.cli import ipbatch
from helpers.cli import ipbatch_ok as cli
from helpers.cluster import REAPER_EVERY, Cluster, FlakyS3
from helpers.services import restart_postgres, restart_rabbitmq_app

REFS = ("red", "blue", "green")


@pytest.fixture()
def outage_settings(flaky_s3: FlakyS3) -> dict[str, str]:
    return {
        "IPBATCH_S3_ENDPOINT_URL": flaky_s3.endpoint,
        "IPBATCH_LEASE_SECONDS": "6",
        "IPBATCH_GENERATE_BATCH": "4",
        "IPBATCH_EMBED_BATCH": "4",
        "IPBATCH_BATCH_IMAGES": "4",
        # the deployment's reaper, every 2 s: queues again what a broker restart lost
        "IPBATCH_REQUEUE_AFTER": "10",
        REAPER_EVERY: "2",
    }


def test_submit_embed_generate_over_real_services(
    cluster: Cluster, reference_images: dict[str, Path]
) -> None:
    s3, bucket, env = cluster.s3, cluster.bucket, cluster.env
    cluster.upload_references(reference_images)
    rows = [
        {
            "id": f"{colour}-{i}",
            "prompt": f"a {colour} product",
            "steps": 2,
            "reference": f"s3://{bucket}/refs/{colour}.png",
            "num_images": 1 + i % 2,
            "adapter": "sd15-plus" if i == 2 else "sd15",
        }
        for colour in REFS
        for i in range(3)
    ]
    manifest = cluster.put_manifest("jobs/catalog.jsonl", rows)
    output = f"s3://{bucket}/results"

    job_id = cli("submit", manifest, "--output", output, env=env).strip()
    assert cli("submit", manifest, "--output", output, env=env).strip() == job_id  # same bytes

    progress = cluster.wait_for_job(job_id)
    assert progress["status"] == "succeeded", progress
    assert (progress["total"], progress["succeeded"], float(progress["percent_done"])) == (
        9,
        9,
        100.0,
    )
    with cluster.engine.connect() as conn:
        outputs = conn.execute(
            sa.text(
                "SELECT o.uri, o.sha256, i.row_id, o.image_index FROM outputs o "
                "JOIN items i ON i.id = o.item_id WHERE i.job_id = :j"
            ),
            {"j": job_id},
        ).all()
        embeddings = conn.execute(sa.text("SELECT kind, uri FROM embeddings")).all()
        attempts = conn.execute(
            sa.text("SELECT MAX(attempts) FROM items WHERE job_id = :j"), {"j": job_id}
        ).scalar()
    assert len(outputs) == sum(r["num_images"] for r in rows)
    for uri, sha, row_id, k in outputs:
        assert uri == f"{output}/{job_id}/{row_id}/{k}.png"
        key = uri.removeprefix(f"s3://{bucket}/")
        data = s3.get_object(Bucket=bucket, Key=key)["Body"].read()
        assert hashlib.sha256(data).hexdigest() == sha
    # 3 references x base kind, x plus kind and x score model: each encoded once
    assert (
        sorted(k for k, _ in embeddings)
        == ["clip_hidden_states"] * 3 + ["clip_image_embeds"] * 3 + ["clip_score"] * 3
    )
    for _, uri in embeddings:
        assert uri.startswith(f"s3://{bucket}/ipbatch-cache/embeddings/")
        s3.head_object(Bucket=bucket, Key=uri.removeprefix(f"s3://{bucket}/"))
    assert attempts == 1  # claims in the last stage: one generate claim each, no redelivery
    check_metrics_and_logs(cluster, job_id, images=len(outputs))

    # verify: one image deleted and one cut short behind the ledger's back are found, and
    # --repair has the generate workers make them again; the job ends whole
    first, second = (uri.removeprefix(f"s3://{bucket}/") for uri, *_ in outputs[:2])
    size = s3.head_object(Bucket=bucket, Key=second)["ContentLength"]
    s3.delete_object(Bucket=bucket, Key=first)
    s3.put_object(Bucket=bucket, Key=second, Body=b"\x89PNG\r\n\x1a\n")  # an upload cut off
    found = ipbatch("verify", job_id, "--json", env=env)
    assert found.returncode == 1, found.stderr
    assert sorted(p["what"] for p in json.loads(found.stdout)["problems"]) == [
        f"8 bytes where {size:,} were recorded",
        "missing",
    ]
    queued = ipbatch("verify", job_id, "--repair", env=env)
    assert queued.returncode == 1  # the job is not whole until the workers have made them
    assert "repair: 2 items queued for the generate workers" in queued.stdout
    assert "Connection pool is full" not in queued.stderr  # a connection per request in flight
    assert cluster.wait_for_job(job_id)["status"] == "succeeded"
    assert json.loads(cli("verify", job_id, "--deep", "--json", env=env))["problems"] == []
    cluster.assert_one_set_of_outputs(job_id, prefix="results", asked=len(outputs))

    # the producer: a manifest dropped under a watched prefix is submitted once
    manifest2 = cluster.put_manifest(
        "incoming/night-2.jsonl",
        rows[:4]
        + [
            {"id": "outside", "reference": f"s3://{bucket}/elsewhere/x.png", "steps": 2},
            {"id": "missing", "reference": f"s3://{bucket}/refs/missing.png", "steps": 2},
        ],
    )
    calls_before = cluster.scrape("generator")[("ipbatch_batch_seconds_count", ())]
    cli("producer", "--watch", f"s3://{bucket}/incoming/", "--output", output, "--once", env=env)
    cli("producer", "--watch", f"s3://{bucket}/incoming/", "--output", output, "--once", env=env)
    with cluster.engine.connect() as conn:
        jobs = (
            conn.execute(sa.text("SELECT id FROM jobs WHERE manifest_uri = :m"), {"m": manifest2})
            .scalars()
            .all()
        )
    assert len(jobs) == 1
    progress2 = cluster.wait_for_job(jobs[0])
    assert (progress2["status"], progress2["succeeded"], progress2["failed"]) == ("partial", 4, 2)
    with cluster.engine.connect() as conn:
        errors = dict(
            conn.execute(
                sa.text(
                    "SELECT row_id, error_code FROM items WHERE job_id = :j AND status = 'failed'"
                ),
                {"j": jobs[0]},
            ).all()
        )
        n_embeddings = conn.execute(sa.text("SELECT COUNT(*) FROM embeddings")).scalar()
    assert errors == {"outside": "reference_forbidden", "missing": "reference_not_found"}
    assert n_embeddings == 9  # last job's embeddings (and reference scores) reused, none added
    # its 4 rows of the first job were made before: copied, bit for bit, no diffusers call
    generator = cluster.scrape("generator")
    assert generator[("ipbatch_batch_seconds_count", ())] == calls_before
    with cluster.engine.connect() as conn:
        copies = conn.execute(
            sa.text(
                "SELECT o.uri, s.uri, o.sha256, s.sha256 FROM outputs o JOIN items i ON"
                " i.id = o.item_id JOIN outputs s ON s.id = o.reused_from WHERE i.job_id = :j"
            ),
            {"j": jobs[0]},
        ).all()
    assert len(copies) == 5 == generator[("ipbatch_images_reused_total", ())]
    for copy_uri, source_uri, copy_sha, source_sha in copies:
        assert copy_uri.startswith(f"{output}/{jobs[0]}/") and copy_sha == source_sha
        read = [
            s3.get_object(Bucket=bucket, Key=u.removeprefix(f"s3://{bucket}/"))["Body"].read()
            for u in (copy_uri, source_uri)
        ]
        assert read[0] == read[1] and hashlib.sha256(read[0]).hexdigest() == copy_sha
    status = json.loads(cli("status", jobs[0], "--json", env=env))
    assert status["jobs"][0]["failed"] == 2
    assert {f["error_code"] for f in status["failures"]} == {
        "reference_forbidden",
        "reference_not_found",
    }

    # retry: the user uploads the missing reference; `outside` is still forbidden
    s3.upload_file(str(reference_images["blue"]), bucket, "refs/missing.png")
    assert "2 failed items queued again" in cli("retry", jobs[0], env=env)
    progress3 = cluster.wait_for_job(jobs[0])
    assert (progress3["status"], progress3["succeeded"], progress3["failed"]) == ("partial", 5, 1)

    # cancel right after submitting: every item ends cancelled or succeeded, nothing in
    # flight, and the outputs rows are exactly the stored images
    rows3 = [
        {"id": f"c{i}", "prompt": f"p{i}", "reference": f"s3://{bucket}/refs/red.png", "steps": 2}
        for i in range(12)
    ]
    job3 = cli(
        "submit", cluster.put_manifest("jobs/cancel.jsonl", rows3), "--output", output, env=env
    )
    cli("cancel", job3.strip(), env=env)
    deadline = time.monotonic() + 120
    while True:
        with cluster.engine.connect() as conn:
            p = (
                conn.execute(
                    sa.text("SELECT * FROM job_progress WHERE job_id = :j"), {"j": job3.strip()}
                )
                .mappings()
                .one()
            )
        if p["pending"] == p["running"] == 0 or time.monotonic() > deadline:
            break
        time.sleep(1)
    assert p["status"] == "cancelled" and p["pending"] == p["running"] == 0, p
    assert p["succeeded"] + p["cancelled"] == p["total"]
    with cluster.engine.connect() as conn:
        n_outputs = conn.execute(
            sa.text(
                "SELECT COUNT(*) FROM outputs o JOIN items i ON i.id = o.item_id "
                "WHERE i.job_id = :j"
            ),
            {"j": job3.strip()},
        ).scalar()
    listed = s3.list_objects_v2(Bucket=bucket, Prefix=f"results/{job3.strip()}/")
    images = [o for o in listed.get("Contents", []) if not o["Key"].endswith("results.jsonl")]
    assert n_outputs == len(images)


@pytest.mark.parametrize("broker", ["redis"], indirect=True)
def test_redis_broker_also_works(
    broker: str, cluster: Cluster, reference_images: dict[str, Path]
) -> None:
    assert broker.startswith("redis://")
    s3, bucket, env = cluster.s3, cluster.bucket, cluster.env
    s3.upload_file(str(reference_images["red"]), bucket, "refs/red.png")
    rows = [
        {"id": f"r{i}", "reference": f"s3://{bucket}/refs/red.png", "steps": 2} for i in range(3)
    ]
    manifest = cluster.put_manifest("jobs/redis.jsonl", rows)
    job_id = cli("submit", manifest, "--output", f"s3://{bucket}/out", env=env).strip()
    progress = cluster.wait_for_job(job_id)
    assert (progress["status"], progress["succeeded"]) == ("succeeded", 3)


SMALL = {"width": 64, "height": 64}  # FLUX's tiny native size is 256


def test_mixed_presets_over_real_services(cluster: Cluster, tmp_path: Path) -> None:
    """sd15-plus, sd15-faceid (insightface in the embed worker), sdxl, sdxl-faceid, flux
    (FLUX.1, with and without true CFG), sd35 (SD3.5, SigLIP in the embed worker; two rows
    with their own references and scales) and kolors-plus (Kolors, ChatGLM in the generate
    worker) rows in one job."""
    from PIL import Image, ImageDraw

    s3, bucket, env = cluster.s3, cluster.bucket, cluster.env
    face = Image.new("RGB", (320, 320), (20, 20, 30))
    ImageDraw.Draw(face).ellipse((80, 70, 240, 250), fill=(230, 190, 160))
    images = {
        "face": face,
        "wall": Image.new("RGB", (320, 320), (25, 25, 25)),
        "bag": Image.new("RGB", (96, 96), (30, 60, 170)),
    }
    for name, image in images.items():
        image.save(tmp_path / f"{name}.png")
        s3.upload_file(str(tmp_path / f"{name}.png"), bucket, f"refs/{name}.png")
    ref = f"s3://{bucket}/refs"
    rows = [
        {"id": "plus-1", "adapter": "sd15-plus", "reference": f"{ref}/bag.png", "steps": 2},
        {
            "id": "plus-2",
            "adapter": "sd15-plus",
            "reference": f"{ref}/bag.png",
            "steps": 2,
            "num_images": 2,
        },
        {"id": "faceid-1", "adapter": "sd15-faceid", "reference": f"{ref}/face.png", "steps": 2},
        {
            "id": "faceid-2",
            "adapter": "sd15-faceid",
            "reference": f"{ref}/face.png",
            "steps": 2,
            "prompt": "on a beach",
        },
        {"id": "sdxl-1", "adapter": "sdxl", "reference": f"{ref}/bag.png", "steps": 2},
        {
            "id": "sdxl-2",
            "adapter": "sdxl",
            "reference": f"{ref}/bag.png",
            "steps": 2,
            "guidance_scale": 1.0,
        },
        {"id": "no-face", "adapter": "sd15-faceid", "reference": f"{ref}/wall.png", "steps": 2},
        {"id": "xl-face", "adapter": "sdxl-faceid", "reference": f"{ref}/face.png", "steps": 2},
        {"id": "flux-1", "adapter": "flux", "reference": f"{ref}/bag.png", "steps": 2} | SMALL,
        {
            "id": "flux-2",
            "adapter": "flux",
            "reference": f"{ref}/face.png",
            "steps": 2,
            "negative_prompt": "blurry",
            "true_cfg_scale": 2.0,
        }
        | SMALL,
        {"id": "sd35-1", "adapter": "sd35", "reference": f"{ref}/bag.png", "steps": 2},
        {
            "id": "sd35-2",
            "adapter": "sd35",
            "reference": f"{ref}/face.png",
            "scale": 0.4,
            "steps": 2,
            "negative_prompt": "blurry",
        },
        {"id": "kolors-1", "adapter": "kolors-plus", "reference": f"{ref}/bag.png", "steps": 2},
    ]
    manifest = cluster.put_manifest("jobs/mixed.jsonl", rows)
    job_id = cli("submit", manifest, "--output", f"s3://{bucket}/mixed", env=env).strip()
    progress = cluster.wait_for_job(job_id)
    assert (progress["status"], progress["succeeded"], progress["failed"]) == ("partial", 12, 1)
    with cluster.engine.connect() as conn:
        failed = conn.execute(
            sa.text("SELECT row_id, error_code FROM items WHERE job_id = :j AND status = 'failed'"),
            {"j": job_id},
        ).all()
        n_outputs = conn.execute(
            sa.text(
                "SELECT COUNT(*) FROM outputs o JOIN items i ON i.id = o.item_id "
                "WHERE i.job_id = :j"
            ),
            {"j": job_id},
        ).scalar()
        encoders = (
            conn.execute(
                sa.text(
                    "SELECT DISTINCT e.encoder FROM embeddings e "
                    "JOIN item_embeddings ie ON ie.embedding_id = e.id "
                    "JOIN items i ON i.id = ie.item_id WHERE i.job_id = :j"
                ),
                {"j": job_id},
            )
            .scalars()
            .all()
        )
    assert [tuple(r) for r in failed] == [("no-face", "no_face")]
    assert n_outputs == 13
    # the family is part of every cache key: no two families share an embedding
    assert {e.split("/")[0] for e in encoders} == {"sd15", "sdxl", "flux", "sd35", "kolors"}


def test_structure_rows_over_real_services(cluster: Cluster, tmp_path: Path) -> None:
    """ControlNet, regions, img2img and inpainting rows (and a row whose mask is missing) in
    one job: inputs read from S3 by the embed worker, prepared and cached there, read back from
    the cache by the generate worker."""
    import numpy as np
    from PIL import Image, ImageDraw

    s3, bucket, env = cluster.s3, cluster.bucket, cluster.env
    photo = Image.new("RGB", (96, 80), (240, 240, 235))
    ImageDraw.Draw(photo).rectangle((20, 10, 70, 60), fill=(30, 60, 170))
    cut = Image.new("RGBA", (80, 80), (0, 0, 0, 0))
    ImageDraw.Draw(cut).ellipse((15, 15, 65, 65), fill=(200, 30, 30, 255))
    left = Image.new("L", (64, 64), 0)
    ImageDraw.Draw(left).rectangle((0, 0, 31, 63), fill=255)
    for name, image in {"photo": photo, "cut": cut, "left": left}.items():
        image.save(tmp_path / f"{name}.png")
        s3.upload_file(str(tmp_path / f"{name}.png"), bucket, f"refs/{name}.png")
    ref = f"s3://{bucket}/refs"
    canny = {"model": "sd15-canny", "image": f"{ref}/photo.png", "preprocess": "canny"}
    base = {"reference": f"{ref}/photo.png", "steps": 2, "width": 64, "height": 64}
    rows = [
        {"id": "pose-1", **base, "control": [canny], "scale": 0.4},
        {"id": "pose-2", **base, "control": [{**canny, "scale": 0.6, "end": 0.5}], "scale": 0.9},
        {"id": "garment", **base, "region": f"{ref}/left.png"},
        {"id": "background", **base, "init_image": f"{ref}/cut.png", "inpaint_mask": "alpha"},
        {"id": "variation", **base, "init_image": f"{ref}/photo.png", "strength": 0.5},
        {
            "id": "masked",
            **base,
            "init_image": f"{ref}/photo.png",
            "inpaint_mask": f"{ref}/left.png",
            "control": [{"model": "sd15-depth", "image": f"{ref}/photo.png"}],
        },
        {"id": "no-mask", **base, "init_image": f"{ref}/cut.png", "inpaint_mask": f"{ref}/no.png"},
    ]
    manifest = cluster.put_manifest("jobs/structure.jsonl", rows)
    job_id = cli("submit", manifest, "--output", f"s3://{bucket}/structure", env=env).strip()
    progress = cluster.wait_for_job(job_id)
    with cluster.engine.connect() as conn:
        failed = conn.execute(
            sa.text(
                "SELECT row_id, error_code, error_message FROM items "
                "WHERE job_id = :j AND status = 'failed'"
            ),
            {"j": job_id},
        ).all()
        linked = conn.execute(
            sa.text(
                "SELECT i.row_id, l.role, l.source_uri, e.kind, e.uri FROM item_inputs l "
                "JOIN items i ON i.id = l.item_id JOIN embeddings e ON e.id = l.embedding_id "
                "WHERE i.job_id = :j ORDER BY i.row_index, l.role"
            ),
            {"j": job_id},
        ).all()
        outputs = dict(
            conn.execute(
                sa.text(
                    "SELECT i.row_id, o.uri FROM outputs o JOIN items i ON i.id = o.item_id "
                    "WHERE i.job_id = :j"
                ),
                {"j": job_id},
            ).all()
        )
    assert [tuple(r[:2]) for r in failed] == [("no-mask", "reference_not_found")], failed
    assert (progress["status"], progress["succeeded"], progress["failed"]) == ("partial", 6, 1)
    assert [(r[0], r[1], r[2], r[3]) for r in linked] == [
        ("pose-1", "control", f"{ref}/photo.png", "canny-100-200"),
        ("pose-2", "control", f"{ref}/photo.png", "canny-100-200"),
        ("garment", "region", f"{ref}/left.png", "mask"),
        ("background", "init", f"{ref}/cut.png", "rgb"),
        ("background", "mask", f"{ref}/cut.png", "alpha"),
        ("variation", "init", f"{ref}/photo.png", "rgb"),
        ("masked", "control", f"{ref}/photo.png", "rgb"),
        ("masked", "init", f"{ref}/photo.png", "rgb"),
        ("masked", "mask", f"{ref}/left.png", "mask"),
    ]
    assert linked[0][4] == linked[1][4]  # one canny map for both rows, prepared once
    for *_, uri in linked:  # the prepared pixels are in the bucket, under the cache
        key = uri.removeprefix(f"s3://{bucket}/")
        assert "/embeddings/inputs-v2/" in uri and s3.head_object(Bucket=bucket, Key=key)
    assert sorted(outputs) == ["background", "garment", "masked", "pose-1", "pose-2", "variation"]
    body = s3.get_object(Bucket=bucket, Key=outputs["masked"].removeprefix(f"s3://{bucket}/"))
    png = Image.open(io.BytesIO(body["Body"].read()))
    meta = json.loads(png.text["ipbatch"])
    assert meta["control"][0]["model"] == "sd15-depth" and meta["inpaint_mask"] == f"{ref}/left.png"
    assert np.asarray(png).shape == (64, 64, 3)


@pytest.mark.parametrize(
    "cluster_settings",
    [
        {
            "IPBATCH_LEASE_SECONDS": "6",
            "IPBATCH_GENERATE_BATCH": "4",
            "IPBATCH_EMBED_BATCH": "4",
            "IPBATCH_BATCH_IMAGES": "4",
        }
    ],
    indirect=True,
)
def test_kill_9_the_generate_worker_three_times(
    cluster: Cluster, reference_images: dict[str, Path]
) -> None:
    """kill -9 the process generating a batch, three times in one job of 40 items: the job
    completes, every item succeeds once, outputs rows = S3 objects = images asked, and the
    history shows the redeliveries."""
    bucket, env = cluster.bucket, cluster.env
    cluster.upload_references(reference_images)
    rows = [
        {
            "id": f"k{i}",
            "prompt": f"product {i}",
            "reference": f"s3://{bucket}/refs/{REFS[i % 3]}.png",
            "steps": 6,  # batches long enough for a kill to land inside one
            "num_images": 1 + i % 2,
        }
        for i in range(40)
    ]
    asked = sum(r["num_images"] for r in rows)
    output = f"s3://{bucket}/killed"
    job_id = cli(
        "submit", cluster.put_manifest("jobs/kill.jsonl", rows), "--output", output, env=env
    )
    job_id = job_id.strip()
    kills, deadline = [], time.monotonic() + 240
    for threshold in (6, 16, 26):
        p = cluster.wait_until_generating(job_id, succeeded=threshold, deadline=deadline)
        pool = cluster.pool("generator")
        assert pool, "the generate worker has no pool process"
        for pid in pool:
            os.kill(pid, signal.SIGKILL)
        kills.append((p["succeeded"], p["running"]))
    assert len(kills) == 3
    # the disruptions used part of the budget; a slow machine still gets 3 minutes to finish
    progress = cluster.wait_for_job(job_id, timeout=max(180.0, deadline - time.monotonic()))
    assert (progress["status"], progress["succeeded"], progress["total"]) == ("succeeded", 40, 40)
    cluster.assert_one_set_of_outputs(job_id, prefix="killed", asked=asked)
    with cluster.engine.connect() as conn:
        reclaims = conn.execute(
            sa.text(
                "SELECT COUNT(*) FROM item_events e JOIN items i ON i.id = e.item_id "
                "WHERE i.job_id = :j AND e.to_status = 'running' AND e.from_status = 'running'"
            ),
            {"j": job_id},
        ).scalar()
        redelivered = conn.execute(
            sa.text("SELECT COUNT(*) FROM items WHERE job_id = :j AND attempts > 1"),
            {"j": job_id},
        ).scalar()
    # each kill that hit a batch leaves its items to be re-claimed once the lease lapsed
    assert reclaims >= 1 and redelivered >= 1, (kills, reclaims, redelivered)
    print(f"kills at (succeeded, running): {kills}; re-claims {reclaims}; ", end="")
    print(f"items redelivered {redelivered}")


@pytest.mark.disruptive  # restarts the PostgreSQL server and RabbitMQ: alone
@pytest.mark.parametrize("cluster_settings", ["outage_settings"], indirect=True)
def test_postgres_restart_and_s3_outage_mid_job(
    cluster: Cluster, flaky_s3: FlakyS3, reference_images: dict[str, Path]
) -> None:
    """PostgreSQL restarted while items generate, then the S3 server gone for 10 s, then
    RabbitMQ stopped for 5 s: the job completes with every item succeeded once and one set of
    outputs; the workers and the deployment's reaper carry on by themselves. No outage counts
    as a delivery of an item (IPBATCH_MAX_DELIVERIES is for workers that die)."""
    bucket, env = cluster.bucket, cluster.env
    cluster.upload_references(reference_images)
    rows = [
        {
            "id": f"o{i}",
            "prompt": f"product {i}",
            "reference": f"s3://{bucket}/refs/{REFS[i % 3]}.png",
            "steps": 3,
        }
        for i in range(30)
    ]
    job_id = cli(
        "submit",
        cluster.put_manifest("jobs/outage.jsonl", rows),
        "--output",
        f"s3://{bucket}/outage",
        env=env,
    ).strip()
    deadline = time.monotonic() + 240
    events = []

    def s3_retries() -> int:  # items given back because S3 was unreachable
        with cluster.engine.connect() as conn:
            return int(
                conn.execute(
                    sa.text(
                        "SELECT COUNT(*) FROM item_events e JOIN items i ON i.id = e.item_id "
                        "WHERE i.job_id = :j AND e.message LIKE 'retrying: S3 unreachable%'"
                    ),
                    {"j": job_id},
                ).scalar_one()
            )

    disruptions = (
        (4, restart_postgres),
        (12, lambda: flaky_s3.outage(10, until=lambda: s3_retries() > 0)),
        (20, lambda: restart_rabbitmq_app(5)),
    )
    for threshold, disrupt in disruptions:
        p = cluster.wait_until_generating(job_id, succeeded=threshold, deadline=deadline)
        events.append((p["succeeded"], p["running"]))
        disrupt()
    # the disruptions used part of the budget; a slow machine still gets 3 minutes to finish
    progress = cluster.wait_for_job(job_id, timeout=max(180.0, deadline - time.monotonic()))
    assert (progress["status"], progress["succeeded"], progress["total"]) == (
        "succeeded",
        30,
        30,
    ), cluster.not_succeeded(job_id)
    cluster.assert_one_set_of_outputs(job_id, prefix="outage", asked=30)
    with cluster.engine.connect() as conn:
        retried = conn.execute(
            sa.text(
                "SELECT COUNT(*) FROM item_events e JOIN items i ON i.id = e.item_id "
                "WHERE i.job_id = :j "
                "AND (e.message LIKE 'retrying:%' OR e.from_status = e.to_status)"
            ),
            {"j": job_id},
        ).scalar()
        reaped = conn.execute(
            sa.text(
                "SELECT e.message LIKE '%queued again by the reaper', COUNT(*) FROM item_events e"
                " JOIN items i ON i.id = e.item_id WHERE i.job_id = :j"
                " AND e.message LIKE '%by the reaper' GROUP BY 1"
            ),
            {"j": job_id},
        ).all()
    print(
        f"disruptions at (succeeded, running): {events}; items retried or re-claimed: {retried}; "
        f"reaper (message lost?, items): {sorted(reaped)}"
    )
    assert s3_retries() > 0, "the S3 outage went unnoticed: no item was given back"


def check_metrics_and_logs(cluster: Cluster, job_id: str, *, images: int) -> None:
    """The workers' Prometheus metrics count what the ledger says happened; their logs are
    JSON lines carrying job and item ids."""
    embedder = cluster.scrape("embedder")
    generator = cluster.scrape("generator")
    assert embedder[("ipbatch_items_total", (("outcome", "done"), ("stage", "embed")))] == 9
    assert embedder[("ipbatch_embedding_cache_total", (("result", "miss"),))] == 6
    assert embedder[("ipbatch_embedding_cache_total", (("result", "hit"),))] == 3
    assert generator[("ipbatch_items_total", (("outcome", "done"), ("stage", "generate")))] == 9
    assert generator[("ipbatch_images_total", ())] == images
    assert generator[("ipbatch_batch_seconds_count", ())] >= 1
    for queue in ("ingest", "embed", "generate"):
        assert generator[("ipbatch_queue_depth", (("queue", queue),))] >= 0
    entries = []
    for line in cluster.logs["generator"].read_text().splitlines():
        try:
            entries.append(json.loads(line))
        except ValueError:
            continue  # Celery's start-up banner is plain text
    stored = [e for e in entries if e.get("message", "").startswith("stored ")]
    assert stored and all(job_id in e["job_ids"] and e["item_ids"] for e in stored)
    assert sum(len(e["item_ids"]) for e in stored) == 9
