"""Seeded, time-bounded mutation fuzz of tar and Parquet inputs: no damage makes planning or reading raise.

Valid tars (several samples with .json/.txt members; ustar, GNU and pax headers) and Parquet files
(several row groups; a bytes column and a Hugging Face {bytes, path} column; several encodings) are
mutated: truncated at random offsets, bytes flipped, runs overwritten, blocks zeroed, ranges duplicated
or cut out. Each mutated input (one or two containers in folders) is planned and every shard read.
Checked: no exception escapes, keys are unique across the input, each record is data or an error with a
reason, a known shard size matches its records, and after a truncation every sample wholly before the
cut is there with its exact bytes. FUZZ_SECONDS (default 15) bounds the time, FUZZ_SEED picks the seed.
"""

from __future__ import annotations

import io
import json
import os
import random
import shutil
import tarfile
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.config import InputConfig
from pipeline.io.sources import Record, plan_shards, read_shard

SECONDS = float(os.environ.get("FUZZ_SECONDS", "15"))
SEED = int(os.environ.get("FUZZ_SEED", "20240607"))


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


def test_mutated_containers_never_break_planning_or_reading(tmp_path: Path) -> None:
    rng = random.Random(SEED)
    bases = [_tar(rng, form) for form in (tarfile.USTAR_FORMAT, tarfile.GNU_FORMAT, tarfile.PAX_FORMAT)]
    bases += [_parquet(rng, variant) for variant in range(3)]
    figures: Counter[str] = Counter()
    escaped: list[str] = []
    deadline = time.monotonic() + SECONDS
    while time.monotonic() < deadline:
        base = rng.choice(bases)
        extension = ".tar" if base.kind == "tar" else ".parquet"
        root = tmp_path / f"input-{figures['inputs']:05d}"
        placed: dict[str, Base] = {}
        cuts: dict[str, int | None] = {}
        for folder in ("a", "b")[: rng.randint(1, 2)]:
            names = rng.sample(list(MUTATIONS), rng.randint(1, 2))
            data = base.data
            for name in names:
                data = MUTATIONS[name](rng, data) or b"\x00"
                figures[f"mutation {name}"] += 1
            (root / folder).mkdir(parents=True)
            (root / folder / f"x{extension}").write_bytes(data)
            placed[f"{folder}/x"] = base
            cuts[f"{folder}/x"] = len(data) if names == ["truncate"] else None
        figures["inputs"] += 1
        try:
            records = _read_input(root, shard_size=rng.randint(1, 30))
        except AssertionError:
            raise
        except Exception as err:  # counted and reported: none may escape
            escaped.append(f"{type(err).__name__}: {err}"[:300])
            continue
        _check(records, placed, cuts)
        shutil.rmtree(root)
        figures["records"] += len(records)
        figures["error records"] += sum(record.error is not None for record in records)
    print(f"\ncontainer fuzz (seed {SEED}, {SECONDS:.0f} s): {figures['inputs']} inputs, {figures['records']} records, "
          f"{figures['error records']} error records, {len(escaped)} exceptions escaped; "
          + ", ".join(f"{name}: {count}" for name, count in sorted(figures.items()) if name.startswith("mutation")))
    assert escaped == []
    assert figures["inputs"] >= 500
