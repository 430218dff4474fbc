"""Seeded, count-bounded mutation fuzz of tar and Parquet inputs: no damage makes planning or reading raise.

Valid tars (several samples with .json/.txt members; ustar, GNU and pax headers) and Parquet files
(several row groups; a bytes column and a Hugging Face {bytes, path} column; several encodings) are
mutated: truncated at random offsets, bytes flipped, runs overwritten, blocks zeroed, ranges duplicated
or cut out. Each mutated input (one or two containers in folders) is planned and every shard read.
Checked: no exception escapes, keys are unique across the input, each record is data or an error with a
reason, a known shard size matches its records, and after a truncation every sample wholly before the
cut is there with its exact bytes. FUZZ_INPUTS cases are run (raise it for a longer soak), FUZZ_SEED picks
the seed. The base containers come from the seed; case i is drawn by a generator seeded from (FUZZ_SEED, i)
alone, so it does not depend on the cases before it or on how fast the machine is: a failure names its case
and the command to replay it, FUZZ_CASE=<i>[,<j>...] runs just those cases and lets their exceptions through.
"""

from __future__ import annotations

import io
import json
import os
import random
import shutil
import tarfile
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.config import InputConfig
from pipeline.io.sources import Record, plan_shards, read_shard

SEED = int(os.environ.get("FUZZ_SEED", "20240607"))
INPUTS = int(os.environ.get("FUZZ_INPUTS", "3600"))  # about 15 s on 2 cores
REPLAY = os.environ.get("FUZZ_CASE")  # case indices, comma-separated: just those, exceptions let through


@dataclass
class Base:
    kind: str  # tar | parquet
    data: bytes
    samples: list[tuple[str, int, bytes | None]]  # tar: (sample key, end of its last member's data, image)


def _tar(rng: random.Random, form: int) -> Base:
    buffer = io.BytesIO()
    samples = []
    with tarfile.open(fileobj=buffer, mode="w", format=form) as archive:
        for index in range(rng.randint(3, 8)):
            long = "long-name-" * (12 if form != tarfile.USTAR_FORMAT else 3)  # GNU and pax: extended headers
            key = f"s{index:03d}" if index != 2 else f"deep/{long}"
            image = rng.randbytes(rng.randint(1, 3000))
            members = [("jpg" if index % 3 else "png", image), ("json", json.dumps({"i": index}).encode()),
                       ("txt", f"caption {index} é".encode())][: rng.randint(1, 3)]
            if index == 4:
                members.insert(0, ("webp", rng.randbytes(100)))  # a less preferred image first
            end = 0
            for extension, data in members:
                info = tarfile.TarInfo(f"{key}.{extension}")
                info.size, info.mtime = len(data), 1_700_000_000
                archive.addfile(info, io.BytesIO(data))
                end = buffer.tell() - (-len(data) % 512)  # data end, padding excluded
            samples.append((key, end, image))
    return Base("tar", buffer.getvalue(), samples)


def _parquet(rng: random.Random, variant: int) -> Base:
    rows = rng.randint(10, 40)
    images = [rng.randbytes(rng.randint(0, 600)) if rng.random() > 0.1 else None for _ in range(rows)]
    if variant == 1:
        struct = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
        column = pa.array([{"bytes": image, "path": f"p/{i}.jpg" if i % 2 else None} for i, image in enumerate(images)],
                          struct)
    else:
        column = pa.array(images, pa.binary())
    table = pa.table({"image": column, "label": [f"row {i}" for i in range(rows)]})
    options = [{"compression": "snappy"}, {"compression": "none", "use_dictionary": False},
               {"compression": "zstd", "data_page_version": "2.0"}][variant]
    buffer = io.BytesIO()
    pq.write_table(table, buffer, row_group_size=rng.randint(3, 9), **options)
    return Base("parquet", buffer.getvalue(), [])


# ------------------------------------------------------------------------------------------------- mutations
def _truncate(rng: random.Random, data: bytes) -> bytes:
    return data[: rng.randrange(len(data))]


def _flip(rng: random.Random, data: bytes) -> bytes:
    out = bytearray(data)
    for _ in range(rng.randint(1, 8)):
        out[rng.randrange(len(out))] ^= rng.randint(1, 255)
    return bytes(out)


def _overwrite(rng: random.Random, data: bytes) -> bytes:
    start = rng.randrange(len(data))
    return data[:start] + rng.randbytes(rng.randint(1, 64)) + data[start + rng.randint(1, 64):]


def _zero(rng: random.Random, data: bytes) -> bytes:
    start = rng.randrange(len(data)) // 512 * 512 if rng.random() < 0.5 else rng.randrange(len(data))
    size = 512 if rng.random() < 0.5 else rng.randint(1, 200)
    return data[:start] + bytes(min(size, len(data) - start)) + data[start + size:]


def _duplicate(rng: random.Random, data: bytes) -> bytes:
    start = rng.randrange(len(data))
    piece = data[start:start + rng.randint(1, 2048)]
    at = rng.randrange(len(data))
    return data[:at] + piece + data[at:]


def _cut_out(rng: random.Random, data: bytes) -> bytes:
    start = rng.randrange(len(data))
    return data[:start] + data[start + rng.randint(1, 1024):]


MUTATIONS: dict[str, Callable[[random.Random, bytes], bytes]] = {
    "truncate": _truncate, "flip": _flip, "overwrite": _overwrite, "zero": _zero, "duplicate": _duplicate,
    "cut_out": _cut_out}


# ---------------------------------------------------------------------------------------------------- checks
def _read_input(root: Path, shard_size: int) -> list[Record]:
    config = InputConfig(uri=str(root), shard_size=shard_size)
    records: list[Record] = []
    for shard in plan_shards(config):
        size, reading = read_shard(shard, config)
        got = list(reading)
        assert size is None or size == len(got), (shard, size, len(got))
        records.extend(got)
    return records


