"""The run report: one self-contained HTML page about an output, for people to look at.

What it shows, all from committed shards (so it can be made while a run writes):
- counts: rows, captioned, errors, shards committed of planned (`pipeline status`'s own numbers);
- per mode, caption length in words (a histogram) and, where the table has `<mode>_confidence`, its
  distribution over 0..1 (older outputs have no such column: the page says so);
- glitch kinds per mode and error kinds (`reason_kind`, as the markers count them), as bar charts;
- throughput over time from the markers' commit times (shards and images per time bucket); the markers
  record no engine count, so engines over time are shown only as a note;
- the most frequent tags of tag modes (captions split at commas, trimmed, lower-cased);
- the worst examples, glitched captions first, then the lowest confidence, with small thumbnails.

Rows are streamed a record batch at a time; what is kept is bounded whatever the table's size: word-count
and confidence histograms, counters of kinds, a tag counter pruned to its most frequent TAG_LIMIT entries
when it grows past twice that (so counts of rare tags in huge vocabularies are approximate), and the
WORST worst rows. Charts are inline SVG made here, thumbnails JPEG data URIs (images re-read as the gallery
and the image exports do: files directly, tar and Parquet members through exports/sources.py): no scripts,
fonts or requests, so the page opens offline. Every value is HTML-escaped.

A run writes `<output>/report.html` when it ends (cli/main.py); failing to is a warning, never a failed run.
"""

from __future__ import annotations

import base64
import io
import logging
import math
import posixpath
import time
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from PIL import Image, ImageOps

from pipeline.captioning.prompts import TAG_CAPTION_TYPES
from pipeline.exports.gallery import ARCHIVES, MAX_SOURCE_BYTES, escape
from pipeline.exports.table import Output, open_output, shard_batches
from pipeline.exports.targets import TargetError, check_file_target, write_new
from pipeline.io.fs import join, open_fs, read_bytes
from pipeline.table.records import reason_kind
from pipeline.table.status import status

log = logging.getLogger("pipeline.exports.report")
REPORT = "report.html"  # in the output folder, beside _manifest.json
GENERATOR = '<meta name="generator" content="joycaption-pipeline report">'  # how a run knows its own page
THUMBNAIL = 128  # longest side of a worst example's thumbnail, px
WORST = 24  # worst examples shown
TOP_TAGS = 25
TAG_LIMIT = 10_000  # distinct tags kept per mode (pruned to this many when twice as many are seen)
CONFIDENCE_BINS = 20
MAX_COLUMNS = 40  # bars of a histogram or time chart
TEXT_CUT = 600  # characters of a caption or prompt kept for a worst example

STYLE = """
body{font:14px/1.45 system-ui,sans-serif;margin:16px 24px;background:#f6f6f6;color:#222;max-width:1200px}
h1{font-size:20px;margin:0 0 4px}h2{font-size:17px;margin:24px 0 8px;border-bottom:1px solid #ccc}
.summary td{padding:1px 12px 1px 0}.note{color:#666;font-style:italic}
.charts{display:flex;flex-wrap:wrap;gap:12px}
figure.chart{background:#fff;border:1px solid #ddd;border-radius:6px;margin:0;padding:8px}
figure.chart figcaption{font-weight:600;font-size:13px;margin-bottom:4px}
svg text{font:11px system-ui,sans-serif;fill:#333}svg .bar{fill:#3b78c2}svg .bar.warn{fill:#d9822b}
svg .axis{stroke:#999;stroke-width:1}
.worst{display:grid;grid-template-columns:repeat(auto-fill,minmax(340px,1fr));gap:10px}
.example{background:#fff;border:1px solid #ddd;border-radius:6px;padding:8px;display:flex;gap:8px;
 overflow-wrap:anywhere}
.example img,.example .placeholder{flex:none;width:128px;height:128px;object-fit:contain;background:#eee}
.example .placeholder{display:flex;align-items:center;justify-content:center;text-align:center;font-size:11px;
 color:#666}
.example .key{font:600 12px monospace}.badge{background:#fc3;border-radius:3px;padding:0 4px;font-size:12px}
.example p{margin:2px 0;white-space:pre-wrap;font-size:12px}details pre{white-space:pre-wrap;font-size:11px}
"""


