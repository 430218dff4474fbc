"""What `pipeline plan` says: the report of a survey and its estimate, as a table for people."""

from __future__ import annotations

from typing import Any


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


def _read_lines(plan: dict[str, Any]) -> list[str]:
    read = plan["read"]
    if not read["everything"] and not read["sample"]:
        return ["read        nothing (--sample 0): broken files are not looked for"]
    share = plan["broken_share"]
    shown = f"{read['broken']:,} broken ({share:.2%})" if share is not None else "0 broken"
    if read["everything"]:
        seconds = plan["seconds"]["reading"] + plan["seconds"]["listing"]  # one after the other, or at once
        return [f"read        all {read['images']:,} images in {seconds:.1f} s: {shown}"]
    asked = f" (whole shards, for --sample {read['sample']:,})" if read["images"] != read["sample"] else ""
    lines = [f"read        a sample of {read['images']:,} images{asked} spread across the input, in "
             f"{plan['seconds']['reading']:.1f} s: {shown}"]
    if plan["broken"] is not None:
        low, high = plan["broken_range"]
        lines.append(f"broken      about {plan['broken']:,} in the whole input, estimated from a sample of "
                     f"{read['images']:,} (95% interval {low:,} to {high:,})")
    return lines


def _reason_lines(read: dict[str, Any]) -> list[str]:
    width = max((len(kind) for kind in read["reasons"]), default=0)
    lines = []
    for kind, count in read["reasons"].items():
        example = (read["examples"].get(kind) or [{}])[0]
        lines.append(f"  {kind:<{width}} {count:>8,}   e.g. {example.get('key', '?')}: {example.get('error', '')}")
    return lines


def _size_lines(read: dict[str, Any]) -> list[str]:
    lines = []
    if read["formats"]:
        lines.append("formats     " + ", ".join(f"{name} {count:,}" for name, count in read["formats"].items()))
    sizes, pixels = read["file_bytes"], read["pixels"]
    if sizes["count"]:
        lines.append(f"file size   p50 {human_bytes(sizes['p50'])}, p90 {human_bytes(sizes['p90'])}, "
                     f"max {human_bytes(sizes['max'])}")
    if pixels["count"]:
        lines.append(f"pixels      p50 {_megapixels(pixels['p50'])}, p90 {_megapixels(pixels['p90'])}, "
                     f"max {_megapixels(pixels['max'])}")
    return lines


def _estimate_lines(plan: dict[str, Any]) -> list[str]:
    guess = plan["estimate"]
    if guess is None:
        return ["estimate    none: the tars' image count is known only once read (try --sample N)"]
    gpus, hours = f"{guess['gpus']} GPU{'s' if guess['gpus'] != 1 else ''}", guess["gpu_hours"]
    gpu_time = f"{hours:,.1f} GPU-hours" if hours >= 1 else f"{human_hours(hours)} of GPU time"
    lines = [f"estimate    {guess['images']:,} images x {guess['modes']} mode{'s' if guess['modes'] != 1 else ''} = "
             f"{guess['captions']:,} captions at {guess['rate']:g} images/s per GPU: {gpu_time}, wall "
             f"{human_hours(guess['wall_hours'])} on {gpus} (an estimate)"]
    lines.extend(f"{'assumes' if index == 0 else '':<12}{text}" for index, text in enumerate(guess["assumes"]))
    return lines


def format_plan(plan: dict[str, Any]) -> str:
    """The plan as a short table for people (`--json` gives the same facts whole)."""
    extensions = ", ".join(f"{name or '(none)'} {count:,}" for name, count in list(plan["extensions"].items())[:6])
    lines = [f"input       {plan['input']} ({plan['layout']}, read as {plan['format']})",
             f"images      {_count(plan['images'], plan['images_estimated'])} in {plan['shards']:,} shards "
             + ("(a tar is one shard)" if plan["unsized_shards"] else f"(shard size {plan['shard_size']:,})"),
             f"bytes       {'about ' if plan['bytes_estimated'] else ''}{human_bytes(plan['bytes'])}"
             + (f" ({extensions})" if extensions else ""),
             f"listing     {plan['seconds']['listing']:.1f} s",
             *_read_lines(plan), *_reason_lines(plan["read"]), *_size_lines(plan["read"]), *_estimate_lines(plan)]
    return "\n".join(lines)
