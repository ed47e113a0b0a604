"""`ipbatch manifest check` / `submit --dry-run`: a manifest checked before anything is
registered. Every row validated as ingest would (adapters known, `custom:` ones included),
every distinct reference and structure input resolved, allowed and looked for (a HEAD, or a
stat), and the output's bucket or folder probed for writing. A file that is not a manifest at
all is said in one line.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from core.errors import ConfigError, IpbatchError, ItemError
from pipeline.inputs import row_inputs
from pipeline.manifest_reader import NotAManifest, detect_format, read_manifest
from pipeline.sources import check_allowed, resolve_reference
from workers.context import StageContext


@dataclass
class Checked:
    rows: int = 0
    valid: int = 0
    invalid: list[tuple[int, str]] = field(default_factory=list)  # (line, why)
    sources: int = 0  # distinct references and structure inputs
    unusable: list[tuple[str, str]] = field(default_factory=list)  # (URI, why)
    output: str | None = None  # why the output cannot be written, if it cannot

    @property
    def ok(self) -> bool:
        return not (self.invalid or self.unusable or self.output)


def check(ctx: StageContext, *, manifest_uri: str, output_uri: str | None) -> Checked:
    """Everything a job of this manifest would find wrong, found now. ConfigError if the
    manifest cannot be read, or is not one."""
    checked = Checked()
    sources: dict[str, list[int]] = {}
    try:
        with ctx.stores.for_uri(manifest_uri).open(manifest_uri) as stream:
            for parsed in read_manifest(stream, detect_format(manifest_uri), adapters=ctx.adapters):
                checked.rows += 1
                if parsed.row is None:
                    checked.invalid.append((parsed.line_number, str(parsed.error)))
                    continue
                checked.valid += 1
                row = parsed.row
                uris = [u for spec in row.adapter_specs() for u in spec.pictures]
                uris += [i.uri for i in row_inputs(row)]
                for uri in uris:
                    sources.setdefault(uri, []).append(parsed.line_number)
    except NotAManifest as exc:
        raise ConfigError(f"{manifest_uri}: {exc}") from exc
    checked.sources = len(sources)
    with ThreadPoolExecutor(max_workers=16) as pool:
        found = pool.map(lambda uri: _unusable(ctx, uri, manifest_uri), list(sources))
        for uri, why in zip(list(sources), found, strict=True):
            if why is not None:
                lines = ", ".join(map(str, sources[uri][:5]))
                checked.unusable.append((uri, f"{why} (line {lines})"))
    if output_uri is not None:
        try:
            ctx.stores.for_uri(output_uri).probe_writes(output_uri)
        except IpbatchError as exc:
            checked.output = str(exc)
    return checked


def _unusable(ctx: StageContext, uri: str, manifest_uri: str) -> str | None:
    """Why a row's picture could not be read, or None."""
    try:
        resolved = resolve_reference(uri, manifest_uri=manifest_uri)
        check_allowed(resolved, allowed=ctx.settings.allowed_sources, local_mode=ctx.local_mode)
        if not ctx.stores.for_uri(resolved).exists(resolved):
            return "does not exist"
    except ItemError as exc:
        return exc.message
    except IpbatchError as exc:
        return str(exc)
    return None
