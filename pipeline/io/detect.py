"""Looking at an input before planning it: `detect_layout` (what `format: auto` means here) and
`check_input` (the cheap check a run makes before any engine starts).

Cost, whatever the input's size: a folder's listing up to `CENSUS_FILES` files (five S3 list pages),
one Parquet footer, and for a Parquet input whose image column must be guessed by content, one small batch.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import itertools
from collections.abc import Iterable

import fsspec
import pyarrow.parquet as pq

from pipeline.captioning.images import IMAGE_EXTENSIONS
from pipeline.config import InputConfig
from pipeline.io import layout as rules
from pipeline.io.columns import (
    check_image_column,
    could_hold_images,
    describe_columns,
    is_image_struct,
    named_candidate,
)
from pipeline.io.fs import RetryingReader, TransientStorageError, open_fs, to_uri
from pipeline.io.layout import META, Census, Layout, ParquetProbe, decide
from pipeline.io.listing import SidecarWindow, files_under, input_kind, listed
from pipeline.io.shards import SourceError, extension


def _count(census: Census, relative: str, globbed: bool) -> None:
    found = extension(relative)
    if found == ".tar" and globbed:
        census.tars += 1
        census.shard_stems.add(relative[: -len(found)])
    elif found == ".parquet" and globbed:
        census.parquets.append(relative)
    elif relative.endswith("_stats.json"):
        census.stats += 1
    elif found not in IMAGE_EXTENSIONS:
        census.other[found] += 1


def take_census(fs: fsspec.AbstractFileSystem, root: str, config: InputConfig) -> Census:
    """Count what the first `CENSUS_FILES` files of the folder `root` are (streamed, then stopped)."""
    census, window = Census(), SidecarWindow()

    def globbed(relative: str) -> bool:
        return config.glob is None or fnmatch.fnmatch(relative, config.glob)

    def images(pairs: Iterable[tuple[str, list[str]]]) -> None:
        for image, sidecars in pairs:
            if globbed(image):
                census.add_image(image, sidecars)

    listing = listed(fs, root)
    for relative in itertools.islice(listing, rules.CENSUS_FILES):
        census.files += 1
        _count(census, relative, globbed(relative))
        images(window.add(relative))
    census.complete = next(listing, None) is None
    images(window.finish())
    return census


def _open_parquet(fs: fsspec.AbstractFileSystem, path: str) -> tuple[RetryingReader, pq.ParquetFile]:
    handle = RetryingReader(fs, path)
    try:
        return handle, pq.ParquetFile(handle)
    except BaseException:
        handle.close()
        raise


def probe_parquet(fs: fsspec.AbstractFileSystem, path: str, relative: str) -> ParquetProbe:
    """What one footer says about a Parquet file: could it hold images, and in which column by name."""
    try:
        handle, parquet = _open_parquet(fs, path)
        with handle:
            schema = parquet.schema_arrow
            found = named_candidate(schema)
            struct = found is not None and is_image_struct(schema.field(found).type)
            return ParquetProbe(relative, describe_columns(schema), could_hold_images(schema), found, struct)
    except TransientStorageError:
        raise
    except Exception:  # damaged: presumed to hold images, so that it is one error row, as any damaged file
        return ParquetProbe(relative, None, True)


def _folder_layout(fs: fsspec.AbstractFileSystem, root: str, config: InputConfig) -> Layout:
    census = take_census(fs, root, config)
    if config.glob is not None and not (census.tars or census.images or census.parquets):
        # A glob that matches nothing (yet) plans nothing; what the folder is still comes from all it holds.
        census = take_census(fs, root, config.model_copy(update={"glob": None}))
    relative = census.parquet_to_probe()
    probe = probe_parquet(fs, f"{root}/{relative}", relative) if relative is not None else None
    return decide(census, probe, config.uri)


def _file_layout(fs: fsspec.AbstractFileSystem, root: str, config: InputConfig) -> Layout:
    if root.endswith(".parquet"):
        probe = probe_parquet(fs, root, root.rsplit("/", 1)[-1])
        origin = "huggingface-parquet" if probe.struct else "parquet"
        return Layout("parquet", origin, config.image_column or probe.image_column, META["parquet"])
    if root.endswith(".tar"):
        return Layout("webdataset", "webdataset", None, META["webdataset"])
    return Layout("filelist", "filelist")


def detect_layout(config: InputConfig) -> Layout:
    """The input's layout: `input.format` when given, else decided from what input.uri holds
    (pipeline.io.layout.decide for folders; a file is Parquet, a tar or a list by its name)."""
    if config.format != "auto":
        input_kind(config)  # a missing input.uri fails here, whatever the format
        column = config.image_column if config.format == "parquet" else None
        return Layout(config.format, config.format, column, META[config.format])
    fs, root, kind = input_kind(config)
    return _file_layout(fs, root, config) if kind == "file" else _folder_layout(fs, root, config)


def detect_format(config: InputConfig) -> str:
    """`input.format`, with `auto` resolved (see `detect_layout`)."""
    return detect_layout(config).format


def _first_parquet(config: InputConfig) -> str | None:
    _fs, root = open_fs(config.uri, config.storage_options)
    relative = next(files_under(config, frozenset({".parquet"})), None)
    if relative is None:
        return None
    return root if relative == "" else f"{root}/{relative}"


def check_input(config: InputConfig) -> Layout:
    """The input's layout, checked as far as a few requests go: raises SourceError, naming what it saw, for
    a missing input, an input with nothing to caption or of two kinds at once, and a Parquet input whose
    first file has no usable image column (explicit `input.image_column` absent or not holding bytes, or
    no candidate found when it is unset). Cheap: a bounded listing, one footer, at most one small batch.

    A first Parquet file that cannot be read at all is not an error here: like any damaged file, it
    becomes an error row, and the other files are captioned."""
    layout = detect_layout(config)
    if layout.format != "parquet":
        return layout
    path = _first_parquet(config)
    if path is None:
        return layout
    fs, _root = open_fs(config.uri, config.storage_options)
    try:
        handle, parquet = _open_parquet(fs, path)
    except TransientStorageError:
        raise
    except Exception:
        return layout
    with handle:
        try:
            column = check_image_column(parquet, config.image_column)
        except TransientStorageError:
            raise
        except ValueError as err:
            raise SourceError(f"{to_uri(fs, path)}: {err}") from None
        except Exception:  # a schema pyarrow cannot work with (duplicate names ...): error rows later
            return layout
    return dataclasses.replace(layout, image_column=column)
