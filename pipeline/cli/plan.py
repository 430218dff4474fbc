"""`pipeline plan CONFIG`: what a run would do, found out before any engine, Ray or GPU starts.

    load_config + validate_before_start    the same checks as `run` (errors: one line, exit 2)
    survey (pipeline.run.survey)       `run`'s own streamed planner and read code, with counters beside
                                           them: a broken file gets the reason its row would get
    report, estimate, table                pipeline.cli.plan_report

Everything is listed; by default only a sample of DEFAULT_SAMPLE images, spread across the input, is read
and prepared: reading ten million images just to plan costs as much CPU as the run's own decoding, and a
thousand tell the share of broken files within a few points. `--sample all` reads everything (streamed,
bounded); `--sample 0` only lists. Memory stays flat whatever the input's size: counters, log-bucketed
histograms, the sample's units and a few examples per kind of error.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from typing import TYPE_CHECKING, Any

from pipeline.captioning.modes import stage_groups
from pipeline.cli.plan_report import PlanReport, PlanSeconds, ReadSummary, format_plan
from pipeline.run.estimate import (
    DEFAULT_SAMPLE,
    assumed_gpus,
    config_assumptions,
    estimate,
    output_budget,
    share_interval,
)

if TYPE_CHECKING:
    from pipeline.config import RunConfig
    from pipeline.io.layout import Layout
    from pipeline.run.survey import Survey


def image_count(found: Survey) -> tuple[int | None, bool]:
    """(images, whether estimated): the rows the run will write when all was read (a tar's count is known
    only then), else the listing's count plus, for tars, the rows of those read times the tars left."""
    listed, read = found.listed, found.read
    if read.whole:
        return read.tally.rows, False
    if not listed.unsized:
        return listed.images, False
    if not read.unsized_read:
        return None, True
    return listed.images + round(listed.unsized * read.unsized_rows / read.unsized_read), True


def report(config: RunConfig, layout: Layout, found: Survey, rate: float | None, gpus: int | None) -> PlanReport:
    """The plan (`to_dict()` is what `--json` prints; the table is made from it too). What was not all read
    is extrapolated from the sample, and says so (`*_estimated`)."""
    tally, whole = found.read.tally, found.read.whole
    images, images_estimated = image_count(found)
    share = tally.broken / tally.rows if tally.rows else None
    broken = tally.broken if whole else (round(share * images) if share is not None and images is not None else None)
    broken_range = None
    if not whole and broken is not None and images is not None:
        low, high = share_interval(tally.broken, tally.rows)
        broken_range = [math.floor(low * images), math.ceil(high * images)]
    size, size_estimated = found.listed_bytes, False
    if size is None and tally.file_bytes.count and images is not None:  # a file list: sizes only as read
        size, size_estimated = round(tally.file_bytes.mean() * images), not whole
    readable = tally.rows - tally.broken
    duplicate_share = tally.duplicates / readable if readable > 0 else None
    duplicates = tally.duplicates if whole else (
        None if duplicate_share is None or images is None else round(duplicate_share * (images - (broken or 0))))
    to_caption = None if images is None else images - (broken or 0)  # broken files cost no GPU time
    if to_caption is not None and config.compute.dedup:  # duplicates are captioned once (engine/dedup.py)
        to_caption -= duplicates or 0
    guess = None if to_caption is None else estimate(
        to_caption, output_budget(config), rate, gpus or assumed_gpus(config),
        fixed_length=config.defaults.fixed_length, max_attempts=config.quality.max_attempts,
        notes=config_assumptions(config), stages=len(stage_groups(config.resolved_modes())),
        engine=config.engine.kind)
    return PlanReport(
        input=config.input.uri, format=layout.format, layout=layout.origin,
        shards=found.listed.shards, shard_size=config.input.shard_size, unsized_shards=found.listed.unsized,
        images=images, images_estimated=images_estimated, bytes=size, bytes_estimated=size_estimated,
        extensions=dict(found.listed.extensions.most_common()),
        read=ReadSummary.of(tally, whole, found.sample),
        broken=broken, broken_share=None if share is None else round(share, 6), broken_estimated=not whole,
        broken_range=broken_range, duplicates=tally.duplicates,
        duplicate_share=None if duplicate_share is None else round(duplicate_share, 6),
        estimate=guess, seconds=PlanSeconds(**found.seconds),
    )


# ---------------------------------------------------------------------------------------------- command
def one_line(message: str) -> str:
    """A multi-line error (an invalid config lists every key) as one line."""
    lines = [line.strip() for line in str(message).splitlines() if line.strip()]
    return lines[0] + (" " + "; ".join(lines[1:]) if len(lines) > 1 else "") if lines else "error"


def sample_size(text: str) -> int | None:
    """`--sample`: a count of images (0: list only), or `all` (None: read everything)."""
    if text.strip().lower() == "all":
        return None
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--sample takes a number of images or `all`, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"--sample must be 0 or more, got {value}")
    return value


def positive(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not value > 0 or math.isinf(value):
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}")
    return value


def count_of_gpus(text: str) -> int:
    value = int(positive(text))
    if value != positive(text):
        raise argparse.ArgumentTypeError(f"--gpus takes a whole number, got {text!r}")
    return value


def cmd_plan(args: argparse.Namespace) -> int:
    from pipeline.config import ConfigError, load_config
    from pipeline.io.detect import detect_layout
    from pipeline.io.fs import TransientStorageError
    from pipeline.io.sources import SourceError
    from pipeline.run.driver import validate_before_start
    from pipeline.run.survey import Ticker, survey

    try:
        config = load_config(args.config, args.set, input_uri=args.input)
        validate_before_start(config)
        layout = detect_layout(config.input)
        found = survey(config, layout.format, args.sample, Ticker())
    except (ConfigError, SourceError) as err:
        print(f"error: {one_line(str(err))}", file=sys.stderr)
        return 2
    except TransientStorageError as err:  # storage that kept failing after retries: try again later
        print(f"error: storage kept failing while planning: {one_line(str(err))}", file=sys.stderr)
        return 1
    except OSError as err:  # an input folder that cannot be listed (permission), say
        print(f"error: {one_line(f'{type(err).__name__}: {err}')}", file=sys.stderr)
        return 2
    plan = report(config, layout, found, args.rate, args.gpus)
    print(json.dumps(plan.to_dict(), indent=1) if args.json else format_plan(plan))
    return 0


def add_commands(subparsers: Any) -> None:
    plan = subparsers.add_parser("plan", help="list, sample and estimate a run without starting an engine or Ray")
    plan.add_argument("config", help="YAML run config")
    plan.add_argument("--input", help="override input.uri")
    plan.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                      help="override a config key, e.g. input.shard_size=1000 (repeatable)")
    plan.add_argument("--sample", type=sample_size, default=DEFAULT_SAMPLE, metavar="N|all",
                      help=f"images to read and prepare, spread across the input (default {DEFAULT_SAMPLE}; "
                           "0: list only; all: read everything)")
    plan.add_argument("--rate", type=positive, metavar="IMAGES_PER_S_PER_GPU",
                      help="this config's measured throughput per GPU (default: the reference figure scaled "
                           "to the config's token caps)")
    plan.add_argument("--gpus", type=count_of_gpus, metavar="N",
                      help="GPUs the run gets (default: compute.actors x GPUs per actor when set, else 1)")
    plan.add_argument("--json", action="store_true", help="print the plan as JSON")
    plan.set_defaults(func=cmd_plan)