# ------------------------------------------------------------------------------------------------ collecting
@dataclass
class ModeData:
    """What the report keeps of one mode: bounded whatever the number of rows."""

    name: str
    is_tags: bool
    captions: int = 0
    words: Counter[int] = field(default_factory=Counter)  # words per caption -> captions
    confidence: list[int] = field(default_factory=lambda: [0] * CONFIDENCE_BINS)
    scored: int = 0  # captions with a confidence value
    has_confidence: bool = False  # some part file has the column
    glitches: Counter[str] = field(default_factory=Counter)
    tags: Counter[str] = field(default_factory=Counter)

    def add_tags(self, text: str) -> None:
        self.tags.update(tag for tag in (" ".join(part.split()).lower() for part in text.split(",")) if tag)
        if len(self.tags) > 2 * TAG_LIMIT:
            self.tags = Counter(dict(self.tags.most_common(TAG_LIMIT)))


@dataclass
class ReportData:
    modes: dict[str, ModeData]
    rows: int = 0
    errors: Counter[str] = field(default_factory=Counter)
    worst: list[tuple[tuple[int, float, str], dict[str, Any]]] = field(default_factory=list)

    def offer(self, rank: tuple[int, float, str], row: dict[str, Any]) -> None:
        """Keep `row` if it is among the WORST lowest ranks (pruned in bulk: a bounded list, sorted lazily)."""
        self.worst.append((rank, row))
        if len(self.worst) > 4 * WORST:
            self.worst = sorted(self.worst, key=lambda item: item[0])[:WORST]

    def worst_rows(self) -> list[dict[str, Any]]:
        return [row for _rank, row in sorted(self.worst, key=lambda item: item[0])[:WORST]]


def tag_modes(output: Output) -> set[str]:
    """Modes that write tag lists: a tag caption type (in any of its prompts), tag clean-up on, or `tag` in
    the name (free-text prompts whose config says nothing else)."""
    found = set()
    configured = {str(mode.get("name")): mode for mode in (output.manifest.get("config") or {}).get("modes") or []
                  if isinstance(mode, dict)}
    for name in output.mode_names:
        mode = configured.get(name) or {}
        types = {mode.get("type")} | {entry.get("type") for entry in mode.get("prompts") or []
                                      if isinstance(entry, dict)}
        if types & TAG_CAPTION_TYPES or ((mode.get("cleanup") or {}).get("tags")) or "tag" in name.lower():
            found.add(name)
    return found


def _confidence_of(value: Any) -> float | None:
    if isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value):
        return min(max(round(float(value), 6), 0.0), 1.0)  # stored as float32: 0.9 reads 0.8999999761
    return None


def _cut(text: Any) -> Any:
    return text[:TEXT_CUT] + "…" if isinstance(text, str) and len(text) > TEXT_CUT else text


def collect(output: Output) -> ReportData:
    """One pass over the committed rows, a record batch at a time."""
    tags = tag_modes(output)
    data = ReportData({name: ModeData(name, name in tags) for name in output.mode_names})
    for shard in output.shards:
        for batch in shard_batches(output, shard):
            names = set(batch.schema.names)
            columns = {name: batch.column(name).to_pylist() for name in names if name != "meta"}
            for mode in data.modes.values():
                mode.has_confidence |= f"{mode.name}_confidence" in names
            for index in range(batch.num_rows):
                _add_row(data, {name: values[index] for name, values in columns.items()})
    return data


def _add_row(data: ReportData, row: dict[str, Any]) -> None:
    data.rows += 1
    if row.get("status") != "ok":
        data.errors[reason_kind(row.get("error"))] += 1
        return
    worst: tuple[int, float] | None = None
    worst_mode = None
    for mode in data.modes.values():
        text = row.get(mode.name)
        if not isinstance(text, str):
            continue
        mode.captions += 1
        mode.words[len(text.split())] += 1
        glitch = row.get(f"{mode.name}_glitch")
        if glitch:
            mode.glitches[str(glitch)] += 1
        confidence = _confidence_of(row.get(f"{mode.name}_confidence"))
        if confidence is not None:
            mode.scored += 1
            mode.confidence[min(int(confidence * CONFIDENCE_BINS + 1e-6), CONFIDENCE_BINS - 1)] += 1
        if mode.is_tags:
            mode.add_tags(text)
        if glitch or confidence is not None:
            rank = (0 if glitch else 1, 1.0 if confidence is None else confidence)
            if worst is None or rank < worst:
                worst, worst_mode = rank, mode.name
    if worst is not None and worst_mode is not None:
        kept = {name: row.get(name) for name in ("key", "source", "member", "shard")}
        kept["mode"] = worst_mode
        for suffix in ("", "_glitch", "_confidence", "_prompt"):
            kept[suffix or "caption"] = _cut(row.get(worst_mode + suffix))
        data.offer((*worst, str(row.get("key"))), kept)


