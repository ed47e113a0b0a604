"""What a worker process loads at start: an ingest-only worker (a CPU machine reading
manifests) must not pay for torch, diffusers or transformers; they load with the first
embed or generate task that needs them."""

from __future__ import annotations

import subprocess
import sys


def test_the_celery_tasks_load_no_model_stack() -> None:
    code = (
        "import sys, workers.tasks, workers.stages.ingest, ipbatch.cli\n"
        "print(sorted(m for m in ('torch', 'diffusers', 'transformers', 'insightface') "
        "if m in sys.modules))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


def test_no_module_is_over_500_lines() -> None:
    """Files split along their seams: a newcomer finds each concern by its file's name. A
    module past 500 lines has outgrown one concern; split it before adding to it."""
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    sizes = {
        str(path.relative_to(root)): len(path.read_text().splitlines())
        for package in ("core", "pipeline", "storage", "workers", "ipbatch")
        for path in (root / package).rglob("*.py")
    }
    assert len(sizes) > 40
    assert {path: n for path, n in sizes.items() if n > 500} == {}
