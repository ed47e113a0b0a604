"""Object stores behind one interface: S3 (boto3, any endpoint) and a local folder.

URIs name objects: `s3://bucket/key`, or a local path / `file://` URI. `ObjectStores.for_uri`
picks the backend. Writes are idempotent (same key, same bytes) and local writes are atomic.
Writing an object whose bytes are known, so that a key is never left holding other bytes
than those recorded, is `storage.publish`.
"""

from __future__ import annotations

import contextlib
import hashlib
import http.client
import io
import logging
import os
import shutil
import tempfile
import threading
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Protocol

from core.errors import Action, ConfigError, ObjectNotFound, RetryableError, classify
from core.uris import is_s3, local_path, parse_s3

log = logging.getLogger(__name__)


class ObjectStore(Protocol):
    def get(self, uri: str) -> bytes: ...

    @contextmanager
    def open(self, uri: str) -> Iterator[IO[bytes]]: ...

    def put(self, uri: str, data: bytes, *, content_type: str = ...) -> None: ...

    def put_new(self, uri: str, data: bytes, *, content_type: str = ...) -> bool: ...

    def exists(self, uri: str) -> bool: ...

    def stat(self, uri: str) -> Stat | None: ...

    def list(self, prefix_uri: str) -> Iterator[str]: ...

    def list_versions(self, prefix_uri: str) -> Iterator[tuple[str, str]]: ...

    def probe_writes(self, uri: str) -> bool: ...

    def delete(self, uri: str) -> None: ...


@dataclass(frozen=True)
class Stat:
    """What a HEAD says of an object: its size, and its ETag where the store has one (S3:
    the MD5 of the bytes for a single-part upload without KMS; anything else otherwise)."""

    size: int
    etag: str | None = None

    def md5_is(self, data: bytes) -> bool | None:
        """Does the ETag say the object is `data`? None where the ETag is not a plain MD5
        (a multipart upload's `...-N`, no ETag, KMS): only a read-back can tell then."""
        if self.etag is None or "-" in self.etag or len(self.etag) != 32:
            return None
        return self.etag == hashlib.md5(data, usedforsecurity=False).hexdigest()


class LocalStore:
    """Objects are files; a key is a path."""

    def get(self, uri: str) -> bytes:
        path = local_path(uri)
        try:
            return path.read_bytes()
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError) as exc:
            raise ObjectNotFound(f"no such file: {path}") from exc

    @contextmanager
    def open(self, uri: str) -> Iterator[IO[bytes]]:
        path = local_path(uri)
        try:
            fh = path.open("rb")
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError) as exc:
            raise ObjectNotFound(f"no such file: {path}") from exc
        with fh:
            yield fh

    @staticmethod
    @contextmanager
    def _staged(path: Path, data: bytes) -> Iterator[str]:
        """`data` in a hidden temporary file next to `path` (removed afterwards), to be put
        in place atomically by the caller: readers never see half an object."""
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
        try:
            with os.fdopen(fd, "wb") as fh:
                fh.write(data)
            yield tmp
        finally:
            Path(tmp).unlink(missing_ok=True)

    def put(self, uri: str, data: bytes, *, content_type: str = "application/octet-stream") -> None:
        path = local_path(uri)
        with self._staged(path, data) as tmp:
            os.replace(tmp, path)

    def put_new(
        self, uri: str, data: bytes, *, content_type: str = "application/octet-stream"
    ) -> bool:
        """Write only if nothing is there yet (first writer wins, atomically): True if this
        call wrote it, False if something was there (what it is: `storage.publish`)."""
        path = local_path(uri)
        with self._staged(path, data) as tmp:
            try:
                os.link(tmp, path)  # fails if the name exists: never overwrites
            except FileExistsError:
                return False
        return True

    def exists(self, uri: str) -> bool:
        return local_path(uri).is_file()

    def stat(self, uri: str) -> Stat | None:
        try:
            return Stat(size=local_path(uri).stat().st_size)
        except (FileNotFoundError, NotADirectoryError):
            return None

    def list(self, prefix_uri: str) -> Iterator[str]:
        for uri, _ in self.list_versions(prefix_uri):
            yield uri

    def list_versions(self, prefix_uri: str) -> Iterator[tuple[str, str]]:
        """(path, version) of each file: a file replaced in place is another version."""
        root = local_path(prefix_uri)
        paths = [root] if root.is_file() else sorted(root.rglob("*"))
        for path in paths:
            if path.is_file() and not path.name.startswith("."):
                info = path.stat()
                yield str(path), f"{info.st_mtime_ns}-{info.st_size}"

    def probe_writes(self, uri: str) -> bool:
        """`uri`'s folder can be written (made if missing); an exclusive link is first-writer-
        wins by itself: True."""
        local_path(uri).mkdir(parents=True, exist_ok=True)
        return True

    def delete(self, uri: str) -> None:
        """Remove one object; one that is not there is not an error."""
        local_path(uri).unlink(missing_ok=True)

    def remove_tree(self, uri: str) -> None:
        shutil.rmtree(local_path(uri), ignore_errors=True)


