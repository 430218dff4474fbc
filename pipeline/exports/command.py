"""`pipeline export`: which options each format takes, the call, and the line it prints."""

from __future__ import annotations

import argparse
from dataclasses import asdict

# The options of the formats that take a few, so each format can refuse the others' by name.
FORMAT_OPTIONS = ("--modes", "--beside-images", "--link", "--columns", "--with-images", "--target-size",
                  "--extension", "--one-mode")
TAKES = {
    "jsonl": ("--to FILE", ()),
    "imagefolder": ("--to FOLDER", ("--modes", "--link")),
    "parquet": ("--to FOLDER", ("--modes", "--columns", "--with-images", "--target-size")),
    "webdataset": ("--to FOLDER", ("--modes", "--target-size")),
}


def _names(text: str | None) -> list[str] | None:
    return [name.strip() for name in text.split(",") if name.strip()] if text else None


def _given(args: argparse.Namespace, options: tuple[str, ...]) -> list[str]:
    return [option for option in options
            if getattr(args, option.lstrip("-").replace("-", "_"), None) not in (None, False)]


def _refuse(fmt: str, args: argparse.Namespace) -> None:
    takes, allowed = TAKES[fmt]
    options = tuple(option for option in FORMAT_OPTIONS if option not in allowed)
    given = _given(args, options)
    if not args.to or given:
        raise ValueError(f"{fmt} export takes {takes} and not {', '.join(options)}"
                         + (f" (given: {', '.join(given)})" if given else " (no --to given)"))


def export_command(args: argparse.Namespace) -> str:
    """Run the export `args` ask for and return its summary; ValueError or OSError for what the user can fix."""
    modes = _names(getattr(args, "modes", None))
    if args.format == "jsonl":
        from pipeline.exports.jsonl import export_jsonl

        _refuse("jsonl", args)
        return f"{export_jsonl(args.output, args.to, overwrite=args.overwrite)} rows written to {args.to}"
    if args.format == "imagefolder":
        from pipeline.exports.imagefolder import describe_counts, export_imagefolder

        _refuse("imagefolder", args)
        counts = export_imagefolder(args.output, args.to, modes, link=args.link, overwrite=args.overwrite)
        return describe_counts(counts, args.to)
    if args.format == "parquet":
        from pipeline.exports.consolidated import DEFAULT_TARGET_SIZE, describe_parquet, export_parquet

        _refuse("parquet", args)
        rolled = export_parquet(args.output, args.to, modes, columns=_names(args.columns),
                                with_images=args.with_images, target_size=args.target_size or DEFAULT_TARGET_SIZE,
                                overwrite=args.overwrite)
        return describe_parquet(rolled, args.to)
    if args.format == "webdataset":
        from pipeline.exports.webdataset import DEFAULT_TARGET_SIZE, describe_webdataset, export_webdataset

        _refuse("webdataset", args)
        rolled = export_webdataset(args.output, args.to, modes, target_size=args.target_size or DEFAULT_TARGET_SIZE,
                                   overwrite=args.overwrite)
        return describe_webdataset(rolled, args.to)
    from pipeline.exports.txt import export_txt

    not_taken = ("--link", "--columns", "--with-images", "--target-size")
    given = _given(args, not_taken)
    if bool(args.to) == args.beside_images or given:
        raise ValueError(f"txt export takes either --to FOLDER or --beside-images, and not {', '.join(not_taken)}"
                         + (f" (given: {', '.join(given)})" if given else ""))
    counts = export_txt(args.output, args.to, modes, beside_images=args.beside_images, overwrite=args.overwrite,
                        extension=args.extension or ".txt", one_mode=args.one_mode)
    return ", ".join(f"{value} {name.replace('_', ' ')}" for name, value in asdict(counts).items())
