"""What kind of dataset an input folder is, decided from what it holds as a whole (`decide`).

The listing's first `CENSUS_FILES` files are counted (`Census`, filled by pipeline.io.detect) and at most
one Parquet footer is read (`ParquetProbe`); `decide` is a pure function of the two, so every rule can be
tested on a synthetic census. Its result, a `Layout`, says what will be read as images, from which
column, what travels into `meta`, and what is left alone: a `pipeline plan` command can print it.
"""

from __future__ import annotations

import posixpath
from collections import Counter
from dataclasses import dataclass, field

from pipeline.io.listing import stem
from pipeline.io.meta import STABLE_NAMES
from pipeline.io.shards import SourceError

CENSUS_FILES = 5000  # files of the listing looked at to decide; the plan itself lists everything
SIDECAR_META = (*STABLE_NAMES, "json", "txt")
COLUMN_META = (*STABLE_NAMES, "columns")
META = {"webdataset": SIDECAR_META, "parquet": COLUMN_META, "folder": SIDECAR_META, "filelist": ()}
IMG2DATASET_TABLES = "*.parquet and *_stats.json beside the shards (img2dataset's metadata, never read as images)"


@dataclass(frozen=True)
class Layout:
    """How an input is read. `format` is what plans and reads it (`folder`, `webdataset`, `parquet`,
    `filelist`); `origin` names the kind of dataset recognised; `image_column` is a Parquet input's
    column (the explicit one, or the one found in its first file; None when not looked at); `meta`
    the names a row's meta may hold; `ignored` what lies in the input and is never read as images."""

    format: str
    origin: str
    image_column: str | None = None
    meta: tuple[str, ...] = ()
    ignored: tuple[str, ...] = ()
    sampled: int = 0  # files of the listing the decision looked at (0: none, an explicit format or a file)

    def describe(self) -> str:
        lines = [f"layout       {self.origin} (read as {self.format})"]
        if self.image_column is not None:
            lines.append(f"image column {self.image_column}")
        lines.append(f"meta         {', '.join(self.meta) if self.meta else 'none'}")
        lines.extend(f"ignored      {item}" for item in self.ignored)
        if self.sampled:
            lines.append(f"decided from {self.sampled} files of the listing")
        return "\n".join(lines)


@dataclass
class Census:
    """Counts over the first files of a folder's listing (glob applied to tars, Parquet files and images)."""

    files: int = 0
    complete: bool = True  # the listing ended within CENSUS_FILES
    tars: int = 0
    images: int = 0
    with_sidecars: int = 0  # images with a `.json` or `.txt` of the same stem beside them
    stats: int = 0  # img2dataset's `<shard>_stats.json`
    parquets: list[str] = field(default_factory=list)  # relative paths, in listing order
    shard_stems: set[str] = field(default_factory=set)  # tars without `.tar`, folders holding images
    other: Counter[str] = field(default_factory=Counter)  # extensions of everything else

    def named_like_a_shard(self, parquet: str) -> bool:
        """img2dataset writes `00000.parquet` beside `00000.tar` or the folder `00000/`."""
        return stem(parquet) in self.shard_stems

    def img2dataset_marks(self) -> bool:
        return self.stats > 0 or any(self.named_like_a_shard(path) for path in self.parquets)

    def parquet_to_probe(self) -> str | None:
        """The one Parquet file whose footer decides whether the Parquet files hold images: the first not
        explained as img2dataset metadata (named like a shard, or any table when `_stats.json` files lie
        beside tars or images)."""
        if self.stats and (self.tars or self.images):
            return None
        return next((path for path in self.parquets if not self.named_like_a_shard(path)), None)

    def add_image(self, relative: str, sidecars: list[str]) -> None:
        self.images += 1
        self.with_sidecars += bool(sidecars)
        self.shard_stems.add(posixpath.dirname(relative))


@dataclass(frozen=True)
class ParquetProbe:
    """One Parquet file's footer, as far as deciding goes. An unreadable file is presumed to hold images
    (it then reads as one error row, as any damaged file does) and has `columns` None."""

    path: str
    columns: str | None  # "name (type), ..." as read from the schema
    holds_images: bool  # some column could hold images
    image_column: str | None = None  # found from the schema alone (pipeline.io.columns rules 1 and 2)
    struct: bool = False  # that column is a {bytes, ...} struct: Hugging Face datasets' Image feature


