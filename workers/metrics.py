"""Prometheus metrics of a worker, and JSON logs.

`ipbatch worker --metrics-port 9100` (or IPBATCH_METRICS_PORT) serves /metrics from the
Celery parent process. The stage code runs in the prefork children, so the counters use
prometheus_client's multiprocess mode (PROMETHEUS_MULTIPROC_DIR, set by `ipbatch worker`
before anything imports prometheus_client). Two gauges are read at scrape time instead of
counted: items by status over running jobs (the ledger's counters) and queue depths (the
broker), each through a connection opened and closed for that scrape, so nothing the parent
holds is inherited by a forked child.

In `ipbatch run` and in tests the same counters simply count in-process.
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from typing import Any

from prometheus_client import Counter, Histogram
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

ITEMS = Counter(
    "ipbatch_items_total",
    "Items a stage finished, by stage (embed, generate) and outcome (done, failed, released)",
    ["stage", "outcome"],
)
IMAGES = Counter("ipbatch_images_total", "Images generated, stored and recorded")
REUSED = Counter(
    "ipbatch_images_reused_total",
    "Images copied from an output made before with the same fingerprint, not generated",
)
BATCH_SECONDS = Histogram(
    "ipbatch_batch_seconds",
    "Seconds per generation call (one batch of rows)",
    buckets=(0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 40, 80, 160),
)
CACHE = Counter(
    "ipbatch_embedding_cache_total",
    "Reference embeddings needed, by result: hit (found in the cache) or miss (computed)",
    ["result"],
)
FENCED = Counter(
    "ipbatch_fenced_writes_total",
    "Writes refused because the worker no longer held the item's claim (its lease lapsed and "
    "another worker took over, or the job was cancelled), by stage",
    ["stage"],
)


class LedgerAndQueues(Collector):
    """Gauges read when Prometheus scrapes: items by status, the backlog of each stage, live
    workers taking work per queue and workers stopped by a configuration error (all from the
    ledger), messages waiting per queue (the broker)."""

    def __init__(self, database_url: str, broker_url: str, queues: tuple[str, ...]) -> None:
        self.database_url = database_url
        self.broker_url = broker_url
        self.queues = queues

    def collect(self) -> Iterator[GaugeMetricFamily]:
        from sqlalchemy.orm import Session

        from core.clock import utcnow
        from storage.ledger import db, queries, workers

        engine = db.make_engine(self.database_url, pooled=False)
        try:
            with Session(engine) as session:
                by_status = queries.items_of_running_jobs(session)
                backlog = queries.backlog(session)
                views = workers.listing(session, now=utcnow())  # read once for both gauges
                consumers = workers.consumers(views)
                stopped = workers.stopped_by_configuration(views)
        finally:
            engine.dispose()
        live = GaugeMetricFamily(
            "ipbatch_queue_consumers",
            "Live workers taking work from each queue (from the ledger's heartbeats); alert "
            "on 0 while the stage has a backlog",
            labels=["queue"],
        )
        for queue in self.queues:
            live.add_metric([queue], float(consumers.get(queue, 0)))
        yield live
        yield GaugeMetricFamily(
            "ipbatch_workers_stopped_by_configuration",
            "Workers that exited on a configuration error and have not come back "
            "(`ipbatch workers` says which and why)",
            value=float(len(stopped)),
        )
        items = GaugeMetricFamily(
            "ipbatch_items", "Items of running jobs, by status (from the ledger)", labels=["status"]
        )
        for status, n in by_status.items():
            items.add_metric([status], float(n))
        yield items
        waiting = GaugeMetricFamily(
            "ipbatch_backlog",
            "Items of running jobs waiting for each stage (from the ledger: the real backlog, "
            "whatever the queues hold)",
            labels=["stage"],
        )
        for stage, n in backlog.items():
            waiting.add_metric([stage], float(n))
        yield waiting

        from workers.celery_app import queue_depths

        depth = GaugeMetricFamily(
            "ipbatch_queue_depth", "Messages waiting in each queue (the broker)", labels=["queue"]
        )
        for queue, n in queue_depths(self.broker_url, self.queues).items():
            depth.add_metric([queue], float(n))
        yield depth


def serve(
    port: int,
    *,
    database_url: str,
    broker_url: str,
    queues: tuple[str, ...],
    health: Callable[[str], tuple[int, str] | None] | None = None,
) -> None:
    """Serve /metrics on `port` from this (the Celery parent) process, and `health`'s
    answers (/healthz, /readyz: `workers.lifeline`)."""
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    from prometheus_client import (
        CONTENT_TYPE_LATEST,
        CollectorRegistry,
        generate_latest,
        multiprocess,
    )

    registry = CollectorRegistry()
    multiprocess.MultiProcessCollector(registry)
    registry.register(LedgerAndQueues(database_url, broker_url, queues))

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            path = self.path.split("?", 1)[0]
            answer = health(path) if health is not None else None
            if answer is not None:
                status, body, kind = answer[0], answer[1].encode(), "text/plain; charset=utf-8"
            elif path in ("/", "/metrics"):
                status, body, kind = 200, generate_latest(registry), CONTENT_TYPE_LATEST
            else:
                status, body, kind = 404, b"not found\n", "text/plain; charset=utf-8"
            self.send_response(status)
            self.send_header("Content-Type", kind)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: Any) -> None:  # no line per scrape
            return

    server = ThreadingHTTPServer(("", port), Handler)
    threading.Thread(target=server.serve_forever, name="ipbatch-http", daemon=True).start()


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message, and job_id / item_ids when the
    log call passed them in `extra`."""

    FIELDS = ("job_id", "job_ids", "item_ids", "worker", "key")

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="microseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        for name in self.FIELDS:
            if name in record.__dict__:
                entry[name] = record.__dict__[name]
        if record.exc_info:
            entry["trace"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)