class S3Store:
    """S3 through boto3; the endpoint URL makes MinIO, moto or any S3-compatible store work.

    Every error, body reads included, comes out as one of ipbatch's: ObjectNotFound,
    ConfigError (access denied, a bucket that does not exist: ipbatch never creates buckets)
    or RetryableError (the endpoint unreachable, busy, or a read cut off half way).
    """

    def __init__(self, *, endpoint_url: str | None, region: str) -> None:
        import boto3
        from botocore.config import Config

        self._client: Any = boto3.session.Session().client(
            "s3",
            endpoint_url=endpoint_url,
            region_name=region,
            # connections for as many requests in flight as `ipbatch verify --threads` sends
            config=Config(retries={"max_attempts": 5, "mode": "standard"}, max_pool_connections=64),
        )
        self._endpoint = endpoint_url or "AWS S3"
        self._conditional: dict[str, bool] = {}  # bucket -> honours If-None-Match
        self._lock = threading.Lock()

    @contextmanager
    def _errors(self, uri: str, *, writing: bool = False) -> Iterator[None]:
        """Map botocore's (and urllib3's, during body reads) errors to ipbatch's."""
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            yield
        except ClientError as exc:
            code = str(exc.response.get("Error", {}).get("Code", ""))
            status = int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0) or 0)
            if code == "NoSuchBucket" and writing:
                raise ConfigError(
                    f"bucket of {uri} does not exist: ipbatch never creates buckets; create it"
                ) from exc
            if code in ("NoSuchKey", "404", "NotFound", "NoSuchBucket"):
                raise ObjectNotFound(f"no such object: {uri}") from exc
            if code in ("AccessDenied", "403", "InvalidAccessKeyId", "SignatureDoesNotMatch"):
                raise ConfigError(f"access denied to {uri} ({code})") from exc
            if status >= 500 or code in ("SlowDown", "Throttling", "RequestTimeout"):
                raise RetryableError(
                    f"S3 busy for {uri}: {code}", dependency="s3", resource=uri
                ) from exc
            raise
        except (BotoCoreError, OSError, http.client.HTTPException) as exc:
            decision = classify(exc)
            if decision.action is Action.CONFIG:
                raise ConfigError(f"S3 client for {uri}: {decision.message}") from exc
            if decision.action is not Action.RETRY:
                raise
            raise RetryableError(
                f"S3 unreachable for {uri}: {type(exc).__name__}", dependency="s3", resource=uri
            ) from exc

    def _call(self, uri: str, fn: Any, *, writing: bool = False, **kwargs: Any) -> Any:
        with self._errors(uri, writing=writing):
            return fn(**kwargs)

    def get(self, uri: str) -> bytes:
        loc = parse_s3(uri)
        with self._errors(uri):
            body = self._client.get_object(Bucket=loc.bucket, Key=loc.key)["Body"]
            with body:
                return bytes(body.read())

    @contextmanager
    def open(self, uri: str) -> Iterator[IO[bytes]]:
        """A streaming body: reading a 100k-row manifest never holds it all in memory. A read
        that fails half way raises RetryableError, like any other S3 call."""
        loc = parse_s3(uri)
        body = self._call(uri, self._client.get_object, Bucket=loc.bucket, Key=loc.key)["Body"]
        try:
            yield io.BufferedReader(_BodyReader(body, self, uri), buffer_size=256 * 1024)
        finally:
            body.close()

    def put(self, uri: str, data: bytes, *, content_type: str = "application/octet-stream") -> None:
        self._put(uri, data, content_type)

    def _put(self, uri: str, data: bytes, content_type: str, **conditions: str) -> None:
        loc = parse_s3(uri)
        self._call(
            uri,
            self._client.put_object,
            writing=True,
            Bucket=loc.bucket,
            Key=loc.key,
            Body=data,
            ContentType=content_type,
            **conditions,
        )

    def put_new(
        self, uri: str, data: bytes, *, content_type: str = "application/octet-stream"
    ) -> bool:
        """A conditional PUT (If-None-Match: *), the first writer wins: True if this call
        wrote `data`, False if an object was there (a 412). What that object is, and whether
        it may stay, is `storage.publish`'s business: an existing key is never trusted.

        Some S3-compatible servers ignore the condition: for those (found out once per
        bucket, see `honours_conditional_writes`) a HEAD comes first. Neither closes every
        race, which is why a worker also checks it still holds its claim before uploading.
        """
        from botocore.exceptions import ClientError

        if not self.honours_conditional_writes(uri) and self.exists(uri):
            return False
        try:
            self._put(uri, data, content_type, IfNoneMatch="*")
            return True
        except ClientError as exc:  # raised as it was: only PreconditionFailed is expected
            if exc.response.get("Error", {}).get("Code") != "PreconditionFailed":
                raise
        return False

    def honours_conditional_writes(self, uri: str) -> bool:
        """Does the bucket of `uri` refuse a second `If-None-Match: *` PUT of one key? Tried
        once per bucket and process (a probe object under `.ipbatch-probe/`, removed after),
        and said in the log either way."""
        from botocore.exceptions import ClientError

        bucket = parse_s3(uri).bucket
        with self._lock:
            if bucket in self._conditional:
                return self._conditional[bucket]
        probe = f"s3://{bucket}/.ipbatch-probe/{uuid.uuid4().hex}"
        honoured = False
        try:
            for _ in range(2):
                self._put(probe, b"probe", "text/plain", IfNoneMatch="*")
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") != "PreconditionFailed":
                raise
            honoured = True
        finally:
            with contextlib.suppress(Exception):
                self._client.delete_object(Bucket=bucket, Key=parse_s3(probe).key)
        if honoured:
            log.info("%s honours conditional writes on bucket %s", self._endpoint, bucket)
        else:
            log.warning(
                "%s ignores If-None-Match on bucket %s: first-writer-wins uploads rest on "
                "ipbatch's claim check before each upload (and a HEAD before each PUT)",
                self._endpoint,
                bucket,
            )
        with self._lock:
            self._conditional[bucket] = honoured
        return honoured

    def probe_writes(self, uri: str) -> bool:
        """Raise ConfigError if `uri`'s bucket does not exist or may not be written; whether
        it honours conditional writes (see `honours_conditional_writes`)."""
        return self.honours_conditional_writes(uri)

    def exists(self, uri: str) -> bool:
        loc = parse_s3(uri)
        try:
            self._call(uri, self._client.head_object, Bucket=loc.bucket, Key=loc.key)
        except ObjectNotFound:
            return False
        return True

    def stat(self, uri: str) -> Stat | None:
        loc = parse_s3(uri)
        try:
            head = self._call(uri, self._client.head_object, Bucket=loc.bucket, Key=loc.key)
        except ObjectNotFound:
            return None
        etag = head.get("ETag")
        return Stat(size=int(head["ContentLength"]), etag=etag.strip('"') if etag else None)

    def delete(self, uri: str) -> None:
        """Remove one object (S3 answers success for a key that is not there)."""
        loc = parse_s3(uri)
        self._call(uri, self._client.delete_object, writing=True, Bucket=loc.bucket, Key=loc.key)

    def list(self, prefix_uri: str) -> Iterator[str]:
        for uri, _ in self.list_versions(prefix_uri):
            yield uri

    def list_versions(self, prefix_uri: str) -> Iterator[tuple[str, str]]:
        """(URI, ETag) of each object: an object uploaded again over its key is a new ETag."""
        loc = parse_s3(prefix_uri)
        paginator = self._client.get_paginator("list_objects_v2")
        pages = self._call(
            prefix_uri, lambda: list(paginator.paginate(Bucket=loc.bucket, Prefix=loc.key))
        )
        for page in pages:
            for obj in page.get("Contents", []):
                yield f"s3://{loc.bucket}/{obj['Key']}", str(obj.get("ETag", "")).strip('"')


class _BodyReader(io.RawIOBase):
    """A botocore StreamingBody as a raw file, so io.BufferedReader can iterate its lines;
    a read that fails half way raises the store's errors, like the call that opened it."""

    def __init__(self, body: Any, store: S3Store, uri: str) -> None:
        super().__init__()
        self._body = body
        self._store = store
        self._uri = uri

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        with self._store._errors(self._uri):
            data = self._body.read(len(buffer))
        buffer[: len(data)] = data
        return len(data)


class ObjectStores:
    """Picks the backend for a URI; the S3 client is made on first use (never at import) and
    shared by the threads of the process (boto3 clients are thread-safe)."""

    def __init__(self, *, s3_endpoint_url: str | None = None, s3_region: str = "us-east-1"):
        self._s3_endpoint_url = s3_endpoint_url
        self._s3_region = s3_region
        self._s3: S3Store | None = None
        self._lock = threading.Lock()
        self.local = LocalStore()

    def for_uri(self, uri: str) -> ObjectStore:
        if is_s3(uri):
            with self._lock:
                if self._s3 is None:
                    self._s3 = S3Store(endpoint_url=self._s3_endpoint_url, region=self._s3_region)
            return self._s3
        return self.local
