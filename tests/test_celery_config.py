"""The Celery app speaks JSON only and hands work out one message at a time, acked late."""

from __future__ import annotations

from core.config import Settings
from workers.celery_app import make_app


def test_json_only_late_acks_prefetch_one() -> None:
    app = make_app(Settings())
    conf = app.conf
    assert conf.accept_content == ["json"] and conf.task_serializer == "json"
    assert conf.result_serializer == "json" and conf.event_serializer == "json"
    assert conf.task_acks_late and conf.task_reject_on_worker_lost
    assert conf.worker_prefetch_multiplier == 1
    assert {q.name for q in conf.task_queues} == {"ingest", "embed", "generate"}
    assert conf.task_routes["ipbatch.generate"] == {"queue": "generate"}


def test_redis_broker_gets_fast_redelivery_options() -> None:
    app = make_app(Settings(broker_url="redis://127.0.0.1:6379/3"))  # type: ignore[arg-type]
    options = app.conf.broker_transport_options
    assert options["unacked_restore_interval"] == 2
    assert make_app(Settings()).conf.broker_transport_options == {}


def test_infrastructure_errors_are_retried_with_backoff_and_jitter() -> None:
    from kombu.exceptions import OperationalError as BrokerError
    from sqlalchemy.exc import OperationalError

    from core.errors import RetryableError
    from workers import tasks

    for task in (tasks.ingest, tasks.embed, tasks.generate):
        assert {RetryableError, OperationalError, BrokerError} <= set(task.autoretry_for)
        assert task.retry_backoff and task.retry_jitter and task.max_retries >= 5
