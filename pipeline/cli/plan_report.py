"""What `pipeline plan` says: the report of a survey and its estimate (`PlanReport`, which `--json` prints
whole), and the same as a table for people."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

from pipeline.run.estimate import Estimate
from pipeline.table.records import known_fields

if TYPE_CHECKING:
    from pipeline.run.estimate import Tally


# ---------------------------------------------------------------------------------------------- records
@dataclass(frozen=True)
class SizeSpread:
    """Sizes seen while reading, of files (bytes) or images (pixels): how many, the range, p50, p90, mean."""

    count: int = 0
    min: int | None = None
    p50: int | None = None
    p90: int | None = None
    max: int | None = None
    mean: float | None = None

    @classmethod
    def from_dict(cls, value: dict[str, Any]) -> SizeSpread:
        return cls(**known_fields(cls, value))


@dataclass(frozen=True)
class ReadSummary:
    """What reading found (a run.estimate.Tally's facts), with whether everything was read and the sample
    asked for."""

    everything: bool = False
    sample: int | None = None  # images asked for; None: --sample all
    images: int = 0
    broken: int = 0
    reasons: dict[str, int] = field(default_factory=dict)  # broken files by kind of reason, most frequent first
    examples: dict[str, list[dict[str, str]]] = field(default_factory=dict)  # the first few of each kind
    formats: dict[str, int] = field(default_factory=dict)
    file_bytes: SizeSpread = field(default_factory=SizeSpread)
    pixels: SizeSpread = field(default_factory=SizeSpread)

    @classmethod
    def of(cls, tally: Tally, everything: bool, sample: int | None) -> ReadSummary:
        # Through the tally's own dict: one place says how a tally is reported.
        return cls.from_dict({"everything": everything, "sample": sample, **tally.to_dict()})

    @classmethod
    def from_dict(cls, value: dict[str, Any]) -> ReadSummary:
        body = known_fields(cls, value)
        body.update({name: SizeSpread.from_dict(value.get(name) or {}) for name in ("file_bytes", "pixels")})
        return cls(**body)


@dataclass(frozen=True)
class PlanSeconds:
    """How long listing and reading took (at the same time with --sample all)."""

    listing: float = 0.0
    reading: float = 0.0


@dataclass(frozen=True)
class PlanReport:
    """What `pipeline plan` found and estimates. What was not all read is extrapolated from the sample and
    says so (`*_estimated`). The fields, in order, are the keys `plan --json` prints."""

    input: str
    format: str  # how the input is read: folder, webdataset, parquet
    layout: str  # what the input was recognised as (io.layout)
    shards: int = 0
    shard_size: int = 0
    unsized_shards: int = 0  # shards whose image count is known only once read (tars)
    images: int | None = None
    images_estimated: bool = False
    bytes: int | None = None
    bytes_estimated: bool = False
    extensions: dict[str, int] = field(default_factory=dict)
    read: ReadSummary = field(default_factory=ReadSummary)
    broken: int | None = None
    broken_share: float | None = None
    broken_estimated: bool = False
    broken_range: list[int] | None = None  # the 95% interval of `broken` when estimated from a sample
    # Readable images whose content an earlier one has (pipeline.io.content), as found in what was read: a share
    # seen in a sample misses copies that fell outside it. With compute.dedup on, the estimate leaves them out.
    duplicates: int | None = None
    duplicate_share: float | None = None
    estimate: Estimate | None = None  # None when the image count is unknown (tars not read)
    seconds: PlanSeconds = field(default_factory=PlanSeconds)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)  # nested records (read, estimate, seconds) become dicts too

    @classmethod
    def from_dict(cls, value: dict[str, Any]) -> PlanReport:
        body = known_fields(cls, value)
        body["read"] = ReadSummary.from_dict(value.get("read") or {})
        body["estimate"] = Estimate.from_dict(value["estimate"]) if value.get("estimate") else None
        body["seconds"] = PlanSeconds(**known_fields(PlanSeconds, value.get("seconds") or {}))
        return cls(**body)


# ------------------------------------------------------------------------------------------------ table
def human_bytes(value: float | None) -> str:
    if value is None:
        return "unknown"
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(value) < 1000 or unit == "TB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1000
    return f"{value:.1f} PB"


def human_hours(hours: float) -> str:
    if hours < 1 / 60:
        return f"{hours * 3600:.0f} s"
    if hours < 1.5:
        return f"{hours * 60:.1f} min" if hours < 0.1 else f"{hours * 60:.0f} min"
    return f"{hours:.1f} h" if hours < 48 else f"{hours / 24:.1f} days"


def _megapixels(value: int | None) -> str:
    if value is None:
        return "?"
    return f"{value:,} px" if value < 10_000 else f"{value / 1e6:.2f} MP"


def _count(value: int | None, estimated: bool) -> str:
    return "unknown" if value is None else f"{'about ' if estimated else ''}{value:,}"


def _read_lines(plan: PlanReport) -> list[str]:
    read = plan.read
    if not read.everything and not read.sample:
        return ["read        nothing (--sample 0): broken files are not looked for"]
    share = plan.broken_share
    shown = f"{read.broken:,} broken ({share:.2%})" if share is not None else "0 broken"
    if read.everything:
        seconds = plan.seconds.reading + plan.seconds.listing  # one after the other, or at once
        return [f"read        all {read.images:,} images in {seconds:.1f} s: {shown}", *_duplicate_lines(plan)]
    asked = f" (whole shards, for --sample {read.sample:,})" if read.images != read.sample else ""
    lines = [f"read        a sample of {read.images:,} images{asked} spread across the input, in "
             f"{plan.seconds.reading:.1f} s: {shown}"]
    if plan.broken is not None and plan.broken_range is not None:
        low, high = plan.broken_range
        lines.append(f"broken      about {plan.broken:,} in the whole input, estimated from a sample of "
                     f"{read.images:,} (95% interval {low:,} to {high:,})")
    return [*lines, *_duplicate_lines(plan)]


def _duplicate_lines(plan: PlanReport) -> list[str]:
    """Readable images whose content another one read had: the run captions each content once."""
    if plan.duplicate_share is None or not plan.duplicates:
        return []
    seen = "of all images read" if plan.read.everything else f"of the sample of {plan.read.images:,}"
    return [f"duplicates  {plan.duplicates:,} ({plan.duplicate_share:.2%} {seen}, readable ones): same content "
            "as another image, captioned once (compute.dedup)"]


def _reason_lines(read: ReadSummary) -> list[str]:
    width = max((len(kind) for kind in read.reasons), default=0)
    lines = []
    for kind, count in read.reasons.items():
        example = (read.examples.get(kind) or [{}])[0]
        lines.append(f"  {kind:<{width}} {count:>8,}   e.g. {example.get('key', '?')}: {example.get('error', '')}")
    return lines


def _size_lines(read: ReadSummary) -> list[str]:
    lines = []
    if read.formats:
        lines.append("formats     " + ", ".join(f"{name} {count:,}" for name, count in read.formats.items()))
    sizes, pixels = read.file_bytes, read.pixels
    if sizes.count:
        lines.append(f"file size   p50 {human_bytes(sizes.p50)}, p90 {human_bytes(sizes.p90)}, "
                     f"max {human_bytes(sizes.max)}")
    if pixels.count:
        lines.append(f"pixels      p50 {_megapixels(pixels.p50)}, p90 {_megapixels(pixels.p90)}, "
                     f"max {_megapixels(pixels.max)}")
    return lines


def _estimate_lines(plan: PlanReport) -> list[str]:
    guess = plan.estimate
    if guess is None:
        return ["estimate    none: the tars' image count is known only once read (try --sample N)"]
    gpus, hours = f"{guess.gpus} GPU{'s' if guess.gpus != 1 else ''}", guess.gpu_hours
    gpu_time = f"{hours:,.1f} GPU-hours" if hours >= 1 else f"{human_hours(hours)} of GPU time"
    lines = [f"estimate    {guess.images:,} images x {guess.modes} mode{'s' if guess.modes != 1 else ''} = "
             f"{guess.captions:,} captions at {guess.rate:g} images/s per GPU: {gpu_time}, wall "
             f"{human_hours(guess.wall_hours)} on {gpus}{' of the server fleet' if guess.engine == 'openai' else ''}"
             f"{f' ({guess.stages} chained stages an image)' if guess.stages > 1 else ''} (an estimate)"]
    lines.extend(f"{'assumes' if index == 0 else '':<12}{text}" for index, text in enumerate(guess.assumes))
    return lines


def format_plan(plan: PlanReport) -> str:
    """The plan as a short table for people (`--json` gives the same facts whole)."""
    extensions = ", ".join(f"{name or '(none)'} {count:,}" for name, count in list(plan.extensions.items())[:6])
    lines = [f"input       {plan.input} ({plan.layout}, read as {plan.format})",
             f"images      {_count(plan.images, plan.images_estimated)} in {plan.shards:,} shards "
             + ("(a tar is one shard)" if plan.unsized_shards else f"(shard size {plan.shard_size:,})"),
             f"bytes       {'about ' if plan.bytes_estimated else ''}{human_bytes(plan.bytes)}"
             + (f" ({extensions})" if extensions else ""),
             f"listing     {plan.seconds.listing:.1f} s",
             *_read_lines(plan), *_reason_lines(plan.read), *_size_lines(plan.read), *_estimate_lines(plan)]
    return "\n".join(lines)
