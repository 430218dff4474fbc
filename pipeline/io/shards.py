"""The planned unit of work (`Shard`), the records reading one gives (`Record`), and planning errors."""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field, fields


class SourceError(ValueError):
    """The input cannot be planned (missing, empty, or of an unknown layout)."""


@dataclass
class Shard:
    """One unit of work, commit and resume.

    `kind` is `files` (folder and file-list inputs: `members` are paths relative to `uri`, or URIs when
    `uri` is ""), `tar` (one whole tar: a tar cannot be split without an index) or `parquet` (one file,
    or the row groups [row_groups[0], row_groups[1]) of it, whose first row is row `first_row` of the file).
    `container` is a tar's or Parquet file's path relative to input.uri ("" when input.uri is the file),
    None in plans written before it existed. `sidecars` tells a folder shard's reader which `.json`/`.txt`
    files lie beside its images, so it asks storage for those that exist and no others."""

    id: str
    kind: str  # files | tar | parquet
    uri: str  # the input root (files) or the shard's own file
    members: list[str] = field(default_factory=list)  # files: paths relative to uri (or absolute URIs)
    size: int | None = None  # images in the shard, when known before reading
    container: str | None = None  # tar / parquet: the file's path relative to input.uri
    row_groups: list[int] | None = None  # parquet: [start, stop) of the file's row groups; None: all
    first_row: int = 0  # parquet: the file's row number of the range's first row
    # files (folders): the sidecar extensions (`json`, `txt`) the listing found beside each member, in
    # member order; None when no member has any, and in plans written before sidecars were read.
    sidecars: list[list[str]] | None = None

    def units(self, input_uri: str | None = None) -> list[str]:
        """What the listing found that this shard covers: its members, or its container file's relative path.

        Every shard of one Parquet file returns the same unit. For tar and Parquet shards of old plans
        (no `container`), the path relative to `input_uri` when given, else the file's URI."""
        if self.kind == "files":
            return list(self.members)
        if self.container is not None:
            return [self.container]
        if input_uri is not None:
            root = input_uri.rstrip("/")
            return [self.uri[len(root) + 1:] if self.uri.startswith(root + "/") else ""]
        return [self.uri]

    def to_json(self) -> str:
        return json.dumps(asdict(self), ensure_ascii=False)

    @classmethod
    def from_json(cls, text: str) -> Shard:
        # Older plan files lack the newer fields (their defaults apply); unknown ones are ignored.
        known = {item.name for item in fields(cls)}
        return cls(**{name: value for name, value in json.loads(text).items() if name in known})


@dataclass
class Record:
    """One input image as read, before decoding."""

    key: str
    source: str
    member: str | None
    data: bytes | None
    error: str | None = None
    meta: str | None = None


Reading = tuple[int | None, Iterator[Record]]  # (images in the shard, None if unknown before reading; records)


def extension(path: str) -> str:
    """`a/b.JPG` -> `.jpg`: the last suffix of the base name, lower case ("" without one). Planning calls
    this on every path listed, hence string searches rather than posixpath."""
    dot = path.rfind(".")
    return path[dot:].lower() if dot > path.rfind("/") else ""


def describe(err: BaseException) -> str:
    return f"{type(err).__name__}: {err}"
