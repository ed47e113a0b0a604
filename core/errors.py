"""One root exception, and the one error policy (`classify`) every layer follows.

An error is one of three things, and `classify` says which:
- the item's own fault (`Action.FAIL`): the item fails at once with an error code from the
  contract and a message that says what to fix (never a stack trace; that goes to the log);
- not the item's fault and passing (`Action.RETRY`): S3, the network, the database or the
  broker went away; the item goes back to waiting and the work is tried again later, once
  the dependency answers;
- this worker cannot work (`Action.CONFIG`): settings, credentials, a models folder that is
  missing or broken; the item goes back to waiting, and the worker stops taking work, loudly.
A process being stopped (`Action.STOP`: Ctrl-C, a shutdown) gives its items back too.

The stages' claim scope, the Celery tasks and the one-machine runner all act on `classify`;
nothing else decides.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from enum import StrEnum


class ErrorCode(StrEnum):
    INVALID_ROW = "invalid_row"
    REFERENCE_NOT_FOUND = "reference_not_found"
    REFERENCE_FORBIDDEN = "reference_forbidden"
    REFERENCE_NOT_IMAGE = "reference_not_image"
    REFERENCE_TOO_LARGE = "reference_too_large"
    NO_FACE = "no_face"
    MODEL_ERROR = "model_error"
    OUTPUT_CONFLICT = "output_conflict"  # the output key holds another picture of the row
    INTERNAL = "internal"


class IpbatchError(Exception):
    """Root of every error ipbatch raises on purpose."""


class ConfigError(IpbatchError):
    """Bad settings, credentials, models or command-line usage (exit code 2)."""


class ModelLoadError(ConfigError):
    """A model file that is there but does not load (corrupt, truncated, the wrong kind):
    the message names the file. A configuration problem of the worker, not of the items."""


class RetryableError(IpbatchError):
    """A transient failure (storage, network, database, broker): the same call may work later.

    `dependency` names what went away ("s3", "database", "broker", "network"); `resource` is
    what was being read or written (an s3:// URI), so a worker can check it is back.
    """

    def __init__(
        self, message: str, *, dependency: str = "network", resource: str | None = None
    ) -> None:
        super().__init__(message)
        self.dependency = dependency
        self.resource = resource


class ItemError(IpbatchError):
    """A permanent failure of one item: recorded with its code, never retried."""

    def __init__(self, code: ErrorCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message

    def __str__(self) -> str:
        return f"{self.code.value}: {self.message}"


class ObjectNotFound(IpbatchError):
    """An object store key or local file does not exist."""


class Action(StrEnum):
    FAIL = "fail"  # the item's fault: fail it with `code`
    RETRY = "retry"  # a dependency is away: give the item back, try again when it answers
    CONFIG = "config"  # this worker cannot work: give the item back, stop taking work
    STOP = "stop"  # the process is stopping: give the item back


@dataclass(frozen=True)
class Decision:
    action: Action
    message: str
    code: ErrorCode | None = None  # for FAIL
    dependency: str | None = None  # for RETRY: "s3", "database", "broker", "network"
    resource: str | None = None  # for RETRY: what failed, when known (an s3:// URI)
    expected: bool = True  # False: a bug or an unknown failure (log the trace)


def short(exc: BaseException) -> str:
    """One line for an item's history (SQLAlchemy errors carry the whole statement)."""
    text = str(exc)
    return text.splitlines()[0][:300] if text.strip() else type(exc).__name__


def classify(exc: BaseException, *, unexpected: ErrorCode = ErrorCode.INTERNAL) -> Decision:
    """What to do about `exc`. An exception nobody anticipated fails the item with
    `unexpected` (internal, or model_error inside a diffusers call) and its type and message;
    the caller logs the trace."""
    if not isinstance(exc, Exception):
        return Decision(Action.STOP, f"stopped ({type(exc).__name__})")
    if isinstance(exc, ItemError):
        return Decision(Action.FAIL, exc.message, code=exc.code)
    if isinstance(exc, ConfigError):
        return Decision(Action.CONFIG, str(exc))
    if isinstance(exc, RetryableError):
        return Decision(Action.RETRY, str(exc), dependency=exc.dependency, resource=exc.resource)
    for cause in _chain(exc):
        decision = _third_party(cause)
        if decision is not None:
            return decision
    if isinstance(exc, ObjectNotFound):
        return Decision(Action.FAIL, str(exc), code=ErrorCode.INTERNAL, expected=False)
    message = f"{type(exc).__name__}: {short(exc)} (the trace is in the worker log)"
    return Decision(Action.FAIL, message, code=unexpected, expected=False)


def _chain(exc: BaseException) -> list[BaseException]:
    """The exception and what it was raised from (`raise ... from`), outermost first."""
    seen: list[BaseException] = []
    current: BaseException | None = exc
    while current is not None and current not in seen and len(seen) < 8:
        seen.append(current)
        current = current.__cause__
    return seen


def _third_party(exc: BaseException) -> Decision | None:
    """The libraries' own exceptions: S3 (botocore, urllib3), PostgreSQL (SQLAlchemy,
    psycopg), the broker (kombu, amqp, redis), the network. None if it is none of these."""
    kinds = _kinds()
    if isinstance(exc, kinds.config):
        return Decision(Action.CONFIG, f"{type(exc).__name__}: {short(exc)}")
    refused = _refused(exc, kinds)
    if refused is not None:
        return refused
    if isinstance(exc, kinds.schema):
        return Decision(
            Action.CONFIG,
            f"the ledger's schema does not match this version of ipbatch ({short(exc)}): "
            "run `ipbatch db upgrade`",
        )
    if kinds.client_error is not None and isinstance(exc, kinds.client_error):
        return _s3_client_error(exc)
    for dependency, types in kinds.transient:
        if isinstance(exc, types):
            setting = SETTINGS.get(dependency)
            where = f" ({setting})" if setting else ""
            return Decision(
                Action.RETRY,
                f"{dependency} unreachable{where}: {short(exc)}",
                dependency=dependency,
            )
    return None


# the setting that says where each dependency is
SETTINGS = {
    "database": "IPBATCH_DATABASE_URL",
    "broker": "IPBATCH_BROKER_URL",
    "s3": "IPBATCH_S3_ENDPOINT_URL",
}


# a database connection that no retry will make: the URL names the wrong user, password,
# database or host (psycopg gives these no SQLSTATE; its message says which)
_DATABASE_REFUSED = (
    "password authentication failed",
    "no pg_hba.conf entry",
    "failed to resolve host",
    "could not translate host name",
)
_DATABASE_MISSING = ("FATAL:", "does not exist")  # a role or database that is not there


def _refused(exc: BaseException, kinds: _Kinds) -> Decision | None:
    """A service that answers and says no: wrong credentials, a user without the right to
    write, a database or host that does not exist. A configuration error, named by its
    setting, not an outage to wait out."""
    text = short(exc)
    if isinstance(exc, kinds.database_refusals):
        if any(p in text for p in _DATABASE_REFUSED) or all(p in text for p in _DATABASE_MISSING):
            return Decision(
                Action.CONFIG, f"the database refused the connection (IPBATCH_DATABASE_URL): {text}"
            )
    state = getattr(getattr(exc, "orig", None), "sqlstate", None) or getattr(exc, "sqlstate", None)
    if state == "42501":  # insufficient_privilege
        return Decision(
            Action.CONFIG,
            f"permission denied for the database user of IPBATCH_DATABASE_URL: {text}",
        )
    if isinstance(exc, kinds.broker_refusals):
        return Decision(Action.CONFIG, f"the broker refused the login (IPBATCH_BROKER_URL): {text}")
    return None


def _s3_client_error(exc: BaseException) -> Decision:
    response = getattr(exc, "response", {}) or {}
    code = str(response.get("Error", {}).get("Code", ""))
    status = int(response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0) or 0)
    if code in ("AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch", "NoSuchBucket"):
        return Decision(Action.CONFIG, f"S3 refused: {code}: {short(exc)}")
    if status >= 500 or code in _S3_BUSY:
        return Decision(Action.RETRY, f"S3 busy: {code}", dependency="s3")
    return Decision(
        Action.FAIL, f"S3 error {code}: {short(exc)}", code=ErrorCode.INTERNAL, expected=False
    )


