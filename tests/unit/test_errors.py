"""One error policy: `classify` says for any exception whether it fails the item (with which
code), gives it back for a retry (and what went away), or is this worker's configuration."""

from __future__ import annotations

import http.client

import pytest

from core.errors import (
    Action,
    ConfigError,
    ErrorCode,
    ItemError,
    ModelLoadError,
    ObjectNotFound,
    RetryableError,
    classify,
)


def _client_error(code: str, status: int) -> Exception:
    from botocore.exceptions import ClientError

    response = {
        "Error": {"Code": code, "Message": code},
        "ResponseMetadata": {"HTTPStatusCode": status},
    }
    return ClientError(response, "GetObject")  # type: ignore[arg-type]


def _cases() -> list[tuple[str, BaseException, Action, str | None]]:
    """(name, exception, action, code for FAIL or dependency for RETRY)."""
    import amqp.exceptions
    import kombu.exceptions
    import psycopg
    import redis.exceptions
    import sqlalchemy.exc as sa
    import urllib3.exceptions
    from botocore import exceptions as bc

    return [
        ("item error", ItemError(ErrorCode.NO_FACE, "no face"), Action.FAIL, "no_face"),
        ("config", ConfigError("models folder missing"), Action.CONFIG, None),
        ("corrupt model file", ModelLoadError("could not load x"), Action.CONFIG, None),
        (
            "ours, S3",
            RetryableError("gone", dependency="s3", resource="s3://b/k"),
            Action.RETRY,
            "s3",
        ),
        (
            "database down",
            sa.OperationalError("SELECT 1", {}, Exception("closed")),
            Action.RETRY,
            "database",
        ),
        (
            "database interface",
            sa.InterfaceError("x", {}, Exception("gone")),
            Action.RETRY,
            "database",
        ),
        (
            "psycopg",
            psycopg.OperationalError("server closed the connection"),
            Action.RETRY,
            "database",
        ),
        (
            "schema too old",
            sa.ProgrammingError("x", {}, Exception("no such column")),
            Action.CONFIG,
            None,
        ),
        ("a bug in SQL", sa.IntegrityError("x", {}, Exception("dup")), Action.FAIL, "internal"),
        ("S3 read timeout", bc.ReadTimeoutError(endpoint_url="http://s3"), Action.RETRY, "s3"),
        (
            "S3 body cut off",
            bc.IncompleteReadError(actual_bytes=5, expected_bytes=9),
            Action.RETRY,
            "s3",
        ),
        ("S3 stream broken", bc.ResponseStreamingError(error="reset"), Action.RETRY, "s3"),
        (
            "S3 unreachable",
            bc.EndpointConnectionError(endpoint_url="http://s3"),
            Action.RETRY,
            "s3",
        ),
        ("no credentials", bc.NoCredentialsError(), Action.CONFIG, None),
        ("access denied", _client_error("AccessDenied", 403), Action.CONFIG, None),
        ("no bucket", _client_error("NoSuchBucket", 404), Action.CONFIG, None),
        ("S3 busy", _client_error("SlowDown", 503), Action.RETRY, "s3"),
        ("S3 5xx", _client_error("InternalError", 500), Action.RETRY, "s3"),
        ("bad request", _client_error("InvalidRequest", 400), Action.FAIL, "internal"),
        ("urllib3", urllib3.exceptions.ProtocolError("Connection broken"), Action.RETRY, "network"),
        ("http", http.client.IncompleteRead(b"abc", 10), Action.RETRY, "network"),
        ("kombu", kombu.exceptions.OperationalError("broker gone"), Action.RETRY, "broker"),
        ("amqp", amqp.exceptions.ConnectionForced("closed"), Action.RETRY, "broker"),
        ("redis", redis.exceptions.ConnectionError("refused"), Action.RETRY, "broker"),
        ("refused", ConnectionRefusedError(111, "refused"), Action.RETRY, "network"),
        ("timeout", TimeoutError("slow"), Action.RETRY, "network"),
        ("a bug", ValueError("unexpected"), Action.FAIL, "internal"),
        ("missing object", ObjectNotFound("no such object: s3://b/k"), Action.FAIL, "internal"),
        ("Ctrl-C", KeyboardInterrupt(), Action.STOP, None),
        # services that answer no: a configuration error, named by its setting
        (
            "database login refused",
            sa.OperationalError(
                "connect",
                {},
                psycopg.OperationalError(
                    'connection failed: connection to server at "db", port 5432 failed: '
                    'FATAL:  password authentication failed for user "ipbatch"'
                ),
            ),
            Action.CONFIG,
            "IPBATCH_DATABASE_URL",
        ),
        (
            "no such database",
            psycopg.OperationalError('connection failed: FATAL:  database "x" does not exist'),
            Action.CONFIG,
            "IPBATCH_DATABASE_URL",
        ),
        (
            "no such database host",
            psycopg.OperationalError("failed to resolve host 'db.typo': Name or service not known"),
            Action.CONFIG,
            "IPBATCH_DATABASE_URL",
        ),
        (
            "broker login refused",
            amqp.exceptions.AccessRefused("(0, 0): (403) ACCESS_REFUSED - Login was refused"),
            Action.CONFIG,
            "IPBATCH_BROKER_URL",
        ),
        (
            "redis login refused",
            redis.exceptions.AuthenticationError("invalid username-password pair"),
            Action.CONFIG,
            "IPBATCH_BROKER_URL",
        ),
    ]


@pytest.mark.parametrize("case", _cases(), ids=lambda case: case[0])
def test_classify(case: tuple[str, BaseException, Action, str | None]) -> None:
    _, exc, action, detail = case
    decision = classify(exc)
    assert decision.action is action, decision
    if action is Action.FAIL:
        assert decision.code is not None and decision.code.value == detail
    if action is Action.RETRY:
        assert decision.dependency == detail
    if action is Action.CONFIG and detail is not None:
        assert detail in decision.message  # the setting to fix
    assert decision.message


def test_what_a_failure_was_raised_from_counts() -> None:
    """A library that wraps an outage in its own error (raise ... from) is still an outage."""
    from botocore.exceptions import EndpointConnectionError

    try:
        try:
            raise EndpointConnectionError(endpoint_url="http://s3")
        except EndpointConnectionError as inner:
            raise RuntimeError("could not fetch") from inner
    except RuntimeError as outer:
        assert classify(outer).action is Action.RETRY


def test_an_unexpected_error_inside_generation_is_a_model_error() -> None:
    import torch

    decision = classify(
        torch.OutOfMemoryError("CUDA out of memory"), unexpected=ErrorCode.MODEL_ERROR
    )
    assert (decision.action, decision.code, decision.expected) == (
        Action.FAIL,
        ErrorCode.MODEL_ERROR,
        False,
    )
    assert "OutOfMemoryError" in decision.message and "worker log" in decision.message


def test_retryable_errors_say_what_to_check() -> None:
    decision = classify(RetryableError("S3 unreachable", dependency="s3", resource="s3://b/k.png"))
    assert (decision.dependency, decision.resource) == ("s3", "s3://b/k.png")
