"""What lies under input.uri, streamed: relative paths in listing order, and images with their sidecars.

Listing order is the byte order S3 lists keys in (pipeline.io.walk), locally too. That order is what
finds sidecars without a request of their own: every name starting with `x.` in one folder comes in one
unbroken run, so `a/x.jpg`, `a/x.json` and `a/x.txt` are met close together, whichever sorts first.
"""

from __future__ import annotations

import fnmatch
import posixpath
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field

import fsspec

from pipeline.captioning.images import IMAGE_EXTENSIONS
from pipeline.config import InputConfig
from pipeline.io import walk
from pipeline.io.fs import open_fs, retrying
from pipeline.io.shards import SourceError, extension

SIDECAR_EXTENSIONS = (".json", ".txt")  # read into `meta` beside an image of the same stem
# Images held back while their run of `x.*` names is still open; past this the oldest goes out without
# waiting (only a folder `x.d/` with thousands of images beside `x.jpg` gets there): memory stays bounded.
MAX_PENDING = 4096


def input_kind(config: InputConfig) -> tuple[fsspec.AbstractFileSystem, str, str]:
    """(file system, path, "file" or "directory") of input.uri; SourceError if it is not there."""
    fs, root = open_fs(config.uri, config.storage_options)
    try:
        info = retrying(fs.info, root, what=config.uri)
    except FileNotFoundError:
        raise SourceError(f"input.uri does not exist: {config.uri}") from None
    except OSError as err:
        raise SourceError(f"input.uri cannot be read: {config.uri}: {type(err).__name__}: {err}") from err
    return fs, root, "file" if info.get("type") == "file" else "directory"


def relative_path(path: str, root: str) -> str:
    # Not posixpath.relpath: an S3 key may hold `//` or `..`, and normalising them names another object.
    return path[len(root) + 1:] if path.startswith(root + "/") else posixpath.relpath(path, root)


def listed(fs: fsspec.AbstractFileSystem, root: str) -> Iterator[str]:
    """Every visible file under the folder `root`, relative to it, in listing order."""
    for path, _size in walk.walk_files(fs, root):
        yield relative_path(path, root)


def _globbed(config: InputConfig, relative: str) -> bool:
    return config.glob is None or fnmatch.fnmatch(relative, config.glob)


def files_under(config: InputConfig, extensions: frozenset[str], folder_only: bool = False) -> Iterator[str]:
    """Paths relative to input.uri of the files with these extensions, in listing order ("" for a file)."""
    fs, root, kind = input_kind(config)
    if kind == "file":
        if folder_only:
            raise SourceError(f"input.uri is a file, and format folder needs a folder: {config.uri}")
        yield ""
        return
    for relative in listed(fs, root):
        if extension(relative) in extensions and _globbed(config, relative):
            yield relative


def stem(relative: str) -> str:
    """`a/x.jpg` -> `a/x`: the path without the last suffix of its base name."""
    dot = relative.rfind(".")
    return relative[:dot] if dot > relative.rfind("/") else relative


Pair = tuple[str, list[str]]  # (image path, extensions of the sidecars found beside it)


@dataclass
class SidecarWindow:
    """Pairs images with the `.json`/`.txt` of the same stem, in one pass over a sorted listing.

    A stem's run of names (`<stem>.`...) is closed once the listing has passed it: then no sidecar of it
    can come any more, and its image leaves, in listing order. Planning runs this on every path listed,
    so the common case (one image pending, nothing found) costs a comparison or two."""

    pending: deque[tuple[str, str]] = field(default_factory=deque)  # (image, "<its stem>."), in listing order
    found: dict[str, list[str]] = field(default_factory=dict)  # "<stem>." -> sidecar extensions seen

    def add(self, relative: str) -> list[Pair]:
        """The images whose run `relative` closes; then `relative` itself is taken in."""
        done = self._close(relative) if self.pending or self.found else []
        suffix = extension(relative)
        if suffix in IMAGE_EXTENSIONS:
            self.pending.append((relative, relative[: len(relative) - len(suffix) + 1]))  # "<stem>."
        elif suffix in SIDECAR_EXTENSIONS:
            self.found.setdefault(relative[: len(relative) - len(suffix) + 1], []).append(suffix[1:])
        return done

    def finish(self) -> list[Pair]:
        return self._close(None)

    def _close(self, now: str | None) -> list[Pair]:
        """Take out what `now` (the next path listed; None: the end) shows to be complete."""
        done: list[Pair] = []
        pending = self.pending
        while pending:
            run = pending[0][1]
            if now is not None and (now < run or now.startswith(run)) and len(pending) <= MAX_PENDING:
                break
            image = pending.popleft()[0]
            done.append((image, sorted(self.found[run]) if run in self.found else []))
        if self.found:  # sidecars no image waits for any more: dropped once their run is over
            held = {run for _image, run in pending}
            for run in [run for run in self.found if run not in held and _passed(run, now)]:
                del self.found[run]
        return done


def _passed(run: str, now: str | None) -> bool:
    return now is None or (now > run and not now.startswith(run))


def images_with_sidecars(config: InputConfig) -> Iterator[tuple[str, list[str]]]:
    """(image path relative to input.uri, extensions of its sidecars) in listing order; a folder input."""
    fs, root, kind = input_kind(config)
    if kind == "file":
        raise SourceError(f"input.uri is a file, and format folder needs a folder: {config.uri}")
    window = SidecarWindow()
    for relative in listed(fs, root):
        for image, sidecars in window.add(relative):
            if _globbed(config, image):
                yield image, sidecars
    for image, sidecars in window.finish():
        if _globbed(config, image):
            yield image, sidecars
