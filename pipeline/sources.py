"""Where a manifest may read references from (IPBATCH_ALLOWED_SOURCES).

A reference is an `s3://bucket/key` URI, or in the one-machine mode a local path or `file://`
URI; relative paths are relative to the manifest's folder. Local paths are resolved (symlinks,
`..`) before they are checked, so a manifest cannot escape its allowed roots.
"""

from __future__ import annotations

import os
from pathlib import Path

from core.errors import ConfigError, ErrorCode, ItemError
from core.uris import is_s3, local_path


def resolve_reference(reference: str, *, manifest_uri: str) -> str:
    """Make a relative local reference absolute, next to a local manifest."""
    if is_s3(reference) or reference.startswith("file://"):
        return reference
    if "://" in reference:
        raise ItemError(
            ErrorCode.REFERENCE_FORBIDDEN,
            f"reference {reference!r}: only s3:// URIs and local paths are supported",
        )
    path = Path(reference).expanduser()
    if not path.is_absolute():
        if is_s3(manifest_uri):
            raise ItemError(
                ErrorCode.REFERENCE_FORBIDDEN,
                f"reference {reference!r} is a local path in a manifest read from S3; "
                "use s3://bucket/key",
            )
        path = local_path(manifest_uri).expanduser().resolve().parent / path
    return str(path)


def check_allowed(reference: str, *, allowed: list[str], local_mode: bool) -> None:
    """Raise reference_forbidden unless `reference` (already resolved) may be read."""
    if is_s3(reference):
        s3_roots = [a for a in allowed if is_s3(a)]
        if allowed and not any(_under_prefix(reference, root) for root in s3_roots):
            raise ItemError(
                ErrorCode.REFERENCE_FORBIDDEN,
                f"{reference} is outside IPBATCH_ALLOWED_SOURCES ({', '.join(allowed)})",
            )
        return
    try:
        path = Path(os.path.realpath(local_path(reference)))
    except ConfigError as exc:
        raise ItemError(ErrorCode.REFERENCE_FORBIDDEN, str(exc)) from exc
    roots = [Path(os.path.realpath(local_path(a))) for a in allowed if not is_s3(a)]
    if roots:
        if not any(path.is_relative_to(root) for root in roots):
            raise ItemError(
                ErrorCode.REFERENCE_FORBIDDEN,
                f"{path} is outside the allowed local folders ({', '.join(map(str, roots))})",
            )
        return
    if not local_mode:
        raise ItemError(
            ErrorCode.REFERENCE_FORBIDDEN,
            f"local reference {reference!r} in distributed mode: workers on other machines "
            "cannot read it; upload it to S3 (or list its folder in IPBATCH_ALLOWED_SOURCES)",
        )


def _under_prefix(uri: str, prefix: str) -> bool:
    """`s3://b/refs` allows `s3://b/refs/x.png`, not `s3://b/refs-private/x.png`."""
    root = prefix.rstrip("/")
    return uri == root or uri.startswith(root + "/")
