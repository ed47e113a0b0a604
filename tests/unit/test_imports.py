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
