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
    assert {q.name for q in conf.task_queues} == {"ingest", "embed", "generate", "train"}
    assert conf.task_routes["ipbatch.embed"] == {"queue": "embed"}
    assert conf.task_routes["ipbatch.generate"] == {"queue": "generate"}
    assert conf.task_routes["ipbatch.train"] == {"queue": "train"}


def test_redis_broker_gets_fast_redelivery_options() -> None:
    app = make_app(Settings(broker_url="redis://127.0.0.1:6379/3"))  # type: ignore[arg-type]
    options = app.conf.broker_transport_options
    assert options["unacked_restore_interval"] == 2
    assert make_app(Settings()).conf.broker_transport_options == {}


def test_work_sent_again_goes_first_on_either_broker() -> None:
    """Queues carry priorities; what the reaper and held-item re-sends publish is urgent:
    RabbitMQ serves the highest number first, Redis the lowest."""
    from workers.celery_app import MAX_PRIORITY, priority

    app = make_app(Settings())
    assert all(q.queue_arguments == {"x-max-priority": MAX_PRIORITY} for q in app.conf.task_queues)
    rabbit, redis = "amqp://h//", "redis://h:6379/0"
    assert priority(rabbit, urgent=True) > priority(rabbit, urgent=False)
    assert priority(redis, urgent=True) < priority(redis, urgent=False)
    assert app.conf.task_default_priority == priority(rabbit, urgent=False)


def test_tasks_decide_nothing_themselves() -> None:
    """No Celery autoretry: outages are waited out by `workers.backpressure` inside the task,
    following `classify`, so a message is never parked in a worker's memory for a retry."""
    from workers import tasks

    for task in (tasks.ingest, tasks.embed, tasks.generate):
        assert not getattr(task, "autoretry_for", ())