def _seen(census: Census, probe: ParquetProbe | None) -> str:
    parts = [f"{census.files} files"]
    parts += [f"{count} {name}" for count, name in ((census.tars, ".tar"), (len(census.parquets), ".parquet"),
                                                   (census.images, "images"), (census.stats, "_stats.json"))
              if count]
    parts += [f"{count} {ext or 'without extension'}" for ext, count in census.other.most_common(5)]
    where = "" if census.complete else f" in the first {CENSUS_FILES} listed"
    example = f"; {probe.path} has columns {probe.columns}" if probe is not None and probe.columns else ""
    return f"{', '.join(parts)}{where}{example}"


def _mixed(census: Census, probe: ParquetProbe | None, kinds: list[str], uri: str) -> SourceError:
    return SourceError(f"input.uri mixes {' and '.join(kinds)} ({_seen(census, probe)}): {uri}; set "
                       f"input.format (webdataset, parquet or folder) to say which to read")


def _parquet_layout(census: Census, probe: ParquetProbe) -> Layout:
    origin = ("img2dataset-parquet" if census.stats else "huggingface-parquet" if probe.struct else "parquet")
    ignored = ("*_stats.json beside the Parquet files",) if census.stats else ()
    return Layout("parquet", origin, probe.image_column, COLUMN_META, ignored, census.files)


def _folder_layout(census: Census, metadata_tables: int) -> Layout:
    marked = census.with_sidecars and census.img2dataset_marks()
    origin = "img2dataset-files" if marked else "folder-with-sidecars" if census.with_sidecars else "folder"
    ignored: tuple[str, ...] = (IMG2DATASET_TABLES,) if marked else ()
    if metadata_tables and not marked:
        ignored += (f"{metadata_tables} .parquet tables without image bytes (metadata)",)
    meta = SIDECAR_META if census.with_sidecars else ()
    return Layout("folder", origin, None, meta, ignored, census.files)


def decide(census: Census, probe: ParquetProbe | None, uri: str = "input") -> Layout:
    """The layout of a folder: the first rule that matches.

    | #  | the folder holds (first CENSUS_FILES files)             | origin                 | read as    |
    | -- | ------------------------------------------------------- | ---------------------- | ---------- |
    | 1  | two of: `.tar` files, image Parquet files, image files  | SourceError: set input.format     |
    | 2  | `.tar` files and img2dataset marks (*)                  | img2dataset-webdataset | webdataset |
    | 3  | `.tar` files                                            | webdataset             | webdataset |
    | 4  | image Parquet files and `*_stats.json`                  | img2dataset-parquet    | parquet    |
    | 5  | image Parquet files with a `{bytes, path}` struct column | huggingface-parquet   | parquet    |
    | 6  | image Parquet files                                     | parquet                | parquet    |
    | 7  | images with sidecars (**) and img2dataset marks (*)     | img2dataset-files      | folder     |
    | 8  | images with sidecars (**)                               | folder-with-sidecars   | folder     |
    | 9  | images (Parquet tables beside them are metadata)        | folder                 | folder     |
    | 10 | only Parquet tables that cannot hold images             | SourceError naming the columns seen |
    | 11 | none of these                                           | SourceError: no images              |

    (*) `*_stats.json` files, or a `.parquet` named like a tar or an image folder (`00000.parquet` beside
    `00000.tar` or `00000/`): img2dataset's metadata tables, never read as images nor probed.
    (**) a `.json` or `.txt` of the same stem beside an image (`x.jpg` + `x.txt`).
    "Image Parquet": `probe` (the footer of `census.parquet_to_probe()`, None when there is none) has a
    bytes or `{bytes, ...}` struct column, or could not be read (then each file is an error row)."""
    image_parquet = probe is not None and probe.holds_images
    kinds = [name for present, name in ((census.tars, f"{census.tars} .tar shards"),
                                        (image_parquet, "Parquet files with image bytes"),
                                        (census.images, f"{census.images} image files")) if present]
    if len(kinds) > 1:
        raise _mixed(census, probe, kinds, uri)
    metadata_tables = len(census.parquets) - int(image_parquet)
    if census.tars:
        if census.img2dataset_marks():
            return Layout("webdataset", "img2dataset-webdataset", None, SIDECAR_META, (IMG2DATASET_TABLES,),
                          census.files)
        return Layout("webdataset", "webdataset", None, SIDECAR_META, (), census.files)
    if image_parquet and probe is not None:
        return _parquet_layout(census, probe)
    if census.images:
        return _folder_layout(census, metadata_tables)
    if census.parquets:
        raise SourceError(f"input.uri holds Parquet tables without image bytes and no images or .tar shards "
                          f"({_seen(census, probe)}): {uri}" + ("; img2dataset writes such tables beside the "
                                                                "shards it downloaded" if census.stats else ""))
    raise SourceError(f"input.uri holds no images, .tar shards or .parquet files ({_seen(census, probe)}): {uri}")
