"""File names for an imagefolder export: from a row's key, inside the export, unique, and loadable by HF.

A key comes from the input (file names, tar members) and is not trusted. It is cut into plain path
segments (txt.safe_segments: `..`, `.`, empty parts and absolute roots go, NUL and other control
characters become `_`), so a name can only point below the export root. Then each segment is made safe
for Hugging Face's `imagefolder` loader, which would otherwise drop or re-split images silently:
- a segment starting with `.` or `__` is hidden from its file listing: it gets a leading `_` instead;
- a split word standing alone in a segment (`test/`, `my_val.jpg`, `train-3`: the words `datasets` uses to
  infer splits, between separators `-._ 0-9`) would make a split of its own, and `load_dataset(...,
  split="train")` would then miss those images and the whole metadata file: a `~` follows the word
  (`test~/`, `my_val~.jpg`);
- `data/<x>-00000-of-00001.<ext>` at the root is the pattern of a sharded split: `-of~-` breaks it;
- a segment over `MAX_SEGMENT_BYTES` is cut and keeps a hash of the whole, and its extension.
The last segment keeps the image's own extension, which the loader recognises images by.

`Namer` makes the names unique, also where two keys differ only in case (or Unicode normalisation) or
were cleaned to the same name: a later one gets `~2`, `~3`, ... before its extension, and a folder is
shared by every key whose folder name differs only in case, so the export copies intact onto
case-insensitive file systems. Memory stays bounded: the folder on disk is the record of what is taken
(each name is reserved by creating its file), and only the listings of recently used folders are kept.
"""

from __future__ import annotations

import hashlib
import os
import posixpath
import re
import unicodedata
from collections import OrderedDict
from collections.abc import Iterator
from typing import Any

from PIL import Image

from pipeline.captioning.images import DECODABLE_EXTENSIONS
from pipeline.exports.txt import safe_segments

MAX_SEGMENT_BYTES = 200  # leaves room for `~N` under the usual 255-byte limit
CACHED_FOLDERS = 1024  # folder listings kept in memory by a Namer
SPLIT_WORDS = ("evaluation", "validation", "training", "testing", "train", "valid", "test", "eval", "dev", "val")
_SEPARATORS = "-._ 0-9"  # datasets.data_files.NON_WORDS_CHARS
_SPLIT_WORD = re.compile(rf"(?<![^{_SEPARATORS}])({'|'.join(SPLIT_WORDS)})(?![^{_SEPARATORS}])")
_SHARDED_SPLIT = re.compile(r"(-[0-9]{5}-of)(-[0-9]{5})")
# The extension written for an image whose file or member name has none the loader knows.
FORMAT_EXTENSIONS = {"JPEG": ".jpg", "MPO": ".jpg", "PNG": ".png", "WEBP": ".webp", "GIF": ".gif", "BMP": ".bmp",
                     "TIFF": ".tif", "AVIF": ".avif", "JPEG2000": ".jp2", "ICO": ".ico", "TGA": ".tga", "PPM": ".ppm"}


def image_extension(row: dict[str, Any]) -> str:
    """The extension of the row's image: its member's or file's own when it is an image extension (case
    kept), else one for its decoded format (`JPEG` -> `.jpg`)."""
    name = row.get("member") if row.get("member") is not None else row.get("source")
    extension = posixpath.splitext(posixpath.basename(name or ""))[1]
    if extension.lower() in DECODABLE_EXTENSIONS:
        return extension
    image_format = str(row.get("format") or "").upper()
    if image_format in FORMAT_EXTENSIONS:
        return FORMAT_EXTENSIONS[image_format]
    known = [ext for ext, fmt in Image.registered_extensions().items() if fmt == image_format]
    return known[0] if known else ".jpg"


def _visible(segment: str) -> str:
    return "_" + segment.lstrip("._") if segment.startswith((".", "__")) else segment


