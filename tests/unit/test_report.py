"""`ipbatch report`: one self-contained HTML page, rendered in a real headless Chromium."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
from helpers.cli import ipbatch
from helpers.services import ensure_services


@pytest.fixture(scope="module")
def chromium() -> str:
    if shutil.which("chromium") is None:
        ensure_services()  # scripts/services.sh installs Debian's chromium when missing
    path = shutil.which("chromium")
    assert path, "chromium is not installed and scripts/services.sh could not install it"
    return path


def headless(chromium: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", *args],
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_report_renders_rows_images_scores_and_errors(
    tmp_path: Path, tiny_models: Path, reference_images: dict[str, Path], chromium: str
) -> None:
    rows = [
        {
            "id": "shoe",
            "prompt": "a red <b>shoe</b> & co",
            "reference": "refs/red.png",
            "steps": 1,
            "num_images": 2,
        },
        {"id": "bag", "reference": "refs/blue.png", "steps": 1},
        {"id": "gone", "reference": "refs/nope.png", "steps": 1},
        {"id": "bad", "reference": "refs/red.png", "steps": 0},
    ]
    (tmp_path / "m.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    env = {**os.environ, "IPBATCH_HOME": str(tmp_path / "home"), "IPBATCH_MODELS": str(tiny_models)}

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return ipbatch(*args, env=env, cwd=tmp_path)

    run = cli("run", "-q", "m.jsonl")
    assert run.returncode == 1, run.stderr
    job_id = run.stdout.split()[1].rstrip(":")
    report = tmp_path / "report.html"
    made = cli("report", job_id, "-o", str(report))
    assert made.returncode == 0, made.stderr
    page = report.read_text()
    # self-contained: every image is embedded, nothing is fetched
    assert "http://" not in page and "https://" not in page and "file://" not in page
    assert len(re.findall(r"<img src='data:image/jpeg;base64,", page)) == 2 + 3  # refs + outputs
    assert page.count("<tr class='row'") == 4
    assert "a red &lt;b&gt;shoe&lt;/b&gt; &amp; co" in page  # manifest text is escaped
    assert "reference_not_found" in page and "invalid_row" in page and "CLIP-I" in page
    assert re.search(r"#1 seed \d+ CLIP-I -?\d\.\d{3} CLIP-T \d\.\d{3}", page)
    assert "insightface" not in page  # no FaceID row: no licence note
    # a real browser loads it: every image decodes, and it looks like something
    dom = headless(chromium, "--dump-dom", report.as_uri())
    assert dom.returncode == 0, dom.stderr[-2000:]
    assert 'data-images-loaded="5"' in dom.stdout and 'data-images-broken="0"' in dom.stdout
    shot = tmp_path / "report.png"
    taken = headless(chromium, "--window-size=1280,900", f"--screenshot={shot}", report.as_uri())
    assert taken.returncode == 0, taken.stderr[-2000:]
    data = shot.read_bytes()
    assert data.startswith(b"\x89PNG") and len(data) > 20_000
    assert cli("report", "no-such-job", "-o", str(tmp_path / "x.html")).returncode == 2


def test_thumbnails_apply_the_limits_every_picture_reader_applies(tmp_path: Path) -> None:
    """The report reads users' pictures too: past the byte or pixel limits (a decompression
    bomb), or not a picture, it shows none instead of decoding it."""
    from PIL import Image

    from ipbatch.report import Thumbnails
    from storage.objectstore import ObjectStores

    picture = tmp_path / "wide.png"
    Image.new("RGB", (300, 200), (200, 30, 30)).save(picture)
    (tmp_path / "text.png").write_text("not a picture")
    stores = ObjectStores()
    generous = Thumbnails(stores, max_pixels=60_000, max_bytes=10**6)
    thumb = generous(str(picture))
    assert thumb is not None and thumb.startswith("data:image/jpeg;base64,")
    assert Thumbnails(stores, max_pixels=59_999, max_bytes=10**6)(str(picture)) is None
    assert Thumbnails(stores, max_pixels=60_000, max_bytes=100)(str(picture)) is None
    assert generous(str(tmp_path / "text.png")) is None
    assert generous(str(tmp_path / "missing.png")) is None


def test_a_job_that_used_faceid_says_insightfaces_licence(
    tmp_path: Path, tiny_models: Path, reference_images: dict[str, Path]
) -> None:
    """The note is in the report of a job with a (valid) FaceID row, and of no other."""
    from helpers.jobs import ingest_job, local_context, write_manifest

    from ipbatch.report import _used_faceid

    face = {"id": "face", "adapter": "sd15-faceid", "reference": "refs/red.png"}
    plain = {"id": "plain", "reference": "refs/red.png"}
    invalid = face | {"id": "invalid", "steps": 0}  # never ran: its params are as written
    ctx = local_context(tmp_path / "home", tiny_models)
    found = {}
    for name, rows in (("face", [plain, face]), ("plain", [plain]), ("invalid", [invalid])):
        manifest = write_manifest(tmp_path / f"{name}.jsonl", rows)
        job_id, _ = ingest_job(ctx, manifest=manifest, output=tmp_path / "out")
        found[name] = _used_faceid(ctx.engine, job_id)
    ctx.close()
    assert found == {"face": True, "plain": False, "invalid": False}
