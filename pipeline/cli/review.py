"""`pipeline review OUTPUT`: the lowest-confidence and flagged captions first (exports/review.py)."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError("must be 1 or more")
    return value


def cmd_review(args: argparse.Namespace) -> int:
    from pipeline.exports.review import Criteria, format_entries, worst
    from pipeline.exports.table import open_output

    try:
        output = open_output(args.output)
        criteria = Criteria(modes=args.mode or None, flag=args.flag, error_kind=args.error_kind, below=args.below)
        found = worst(output, criteria, args.worst)
    except (FileNotFoundError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps([entry.to_dict() for entry in found], ensure_ascii=False))
    else:
        print(format_entries(found))
    return 0


def add_commands(subparsers: Any) -> None:
    review = subparsers.add_parser("review", help="the lowest-confidence and flagged captions of an output first")
    review.add_argument("output", help="output folder or s3:// prefix of a run")
    review.add_argument("--mode", action="append", default=[], metavar="M", help="only this mode (repeatable)")
    review.add_argument("--flag", metavar="GLITCH",
                        help="only captions with this glitch (repetition, truncated, refusal, empty; any)")
    review.add_argument("--error-kind", metavar="K",
                        help="error rows of this kind (as `pipeline status` counts them; any) instead of captions, "
                             "or besides them with --flag/--below")
    review.add_argument("--worst", type=positive_int, default=20, metavar="N", help="how many to list (default 20)")
    review.add_argument("--below", type=float, metavar="X", help="only captions with a confidence below X")
    review.add_argument("--json", action="store_true", help="print a JSON list, worst first")
    review.set_defaults(func=cmd_review)
