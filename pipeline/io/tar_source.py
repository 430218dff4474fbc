"""WebDataset tars, read in one sequential pass: damage costs only the samples it touches.

- Members are grouped into samples as WebDataset does: consecutive members sharing a key, the member's
  path up to the first dot of its base name (a leading `./` or `/` dropped; a member with no key or no
  extension is skipped, as WebDataset skips it). The image member is the first of
  `WDS_IMAGE_EXTENSIONS` the sample has; its `.json`/`.txt` members go into `meta`, as read and under
  the stable names of pipeline.io.meta (`caption`, `url`, `source_key`, `sha256`, ...). Within a sample
  a repeated extension keeps the first member.
- Keys are unique within a tar: a key that comes back later, not adjacent, is another sample, keyed
  `<key>#2` (then `#3`, ...) with a warning, so both are accounted for and neither shadows the other.
- Damage: every sample completed before it is yielded. A sample whose member data is cut (or whose
  member is over `MAX_MEMBER_BYTES`) becomes an error row. A tar damaged in a header, cut short (no
  end-of-archive block, also exactly at a member boundary) or failing mid-stream ends with one error
  row `<prefix>/@offset-<N>` for the unreadable rest, N being the byte up to which the tar read well.
  Data after the end-of-archive block (a zeroed header reads as one) counts as damage too. A tar
  unreadable from its first byte (not a tar, missing, permission) is one error row `<prefix>`.
- The number of samples is known only at the end, so `read_tar` returns None for the size.
- A tar is one shard: without an index it cannot be split. Memory: the wanted members of one sample
  (the preferred image so far plus meta) and the set of keys seen.
- Transient storage errors are retried beneath tarfile (`RetryingReader`); when they persist,
  `TransientStorageError` escapes the record iterator, never an error row: the read task fails and
  Ray retries it.
"""

from __future__ import annotations

import logging
import re
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from pipeline.config import InputConfig
from pipeline.io.fs import RetryingReader, TransientStorageError, open_fs
from pipeline.io.keys import container_prefix, safe_key
from pipeline.io.meta import sample_meta, sidecar_value
from pipeline.io.shards import Reading, Record, Shard, describe

log = logging.getLogger("pipeline.io")

# The image member of a WebDataset sample, by preference.
WDS_IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp", "bmp", "gif", "tif", "tiff", "avif")
WDS_META_EXTENSIONS = ("json", "txt")
MAX_MEMBER_BYTES = 1 << 30  # a bigger member is an error row, never read into memory
_LEADING = re.compile(r"^(?:\./|/)+")


class _Probe(tarfile.TarInfo):
    """Remembers why the last header failed: tarfile ends iteration silently on a damaged or missing
    header just as on the end-of-archive block, and only the kind of failure tells them apart."""

    @classmethod
    def fromtarfile(cls, archive: tarfile.TarFile) -> tarfile.TarInfo:
        try:
            return super().fromtarfile(archive)
        except tarfile.HeaderError as err:
            archive.header_error = err  # type: ignore[attr-defined]
            raise


def sample_key(name: str) -> tuple[str, str] | None:
    """(key, lower-case extension) of a member, as WebDataset groups them; None when it has neither."""
    name = _LEADING.sub("", name).encode("utf-8", "surrogateescape").decode("utf-8", "replace")
    directory, slash, base = name.rpartition("/")
    stem, dot, extension = base.partition(".")
    if not stem or not dot:
        return None
    return directory + slash + stem, extension.lower()


@dataclass
class _Sample:
    key: str
    found: list[str] = field(default_factory=list)  # every extension, in member order
    image: tuple[str, str, bytes] | None = None  # (extension, member name, data) of the preferred image so far
    meta: dict[str, Any] = field(default_factory=dict)
    problem: str | None = None


@dataclass
class _Tar:
    shard: Shard
    prefix: str
    seen: set[str] = field(default_factory=set)

    def unique(self, key: str) -> str:
        if key not in self.seen:
            self.seen.add(key)
            return key
        number = 2
        while f"{key}#{number}" in self.seen:
            number += 1
        log.warning("%s: sample key %r comes again later in the tar; keyed %s#%d", self.shard.uri, key, key, number)
        self.seen.add(f"{key}#{number}")
        return f"{key}#{number}"

    def record(self, sample: _Sample) -> Record:
        key = f"{self.prefix}/{safe_key(self.unique(sample.key))}"
        meta = sample_meta(sample.meta)
        if sample.problem is not None:
            return Record(key, self.shard.uri, None, None, sample.problem, meta)
        if sample.image is None:
            found = ", ".join(sorted(set(sample.found))) or "nothing"
            return Record(key, self.shard.uri, None, None, f"no image member in sample (found {found})", meta)
        return Record(key, self.shard.uri, sample.image[1], sample.image[2], None, meta)

    def rest(self, offset: int, why: str) -> Record:
        key = f"{self.prefix}/{safe_key(self.unique(f'@offset-{offset}'))}"
        return Record(key, self.shard.uri, None, None, f"tar damaged after byte {offset}: rest unreadable ({why})")


