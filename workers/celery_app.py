"""The Celery app: JSON only, late acks, one message at a time, three queues.

Tasks carry ids only; the ledger says what they mean. RabbitMQ (the default) redelivers a
dead worker's message as soon as its channel closes; with Redis, the transport options below
shorten the redelivery scan (facts: the default waits an hour).
"""

from __future__ import annotations

from collections.abc import Iterable

from celery import Celery
from kombu import Connection, Queue

from core.config import Settings

QUEUES = ("ingest", "embed", "generate")


def make_app(settings: Settings | None = None) -> Celery:
    settings = settings or Settings()
    broker = settings.broker_url.get_secret_value()
    app = Celery("ipbatch", broker=broker, include=["workers.tasks"])
    app.conf.update(
        task_serializer="json",
        result_serializer="json",
        accept_content=["json"],  # never pickle
        event_serializer="json",
        task_ignore_result=True,
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        worker_hijack_root_logger=False,
        broker_connection_retry_on_startup=True,
        task_queues=[Queue(name) for name in QUEUES],
        task_default_queue="ingest",
        task_routes={
            "ipbatch.ingest": {"queue": "ingest"},
            "ipbatch.embed": {"queue": "embed"},
            "ipbatch.generate": {"queue": "generate"},
        },
    )
    if broker.startswith(("redis://", "rediss://")):
        app.conf.broker_transport_options = {
            "visibility_timeout": 3600,
            "unacked_restore_interval": 2,
            "unacked_restore_throttle": 1,
        }
    return app


def queue_depths(broker_url: str, queues: Iterable[str]) -> dict[str, int]:
    """Messages waiting (ready, not yet delivered) in each queue; 0 for one not declared yet."""
    depths = {}
    with Connection(broker_url, connect_timeout=5) as connection:
        channel = connection.channel()
        for queue in queues:
            try:
                _, depths[queue], _ = channel.queue_declare(queue=queue, passive=True)
            except Exception:  # not declared yet (the failed call closed the channel)
                depths[queue] = 0
                channel = connection.channel()
    return depths


app = make_app()
