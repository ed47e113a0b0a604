"""The Celery app: JSON only, late acks, one message at a time, a queue per stage.

Tasks carry ids only; the ledger says what they mean. RabbitMQ (the default) redelivers a
dead worker's message as soon as its channel closes; with Redis, the transport options below
shorten the redelivery scan (facts: the default waits an hour).

Queues have priorities: work sent again after a failure (a lapsed lease, a lost message, an
item another worker held) goes to the front. RabbitMQ counts up (9 first), Redis down (0
first); `priority` hides that. Queues declared by an older ipbatch without priorities must be
deleted once (`rabbitmqctl delete_queue generate`, ...): RabbitMQ refuses to change them.
"""

from __future__ import annotations

from collections.abc import Iterable

from celery import Celery
from kombu import Connection, Queue

from core.config import Settings
from storage.lifecycle import INGEST, JOB_STAGES, NORMAL, QUEUES, STAGES

MAX_PRIORITY = 9


def is_redis(broker_url: str) -> bool:
    return broker_url.startswith(("redis://", "rediss://"))


def priority(broker_url: str, *, urgent: bool, level: int = NORMAL) -> int:
    """The message priority of work sent again (urgent: first of all), or of a job's work at
    its priority level (`lifecycle.PRIORITIES`: low 0, normal 1, high 2) on this broker."""
    rank = 3 if urgent else max(0, min(level, 2))  # 0 .. 3, higher first
    if is_redis(broker_url):
        return 9 - 3 * rank  # kombu's Redis transport serves 0 first, in steps of 3
    return 3 * rank  # RabbitMQ: 9 first


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
        task_queues=[
            Queue(name, queue_arguments={"x-max-priority": MAX_PRIORITY}) for name in QUEUES
        ],
        task_default_queue=INGEST.queue,
        task_default_priority=priority(broker, urgent=False),
        task_routes={
            **{f"ipbatch.{stage.name}": {"queue": stage.queue} for stage in JOB_STAGES},
            **{f"ipbatch.{stage.name}": {"queue": stage.queue} for stage in STAGES},
        },
    )
    if is_redis(broker):
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
