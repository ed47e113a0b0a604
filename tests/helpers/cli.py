"""The real `ipbatch` command in a subprocess, and free ports for servers tests start."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path


def ipbatch(
    *args: str, env: dict[str, str] | None = None, cwd: Path | None = None, timeout: float = 300
) -> subprocess.CompletedProcess[str]:
    """`ipbatch ARGS`; `env` is laid over this process's environment."""
    return subprocess.run(
        [sys.executable, "-m", "ipbatch.cli", *args],
        env={**os.environ, **(env or {})},
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def ipbatch_ok(*args: str, env: dict[str, str], timeout: float = 120) -> str:
    """`ipbatch ARGS`, which must succeed; its standard output."""
    result = ipbatch(*args, env=env, timeout=timeout)
    assert result.returncode == 0, f"ipbatch {args} failed:\n{result.stdout}\n{result.stderr}"
    return result.stdout


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])
