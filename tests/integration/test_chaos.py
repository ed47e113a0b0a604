"""A chaos run, small enough for `make test` (bench/chaos.py runs a large one): two jobs go
through three real workers and the reaper while workers are killed and paused, database
connections cut and the S3 server restarted, at seeded moments. See helpers/chaos.py."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import pytest
from helpers import chaos
from helpers.cluster import Cluster, FlakyS3

SEED = int(os.environ.get("IPBATCH_CHAOS_SEED", "20261203"))


@pytest.mark.timeout(900)
def test_chaos_loses_nothing_and_makes_nothing_twice(
    make_cluster: Callable[..., Cluster],
    flaky_s3: FlakyS3,
    reference_images: dict[str, Path],
) -> None:
    plan = chaos.Plan(seed=SEED)
    cluster = make_cluster(**chaos.settings(plan, flaky_s3))
    database_url = cluster.env["IPBATCH_DATABASE_URL"]
    report = chaos.run(cluster, flaky_s3, plan, reference_images, database_url)
    print(report.summary())
    for when, fault, target in report.faults:
        print(f"  {when:6.1f} s  {fault:13} {target}")
    happened = {fault for _, fault, _ in report.faults}
    assert happened == set(chaos.FAULTS), f"the jobs ended before every fault: {happened}"
    assert report.cut_uploads, "no upload was cut off: the first fault found no item waiting"