# ------------------------------------------------------------------------------------------------ charts (SVG)
def _number(value: float) -> str:
    return f"{value:,.0f}" if float(value).is_integer() else f"{value:,.2f}"


def _figure(chart_id: str, title: str, svg_body: str, width: int, height: int) -> str:
    return (f'<figure class="chart" data-chart="{escape(chart_id)}"><figcaption>{escape(title)}</figcaption>'
            f'<svg xmlns="http://www.w3.org/2000/svg" role="img" width="{width}" height="{height}" '
            f'viewBox="0 0 {width} {height}" aria-label="{escape(title)}"><title>{escape(title)}</title>'
            f"{svg_body}</svg></figure>")


def _no_data(width: int, height: int) -> str:
    return f'<text class="nodata" x="{width // 2}" y="{height // 2}" text-anchor="middle">no data</text>'


def column_chart(chart_id: str, title: str, labels: list[str], values: list[float], x_label: str,
                 warn: bool = False) -> str:
    """Vertical columns (histograms, time): every column has a tooltip; the first, last and a few between
    are labelled under the axis."""
    width, height, left, bottom, top = 540, 220, 48, 36, 12
    if not values or not any(values):
        return _figure(chart_id, title, _no_data(width, height), width, height)
    peak = max(values)
    step = (width - left - 8) / len(values)
    plot = height - bottom - top
    parts = [f'<line class="axis" x1="{left}" y1="{height - bottom}" x2="{width - 4}" y2="{height - bottom}"/>',
             f'<line class="axis" x1="{left}" y1="{top}" x2="{left}" y2="{height - bottom}"/>',
             f'<text x="{left - 4}" y="{top + 8}" text-anchor="end">{_number(peak)}</text>',
             f'<text x="{left - 4}" y="{height - bottom}" text-anchor="end">0</text>',
             f'<text x="{(left + width) // 2}" y="{height - 4}" text-anchor="middle">{escape(x_label)}</text>']
    every = max(1, math.ceil(len(values) / 8))
    for index, (label, value) in enumerate(zip(labels, values, strict=True)):
        bar = plot * value / peak
        x = left + index * step
        parts.append(f'<rect class="bar{" warn" if warn else ""}" x="{x + 1:.1f}" y="{height - bottom - bar:.1f}" '
                     f'width="{max(step - 2, 1):.1f}" height="{bar:.1f}"><title>{escape(label)}: '
                     f"{_number(value)}</title></rect>")
        if index % every == 0 or (index == len(values) - 1 and index % every >= every / 2):
            parts.append(f'<text x="{x + step / 2:.1f}" y="{height - bottom + 13}" text-anchor="middle">'
                         f"{escape(label)}</text>")
    return _figure(chart_id, title, "".join(parts), width, height)


def bar_chart(chart_id: str, title: str, counts: Iterable[tuple[str, float]], warn: bool = False) -> str:
    """Horizontal bars, one per label, largest first as given."""
    items = [(label, value) for label, value in counts if value]
    width, label_width, row = 540, 210, 20
    if not items:
        return _figure(chart_id, title, _no_data(width, 60), width, 60)
    height = row * len(items) + 8
    peak = max(value for _label, value in items)
    parts = []
    for index, (label, value) in enumerate(items):
        y = 4 + index * row
        bar = (width - label_width - 70) * value / peak
        short = label if len(label) <= 36 else label[:35] + "…"
        parts.append(f'<text x="{label_width - 6}" y="{y + 13}" text-anchor="end">{escape(short)}</text>'
                     f'<rect class="bar{" warn" if warn else ""}" x="{label_width}" y="{y + 2}" width="{bar:.1f}" '
                     f'height="{row - 5}"><title>{escape(label)}: {_number(value)}</title></rect>'
                     f'<text x="{label_width + bar + 4:.1f}" y="{y + 13}">{_number(value)}</text>')
    return _figure(chart_id, title, "".join(parts), width, height)


