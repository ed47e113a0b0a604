"""Reading a manifest file: JSON Lines or CSV, streamed.

`read_manifest` yields one `ParsedRow` per non-blank line, valid or not, so a bad row fails
alone and memory stays constant however long the manifest is (only the set of ids seen is kept,
to refuse duplicates). `read_rows` does the same for any row schema (training manifests).
"""

from __future__ import annotations

import csv
import io
import json
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import IO, Any, Generic, Literal, Protocol, TypeVar

from pydantic import ValidationError

from pipeline.manifest import ROW_ID_PATTERN, AdapterLookup, Row, validate_row
from pipeline.presets import builtin_adapter

MAX_LINE_BYTES = 1024 * 1024
_ROW_ID = re.compile(ROW_ID_PATTERN)
# the file names read as manifests: CSV by its suffix, JSON Lines otherwise (a `.json` file
# holds one JSON object per line, as `.jsonl` does)
MANIFEST_SUFFIXES = (".jsonl", ".json", ".csv")


class HasId(Protocol):
    @property
    def id(self) -> str: ...


R = TypeVar("R", bound=HasId)


@dataclass(frozen=True)
class ParsedRow(Generic[R]):
    """One non-blank manifest line: `row` when valid, else `error` says what to fix."""

    index: int  # 0-based among non-blank lines
    line_number: int  # 1-based line in the file (CSV: record number + 1 for the header)
    row: R | None
    error: str | None
    row_id: str | None  # the id as written, when there is a usable one
    raw: dict[str, Any] | None  # the parsed object, for the ledger's params


def describe_validation_error(exc: ValidationError) -> str:
    parts = []
    for err in exc.errors():
        loc = ".".join(str(p) for p in err["loc"]) or "row"
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            msg = "unknown field"
        parts.append(f"{loc}: {msg}")
    return "; ".join(parts)


# the rows looked at before a file is said not to be a manifest at all
FIRST_ROWS = 5


class NotAManifest(ValueError):
    """The file is not JSON Lines (or CSV) at all: its first rows are none of them a JSON
    object (or a CSV header without `id`). One error for the file, not one per line."""


def detect_format(name: str) -> Literal["jsonl", "csv"]:
    return "csv" if name.lower().rstrip("/").endswith(".csv") else "jsonl"


def _iter_jsonl(stream: IO[bytes]) -> Iterator[tuple[int, dict[str, Any] | None, str | None]]:
    for line_number, raw_line in enumerate(stream, start=1):
        if len(raw_line) > MAX_LINE_BYTES:
            yield line_number, None, f"line is longer than {MAX_LINE_BYTES} bytes"
            continue
        try:
            text = raw_line.decode("utf-8")
        except UnicodeDecodeError:
            yield line_number, None, "line is not valid UTF-8"
            continue
        if line_number == 1:
            text = text.removeprefix("\ufeff")
        if not text.strip():
            continue
        try:
            obj = json.loads(text)
        except json.JSONDecodeError as exc:
            yield line_number, None, f"not valid JSON ({exc.msg} at column {exc.colno})"
            continue
        if not isinstance(obj, dict):
            yield line_number, None, "each line must be a JSON object"
            continue
        yield line_number, obj, None


def _looks_like_a_manifest(
    lines: Iterator[tuple[int, dict[str, Any] | None, str | None]], fmt: str
) -> Iterator[tuple[int, dict[str, Any] | None, str | None]]:
    """The lines as they come, unless the first FIRST_ROWS are all unreadable (JSON Lines)
    or have no `id` (CSV: its header has none): then NotAManifest, naming the first line."""
    first = []
    for line in lines:
        first.append(line)
        if len(first) == FIRST_ROWS:
            break
    if first:
        if fmt == "jsonl" and all(obj is None for _, obj, _ in first):
            line_number, _, error = first[0]
            raise NotAManifest(
                f"not a JSON Lines file (one JSON object per line): line {line_number}: "
                f"{error}; a CSV manifest needs a .csv name"
            )
        if fmt == "csv" and all(obj is not None and "id" not in obj for _, obj, _ in first):
            columns = ", ".join(sorted(first[0][1] or {})) or "none"
            raise NotAManifest(f"not a manifest CSV: its header has no `id` column ({columns})")
    yield from first
    yield from lines


def _csv_value(text: str) -> Any:
    stripped = text.strip()
    if stripped.startswith(("[", "{")):
        try:
            return json.loads(stripped)
        except json.JSONDecodeError:
            return text
    return text


def _iter_csv(stream: IO[bytes]) -> Iterator[tuple[int, dict[str, Any] | None, str | None]]:
    text = io.TextIOWrapper(stream, encoding="utf-8-sig", errors="strict", newline="")
    reader = csv.DictReader(text)
    try:
        for record in reader:
            line_number = reader.line_num
            if None in record:
                yield line_number, None, "more values than header columns"
                continue
            obj = {k: _csv_value(v) for k, v in record.items() if v is not None and v != ""}
            if not obj:
                continue
            yield line_number, obj, None
    except (UnicodeDecodeError, csv.Error) as exc:
        yield reader.line_num + 1, None, f"unreadable CSV ({exc}); rows after this are skipped"
    finally:
        text.detach()


def read_manifest(
    stream: IO[bytes],
    fmt: Literal["jsonl", "csv"] = "jsonl",
    *,
    adapters: AdapterLookup = builtin_adapter,
) -> Iterator[ParsedRow[Row]]:
    """Yield every non-blank row of a manifest, valid or not, in order."""
    return read_rows(stream, fmt, lambda obj: validate_row(obj, adapters))


def read_rows(
    stream: IO[bytes],
    fmt: Literal["jsonl", "csv"],
    validate: Callable[[dict[str, Any]], R],
) -> Iterator[ParsedRow[R]]:
    """Every non-blank row of a JSON Lines / CSV file, checked by `validate` (which raises
    pydantic's ValidationError), ids unique: generation and training manifests alike.
    NotAManifest, before any row, for a file that is not one at all."""
    seen_ids: set[str] = set()
    lines = _looks_like_a_manifest(_iter_csv(stream) if fmt == "csv" else _iter_jsonl(stream), fmt)
    for index, (line_number, obj, parse_error) in enumerate(lines):
        raw_id = obj.get("id") if obj is not None else None
        row_id = raw_id if isinstance(raw_id, str) and _ROW_ID.fullmatch(raw_id) else None
        if parse_error is not None or obj is None:
            yield ParsedRow(
                index, line_number, None, f"line {line_number}: {parse_error}", None, None
            )
            continue
        try:
            row = validate(obj)
        except ValidationError as exc:
            message = f"line {line_number}: {describe_validation_error(exc)}"
            yield ParsedRow(index, line_number, None, message, row_id, obj)
            continue
        if row.id in seen_ids:
            message = f"line {line_number}: id: {row.id!r} is used by an earlier row"
            yield ParsedRow(index, line_number, None, message, row.id, obj)
            continue
        seen_ids.add(row.id)
        yield ParsedRow(index, line_number, row, None, row.id, obj)
