"""A review gallery: one static, self-contained HTML page showing a sample of rows and their captions.

For eyeballing a run: the sample is chosen by a hash of (seed, key), so the same seed shows the
same images whatever the row order, and an image stays in the sample as the run grows unless one
with a lower hash displaces it. Only the sample is held in memory. Thumbnails are embedded as JPEG
data URIs, so the page can be mailed or opened offline. Images inside tars or Parquet files would
mean re-reading whole archives, so those get a placeholder. Every value is HTML-escaped: keys,
captions and errors come from untrusted inputs and model output.
"""

from __future__ import annotations

import base64
import hashlib
import heapq
import io
import logging
import posixpath
import re
from html import escape as html_escape
from typing import Any

from PIL import Image, ImageOps

from pipeline.exports.table import Output, iter_batches, open_output
from pipeline.exports.targets import check_file_target, write_new
from pipeline.io.fs import open_fs, read_bytes

log = logging.getLogger("pipeline.exports.gallery")
THUMBNAIL = 256  # longest side, px
MAX_SOURCE_BYTES = 64 << 20  # larger files get a placeholder rather than a slow page build
ARCHIVES = (".tar", ".parquet")
CONTROL_CHARACTERS = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")
MODE_COLUMNS = ("", "_prompt", "_glitch", "_attempts", "_tokens", "_finish_reason")
STYLE = """
body{font:14px/1.4 system-ui,sans-serif;margin:16px;background:#f4f4f4;color:#222}
.grid{display:grid;grid-template-columns:repeat(auto-fill,minmax(300px,1fr));gap:12px}
.card{background:#fff;border:1px solid #ddd;border-radius:6px;padding:8px;overflow-wrap:anywhere}
.card[data-status=error]{border-color:#c33;background:#fff4f4}
.thumb{display:block;max-width:256px;max-height:256px;margin:0 auto 6px}
.placeholder{width:256px;height:120px;display:flex;align-items:center;justify-content:center;
 text-align:center;background:#eee;color:#666;font-size:12px;border:1px dashed #aaa;padding:6px;box-sizing:border-box}
.key{font:600 13px monospace;margin:4px 0}.meta{color:#777;font-size:12px;margin:2px 0}
.error{color:#b00;font-weight:600}.caption{border-top:1px solid #eee;margin-top:6px;padding-top:4px}
.caption h3{font-size:12px;margin:0;color:#555}.glitch{background:#fc3;color:#000;border-radius:3px;padding:0 4px}
.attempts{color:#777;font-weight:normal}.caption p{margin:2px 0;white-space:pre-wrap}
details pre{white-space:pre-wrap;font-size:11px;background:#f8f8f8;padding:4px}
"""


def escape(value: object) -> str:
    """Text safe inside HTML elements and quoted attributes; control characters (NUL) shown as U+FFFD."""
    return html_escape(CONTROL_CHARACTERS.sub("\ufffd", str(value)), quote=True)


def _score(seed: int, key: str) -> int:
    return int.from_bytes(hashlib.blake2b(f"{seed}\x1f{key}".encode(), digest_size=8).digest(), "big")


def sample_rows(output: Output, sample: int, seed: int) -> tuple[list[dict[str, Any]], int]:
    """The `sample` rows with the lowest (seed, key) hashes, sorted by key, and the rows seen."""
    columns = ["key", "source", "member", "status", "error", "width", "height", "format"]
    columns += [name + suffix for name in output.mode_names for suffix in MODE_COLUMNS]
    heap: list[tuple[int, str, dict[str, Any]]] = []  # (-score, key, row): the worst kept row on top
    total = 0
    for batch in iter_batches(output, columns):
        for index, key in enumerate(batch.column("key").to_pylist()):
            total += 1
            score = _score(seed, key)
            if len(heap) < sample or score < -heap[0][0]:
                entry = (-score, key, batch.slice(index, 1).to_pylist()[0])
                (heapq.heappush if len(heap) < sample else heapq.heapreplace)(heap, entry)
    return sorted((entry[2] for entry in heap), key=lambda row: row["key"]), total


def _jpeg_thumbnail(data: bytes) -> bytes:
    with Image.open(io.BytesIO(data)) as opened:
        opened.draft("RGB", (THUMBNAIL, THUMBNAIL))  # JPEG: decode at a fraction of full size
        image = ImageOps.exif_transpose(opened).convert("RGBA")
    image.thumbnail((THUMBNAIL, THUMBNAIL))
    flat = Image.new("RGB", image.size, "white")
    flat.paste(image, mask=image.getchannel("A"))
    buffer = io.BytesIO()
    flat.save(buffer, "JPEG", quality=80)
    return buffer.getvalue()


