"""Dirty data through the real pipeline: damaged files of every kind end as rows, never as a failed run."""

from __future__ import annotations

import random
import shutil
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.table.names import DATA
from tests.integration.conftest import last_summary, run_cli, write_config

pytestmark = pytest.mark.integration
QUICK_MODES = [{"name": "tags", "type": "booru_like", "length": 50, "max_tokens": 8}]
FEW = ["astronaut.jpg", "coffee.jpg", "rocket.jpg"]


def _run(tmp_path: Path, tiny_model: Path, input_uri: str, out: Path, **sections: object):
    sections.setdefault("modes", QUICK_MODES)
    # Mostly damage by design: the run's verdict on its error share is tested on its own below.
    sections.setdefault("quality", {"retry_on": ["repetition", "refusal", "empty"], "max_error_share": 1.0})
    config = write_config(tmp_path / "run.yaml", tiny_model, input_uri, str(out), **sections)
    result = run_cli("run", str(config))
    assert result.returncode == 0, result.stderr[-4000:]
    return config, result


def _mutants(samples: Path, folder: Path, count: int, seed: int = 14) -> list[str]:
    """`count` damaged copies of the sample images: cut, bytes flipped, runs overwritten."""
    rng = random.Random(seed)
    sources = sorted(p for p in samples.rglob("*") if p.is_file())
    names = []
    for index in range(count):
        source = sources[index % len(sources)]
        data = bytearray(source.read_bytes())
        how = index % 3
        if how == 0:
            data = data[: rng.randrange(1, len(data))]
        elif how == 1:
            for _ in range(rng.randrange(1, 40)):
                data[rng.randrange(len(data))] = rng.randrange(256)
        else:
            start = rng.randrange(len(data))
            data[start:start + 64] = bytes(rng.randrange(256) for _ in range(64))
        name = f"mutants/{index:03d}{source.suffix}"
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_bytes(bytes(data))
        names.append(name)
    return names


