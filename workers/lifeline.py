"""A worker saying how it is: the start-up check, its heartbeat in the ledger, its exit.

`ipbatch worker` (the Celery parent process) runs `Lifeline.wait_until_able` before it
consumes anything: configuration errors are returned (the command prints them and exits 2),
outages are waited out with backoff (SIGTERM stops the wait at once: nothing is held yet).
Then a thread beats every `BEAT_SECONDS` (`storage.ledger.workers`), and the metrics port
answers /healthz and /readyz from here. A configuration error met later, while running a
message, is written to `stop_file` by the pool process, which then asks the parent to stop;
the parent reads it back and exits 2 too (`workers.tasks`).
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path

from core.clock import utcnow
from core.config import Settings
from core.errors import short
from storage.ledger import workers as ledger_workers
from workers.backpressure import delay
from workers.preflight import Problem, check

log = logging.getLogger("ipbatch.worker")

# what `ipbatch worker` tells its pool processes (they are forked from it)
STOP_FILE = "IPBATCH_WORKER_STOP_FILE"  # where a pool process writes a configuration error
PARENT_PID = "IPBATCH_WORKER_PID"  # the process to ask to stop
WORKER_NAME = "IPBATCH_WORKER_NAME"  # the --hostname, expanded


class Lifeline:
    def __init__(
        self,
        settings: Settings,
        *,
        name: str,
        queues: list[str],
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.settings = settings
        self.name = name
        self.queues = queues
        self.sleep = sleep
        self.pid = os.getpid()
        self.ready = False  # passed the start-up check, beating, not stopping
        self.problems: list[str] = []  # why not ready
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # --- start-up ---------------------------------------------------------------------------

    def wait_until_able(self) -> list[Problem]:
        """Check what the queues need; wait out outages, return configuration errors (an
        empty list: the worker can work)."""
        failures = 0
        while True:
            problems = check(self.settings, self.queues)
            self.problems = [p.line() for p in problems]
            config = [p for p in problems if not p.outage]
            if config or not problems:
                return config
            failures += 1
            pause = delay(failures, cap=self.settings.backoff_max)
            for problem in problems:
                log.warning("waiting, checking again in %.0f s: %s", pause, problem.line())
            self._record(ledger_workers.WAITING, "; ".join(self.problems))
            self.sleep(pause)

    # --- running ----------------------------------------------------------------------------

    def start_beating(self) -> None:
        self.ready, self.problems = True, []
        self._record(ledger_workers.READY, None)
        self._thread = threading.Thread(target=self._beat, name="ipbatch-heartbeat", daemon=True)
        self._thread.start()

    def _beat(self) -> None:
        while not self._stop.wait(ledger_workers.BEAT_SECONDS):
            self._record(ledger_workers.READY, None)

    def stopped(self, problems: list[str]) -> None:
        """The worker is exiting; `problems`: the configuration errors it exits for."""
        self.ready = False
        self._stop.set()
        self.problems = problems
        self._record(ledger_workers.STOPPED, "; ".join(problems) or None)

    def _record(self, state: str, problem: str | None) -> bool:
        """This worker's line in the ledger; False (and the reason kept) if the ledger
        cannot be written (it may be what is away)."""
        from storage.ledger import db

        try:
            engine = db.make_engine(self.settings.ledger_url(), pooled=False)
            try:
                with db.make_sessions(engine).begin() as session:
                    ledger_workers.beat(
                        session,
                        name=self.name,
                        queues=self.queues,
                        pid=self.pid,
                        state=state,
                        problem=problem,
                        now=utcnow(),
                    )
            finally:
                engine.dispose()
        except Exception as exc:
            log.warning("could not record this worker's state in the ledger: %s", short(exc))
            if state == ledger_workers.READY:
                self.ready = False
                self.problems = [f"IPBATCH_DATABASE_URL: heartbeat failed: {short(exc)}"]
            return False
        if state == ledger_workers.READY and not self._stop.is_set():
            self.ready, self.problems = True, []
        return True

    # --- HTTP -------------------------------------------------------------------------------

    def health(self, path: str) -> tuple[int, str] | None:
        """/healthz: the process answers (200); /readyz: it takes work (200) or why not
        (503); None for other paths."""
        if path == "/healthz":
            return 200, "ok\n"
        if path == "/readyz":
            if self.ready:
                return 200, "ready\n"
            return 503, "\n".join(self.problems or ["not ready"]) + "\n"
        return None


def stop_file_problem(path: str | None) -> str | None:
    """The configuration error a pool process left for the parent, if any."""
    if not path:
        return None
    file = Path(path)
    return file.read_text().strip() or None if file.is_file() else None
