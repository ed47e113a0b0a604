"""`ipbatch report JOB -o report.html`: one self-contained page to look at a job's results.

A training job gets its own page: the loss curve, the validation scores over the steps (SVG
charts), the newest validation renders, the skipped rows and the settings.

At the top: counts by status, time, images/s and the distribution of CLIP-I and CLIP-T as
small bar charts. Then one row per manifest row (up to --limit, in manifest order): its
references and structure inputs (control images, regions, init image, inpaint mask), its
outputs with seed and scores, the prompt, and for a failed row the error code and message.
Thumbnails are embedded (JPEG data URIs), so the file can be mailed or archived; nothing is
fetched when it is opened. Every text from the manifest is escaped.
"""

from __future__ import annotations

import base64
import html
import io
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Engine
from sqlalchemy.orm import Session

from ipbatch import status
from pipeline.faces import INSIGHTFACE_LICENCE, uses_faceid
from pipeline.requests import adapter_set
from storage.ledger import queries
from storage.objectstore import ObjectStores

THUMB = 160


@dataclass(frozen=True)
class Thumbnails:
    """JPEG data URIs of the pictures a report shows, read with the limits every reader of a
    user's picture applies (bytes, pixels, decompression bombs: `pipeline.images`)."""

    stores: ObjectStores
    max_pixels: int
    max_bytes: int

    def __call__(self, uri: str) -> str | None:
        """The thumbnail of the picture at `uri`; None if it cannot be read or is refused."""
        from pipeline.images import decode_reference

        try:
            data = self.stores.for_uri(uri).get(uri)
            thumb = decode_reference(
                data, name=uri, max_pixels=self.max_pixels, max_bytes=self.max_bytes
            )
            thumb.thumbnail((THUMB, THUMB))
        except Exception:  # a missing, broken or refused picture: the row says why it failed
            return None
        buffer = io.BytesIO()
        thumb.save(buffer, format="JPEG", quality=80)
        return "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode()


def _maybe(value: float | None) -> str:
    return "-" if value is None else f"{value:,.1f}"


def _named_references(params: dict[str, Any], manifest_uri: str) -> list[str]:
    """The references a row names, resolved like the embed stage does (for rows that failed
    before their references were recorded)."""
    from pipeline.sources import resolve_reference

    refs: list[str] = []
    for spec in params.get("adapters") or [params]:
        value = spec.get("reference") if isinstance(spec, dict) else None
        for ref in [value] if isinstance(value, str) else list(value or []):
            try:
                refs.append(resolve_reference(str(ref), manifest_uri=manifest_uri))
            except Exception:
                refs.append(str(ref))
    return list(dict.fromkeys(refs))


def _input_labels(row: queries.ReportRow) -> list[tuple[str, str]]:
    """(label, uri) of the row's control images, regions and init image, shown next to its
    references ("inpaint mask" too when it is an image of its own, not the init's alpha)."""
    controls = row.params.get("control") or []
    labelled = []
    for role, owner, uri in row.inputs:
        if role == "control":
            model = controls[owner].get("model", "") if owner < len(controls) else ""
            labelled.append((f"control {model}".strip(), uri))
        elif role == "region":
            labelled.append((f"region of adapter {owner + 1}", uri))
        elif role == "init":
            labelled.append(("init image", uri))
        elif row.params.get("inpaint_mask") != "alpha":
            labelled.append(("inpaint mask", uri))
    return labelled


def _named_inputs(params: dict[str, Any], manifest_uri: str) -> list[tuple[str, int, str]]:
    """The structure inputs a row names, as the embed stage records them."""
    from pipeline.inputs import row_inputs
    from pipeline.manifest import Row
    from pipeline.sources import resolve_reference

    try:
        named = row_inputs(Row.model_validate(params))
    except Exception:  # not a row this version reads: show its references only
        return []
    found = []
    for i in named:
        try:
            found.append((i.role, i.owner, resolve_reference(i.uri, manifest_uri=manifest_uri)))
        except Exception:
            found.append((i.role, i.owner, i.uri))
    return found