def words_chart(mode: ModeData) -> str:
    title = f"{mode.name}: caption length in words ({mode.captions:,} captions)"
    if not mode.words:
        return column_chart(f"words-{mode.name}", title, [], [], "words")
    top = max(mode.words)
    width = max(1, math.ceil((top + 1) / MAX_COLUMNS))
    bins = [0] * (top // width + 1)
    for words, count in mode.words.items():
        bins[words // width] += count
    labels = [str(index * width) if width == 1 else f"{index * width}–{index * width + width - 1}"
              for index in range(len(bins))]
    return column_chart(f"words-{mode.name}", title, labels, [float(v) for v in bins], "words per caption")


def confidence_chart(mode: ModeData) -> str:
    if not mode.has_confidence:
        return (f'<p class="note" data-note="confidence-{escape(mode.name)}">{escape(mode.name)}: this output has no '
                f"{escape(mode.name)}_confidence column (written by runs with quality.confidence on)</p>")
    labels = [f"{index / CONFIDENCE_BINS:.2f}–{(index + 1) / CONFIDENCE_BINS:.2f}" for index in range(CONFIDENCE_BINS)]
    return column_chart(f"confidence-{mode.name}", f"{mode.name}: confidence ({mode.scored:,} scored captions)",
                        labels, [float(v) for v in mode.confidence], "confidence (0..1)")


def throughput_charts(commits: list[tuple[float, int]]) -> str:
    """Shards and images committed per time bucket (a minute, or wider so there are at most MAX_COLUMNS)."""
    if not commits:
        return (column_chart("throughput-shards", "shards committed over time", [], [], "time") +
                column_chart("throughput-images", "images committed over time", [], [], "time"))
    commits = sorted(commits)
    start = commits[0][0]
    span = commits[-1][0] - start
    bucket = 60 * max(1, math.ceil(span / 60 / MAX_COLUMNS + 1e-9))
    shards = [0.0] * (int(span // bucket) + 1)
    images = [0.0] * len(shards)
    for at, rows in commits:
        shards[int((at - start) // bucket)] += 1
        images[int((at - start) // bucket)] += rows
    shape = "%H:%M" if span < 86_400 else "%m-%d %H:%M"
    labels = [time.strftime(shape, time.localtime(start + index * bucket)) for index in range(len(shards))]
    per = "minute" if bucket == 60 else f"{bucket // 60} minutes"
    return (column_chart("throughput-shards", f"shards committed per {per}", labels, shards, "commit time") +
            column_chart("throughput-images", f"images committed per {per}", labels, images, "commit time"))


# ------------------------------------------------------------------------------------------------ thumbnails
def small_jpeg(data: bytes, size: int = THUMBNAIL) -> bytes:
    with Image.open(io.BytesIO(data)) as opened:
        opened.draft("RGB", (size, size))
        image = ImageOps.exif_transpose(opened).convert("RGBA")
    image.thumbnail((size, size))
    flat = Image.new("RGB", image.size, "white")
    flat.paste(image, mask=image.getchannel("A"))
    buffer = io.BytesIO()
    flat.save(buffer, "JPEG", quality=75)
    return buffer.getvalue()


def _data_uri(data: bytes) -> str:
    return "data:image/jpeg;base64," + base64.b64encode(small_jpeg(data)).decode("ascii")


def thumbnails(output: Output, rows: list[dict[str, Any]],
               input_storage_options: dict[str, Any] | None) -> dict[str, tuple[str | None, str]]:
    """key -> (data URI, "") or (None, why not), for the worst examples: image files read directly, members of
    tars and Parquet files by re-reading their shard once (exports/sources.py), only the shards that hold one."""
    found: dict[str, tuple[str | None, str]] = {}
    archived: dict[str, set[str]] = {}
    for row in rows:
        key, source = str(row["key"]), row.get("source")
        if not source:
            found[key] = (None, "no source recorded")
        elif row.get("member") is not None or posixpath.splitext(source)[1].lower() in ARCHIVES:
            archived.setdefault(str(row.get("shard")), set()).add(key)
        else:
            found[key] = _file_thumbnail(source, input_storage_options or {})
    for shard, keys in archived.items():
        found.update(_archive_thumbnails(output, shard, keys, input_storage_options))
    return found


def _file_thumbnail(source: str, options: dict[str, Any]) -> tuple[str | None, str]:
    try:
        fs, path = open_fs(source, options)
        if fs.size(path) > MAX_SOURCE_BYTES:
            return None, "image file too large for a thumbnail"
        return _data_uri(read_bytes(fs, path)), ""
    except (OSError, ValueError, SyntaxError, ImportError, Image.DecompressionBombError) as err:
        return None, f"no thumbnail: {type(err).__name__}"


def _archive_thumbnails(output: Output, shard: str, keys: set[str],
                        input_storage_options: dict[str, Any] | None) -> dict[str, tuple[str | None, str]]:
    from pipeline.exports.sources import archive_records, input_access

    found: dict[str, tuple[str | None, str]] = {}
    try:
        access = input_access(output, input_storage_options, None)
        for record in archive_records(output, shard, access):
            if record.key in keys and record.data:
                try:
                    found[record.key] = (_data_uri(record.data), "")
                except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as err:
                    found[record.key] = (None, f"no thumbnail: {type(err).__name__}")
                if len(found) == len(keys):
                    break
    except (OSError, ValueError) as err:
        log.debug("no thumbnails from shard %s: %s", shard, err)
        why = f"no thumbnail: its container could not be read again ({type(err).__name__})"
        return {key: found.get(key, (None, why)) for key in keys}
    return {key: found.get(key, (None, "no thumbnail: not found in its container")) for key in keys}


# ------------------------------------------------------------------------------------------------ the page
def _example_html(row: dict[str, Any], thumb: tuple[str | None, str]) -> str:
    uri, why = thumb
    key = escape(row["key"])
    image = f'<img src="{uri}" alt="{key}">' if uri else f'<div class="placeholder">{escape(why)}</div>'
    badges = []
    if row.get("glitch"):
        badges.append(f'<span class="badge" data-glitch="{escape(row["glitch"])}">{escape(row["glitch"])}</span>')
    confidence = _confidence_of(row.get("confidence"))
    if confidence is not None:
        badges.append(f'<span class="confidence">confidence {confidence:.2f}</span>')
    prompt = (f'<details><summary>prompt</summary><pre>{escape(row["prompt"])}</pre></details>'
              if row.get("prompt") else "")
    return (f'<article class="example" data-key="{key}">{image}<div><p class="key">{key}</p>'
            f'<p>{escape(row["mode"])} {" ".join(badges)}</p><p class="text">{escape(row.get("caption") or "")}</p>'
            f"{prompt}</div></article>")


def render(output: Output, data: ReportData, thumbs: dict[str, tuple[str | None, str]],
           facts: dict[str, Any], commits: list[tuple[float, int]]) -> str:
    model = (output.manifest.get("model") or {}).get("path") or "?"
    title = f"Run report: {output.uri}"
    summary = "".join(f"<tr><td>{escape(name)}</td><td>{escape(value)}</td></tr>" for name, value in (
        ("model", model), ("modes", ", ".join(output.mode_names)),
        ("shards", f"{facts['shards_committed']:,} committed of {facts['shards_planned']:,} planned"),
        ("rows", f"{data.rows:,} ({data.rows - sum(data.errors.values()):,} captioned, "
                 f"{sum(data.errors.values()):,} errors)"),
        ("written", time.strftime("%Y-%m-%d %H:%M:%S %Z"))))
    sections = [f'<h1>{escape(title)}</h1><table class="summary">{summary}</table>']
    modes = list(data.modes.values())
    sections.append('<h2>Caption length</h2><div class="charts">' + "".join(words_chart(m) for m in modes) + "</div>")
    sections.append('<h2>Confidence</h2><div class="charts">' + "".join(confidence_chart(m) for m in modes) + "</div>")
    glitches = Counter({f"{m.name}: {kind}": count for m in modes for kind, count in m.glitches.items()})
    sections.append('<h2>Glitches and errors</h2><div class="charts">'
                    + bar_chart("glitches", "glitch kinds (captions whose last attempt glitched)",
                                glitches.most_common(), warn=True)
                    + bar_chart("errors", "error kinds (rows)", data.errors.most_common(20), warn=True) + "</div>")
    sections.append('<h2>Throughput</h2><div class="charts">' + throughput_charts(commits) + "</div>"
                    '<p class="note" data-note="engines">Engines over time: not recorded in this output '
                    "(markers hold commit times, not engine counts).</p>")
    tag_charts = "".join(bar_chart(f"tags-{m.name}", f"{m.name}: top {TOP_TAGS} tags", m.tags.most_common(TOP_TAGS))
                         for m in modes if m.is_tags)
    sections.append('<h2>Top tags</h2>' + (f'<div class="charts">{tag_charts}</div>' if tag_charts else
                                           '<p class="note" data-note="tags">No tag modes in this run.</p>'))
    worst = data.worst_rows()
    examples = "".join(_example_html(row, thumbs.get(str(row["key"]), (None, "no thumbnail"))) for row in worst)
    sections.append("<h2>Worst examples</h2>" + (
        f'<p class="note">Glitched captions first, then the lowest confidence; {len(worst)} shown.</p>'
        f'<div class="worst">{examples}</div>' if worst else
        '<p class="note" data-note="worst">No glitched or scored captions.</p>'))
    return (f'<!doctype html>\n<html lang="en"><head><meta charset="utf-8">{GENERATOR}<title>{escape(title)}</title>'
            f"<style>{STYLE}</style></head>\n<body>\n" + "\n".join(sections) + "\n</body></html>\n")


def build_report(output_uri: str, storage_options: dict[str, Any] | None = None,
                 input_storage_options: dict[str, Any] | None = None) -> tuple[str, ReportData]:
    """The page's HTML, and what it was made of."""
    output = open_output(output_uri, storage_options)
    facts = status(output_uri, storage_options).to_dict()
    trusted = output.ledger.markers(output.manifest.get("fingerprint"))  # another config's markers do not count
    commits = [(float(marker.committed_at), marker.rows) for marker in trusted
               if marker.committed_at and marker.shard in set(output.shards)]
    data = collect(output)
    worst = data.worst_rows()
    options = storage_options if input_storage_options is None else input_storage_options
    return render(output, data, thumbnails(output, worst, options), facts, commits), data


def default_target(output_uri: str) -> str:
    return join(output_uri.rstrip("/"), REPORT)


def write_report(output_uri: str, to: str | None = None, storage_options: dict[str, Any] | None = None,
                 input_storage_options: dict[str, Any] | None = None, *, overwrite: bool = False) -> str:
    """Write the report to `to` (default `<output>/report.html`, which is the pipeline's own file and replaced
    whatever `overwrite` says); return where. An existing `to` is replaced only with `overwrite`."""
    target = to or default_target(output_uri)
    fs, path = open_fs(target, storage_options)
    if to is None:  # the output's own page: replaced, unless it is someone else's file (--allow-existing)
        overwrite = not fs.exists(path) or _ours(fs, path)
        if not overwrite:
            raise TargetError(f"{target} exists and is not a pipeline report; it was kept (write the report "
                              "elsewhere: pipeline report OUTPUT --to FILE)")
    check_file_target(target, fs, path, "report", REPORT, overwrite)
    page, _data = build_report(output_uri, storage_options, input_storage_options)
    write_new(fs, path, page.encode("utf-8"), overwrite)
    return target



def _ours(fs: Any, path: str) -> bool:
    try:
        with fs.open(path, "rb") as handle:
            return GENERATOR.encode() in handle.read(4096)
    except (OSError, ValueError):
        return False


def write_run_report(output_uri: str, storage_options: dict[str, Any] | None = None,
                     input_storage_options: dict[str, Any] | None = None) -> str:
    """At the end of a run: write `<output>/report.html` and return the console line saying where, or a
    warning line when it could not be written (a run never fails for its report)."""
    try:
        return f"report: {write_report(output_uri, None, storage_options, input_storage_options)}"
    except Exception as err:  # anything: the captions are committed, the page is a convenience
        log.warning("the run report was not written", exc_info=True)
        return f"warning: the run report was not written: {type(err).__name__}: {err}"
