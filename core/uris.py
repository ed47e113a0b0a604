"""Object URIs: `s3://bucket/key`, or a local path / `file://` URI.

Plain string helpers every layer may use (the manifest's references, the stores, the cache).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote, urlsplit

from core.errors import ConfigError


@dataclass(frozen=True)
class S3Location:
    bucket: str
    key: str


def is_s3(uri: str) -> bool:
    return uri.startswith("s3://")


def parse_s3(uri: str) -> S3Location:
    parts = urlsplit(uri)
    if parts.scheme != "s3" or not parts.netloc:
        raise ConfigError(f"not an s3://bucket/key URI: {uri!r}")
    return S3Location(bucket=parts.netloc, key=parts.path.lstrip("/"))


def local_path(uri: str) -> Path:
    if uri.startswith("file://"):
        parts = urlsplit(uri)
        if parts.netloc not in ("", "localhost"):
            raise ConfigError(f"file:// URIs name local files only: {uri!r}")
        return Path(unquote(parts.path))
    if "://" in uri:
        raise ConfigError(f"unsupported URI scheme: {uri!r} (use s3://, file:// or a path)")
    return Path(uri).expanduser()


def absolute_uri(uri: str) -> str:
    """A manifest or output location as the ledger records it: a URI with a scheme as given,
    a path made absolute (`~` expanded), so that a job means the same files from any folder."""
    if "://" in uri:
        return uri
    return str(Path(uri).expanduser().resolve())


def join_uri(base: str, *parts: str) -> str:
    out = base.rstrip("/")
    for part in parts:
        out = f"{out}/{part.strip('/')}"
    return out