def _load(engine: Engine, job_id: str, limit: int) -> queries.ReportData:
    with Session(engine) as session:
        data = queries.report(session, job_id=job_id, limit=limit)
    if data is None:
        raise LookupError(f"no job {job_id}")
    for row in data.rows:
        if row.error_code == "invalid_row":
            row.params = {}  # not a row: do not show what it claimed
            continue
        if not row.references:  # failed before its references were recorded
            row.references = _named_references(row.params, data.manifest_uri)
        if not row.inputs and row.error_code:  # or before its inputs were
            row.inputs = _named_inputs(row.params, data.manifest_uri)
    return data


def _histogram(values: list[float], lo: float, hi: float, title: str, bins: int = 10) -> str:
    """A small SVG bar chart of `values` in [lo, hi]."""
    counts = [0] * bins
    for v in values:
        k = min(bins - 1, max(0, int((v - lo) / (hi - lo) * bins)))
        counts[k] += 1
    peak = max(counts) or 1
    width, height, bar = 240, 90, 240 // bins
    rects = "".join(
        f'<rect x="{k * bar + 1}" y="{height - 20 - round(c / peak * 60)}" width="{bar - 2}" '
        f'height="{round(c / peak * 60)}"><title>{c}</title></rect>'
        for k, c in enumerate(counts)
    )
    return (
        f'<figure class="chart"><svg width="{width}" height="{height}" role="img" '
        f'aria-label="{html.escape(title)}">{rects}'
        f'<text x="0" y="{height - 4}">{lo:g}</text>'
        f'<text x="{width - 24}" y="{height - 4}">{hi:g}</text></svg>'
        f"<figcaption>{html.escape(title)} (n={len(values)})</figcaption></figure>"
    )


CSS = """
body{font:14px system-ui,sans-serif;margin:24px;color:#222}
h1{font-size:20px;margin:0 0 4px} .muted{color:#666}
.summary{display:flex;gap:32px;align-items:flex-start;margin:16px 0 24px;flex-wrap:wrap}
.counts td{padding:2px 12px 2px 0} .chart rect{fill:#4a7bd0} .chart text{font-size:10px}
figure{margin:0} figcaption{font-size:12px;color:#444}
table.rows{border-collapse:collapse;width:100%}
table.rows td,table.rows th{border-top:1px solid #ddd;padding:8px;vertical-align:top}
table.rows th{text-align:left}
.thumbs{display:flex;gap:8px;flex-wrap:wrap} .thumbs figure{width:SIZEpx}
.thumbs img{max-width:SIZEpx;max-height:SIZEpx;display:block;border:1px solid #ccc}
.status-failed{color:#b00020;font-weight:600} .status-succeeded{color:#0a7a2f}
.error{color:#b00020} .warning{color:#8a5a00} .missing{color:#999;font-style:italic}
""".replace("SIZE", str(THUMB))


def _line_chart(series: dict[str, list[tuple[float, float]]], title: str) -> str:
    """A small SVG line chart: one polyline per series, x = step, y scaled to the data."""
    points = [p for values in series.values() for p in values]
    if not points:
        return ""
    width, height, pad = 480, 160, 28
    x_lo, x_hi = min(x for x, _ in points), max(x for x, _ in points)
    y_lo, y_hi = min(y for _, y in points), max(y for _, y in points)
    x_span, y_span = (x_hi - x_lo) or 1.0, (y_hi - y_lo) or 1.0

    def at(x: float, y: float) -> str:
        px = pad + (x - x_lo) / x_span * (width - 2 * pad)
        py = height - pad - (y - y_lo) / y_span * (height - 2 * pad)
        return f"{px:.1f},{py:.1f}"

    colours = ["#4a7bd0", "#d07a4a", "#3a9a5a"]
    lines = "".join(
        f'<polyline fill="none" stroke="{colours[k % 3]}" stroke-width="1.5" '
        f'points="{" ".join(at(x, y) for x, y in values)}"><title>{html.escape(name)}</title>'
        "</polyline>"
        for k, (name, values) in enumerate(series.items())
    )
    legend = ", ".join(
        f"<span style='color:{colours[k % 3]}'>{html.escape(name)}</span>"
        for k, name in enumerate(series)
    )
    return (
        f'<figure class="chart"><svg width="{width}" height="{height}" role="img" '
        f'aria-label="{html.escape(title)}">{lines}'
        f'<text x="0" y="{pad - 8}">{y_hi:.4g}</text><text x="0" y="{height - pad + 4}">'
        f"{y_lo:.4g}</text>"
        f'<text x="{pad}" y="{height - 6}">step {x_lo:g}</text>'
        f'<text x="{width - pad - 50}" y="{height - 6}">step {x_hi:g}</text></svg>'
        f"<figcaption>{html.escape(title)}: {legend}</figcaption></figure>"
    )