def thumbnail(row: dict[str, Any], storage_options: dict[str, Any] | None) -> tuple[str | None, str]:
    """(JPEG data URI, "") for an image file the row names, else (None, why there is none)."""
    source = row.get("source")
    if not source:
        return None, "no source recorded"
    if row.get("member") is not None or posixpath.splitext(source)[1].lower() in ARCHIVES:
        return None, "image is inside an archive or table; not re-read for the gallery"
    try:
        fs, path = open_fs(source, storage_options)
        if fs.size(path) > MAX_SOURCE_BYTES:
            return None, "image file too large for a thumbnail"
        data = _jpeg_thumbnail(read_bytes(fs, path))
    except (OSError, ValueError, SyntaxError, ImportError, Image.DecompressionBombError) as err:
        log.debug("no thumbnail for %s: %s", source, err)
        return None, f"no thumbnail: {type(err).__name__}"
    return "data:image/jpeg;base64," + base64.b64encode(data).decode("ascii"), ""


def _caption_html(row: dict[str, Any], mode: str) -> str:
    glitch = row.get(f"{mode}_glitch")
    attempts = row.get(f"{mode}_attempts")
    text = row.get(mode)
    parts = [f'<section class="caption" data-mode="{escape(mode)}"><h3>{escape(mode)}']
    if glitch:
        parts.append(f' <span class="glitch" data-glitch="{escape(glitch)}">{escape(glitch)}</span>')
    if attempts is not None:
        parts.append(f' <span class="attempts">{attempts} attempt{"" if attempts == 1 else "s"}</span>')
    parts.append(f'</h3><p class="text">{escape(text) if text is not None else "<i>no caption</i>"}</p>')
    if row.get(f"{mode}_prompt"):
        parts.append(f'<details class="prompt"><summary>prompt</summary><pre>{escape(row[f"{mode}_prompt"])}</pre>'
                     "</details>")
    return "".join(parts) + "</section>"


def card_html(row: dict[str, Any], modes: list[str], storage_options: dict[str, Any] | None) -> str:
    """One image: thumbnail or placeholder, key, size, error if any, then each mode's caption."""
    status = row.get("status") or "error"
    data_uri, why = thumbnail(row, storage_options)
    key = escape(row["key"])
    image = (f'<img class="thumb" src="{data_uri}" alt="{key}">' if data_uri
             else f'<div class="thumb placeholder">{escape(why)}</div>')
    size = f"{row['width']}×{row['height']} " if row.get("width") and row.get("height") else ""
    parts = [f'<article class="card" data-status="{escape(status)}" data-key="{key}">', image,
             f'<h2 class="key">{key}</h2><p class="meta">{escape(size + (row.get("format") or ""))}</p>']
    if status != "ok":
        parts.append(f'<p class="error">{escape(row.get("error") or "error (no reason recorded)")}</p>')
    parts.extend(_caption_html(row, mode) for mode in modes if status == "ok" or row.get(mode) is not None)
    return "".join(parts) + "</article>"


def render_page(output: Output, rows: list[dict[str, Any]], total: int, seed: int,
                storage_options: dict[str, Any] | None) -> str:
    model = (output.manifest.get("model") or {}).get("path") or "?"
    errors = sum(1 for row in rows if row.get("status") != "ok")
    title = f"Captions: {output.uri}"
    header = (f"<h1>{escape(title)}</h1><p class=\"summary\">{len(rows)} of {total} committed rows "
              f"(errors in the sample: {errors}), sampled with seed {seed}; model {escape(str(model))}; "
              f"modes {escape(', '.join(output.mode_names))}.</p>")
    cards = "\n".join(card_html(row, output.mode_names, storage_options) for row in rows)
    return (f'<!doctype html>\n<html lang="en"><head><meta charset="utf-8"><title>{escape(title)}</title>'
            f"<style>{STYLE}</style></head>\n<body><header>{header}</header>\n<main class=\"grid\">\n{cards}\n"
            "</main></body></html>\n")


def write_gallery(output_uri: str, page_path: str, sample: int = 48, seed: int = 0,
                  storage_options: dict[str, Any] | None = None,
                  input_storage_options: dict[str, Any] | None = None, *, overwrite: bool = False) -> int:
    """Write the gallery page for a sample of committed rows; return how many rows it shows.

    Images are read with `input_storage_options` (default: the output's), since the manifest keeps
    no credentials. An existing page is replaced only with `overwrite`; a folder is refused.
    """
    if sample < 1:
        raise ValueError("sample must be at least 1")
    output = open_output(output_uri, storage_options)
    fs, path = open_fs(page_path, storage_options)
    check_file_target(page_path, fs, path, "gallery", "gallery.html", overwrite)
    rows, total = sample_rows(output, sample, seed)
    page = render_page(output, rows, total, seed,
                       storage_options if input_storage_options is None else input_storage_options)
    write_new(fs, path, page.encode("utf-8"), overwrite)
    return len(rows)
