"""Input sources -> deterministic shards -> image records.

Four layouts, all through fsspec so local paths and s3:// behave the same:
- `folder`: image files under a prefix (recursive), cut into shards of `shard_size` in listing order;
- `webdataset`: `.tar` shards; members grouped by key, the image member chosen by extension, and the
  `.json`/`.txt` members beside it carried into the row's `meta`;
- `parquet`: files with an image column holding bytes or Hugging Face's `{bytes, path}` struct;
- `filelist`: a text file with one image URI per line.

The plan is streamed: listing yields one path at a time and shards are emitted as they fill, so a
prefix with millions of objects is never one list in memory. The same input always yields the same
shard ids and keys; keys are relative paths (or shard/member), safe to use as file names later.
"""

from __future__ import annotations

import fnmatch
import json
import posixpath
import tarfile
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from typing import Any

import pyarrow.parquet as pq

from pipeline.config import InputConfig
from pipeline.images import IMAGE_EXTENSIONS
from pipeline.io.fs import open_fs, read_bytes, walk_files

# The image member of a WebDataset sample, by preference.
WDS_IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp", "bmp", "gif", "tif", "tiff", "avif")
WDS_META_EXTENSIONS = ("json", "txt")


class SourceError(ValueError):
    """The input cannot be planned (missing, empty, or of an unknown layout)."""


@dataclass
class Shard:
    """One unit of work, commit and resume."""

    id: str
    kind: str  # files | tar | parquet
    uri: str  # the input root (files) or the shard's own file
    members: list[str] = field(default_factory=list)  # files: paths relative to uri (or absolute URIs)
    size: int | None = None  # images in the shard, when known before reading

    def to_json(self) -> str:
        return json.dumps(asdict(self), ensure_ascii=False)

    @classmethod
    def from_json(cls, text: str) -> Shard:
        return cls(**json.loads(text))


@dataclass
class Record:
    """One input image as read, before decoding."""

    key: str
    source: str
    member: str | None
    data: bytes | None
    error: str | None = None
    meta: str | None = None


def _extension(path: str) -> str:
    name = posixpath.basename(path)
    return "." + name.rsplit(".", 1)[-1].lower() if "." in name else ""


def detect_format(config: InputConfig) -> str:
    """Resolve `auto` from the URI: a file is a list or Parquet; a folder by what it holds."""
    if config.format != "auto":
        return config.format
    fs, root = open_fs(config.uri, config.storage_options)
    if not fs.exists(root):
        raise SourceError(f"input.uri does not exist: {config.uri}")
    if fs.isfile(root):
        return "parquet" if root.endswith(".parquet") else "webdataset" if root.endswith(".tar") else "filelist"
    for path, _size in walk_files(fs, root):
        extension = _extension(path)
        if extension == ".tar":
            return "webdataset"
        if extension == ".parquet":
            return "parquet"
        if extension in IMAGE_EXTENSIONS:
            return "folder"
    raise SourceError(f"input.uri holds no images, .tar shards or .parquet files: {config.uri}")


def _selected(config: InputConfig, relative: str) -> bool:
    return config.glob is None or fnmatch.fnmatch(relative, config.glob)


def _chunked(paths: Iterator[str], size: int, kind: str, uri: str) -> Iterator[Shard]:
    chunk: list[str] = []
    index = 0
    for path in paths:
        chunk.append(path)
        if len(chunk) == size:
            yield Shard(f"{index:06d}", kind, uri, chunk, len(chunk))
            chunk, index = [], index + 1
    if chunk:
        yield Shard(f"{index:06d}", kind, uri, chunk, len(chunk))


def _files_under(config: InputConfig, extensions: frozenset[str]) -> Iterator[str]:
    fs, root = open_fs(config.uri, config.storage_options)
    if not fs.exists(root):
        raise SourceError(f"input.uri does not exist: {config.uri}")
    if fs.isfile(root):
        yield ""
        return
    for path, _size in walk_files(fs, root):
        relative = posixpath.relpath(path, root)
        if _extension(path) in extensions and _selected(config, relative):
            yield relative


def _filelist_lines(config: InputConfig) -> Iterator[str]:
    fs, path = open_fs(config.uri, config.storage_options)
    if not fs.exists(path):
        raise SourceError(f"input.uri does not exist: {config.uri}")
    with fs.open(path, "rt", encoding="utf-8") as handle:
        for line in handle:
            line = line.strip()
            if line and not line.startswith("#"):
                yield line


def plan_shards(config: InputConfig) -> Iterator[Shard]:
    """Stream the input's shards in a deterministic order."""
    layout = detect_format(config)
    if layout == "folder":
        yield from _chunked(_files_under(config, IMAGE_EXTENSIONS), config.shard_size, "files", config.uri)
    elif layout == "filelist":
        yield from _chunked(_filelist_lines(config), config.shard_size, "files", "")
    else:
        extension = ".tar" if layout == "webdataset" else ".parquet"
        kind = "tar" if layout == "webdataset" else "parquet"
        for index, relative in enumerate(_files_under(config, frozenset({extension}))):
            uri = config.uri if relative == "" else posixpath.join(config.uri.rstrip("/"), relative)
            yield Shard(f"{index:06d}", kind, uri)