def test_a_dirty_folder_exits_0_with_one_row_per_file(tmp_path: Path, tiny_model: Path, samples: Path):
    folder = tmp_path / "in"
    shutil.copytree(samples, folder)
    good = sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())
    png = (samples / "logo.png").read_bytes()
    (folder / "half.png").write_bytes(png[: len(png) // 2])  # cut inside its image data
    mutants = _mutants(samples, folder, 36)
    (folder / "loop").mkdir()
    (folder / "loop" / "up").symlink_to("..")  # a symlink cycle: never followed round
    out = tmp_path / "out"
    config, first = _run(tmp_path, tiny_model, str(folder), out, input={"uri": str(folder), "shard_size": 8})
    assert "symlink" in first.stderr.lower()
    table = pd.read_parquet(out / DATA).set_index("key")
    assert sorted(table.index) == sorted([*good, "half.png", *mutants])  # one row per file, none twice
    assert table.loc["half.png"].status == "error" and "truncated" in table.loc["half.png"].error
    assert (table.loc[good].status == "ok").all()
    assert table[table.status == "error"].error.str.len().gt(0).all()
    again = run_cli("run", str(config))
    assert again.returncode == 0 and last_summary(out)["shards_committed_this_run"] == 0


@pytest.mark.slow
def test_a_folder_of_nothing_but_broken_files_exits_non_zero_saying_why(tmp_path: Path, tiny_model: Path):
    folder = tmp_path / "in"
    folder.mkdir()
    for index in range(3):
        (folder / f"{index}.jpg").write_bytes(b"<html>404 not found</html>")
    (folder / "3.png").write_bytes(b"")
    out = tmp_path / "out"
    config = write_config(tmp_path / "run.yaml", tiny_model, str(folder), str(out), modes=QUICK_MODES)
    result = run_cli("run", str(config))
    assert result.returncode == 5, result.stderr[-3000:]
    [verdict] = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert verdict.startswith("error: no image was captioned: 4 of 4 images failed; most errors were: "
                              "not an image (3), empty file (1)")
    assert last_summary(out)["error_reasons"] == {"not an image": 3, "empty file": 1}


def test_damaged_tars_and_tars_of_one_basename(tmp_path: Path, tiny_model: Path, samples: Path):
    import webdataset

    shards = tmp_path / "shards"
    for folder in ("a", "b"):
        (shards / folder).mkdir(parents=True)
        with webdataset.TarWriter(str(shards / folder / "000000.tar")) as sink:
            for number, name in enumerate(FEW):
                sink.write({"__key__": f"s{number}", "jpg": (samples / name).read_bytes(), "txt": f"alt {name}"})
    damaged = (shards / "b" / "000000.tar").read_bytes()
    cut = damaged.index((samples / FEW[2]).read_bytes()) + 100  # inside the last sample's image
    (shards / "b" / "000000.tar").write_bytes(damaged[:cut])
    out = tmp_path / "out"
    _run(tmp_path, tiny_model, str(shards), out)
    table = pd.read_parquet(out / DATA).set_index("key")
    assert table.index.is_unique
    assert {f"a/000000/s{n}" for n in range(3)} | {"b/000000/s0", "b/000000/s1"} <= set(table.index)
    assert (table.loc[[f"a/000000/s{n}" for n in range(3)] + ["b/000000/s0", "b/000000/s1"]].status == "ok").all()
    rest = table[table.index.str.startswith("b/") & ~table.index.isin(["b/000000/s0", "b/000000/s1"])]
    assert len(rest) >= 1 and (rest.status == "error").all()


def test_a_parquet_file_with_a_corrupt_row_group(tmp_path: Path, tiny_model: Path, samples: Path):
    images = [(samples / name).read_bytes() for name in FEW * 2]
    path = tmp_path / "in" / "images.parquet"
    path.parent.mkdir()
    pq.write_table(pa.table({"image": images, "n": list(range(6))}), path, row_group_size=2, compression="none")
    column = pq.ParquetFile(path).metadata.row_group(1).column(0)
    data = bytearray(path.read_bytes())
    start = column.dictionary_page_offset if column.has_dictionary_page else column.data_page_offset
    size = column.total_compressed_size
    data[start:start + size] = (b"\xde\xad" * size)[:size]  # same length: later row groups stay in place
    path.write_bytes(bytes(data))
    out = tmp_path / "out"
    _run(tmp_path, tiny_model, str(path.parent), out, input={"uri": str(path.parent), "shard_size": 4})
    table = pd.read_parquet(out / DATA).set_index("key").sort_index()
    assert list(table.index) == [f"images/{row:08d}" for row in range(6)]
    assert list(table.status) == ["ok", "ok", "error", "error", "ok", "ok"]


def test_a_file_list_with_repeated_lines(tmp_path: Path, tiny_model: Path, samples: Path):
    lines = [str(samples / name) for name in FEW] + [str(samples / FEW[0]), str(samples / FEW[1]), ""]
    listing = tmp_path / "list.txt"
    listing.write_text("\n".join(lines))
    out = tmp_path / "out"
    _run(tmp_path, tiny_model, str(listing), out, input={"uri": str(listing), "shard_size": 2})
    table = pd.read_parquet(out / DATA)
    assert len(table) == 3 and table.key.is_unique and (table.status == "ok").all()
    assert sorted(table.source) == sorted(str(samples / name) for name in FEW)




@pytest.mark.slow
def test_transient_s3_errors_are_retried_and_never_become_rows(tmp_path: Path, tiny_model: Path, samples: Path,
                                                                s3_server: str, s3_fs, s3_bucket: str):
    from tests.faults import Fault, FaultProxy

    for name in FEW:
        s3_fs.pipe_file(f"{s3_bucket}/in/{name}", (samples / name).read_bytes())
    out = tmp_path / "out"
    with FaultProxy(s3_server) as proxy:
        # SlowDown and dropped connections that clear: retried (by botocore, s3fs and the pipeline in turn).
        faults = [Fault.slow_down(key=rf"/in/{FEW[0]}$", method="GET", times=4),
                  Fault.drop(key=rf"/in/{FEW[1]}$", method="GET", times=2)]
        proxy.add(*faults)
        source = {"uri": f"s3://{s3_bucket}/in", "shard_size": 1, "storage_options": {"endpoint_url": proxy.url}}
        _run(tmp_path, tiny_model, source["uri"], out, input=source)
        assert [fault.injected for fault in faults] == [4, 2]
        table = pd.read_parquet(out / DATA)
        assert sorted(table.key) == sorted(FEW) and (table.status == "ok").all()

        # A fault that never clears fails the run in words; the image is not committed as an error row.
        proxy.add(Fault.slow_down(key=rf"/in/{FEW[2]}$", method="GET", times=None))
        fast = {**source, "storage_options": {"endpoint_url": proxy.url,
                                              "config_kwargs": {"retries": {"max_attempts": 1}}}}
        failing = write_config(tmp_path / "failing.yaml", tiny_model, source["uri"], str(tmp_path / "out2"),
                               input=fast, modes=QUICK_MODES)
        result = run_cli("run", str(failing))
    assert result.returncode == 1, result.stderr[-3000:]
    assert "storage still failing" in result.stderr and FEW[2] in result.stderr.splitlines()[-1]
    committed = pd.read_parquet(tmp_path / "out2" / DATA) if (tmp_path / "out2" / DATA).exists() else None
    assert committed is None or FEW[2] not in set(committed.key)