_S3_BUSY = {"SlowDown", "Throttling", "RequestTimeout", "InternalError", "ServiceUnavailable"}


@dataclass(frozen=True)
class _Kinds:
    transient: tuple[tuple[str, tuple[type[BaseException], ...]], ...]
    config: tuple[type[BaseException], ...]
    schema: tuple[type[BaseException], ...]
    client_error: type[BaseException] | None
    database_refusals: tuple[type[BaseException], ...]  # checked by message (`_refused`)
    broker_refusals: tuple[type[BaseException], ...]  # a login refused


@functools.cache
def _kinds() -> _Kinds:
    """The exception classes, imported once and only if installed (core depends on none)."""
    database: list[type[BaseException]] = []
    s3: list[type[BaseException]] = []
    broker: list[type[BaseException]] = []
    network: list[type[BaseException]] = [ConnectionError, TimeoutError]
    config: list[type[BaseException]] = []
    schema: list[type[BaseException]] = []
    client_error: type[BaseException] | None = None
    broker_refusals: list[type[BaseException]] = []
    try:
        from sqlalchemy import exc as sa

        database += [sa.OperationalError, sa.InterfaceError, sa.DisconnectionError, sa.TimeoutError]
        schema.append(sa.ProgrammingError)
    except ImportError:
        pass
    try:
        import psycopg

        database += [psycopg.OperationalError, psycopg.InterfaceError]
    except ImportError:
        pass
    try:
        from botocore import exceptions as bc

        config += [
            bc.NoCredentialsError,
            bc.PartialCredentialsError,
            bc.NoRegionError,
            bc.ParamValidationError,
            bc.InvalidConfigError,
            bc.UnknownServiceError,
            bc.ProfileNotFound,
        ]
        # every other botocore error is about getting bytes there and back: reads that time
        # out or stop half way (ReadTimeoutError, IncompleteReadError, ResponseStreamingError),
        # connections refused or closed, endpoints that do not answer
        s3.append(bc.BotoCoreError)
        client_error = bc.ClientError
    except ImportError:
        pass
    try:
        import urllib3.exceptions

        network.append(urllib3.exceptions.HTTPError)
    except ImportError:
        pass
    import http.client

    network.append(http.client.HTTPException)
    try:
        import kombu.exceptions

        broker.append(kombu.exceptions.OperationalError)
    except ImportError:
        pass
    try:
        import amqp.exceptions

        broker += [amqp.exceptions.ConnectionError, amqp.exceptions.RecoverableConnectionError]
        broker_refusals.append(amqp.exceptions.AccessRefused)
    except ImportError:
        pass
    try:
        import redis.exceptions

        broker += [redis.exceptions.ConnectionError, redis.exceptions.TimeoutError]
        broker_refusals.append(redis.exceptions.AuthenticationError)
    except ImportError:
        pass
    return _Kinds(
        transient=(
            ("database", tuple(database)),
            ("s3", tuple(s3)),
            ("broker", tuple(broker)),
            ("network", tuple(network)),
        ),
        config=tuple(config),
        schema=tuple(schema),
        client_error=client_error,
        database_refusals=tuple(database),
        broker_refusals=tuple(broker_refusals),
    )
