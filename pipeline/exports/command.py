"""`pipeline export`: which options each format takes, the call, and the line it prints."""

from __future__ import annotations

import argparse
from dataclasses import asdict


def _modes(text: str | None) -> list[str] | None:
    return [name.strip() for name in text.split(",") if name.strip()] if text else None


def _refuse(fmt: str, args: argparse.Namespace, takes: str, options: tuple[str, ...]) -> None:
    given = [option for option in options if getattr(args, option.lstrip("-").replace("-", "_"))]
    if not args.to or given:
        raise ValueError(f"{fmt} export takes {takes} and not {', '.join(options)}"
                         + (f" (given: {', '.join(given)})" if given else " (no --to given)"))


def export_command(args: argparse.Namespace) -> str:
    """Run the export `args` ask for and return its summary; ValueError or OSError for what the user can fix."""
    modes = _modes(args.modes)
    if args.format == "jsonl":
        from pipeline.exports.jsonl import export_jsonl

        _refuse("jsonl", args, "--to FILE", ("--modes", "--beside-images", "--link"))
        return f"{export_jsonl(args.output, args.to, overwrite=args.overwrite)} rows written to {args.to}"
    if args.format == "imagefolder":
        from pipeline.exports.imagefolder import describe_counts, export_imagefolder

        _refuse("imagefolder", args, "--to FOLDER", ("--beside-images",))
        counts = export_imagefolder(args.output, args.to, modes, link=args.link, overwrite=args.overwrite)
        return describe_counts(counts, args.to)
    from pipeline.exports.txt import export_txt

    if bool(args.to) == args.beside_images or args.link:
        raise ValueError("txt export takes either --to FOLDER or --beside-images, and not --link")
    counts = export_txt(args.output, args.to, modes, beside_images=args.beside_images, overwrite=args.overwrite)
    return ", ".join(f"{value} {name.replace('_', ' ')}" for name, value in asdict(counts).items())