def _key_from_uri(uri: str) -> str:
    """A file-list entry's key: its path without scheme or leading slash."""
    scheme, _, rest = uri.partition("://")
    return (rest if _ else scheme).lstrip("/")


Reading = tuple[int, Iterator[Record]]  # (images in the shard, their records)


def _unreadable(shard: Shard, key: str, err: BaseException) -> Reading:
    return 1, iter([Record(key, shard.uri, None, None, f"unreadable object: {type(err).__name__}: {err}")])


def _read_files(shard: Shard, config: InputConfig) -> Reading:
    def records() -> Iterator[Record]:
        root_fs, root = open_fs(shard.uri, config.storage_options) if shard.uri else (None, "")
        for member in shard.members:
            if shard.uri:
                fs, path, key = root_fs, posixpath.join(root, member), member
                source = posixpath.join(shard.uri.rstrip("/"), member)
            else:
                fs, path = open_fs(member, config.storage_options)
                key, source = _key_from_uri(member), member
            try:
                yield Record(key, source, None, read_bytes(fs, path))
            except (OSError, ValueError) as err:  # missing, permission, network
                yield Record(key, source, None, None, f"unreadable object: {type(err).__name__}: {err}")

    return len(shard.members), records()


def _sample_key(name: str) -> tuple[str, str]:
    directory, base = posixpath.split(name)
    stem, _, extension = base.partition(".")
    return posixpath.join(directory, stem), extension.lower()


def _read_tar(shard: Shard, config: InputConfig) -> Reading:
    fs, path = open_fs(shard.uri, config.storage_options)
    prefix = posixpath.basename(path).removesuffix(".tar")
    try:
        handle = fs.open(path, "rb")
    except OSError as err:
        return _unreadable(shard, prefix, err)
    try:
        archive = tarfile.open(fileobj=handle, mode="r:")  # noqa: SIM115 - records() closes it
        samples: dict[str, dict[str, tarfile.TarInfo]] = {}
        for info in archive.getmembers():  # headers only: seeks past member data
            if info.isfile():
                sample, extension = _sample_key(info.name)
                samples.setdefault(sample, {})[extension] = info
    except (OSError, tarfile.TarError, EOFError) as err:
        handle.close()
        return _unreadable(shard, prefix, err)

    def records() -> Iterator[Record]:
        with handle, archive:
            for sample in sorted(samples):
                try:
                    yield _tar_record(archive, shard, prefix, sample, samples[sample])
                except (OSError, tarfile.TarError, EOFError, ValueError) as err:
                    yield Record(f"{prefix}/{sample}", shard.uri, None, None,
                                 f"unreadable object: {type(err).__name__}: {err}")

    return len(samples), records()


def _tar_record(archive: tarfile.TarFile, shard: Shard, prefix: str, sample: str,
                members: dict[str, tarfile.TarInfo]) -> Record:
    key = f"{prefix}/{sample}"
    meta: dict[str, Any] = {}
    for extension in WDS_META_EXTENSIONS:
        if extension in members:
            text = archive.extractfile(members[extension]).read().decode("utf-8", "replace")  # type: ignore[union-attr]
            try:
                meta[extension] = json.loads(text) if extension == "json" else text
            except json.JSONDecodeError:
                meta[extension] = text
    meta_json = json.dumps(meta, ensure_ascii=False) if meta else None
    image = next((members[e] for e in WDS_IMAGE_EXTENSIONS if e in members), None)
    if image is None:
        found = ", ".join(sorted(members)) or "nothing"
        return Record(key, shard.uri, None, None, f"no image member in sample (found {found})", meta_json)
    data = archive.extractfile(image).read()  # type: ignore[union-attr]
    return Record(key, shard.uri, image.name, data, None, meta_json)


def _image_bytes(value: Any) -> tuple[bytes | None, str | None]:
    if isinstance(value, dict):  # Hugging Face datasets' Image feature: {bytes, path}
        return value.get("bytes"), value.get("path")
    return value, None


def _read_parquet(shard: Shard, config: InputConfig) -> Reading:
    fs, path = open_fs(shard.uri, config.storage_options)
    prefix = posixpath.basename(path).removesuffix(".parquet")
    try:
        parquet = pq.ParquetFile(fs.open(path, "rb"))
        if config.image_column not in parquet.schema_arrow.names:
            names = parquet.schema_arrow.names
            raise ValueError(f"no column {config.image_column!r} (input.image_column); columns are {names}")
    except (OSError, ValueError) as err:
        return _unreadable(shard, prefix, err)

    def records() -> Iterator[Record]:
        row = 0
        for batch in parquet.iter_batches(batch_size=64, columns=[config.image_column]):
            for value in batch.column(0).to_pylist():
                data, inner_path = _image_bytes(value)
                error = None if data else "no image bytes in this row"
                yield Record(f"{prefix}/{row:08d}", shard.uri, inner_path or str(row), data, error)
                row += 1

    return parquet.metadata.num_rows, records()


READERS = {"files": _read_files, "tar": _read_tar, "parquet": _read_parquet}


def read_shard(shard: Shard, config: InputConfig) -> Reading:
    """How many images a shard holds and every one of their records, unreadable ones included."""
    return READERS[shard.kind](shard, config)