def _training_page(engine: Engine, thumbnail: Thumbnails, job: dict[str, Any]) -> str:
    """A training job: the loss curve, the validation scores over the steps, the newest
    validation renders, the skipped rows and the settings."""
    with Session(engine) as session:
        run = queries.training_summary(session, job_id=job["job_id"], curve=True)
    assert run is not None
    e = html.escape
    validations = run["validations"]
    scores = {"CLIP-I": [(v["step"], v["clip_i"]) for v in validations]}
    if any(v["clip_t"] is not None for v in validations):
        scores["CLIP-T"] = [(v["step"], v["clip_t"]) for v in validations if v["clip_t"]]
    samples = []
    for uri in validations[-1]["samples"] if validations else []:
        data = thumbnail(uri)
        samples.append(
            f"<figure><img src='{data}' alt='validation'><figcaption>{e(uri)}</figcaption></figure>"
            if data
            else f"<figure class='missing'>missing: {e(uri)}</figure>"
        )
    skipped = "".join(
        f"<li>line {s['line']} ({e(str(s['id'] or 'no id'))}): {e(str(s['error']))}</li>"
        for s in run["skipped"]
    )
    settings = "".join(
        f"<tr><td>{e(k)}</td><td>{e(str(v))}</td></tr>" for k, v in run["settings"].items()
    )
    loss = "-" if run["loss"] is None else f"{run['loss']:.4f}"
    return (
        f"<h1>{e(run['adapter'])}</h1><div class='muted'>training job {e(job['job_id'])}: "
        f"{e(job['status'])}, step {run['step']} of {run['total_steps']}, loss {loss}, "
        f"{run['examples'] or 0} rows, adapter {e(run['adapter_uri'] or '(not yet)')}</div>"
        "<div class='summary'>"
        f"{_line_chart({'loss': [(s, v) for s, v, _ in run['curve']]}, 'training loss')}"
        f"{_line_chart(scores, 'validation') if validations else ''}</div>"
        f"<h2>validation renders (step {validations[-1]['step'] if validations else '-'})</h2>"
        f"<div class='thumbs'>{''.join(samples) or '<span class=muted>none yet</span>'}</div>"
        f"<h2>skipped rows</h2><ul>{skipped or '<li>none</li>'}</ul>"
        f"<h2>settings</h2><table class='counts'>{settings}</table>"
    )


def _used_faceid(engine: Engine, job_id: str) -> bool:
    """Whether a row of the job uses a FaceID adapter (its stored params, a page at a time,
    until the first one that does)."""
    with Session(engine) as session:
        return any(
            uses_faceid(adapter_set(params))
            for params in queries.item_params(session, job_id=job_id)
        )


