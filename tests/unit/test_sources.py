"""IPBATCH_ALLOWED_SOURCES: which references a manifest may read, in each mode."""

from __future__ import annotations

from pathlib import Path

import pytest

from core.errors import ErrorCode, ItemError
from pipeline.sources import check_allowed, resolve_reference


def forbidden(reference: str, allowed: list[str], *, local_mode: bool) -> bool:
    try:
        check_allowed(reference, allowed=allowed, local_mode=local_mode)
    except ItemError as error:
        assert error.code is ErrorCode.REFERENCE_FORBIDDEN and error.message
        return True
    return False


def test_s3_prefixes_are_whole_path_segments() -> None:
    allowed = ["s3://catalog/refs", "s3://other/"]
    assert not forbidden("s3://catalog/refs/shoe.png", allowed, local_mode=False)
    assert not forbidden("s3://other/deep/x.png", allowed, local_mode=False)
    assert forbidden("s3://catalog/refs-private/x.png", allowed, local_mode=False)
    assert forbidden("s3://catalog/x.png", allowed, local_mode=False)
    assert forbidden("s3://elsewhere/refs/x.png", allowed, local_mode=False)
    assert not forbidden("s3://anything/x.png", [], local_mode=False)  # empty: any S3 object


def test_local_paths_in_each_mode(tmp_path: Path) -> None:
    refs = tmp_path / "refs"
    refs.mkdir()
    (refs / "a.png").write_bytes(b"x")
    (tmp_path / "secret.png").write_bytes(b"x")
    (refs / "link.png").symlink_to(tmp_path / "secret.png")
    # distributed mode: local files only from folders listed explicitly
    assert forbidden(str(refs / "a.png"), [], local_mode=False)
    assert forbidden(f"file://{refs / 'a.png'}", ["s3://catalog/"], local_mode=False)
    assert not forbidden(str(refs / "a.png"), [str(refs)], local_mode=False)
    # one-machine mode: anything, unless roots are listed
    assert not forbidden(str(tmp_path / "secret.png"), [], local_mode=True)
    assert forbidden(str(tmp_path / "secret.png"), [str(refs)], local_mode=True)
    assert forbidden(str(refs / ".." / "secret.png"), [str(refs)], local_mode=True)
    assert forbidden(str(refs / "link.png"), [str(refs)], local_mode=True)  # symlink out


def test_resolving_references(tmp_path: Path) -> None:
    manifest = str(tmp_path / "jobs" / "m.jsonl")
    assert resolve_reference("refs/a.png", manifest_uri=manifest) == str(
        tmp_path / "jobs" / "refs" / "a.png"
    )
    assert resolve_reference("s3://b/k.png", manifest_uri=manifest) == "s3://b/k.png"
    for reference, manifest_uri in (
        ("http://example.com/a.png", manifest),
        ("refs/a.png", "s3://b/jobs/m.jsonl"),  # a local path in a manifest on S3
    ):
        with pytest.raises(ItemError) as info:
            resolve_reference(reference, manifest_uri=manifest_uri)
        assert info.value.code is ErrorCode.REFERENCE_FORBIDDEN