def _short(segment: str) -> str:
    if len(segment.encode("utf-8")) <= MAX_SEGMENT_BYTES:
        return segment
    stem, extension = posixpath.splitext(segment)
    extension = extension if len(extension.encode("utf-8")) <= 16 else ""
    digest = hashlib.blake2b(segment.encode("utf-8"), digest_size=4).hexdigest()
    room = MAX_SEGMENT_BYTES - len(extension.encode("utf-8")) - len(digest) - 1
    return stem.encode("utf-8")[:room].decode("utf-8", "ignore") + "~" + digest + extension


def loadable(segment: str) -> str:
    """One segment as HF's loader neither hides nor reads as a split name (see the module doc)."""
    return _SPLIT_WORD.sub(r"\1~", _short(_visible(segment)))


def relative_segments(key: str, extension: str) -> list[str] | None:
    """The export path of a key as segments, its last one ending in `extension`; None if nothing is left."""
    # Lone surrogates (undecodable bytes of a listed name) cannot be written to JSON or most file systems.
    segments = safe_segments(key.encode("utf-8", "surrogatepass").decode("utf-8", "replace"))
    if not segments:
        return None
    last = _visible(segments[-1])
    if not (last.lower().endswith(extension.lower()) and len(last) > len(extension)):
        last += extension
    segments[-1] = last
    segments = [loadable(segment) for segment in segments]
    if len(segments) == 2 and segments[0] == "data":
        segments[1] = _SHARDED_SPLIT.sub(r"\1~\2", segments[1])
    return segments


def fold(name: str) -> str:
    """What two names share when a case- or normalisation-insensitive file system sees them as one."""
    return unicodedata.normalize("NFKC", name).casefold()


def _variants(name: str, is_file: bool) -> Iterator[str]:
    yield name
    stem, extension = posixpath.splitext(name) if is_file else (name, "")
    number = 2
    while True:
        yield loadable(f"{stem}~{number}{extension}")
        number += 1


class Namer:
    """Reserves unique relative paths under `root`, a folder only this export writes to."""

    def __init__(self, root: str) -> None:
        self.root = root
        # folder (relative, "" for the root) -> {folded name: (name on disk, is a folder)}
        self.listings: OrderedDict[str, dict[str, tuple[str, bool]]] = OrderedDict()

    def _listing(self, folder: str) -> dict[str, tuple[str, bool]]:
        listing = self.listings.get(folder)
        if listing is None:
            with os.scandir(os.path.join(self.root, folder)) as entries:
                listing = {fold(entry.name): (entry.name, entry.is_dir(follow_symlinks=False)) for entry in entries}
            self.listings[folder] = listing
            if len(self.listings) > CACHED_FOLDERS:
                self.listings.popitem(last=False)
        self.listings.move_to_end(folder)
        return listing

    def _folder(self, parent: str, name: str) -> str:
        listing = self._listing(parent)
        for candidate in _variants(name, is_file=False):
            taken = listing.get(fold(candidate))
            if taken is not None and taken[1]:
                return posixpath.join(parent, taken[0])  # share the folder, whatever its case
            if taken is None:
                folder = posixpath.join(parent, candidate)
                os.mkdir(os.path.join(self.root, folder))
                listing[fold(candidate)] = (candidate, True)
                self.listings[folder] = {}
                return folder
        raise AssertionError("unreachable")  # _variants never ends

    def reserve(self, segments: list[str]) -> str:
        """Create the folders and an empty file for `segments` (renamed if taken); return its relative path."""
        folder = ""
        for segment in segments[:-1]:
            folder = self._folder(folder, segment)
        listing = self._listing(folder)
        for candidate in _variants(segments[-1], is_file=True):
            if fold(candidate) not in listing:
                relative = posixpath.join(folder, candidate)
                os.close(os.open(os.path.join(self.root, relative), os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644))
                listing[fold(candidate)] = (candidate, False)
                return relative
        raise AssertionError("unreachable")
