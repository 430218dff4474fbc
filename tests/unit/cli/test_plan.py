"""`pipeline plan`: the estimate, the tallies and sample it is made of, and the table it prints.

Reading goes through the read stage's own code: a file's reason here is the reason its row would get."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from pipeline.cli.plan import one_line, report, sample_size
from pipeline.cli.plan_report import PlanReport, format_plan
from pipeline.config import RunConfig, build_config
from pipeline.io.shards import Shard
from pipeline.run.estimate import (
    EXAMPLES_PER_REASON,
    MAX_REASONS,
    REFERENCE_RATE,
    Spread,
    Tally,
    assumed_gpus,
    estimate,
    output_budget,
    share_interval,
)
from pipeline.run.survey import (
    Listed,
    ListingSizes,
    Smallest,
    Ticker,
    offer_units,
    read_tally,
    survey,
    wave_size,
)
from tests.conftest import ImageCorpus


def config_for(folder: Path, **sections: Any) -> RunConfig:
    tree: dict[str, Any] = {"input": {"uri": str(folder)}, "output": {"uri": str(folder.parent / "out")},
                            "model": {"path": str(folder.parent)}, "modes": "dual"}
    tree.update(sections)
    return build_config(tree)


def jpeg(shade: int, size: tuple[int, int] = (64, 48)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, (shade, 20, 20)).save(buffer, "JPEG")
    return buffer.getvalue()


def write_tar(path: Path, samples: int, cut_last: bool = False) -> None:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.USTAR_FORMAT) as archive:
        for index in range(samples):
            data = jpeg(index * 20)
            info = tarfile.TarInfo(f"s{index}.jpg")
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
    data = buffer.getvalue()
    path.write_bytes(data[: data.index(jpeg((samples - 1) * 20)) + 100] if cut_last else data)


# ---------------------------------------------------------------------------------------------- estimate
def test_the_reference_workload_runs_at_the_reference_rate():
    guess = estimate(round(REFERENCE_RATE * 3600), [128, 256], None, gpus=4)
    assert guess.rate == REFERENCE_RATE and guess.rate_from == "reference"
    assert guess.gpu_hours == pytest.approx(1.0) and guess.wall_hours == pytest.approx(0.25)
    assert guess.captions == 2 * guess.images and guess.output_tokens_per_image == 384
    assert "16.8 x 384 / 384" in guess.assumes[1]


def test_the_rate_scales_with_the_output_token_budget():
    assert estimate(1000, [128], None, 1).rate == pytest.approx(REFERENCE_RATE * 3)  # one short mode
    assert estimate(1000, [256] * 4, None, 1).rate == pytest.approx(REFERENCE_RATE * 384 / 1024)
    small = estimate(1000, [32], None, 1)
    assert any("optimistic" in line for line in small.assumes)
    assert not any("optimistic" in line for line in estimate(1000, [128, 256], None, 1).assumes)


def test_a_given_rate_is_taken_as_it_is():
    guess = estimate(36_000, [128, 256, 256], 10.0, gpus=2)
    assert (guess.rate, guess.rate_from, guess.gpu_hours, guess.wall_hours) == (10.0, "--rate", 1.0, 0.5)
    assert "--rate" in guess.assumes[0]


def test_the_notes_follow_the_config():
    forced = estimate(10, [128, 256], None, 1, fixed_length=True, max_attempts=1)
    free = estimate(10, [128, 256], None, 1, fixed_length=False, max_attempts=3)
    assert not any("before their cap" in line for line in forced.assumes)
    assert any("before their cap" in line for line in free.assumes)
    assert any("up to 3 attempts" in line for line in free.assumes)


def test_token_caps_and_gpus_come_from_the_config(tmp_path: Path):
    config = config_for(tmp_path, modes=[{"name": "a", "type": "booru_like"},
                                         {"name": "b", "type": "straightforward", "max_tokens": 90}],
                        defaults={"max_tokens": 200})
    assert output_budget(config) == [200, 90]
    assert assumed_gpus(config) == 1
    assert assumed_gpus(config_for(tmp_path, compute={"actors": 4}, model={"path": "m", "tensor_parallel_size": 2})) \
        == 8


def test_the_broken_share_interval_is_honest_at_zero_and_in_small_samples():
    low, high = share_interval(0, 1000)
    assert low == 0 and 0.003 < high < 0.0045  # none seen in 1000: still up to about 0.4 %
    low, high = share_interval(50, 100)
    assert low == pytest.approx(0.404, abs=0.002) and high == pytest.approx(0.596, abs=0.002)
    assert share_interval(1, 10)[1] > 0.4  # one in ten says little
    assert share_interval(0, 0) == (0.0, 1.0)


# ----------------------------------------------------------------------------------------------- tallies
def test_spread_quantiles_stay_close_in_bounded_memory():
    spread = Spread()
    for value in range(1, 100_001):
        spread.add(value)
    assert len(spread.buckets) < 80  # 4 an octave: memory does not grow with the values
    assert spread.quantile(0.5) == pytest.approx(50_000, rel=0.1)
    assert spread.quantile(0.9) == pytest.approx(90_000, rel=0.1)
    assert (spread.low, spread.high, spread.mean()) == (1, 100_000, 50_000.5)
    halves = Spread(), Spread()
    for value in range(1, 100_001):
        halves[value % 2].add(value)
    halves[0].merge(halves[1])
    assert halves[0] == spread


def test_a_tally_counts_by_kind_and_keeps_a_few_examples():
    tally = Tally()
    for index in range(10):
        tally.add(f"k{index}", f"/in/k{index}", f"truncated or corrupt image: cut at {index}", size=10)
    tally.add("z", "/in/z", "empty file (0 bytes)", size=0)
    tally.add("ok", "/in/ok", None, "JPEG", 100, 50, 5000)
    assert (tally.rows, tally.broken) == (12, 11)
    assert tally.reasons == {"truncated or corrupt image": 10, "empty file": 1}
    assert [item["key"] for item in tally.examples["truncated or corrupt image"]] == ["k0", "k1", "k2"]
    assert len(tally.examples["truncated or corrupt image"]) == EXAMPLES_PER_REASON
    assert tally.formats == {"JPEG": 1} and tally.pixels.count == 1 and tally.file_bytes.count == 12


def test_merged_tallies_keep_the_first_examples_and_a_bounded_set_of_kinds():
    first, second = Tally(), Tally()
    first.add("a", "a", "not an image: x")
    for index in range(5):
        second.add(f"b{index}", "b", "not an image: y")
    for index in range(MAX_REASONS + 5):
        second.add(f"c{index}", "c", f"kind {chr(65 + index % 26)}{chr(65 + index // 26)}: boom")
    first.merge(second)
    assert first.rows == 1 + 5 + MAX_REASONS + 5
    assert [item["key"] for item in first.examples["not an image"]] == ["a", "b0", "b1"]
    assert len(first.reasons) <= MAX_REASONS + 1 and first.reasons["other"] > 0
    assert sum(first.reasons.values()) == first.broken


# ------------------------------------------------------------------------------------------------ sample
def _files_shards(count: int, size: int) -> list[Shard]:
    members = [f"d{index // 100}/f{index:06d}.jpg" for index in range(count)]
    return [Shard(f"{start // size:06d}", "files", "/in", members[start:start + size], len(members[start:start + size]))
            for start in range(0, count, size)]


def _picked(shards: list[Shard], size: int) -> list[str]:
    sample = Smallest(size)
    for shard in shards:
        offer_units(sample, shard)
    return [unit.members[0] for unit in sample.in_listing_order()]


def test_the_sample_is_the_same_whatever_the_shard_size_and_spread_over_the_input():
    picked = _picked(_files_shards(10_000, 256), 200)
    assert len(picked) == 200 == len(set(picked))
    assert picked == _picked(_files_shards(10_000, 7), 200)  # per image, not per shard
    assert picked == sorted(picked, key=lambda member: int(member[-10:-4]))  # read in listing order
    quarters = [sum(1 for member in picked if int(member[-10:-4]) // 2500 == quarter) for quarter in range(4)]
    assert min(quarters) > 25  # a quarter of the input would hold 50 on average


def test_a_sample_as_big_as_the_input_is_the_whole_input():
    sample = Smallest(50)
    for shard in _files_shards(40, 8):
        offer_units(sample, shard)
    assert sample.whole and len(sample.heap) == 40
    sample = Smallest(10)
    for shard in _files_shards(40, 8):
        offer_units(sample, shard)
    assert not sample.whole and sample.seen == 40


def test_container_waves_use_known_sizes_then_the_mean_read_so_far():
    parquet = [Shard(f"{index:06d}", "parquet", "/in/x.parquet", [], 100, first_row=100 * index) for index in range(30)]
    assert wave_size(parquet, 0, 250, None) == 3  # 100 + 100 + 100 >= 250
    assert wave_size(parquet, 0, 10, None) == 1
    tars = [Shard(f"{index:06d}", "tar", f"/in/{index}.tar") for index in range(30)]
    assert wave_size(tars, 0, 1000, None) == 1  # nothing read yet: one to learn a tar's size
    assert wave_size(tars, 1, 900, 300.0) == 3
    assert wave_size(tars, 1, 10_000, 10.0) == 16  # never more than the pool at once


# --------------------------------------------------------------------------------------- reading, listing
def test_plan_gives_every_file_the_reason_its_row_would_get(tmp_path: Path, image_corpus: ImageCorpus):
    from pipeline.run.stages import _records_as_rows  # the read stage run uses

    corpus = image_corpus(tmp_path / "in")
    config = config_for(tmp_path / "in")
    shard = Shard("000000", "files", config.input.uri, sorted(p.path.name for p in corpus.values()), len(corpus))
    rows = {row["key"]: row["error"] for row in _records_as_rows(shard, config, None)}
    tally = read_tally(shard, config)
    broken = {name: file for name, file in corpus.items() if file.error is not None}
    assert tally.rows == len(corpus) and tally.broken == len(broken) == sum(1 for e in rows.values() if e)
    seen = {item["key"]: item["error"] for examples in tally.examples.values() for item in examples}
    assert seen == {key: error for key, error in rows.items() if error}  # every kind here has one file


def test_listing_sizes_count_the_planned_images_once(tmp_path: Path):
    folder = tmp_path / "in"
    (folder / "sub").mkdir(parents=True)
    sizes = 0
    for index in range(5):
        data = jpeg(index * 40, (32 + index, 32))
        (folder / "sub" / f"{index}.jpg").write_bytes(data)
        sizes += len(data)
    (folder / "sub" / "0.json").write_text('{"caption": "not an image, not counted"}')
    (folder / "notes.md").write_text("not an image either")
    (folder / "skip.png").write_bytes(jpeg(1))  # left out by the glob
    found = survey(config_for(folder, input={"uri": str(folder), "glob": "sub/*"}), "folder", 0, Ticker(True))
    assert (found.listed.images, found.listed_bytes) == (5, sizes)  # the census walk is not counted again
    from pipeline.io import walk
    assert not walk._OBSERVERS  # the listing's walk is watched no more


def test_listing_sizes_see_nothing_without_a_walk(tmp_path: Path):
    with ListingSizes(config_for(tmp_path).input, "filelist") as sizes:
        pass
    assert sizes.total() is None


def test_tars_are_counted_exactly_when_read_and_estimated_from_a_sample(tmp_path: Path):
    folder = tmp_path / "tars"
    folder.mkdir()
    for index in range(4):
        write_tar(folder / f"{index:03d}.tar", 3, cut_last=index == 2)
    config = config_for(folder)
    whole = report(config, _layout("webdataset"), survey(config, "webdataset", None, Ticker(True)), None, None)
    # Three whole tars of 3, and the cut one: 2 good, its cut sample and the unreadable rest.
    assert (whole.images, whole.broken, whole.images_estimated) == (13, 2, False)
    assert set(whole.read.reasons) == {"sample cut short", "tar damaged after byte N"}
    part = report(config, _layout("webdataset"), survey(config, "webdataset", 2, Ticker(True)), None, None)
    assert part.read.images in (3, 4) and part.images_estimated and not part.read.everything
    assert part.images == 4 * part.read.images  # tars x rows per tar read
    assert part.bytes == sum(path.stat().st_size for path in folder.iterdir())


def _layout(fmt: str) -> Any:
    from pipeline.io.layout import Layout

    return Layout(fmt, fmt)


# -------------------------------------------------------------------------------------------------- table
def _plan(**changes: Any) -> PlanReport:
    tally = Tally()
    tally.add("a.jpg", "/in/a.jpg", "not an image: no decoder recognises the data", size=12)
    for index in range(9):
        tally.add(f"{index}.jpg", f"/in/{index}.jpg", None, "JPEG", 640, 480, 50_000)
    plan: dict[str, Any] = {
        "input": "/in", "format": "folder", "layout": "folder", "shards": 40, "shard_size": 256,
        "unsized_shards": 0, "images": 10_000, "images_estimated": False, "bytes": 500_000_000,
        "bytes_estimated": False, "extensions": {".jpg": 10_000},
        "read": {"everything": False, "sample": 10, **tally.to_dict()}, "broken": 1000, "broken_share": 0.1,
        "broken_estimated": True, "broken_range": [180, 4_400], "seconds": {"listing": 1.5, "reading": 0.5},
        "estimate": estimate(9000, [128, 256], None, 2).to_dict(),
    }
    plan.update(changes)
    return PlanReport.from_dict(plan)


def test_the_table_says_what_is_estimated_and_from_what():
    text = format_plan(_plan())
    assert "images      10,000 in 40 shards (shard size 256)" in text
    assert "bytes       500.0 MB (.jpg 10,000)" in text
    assert "a sample of 10 images spread across the input" in text and "1 broken (10.00%)" in text
    assert "broken      about 1,000 in the whole input, estimated from a sample of 10 (95% interval 180 to 4,400)" \
        in text
    assert "not an image" in text and "e.g. a.jpg: not an image: no decoder recognises the data" in text
    assert "formats     JPEG 9" in text and "0.31 MP" in text
    assert "9,000 images x 2 modes = 18,000 captions at 16.8 images/s per GPU" in text
    assert "(an estimate)" in text and "assumes     the reference: 16.8 images/s per H100" in text
    assert "wall 4.5 min on 2 GPUs" in text


def test_the_table_without_reading_or_without_a_count():
    listed_only = format_plan(_plan(read={"everything": False, "sample": 0, **Tally().to_dict()},
                                    broken=None, broken_share=None, broken_range=None))
    assert "read        nothing (--sample 0)" in listed_only
    tars = format_plan(_plan(images=None, images_estimated=True, unsized_shards=40, estimate=None))
    assert "images      unknown in 40 shards (a tar is one shard)" in tars
    assert "estimate    none: the tars' image count is known only once read" in tars
    assert "about 1,000" in format_plan(_plan(images=1000, images_estimated=True))


# The keys `plan --json` prints, in order (README: `pipeline plan`): scripts read them.
PLAN_KEYS = ["input", "format", "layout", "shards", "shard_size", "unsized_shards", "images", "images_estimated",
             "bytes", "bytes_estimated", "extensions", "read", "broken", "broken_share", "broken_estimated",
             "broken_range", "duplicates", "duplicate_share", "estimate", "seconds"]
READ_KEYS = ["everything", "sample", "images", "broken", "reasons", "examples", "formats", "file_bytes", "pixels"]


def test_the_json_report_is_plain_json(tmp_path: Path):
    folder = tmp_path / "in"
    folder.mkdir()
    (folder / "a.jpg").write_bytes(jpeg(1))
    (folder / "b.jpg").write_bytes(b"")
    config = config_for(folder)
    plan = report(config, _layout("folder"), survey(config, "folder", 1000, Ticker(True)), None, None)
    again = json.loads(json.dumps(plan.to_dict()))
    assert again["images"] == 2 and again["broken"] == 1 and again["read"]["everything"]
    assert again["read"]["reasons"] == {"empty file": 1} and again["estimate"]["images"] == 1
    assert list(again) == PLAN_KEYS and list(again["read"]) == READ_KEYS
    assert list(again["seconds"]) == ["listing", "reading"]
    assert list(again["read"]["file_bytes"]) == ["count", "min", "p50", "p90", "max", "mean"]
    assert PlanReport.from_dict(again) == plan
    assert PlanReport.from_dict({**again, "estimate": None}).estimate is None
    assert not Listed().shards


# ------------------------------------------------------------------------------------------------ options
def test_options_and_one_line_errors():
    import argparse

    assert sample_size("all") is None and sample_size("0") == 0 and sample_size("25") == 25
    for bad in ("-1", "many"):
        with pytest.raises(argparse.ArgumentTypeError):
            sample_size(bad)
    assert one_line("invalid config:\n  modes.0.x: unknown key\n  input.y: unknown key") == \
        "invalid config: modes.0.x: unknown key; input.y: unknown key"
    assert one_line("input.uri does not exist: /x") == "input.uri does not exist: /x"


def test_parquet_rows_are_known_from_footers_and_sampled_by_shard(tmp_path: Path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    folder = tmp_path / "pq"
    folder.mkdir()
    images = [jpeg(index * 30) for index in range(5)] + [b"not an image"]
    pq.write_table(pa.table({"image": images}), folder / "x.parquet", row_group_size=2)
    config = config_for(folder, input={"uri": str(folder), "shard_size": 2})
    part = report(config, _layout("parquet"), survey(config, "parquet", 2, Ticker(True)), None, None)
    assert (part.shards, part.images, part.images_estimated) == (3, 6, False)  # footers: exact
    assert part.read.images == 2 and not part.read.everything  # one shard of two rows
    whole = report(config, _layout("parquet"), survey(config, "parquet", 1000, Ticker(True)), None, None)
    assert whole.read.everything and (whole.images, whole.broken) == (6, 1)
    assert whole.bytes == (folder / "x.parquet").stat().st_size


def test_the_estimate_says_what_a_chain_and_a_remote_engine_change():
    from pipeline.run.estimate import config_assumptions

    modes = [{"name": "tags", "type": "booru_like", "max_tokens": 128},
             {"name": "description", "prompt": "Describe it. Tags: {tags}.", "requires": ["tags"], "max_tokens": 256},
             {"name": "clip", "prompt": "Shorten: {description}", "requires": ["description"], "image": False,
              "max_tokens": 77, "engine": "writer"}]
    tree = {"input": {"uri": "in"}, "output": {"uri": "out"}, "model": {"path": "m"}, "modes": modes,
            "engines": {"writer": {"kind": "openai", "base_url": "http://w:8000/v1", "model": "llm"}}}
    config = build_config(tree)
    assert output_budget(config) == [128, 256]  # the rewrite is the writer's work, not this run's GPUs'
    notes = " | ".join(config_assumptions(config))
    assert "chained modes: 2 of 3" in notes and "3 stages an image" in notes and "384 tokens of earlier" in notes
    assert "text-only (clip)" in notes and "clip on writer (http://w:8000/v1)" in notes
    remote = build_config({**tree, "engine": {"kind": "openai", "base_url": "http://fleet:8000/v1"}})
    assert assumed_gpus(remote) == 1 and "the GPUs are those of the server(s) at http://fleet" in \
        " ".join(config_assumptions(remote))
    guess = estimate(1000, output_budget(config), None, 1, notes=config_assumptions(config), stages=3)
    plan_line = format_plan_estimate(guess)
    assert "(3 chained stages an image)" in plan_line


def format_plan_estimate(guess) -> str:
    from pipeline.cli.plan_report import _estimate_lines

    return "\n".join(_estimate_lines(PlanReport(input="in", format="folder", layout="folder", shards=1, shard_size=1,
                                                unsized_shards=0, images=1000, estimate=guess)))