def _read(archive: tarfile.TarFile, info: tarfile.TarInfo) -> bytes:
    handle = archive.extractfile(info)
    return handle.read() if handle is not None else b""


def _add(archive: tarfile.TarFile, sample: _Sample, info: tarfile.TarInfo, extension: str) -> None:
    """Read the member's data if the sample needs it: a better image than it has, or meta not seen yet."""
    first = extension not in sample.found
    sample.found.append(extension)
    better_image = extension in WDS_IMAGE_EXTENSIONS and (
        sample.image is None or WDS_IMAGE_EXTENSIONS.index(extension) < WDS_IMAGE_EXTENSIONS.index(sample.image[0]))
    wanted_meta = extension in WDS_META_EXTENSIONS and first
    if not (better_image or wanted_meta):
        return  # tarfile skips its data when the next header is read
    if info.size > MAX_MEMBER_BYTES:
        sample.problem = f"member {info.name} is {info.size} bytes, over the {MAX_MEMBER_BYTES}-byte limit"
        return
    data = _read(archive, info)
    if better_image:
        sample.image = (extension, info.name, data)
    else:
        sample.meta[extension] = sidecar_value(extension, data)


def _end_damage(archive: tarfile.TarFile) -> str | None:
    """Why the tar ended where tarfile stopped, if that is not a proper end: a damaged or missing header,
    or data after the end-of-archive block (a zeroed header reads as one; the samples after it are lost)."""
    error = getattr(archive, "header_error", None)
    if not isinstance(error, tarfile.EOFHeaderError):
        return describe(error) if error is not None else "no end-of-archive block"
    try:
        while chunk := archive.fileobj.read(64 * 1024):  # type: ignore[union-attr] - normally a few KB of zeros
            if chunk.count(0) != len(chunk):
                return "an end-of-archive block followed by more data"
    except TransientStorageError:
        raise
    except Exception as err:
        return f"after the end-of-archive block: {describe(err)}"
    return None


def _samples(archive: tarfile.TarFile, tar: _Tar) -> Iterator[Record]:
    sample: _Sample | None = None
    good_until = 0  # the tar read well up to this byte
    damage: str | None = None
    while True:
        try:
            info = archive.next()
        except TransientStorageError:
            raise
        except Exception as err:  # a damaged extended header, or the data of a skipped member cut short
            damage = describe(err)
            break
        archive.members.clear()  # stream mode keeps every header otherwise; none is looked up again
        if info is None:
            good_until, damage = archive.offset, _end_damage(archive)
            break
        good_until = info.offset_data
        named = sample_key(info.name) if info.isfile() else None
        if named is None:
            continue  # folders, links, members without a key or an extension
        if sample is None or named[0] != sample.key:
            if sample is not None:
                yield tar.record(sample)
            sample = _Sample(named[0])
        try:
            _add(archive, sample, info, named[1])
        except TransientStorageError:
            raise
        except Exception as err:  # the member's data is cut short: the stream ends here
            sample.problem = f"sample cut short: member {info.name} unreadable ({describe(err)})"
            damage = f"member {info.name}: {describe(err)}"
            break
        good_until = info.offset_data + info.size
    if sample is not None:
        yield tar.record(sample)
    if damage is not None:
        yield tar.rest(good_until, damage)


def _records(shard: Shard, config: InputConfig) -> Iterator[Record]:
    fs, path = open_fs(shard.uri, config.storage_options)
    tar = _Tar(shard, container_prefix(shard.container, path))
    try:
        handle = RetryingReader(fs, path)
    except TransientStorageError:
        raise
    except Exception as err:  # missing, permission
        yield Record(tar.prefix, shard.uri, None, None, f"unreadable object: {describe(err)}")
        return
    with handle:
        try:
            archive = tarfile.open(fileobj=handle, mode="r|", tarinfo=_Probe)  # noqa: SIM115 - closed below
        except TransientStorageError:
            raise
        except Exception as err:  # not a tar from its first header on
            yield Record(tar.prefix, shard.uri, None, None, f"unreadable object: {describe(err)}")
            return
        with archive:
            yield from _samples(archive, tar)


def read_tar(shard: Shard, config: InputConfig) -> Reading:
    """Every sample of a tar shard, damaged ones as error rows; the count is unknown before reading."""
    return None, _records(shard, config)