def render(engine: Engine, thumbnail: Thumbnails, *, job_id: str, limit: int = 500) -> str:
    jobs = status.collect(engine, job_id=job_id)
    if not jobs:
        raise LookupError(f"no job {job_id}")
    job = jobs[0]
    if job["training"] is not None:
        return (
            "<!doctype html><html lang='en'><head><meta charset='utf-8'>"
            f"<title>ipbatch training: {html.escape(str(job['name']))}</title>"
            f"<style>{CSS}</style></head><body>{_training_page(engine, thumbnail, job)}"
            "</body></html>"
        )
    loaded = _load(engine, job_id, limit)
    rows, total, images = loaded.rows, loaded.total_items, loaded.total_images
    elapsed = job["elapsed_seconds"]
    scores_i = [o["clip_i"] for r in rows for o in r.outputs if o["clip_i"] is not None]
    scores_t = [o["clip_t"] for r in rows for o in r.outputs if o["clip_t"] is not None]
    e = html.escape
    counts = "".join(
        f"<tr><td>{e(name)}</td><td>{n}</td></tr>" for name, n in job["stages"].items() if n
    )
    rate = images / elapsed if elapsed else 0.0
    head = (
        f"<h1>{e(str(job['name']))}</h1><div class='muted'>job {e(job_id)}: {e(job['status'])}, "
        f"{job['percent_done']:.1f}% done</div>"
        f"<div class='summary'><table class='counts'>{counts}"
        f"<tr><td>images</td><td>{images}</td></tr>"
        f"<tr><td>made before, copied</td><td>{loaded.cost['reused']}</td></tr>"
        f"<tr><td>GPU-seconds</td><td>{loaded.cost['gpu_seconds']:.1f}</td></tr>"
        f"<tr><td>images per GPU-hour</td>"
        f"<td>{_maybe(loaded.cost['images_per_gpu_hour'])}</td></tr>"
        f"<tr><td>GPU-seconds saved by copies</td>"
        f"<td>{_maybe(loaded.cost['gpu_seconds_saved'])}</td></tr>"
        f"<tr><td>time</td><td>{elapsed:.1f} s</td></tr>"
        f"<tr><td>images/s</td><td>{rate:.2f}</td></tr></table>"
        f"{_histogram(scores_i, -1.0, 1.0, 'CLIP-I') if scores_i else ''}"
        f"{_histogram(scores_t, 0.0, 2.5, 'CLIP-T') if scores_t else ''}</div>"
    )
    if total > len(rows):
        head += f"<p class='muted'>showing the first {len(rows)} of {total} rows</p>"
    if _used_faceid(engine, job_id):
        head += f"<p class='licence'>{e(INSIGHTFACE_LICENCE)}.</p>"
    body = []
    for r in rows:
        refs = []
        for uri in r.references:
            data = thumbnail(uri)
            refs.append(
                f"<figure><img src='{data}' alt='reference'><figcaption>{e(uri)}</figcaption>"
                "</figure>"
                if data
                else f"<figure class='missing'>unreadable: {e(uri)}</figure>"
            )
        for label, uri in _input_labels(r):
            data = thumbnail(uri)
            refs.append(
                f"<figure class='input'><img src='{data}' alt='{e(label)}'>"
                f"<figcaption>{e(label)}: {e(uri)}</figcaption></figure>"
                if data
                else f"<figure class='missing'>unreadable {e(label)}: {e(uri)}</figure>"
            )
        outs = []
        for o in r.outputs:
            data = thumbnail(o["uri"])
            scores = " ".join(
                f"{name} {o[key]:.3f}"
                for name, key in (("CLIP-I", "clip_i"), ("CLIP-T", "clip_t"))
                if o[key] is not None
            )
            caption = f"#{o['image_index']} seed {o['seed']} {scores}"
            outs.append(
                f"<figure><img src='{data}' alt='output {o['image_index']}' class='output'>"
                f"<figcaption>{e(caption)}</figcaption></figure>"
                if data
                else f"<figure class='missing'>missing: {e(o['uri'])}</figure>"
            )
        notes = ""
        if r.error_code:
            notes += f"<div class='error'>{e(r.error_code)}: {e(r.error_message or '')}</div>"
        if r.warning:
            notes += f"<div class='warning'>{e(r.warning)}</div>"
        prompt = r.params.get("prompt")
        body.append(
            f"<tr class='row' data-status='{e(r.status)}'><td>{r.row_index + 1}</td>"
            f"<td>{e(r.row_id or '(no id)')}</td>"
            f"<td class='status-{e(r.status)}'>{e(r.status)}</td>"
            f"<td>{e(str(prompt or ''))}{notes}</td>"
            f"<td><div class='thumbs'>{''.join(refs)}</div></td>"
            f"<td><div class='thumbs'>{''.join(outs)}</div></td></tr>"
        )
    script = (
        "<script>window.addEventListener('load',()=>{const i=[...document.images];"
        "document.body.dataset.imagesLoaded=i.filter(x=>x.complete&&x.naturalWidth>0).length;"
        "document.body.dataset.imagesBroken=i.filter(x=>!(x.complete&&x.naturalWidth>0)).length;"
        "});</script>"
    )
    return (
        "<!doctype html><html lang='en'><head><meta charset='utf-8'>"
        f"<title>ipbatch report: {e(str(job['name']))}</title><style>{CSS}</style></head><body>"
        f"{head}<table class='rows'><thead><tr><th>#</th><th>row</th><th>status</th>"
        "<th>prompt</th><th>references and inputs</th><th>outputs</th></tr></thead><tbody>"
        f"{''.join(body)}</tbody></table>{script}</body></html>"
    )