def _check(records: list[Record], bases: dict[str, Base], cuts: dict[str, int | None]) -> None:
    keys = [record.key for record in records]
    assert len(set(keys)) == len(keys), [key for key, count in Counter(keys).items() if count > 1]
    for record in records:
        assert (record.data is not None and record.error is None) or (record.data is None and record.error), record
    by_key = {record.key: record for record in records}
    for prefix, cut in cuts.items():
        if cut is None:
            continue
        base = bases[prefix]
        if base.kind == "parquet":  # the footer is at the end: a cut file is one error row
            assert [r.key for r in records if r.key.split("/")[0] == prefix.split("/")[0]] == [prefix]
            continue
        for key, end, image in base.samples:
            if end <= cut:
                assert by_key[f"{prefix}/{key}"].data == image, (prefix, key, cut)


@dataclass
class Case:
    """One fuzz input: which base container, how each copy of it was mutated, the shard size."""

    index: int
    base: str
    folders: dict[str, list[str]]  # folder -> the mutations of its copy, in order
    shard_size: int

    def __str__(self) -> str:
        copies = "; ".join(f"{folder}/: {'+'.join(names)}" for folder, names in self.folders.items())
        return f"case {self.index} (seed {SEED}): {self.base}, {copies}, shard size {self.shard_size}"

    def replay(self) -> str:
        return (f"FUZZ_SEED={SEED} FUZZ_CASE={self.index} python -m pytest -s "
                "tests/unit/io/test_container_fuzz.py::test_mutated_containers_never_break_planning_or_reading")


def make_bases() -> dict[str, Base]:
    rng = random.Random(SEED)
    forms = {"tar-ustar": tarfile.USTAR_FORMAT, "tar-gnu": tarfile.GNU_FORMAT, "tar-pax": tarfile.PAX_FORMAT}
    bases = {name: _tar(rng, form) for name, form in forms.items()}
    variants = ("parquet-snappy", "parquet-plain", "parquet-zstd-v2")
    bases.update({name: _parquet(rng, variant) for variant, name in enumerate(variants)})
    return bases


def draw_case(index: int, bases: dict[str, Base]) -> tuple[Case, dict[str, bytes]]:
    """Case `index`: one base, one or two mutated copies of it (folder -> bytes), a shard size."""
    rng = random.Random(f"{SEED}:{index}")
    name = rng.choice(sorted(bases))
    folders: dict[str, list[str]] = {}
    files: dict[str, bytes] = {}
    for folder in ("a", "b")[: rng.randint(1, 2)]:
        folders[folder] = rng.sample(list(MUTATIONS), rng.randint(1, 2))
        data = bases[name].data
        for mutation in folders[folder]:
            data = MUTATIONS[mutation](rng, data) or b"\x00"
        files[folder] = data
    return Case(index, name, folders, rng.randint(1, 30)), files


def run_case(case: Case, files: dict[str, bytes], bases: dict[str, Base], tmp_path: Path) -> list[Record]:
    """Plan and read one case, then check it; an AssertionError says which case failed and how to replay it."""
    root = tmp_path / f"case-{case.index:05d}"
    base = bases[case.base]
    placed: dict[str, Base] = {}
    cuts: dict[str, int | None] = {}
    for folder, data in files.items():
        (root / folder).mkdir(parents=True)
        (root / folder / ("x.tar" if base.kind == "tar" else "x.parquet")).write_bytes(data)
        placed[f"{folder}/x"] = base
        cuts[f"{folder}/x"] = len(data) if case.folders[folder] == ["truncate"] else None
    try:
        records = _read_input(root, shard_size=case.shard_size)
        _check(records, placed, cuts)
    except AssertionError as error:
        raise AssertionError(f"{case}: {error}\n  input kept in {root}\n  replay: {case.replay()}") from error
    shutil.rmtree(root)
    return records


def test_mutated_containers_never_break_planning_or_reading(tmp_path: Path) -> None:
    bases = make_bases()
    if REPLAY:  # just these cases, their exceptions and tracebacks let through
        for index in (int(word) for word in REPLAY.split(",")):
            case, files = draw_case(index, bases)
            print(f"\ncontainer fuzz {case}")
            records = run_case(case, files, bases, tmp_path)
            print(f"  {len(records)} records, {sum(record.error is not None for record in records)} error records")
        return
    figures: Counter[str] = Counter()
    escaped: list[str] = []
    for index in range(INPUTS):
        case, files = draw_case(index, bases)
        figures[f"base {case.base}"] += 1
        figures.update(f"mutation {name}" for names in case.folders.values() for name in names)
        try:
            records = run_case(case, files, bases, tmp_path)
        except AssertionError:
            raise
        except Exception as err:  # counted and reported: none may escape
            escaped.append(f"{case}: {type(err).__name__}: {err}"[:400] + f"\n    replay: {case.replay()}")
            continue
        figures["records"] += len(records)
        figures["error records"] += sum(record.error is not None for record in records)
    print(f"\ncontainer fuzz (seed {SEED}): {INPUTS} cases, {figures['records']} records, "
          f"{figures['error records']} error records, {len(escaped)} exceptions escaped; "
          + ", ".join(f"{name}: {count}" for name, count in sorted(figures.items()) if name.startswith(("base", "mu"))))
    assert escaped == [], "exceptions escaped:\n  " + "\n  ".join(escaped[:10])
    # Coverage: every base container and every kind of mutation was tried.
    assert {f"base {name}" for name in bases} <= set(figures), figures
    assert {f"mutation {name}" for name in MUTATIONS} <= set(figures), figures
