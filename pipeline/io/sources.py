"""Input sources -> deterministic shards -> image records. No input file stops a run.

Four layouts, all through fsspec so local paths and s3:// behave the same (`format: auto` decides from
what a folder holds as a whole, img2dataset's outputs and Hugging Face exports included: pipeline.io.layout;
`check_input` is the cheap check before a run):
- `folder`: image files under a prefix (recursive), cut into shards of `shard_size` in listing order;
  a `.json`/`.txt` of the same stem beside an image goes into its `meta`;
- `webdataset`: `.tar` files, one shard each (a tar cannot be split without an index), read in one
  sequential pass (pipeline.io.tar_source);
- `parquet`: files with an image column holding bytes or Hugging Face's `{bytes, path}` struct, cut
  into shards of consecutive row groups of about `shard_size` rows (pipeline.io.parquet_source);
- `filelist`: a text file with one image URI per line. Blank lines and `#` comments are ignored; a
  relative line is relative to the folder holding the list; a URI repeated (after stripping) is one
  image, kept at its first place, and the lines dropped are counted in a warning.

The plan is streamed: listing yields one path at a time and shards are emitted as they fill, so a
prefix with millions of objects is never one list in memory. The same input always yields the same
shard ids and keys. Keys are unique across the input and safe as relative file names
(pipeline.io.keys): folder `a/b/cat.jpg`; tar `a/000000/<sample>` for `a/000000.tar`; Parquet
`x/part-0/00000012` (row 12 of `x/part-0.parquet`); file list `s3/b/x.jpg` for `s3://b/x.jpg`,
`file/b/x.jpg` for `/b/x.jpg`.

What the dataset knows about an image (alt text, URL, its own key and hash, other small columns)
travels in the record's `meta` JSON under stable names (pipeline.io.meta).

Every input is accounted for: an unreadable file, sample, row group or damaged tail is an error row
with a reason (permanent errors are data). Transient storage errors (throttling, 5xx, timeouts, dropped
connections) are retried and, when they persist, raise `TransientStorageError` out of the record
iterator instead: the read task fails and Ray retries it.

`read_shard` returns (size, records); the size is None for tar shards, known only once read.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import fsspec

from pipeline.config import InputConfig
from pipeline.io.detect import check_input, detect_format, detect_layout
from pipeline.io.fs import TransientStorageError, open_fs, read_input
from pipeline.io.keys import list_entry_key, safe_key
from pipeline.io.layout import Layout
from pipeline.io.listing import stem
from pipeline.io.meta import sample_meta, sidecar_value
from pipeline.io.parquet_source import read_parquet
from pipeline.io.sharding import plan_shards
from pipeline.io.shards import Reading, Record, Shard, SourceError, describe
from pipeline.io.tar_source import WDS_IMAGE_EXTENSIONS, WDS_META_EXTENSIONS, read_tar

__all__ = ["WDS_IMAGE_EXTENSIONS", "WDS_META_EXTENSIONS", "Layout", "Reading", "Record", "Shard", "SourceError",
           "check_input", "detect_format", "detect_layout", "plan_shards", "read_shard"]


def _sidecar_meta(fs: fsspec.AbstractFileSystem, image_path: str, found: list[str]) -> str | None:
    """The meta of an image file from the sidecars the listing found beside it (one GET each)."""
    raw: dict[str, Any] = {}
    for suffix in found:
        try:
            raw[suffix] = sidecar_value(suffix, read_input(fs, f"{stem(image_path)}.{suffix}"))
        except TransientStorageError:
            raise
        except Exception:  # gone or unreadable since listing: the image is still captioned, without it
            continue
    return sample_meta(raw)


def _read_files(shard: Shard, config: InputConfig) -> Reading:
    def records() -> Iterator[Record]:
        root_fs, root = open_fs(shard.uri, config.storage_options) if shard.uri else (None, "")
        sidecars = shard.sidecars or [[] for _member in shard.members]
        for member, found in zip(shard.members, sidecars, strict=True):
            if shard.uri:  # a folder: members are relative paths (kept as listed, `//` and all)
                key, source = safe_key(member), f"{shard.uri.rstrip('/')}/{member}"
            else:  # a file list: members are URIs
                key, source = list_entry_key(member), member
            try:
                fs, path = (root_fs, f"{root}/{member}") if shard.uri else open_fs(member, config.storage_options)
                data = read_input(fs, path)
            except TransientStorageError:
                raise
            except Exception as err:  # missing, permission, a folder, a URI no file system takes (any class)
                yield Record(key, source, None, None, f"unreadable object: {describe(err)}")
            else:
                yield Record(key, source, None, data, None, _sidecar_meta(fs, path, found) if found else None)

    return len(shard.members), records()


READERS = {"files": _read_files, "tar": read_tar, "parquet": read_parquet}


def read_shard(shard: Shard, config: InputConfig) -> Reading:
    """How many images a shard holds (None when unknown before reading) and every one of their records,
    unreadable ones included. Raises TransientStorageError, from the iterator too, when storage keeps failing."""
    return READERS[shard.kind](shard, config)
