"""`python -m pipeline` / `pipeline`: run, prompts, tiny-model, samples."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence

from pipeline.config import ConfigError, load_config


def _setup_logging(verbose: bool) -> None:
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")


def cmd_run(args: argparse.Namespace) -> int:
    from pipeline.io.sources import SourceError
    from pipeline.ledger import FingerprintMismatch
    from pipeline.run import execute, format_summary, validate_before_start

    try:
        config = load_config(args.config, args.set, input_uri=args.input, output_uri=args.output)
        validate_before_start(config)
    except (ConfigError, SourceError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    try:
        summary = execute(config, overwrite=args.overwrite)
    except FingerprintMismatch as err:
        print(f"error: {err}", file=sys.stderr)
        return 3
    print(json.dumps(summary, indent=1) if args.json else format_summary(summary))
    return 0


def cmd_tiny_model(args: argparse.Namespace) -> int:
    from pipeline.testing.tiny_model import build_tiny_model

    print(build_tiny_model(args.dir, seed=args.seed))
    return 0


def cmd_samples(args: argparse.Namespace) -> int:
    from pipeline.testing.samples import write_samples

    paths = write_samples(args.dir)
    print(f"{len(paths)} sample images under {args.dir}")
    return 0


def cmd_prompts(args: argparse.Namespace) -> int:
    from pipeline.prompt_catalog import describe_catalog, describe_mode

    try:
        print(describe_mode(args) if (args.type or args.prompt or args.config) else describe_catalog())
    except (ConfigError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pipeline", description="Caption image datasets with JoyCaption.")
    parser.add_argument("-v", "--verbose", action="store_true")
    commands = parser.add_subparsers(dest="command", required=True)

    run = commands.add_parser("run", help="caption a dataset (resumes an interrupted run)")
    run.add_argument("config", help="YAML run config")
    run.add_argument("--input", help="override input.uri")
    run.add_argument("--output", help="override output.uri")
    run.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                     help="override a config key, e.g. modes.0.length=80 (repeatable)")
    run.add_argument("--overwrite", action="store_true", help="discard an existing output and start over")
    run.add_argument("--json", action="store_true", help="print the summary as JSON")
    run.set_defaults(func=cmd_run)

    prompts = commands.add_parser("prompts", help="list caption types, lengths and extra options, or show a "
                                                  "mode's exact prompt")
    prompts.add_argument("--type", help="caption type id")
    prompts.add_argument("--length", default="any")
    prompts.add_argument("--extra", action="append", default=[], help="extra option id or sentence")
    prompts.add_argument("--name", help="character name for the `name` option")
    prompts.add_argument("--prompt", help="free-text instruction")
    prompts.add_argument("--system", help="system prompt")
    prompts.add_argument("--config", help="show every mode of this run config")
    prompts.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    prompts.set_defaults(func=cmd_prompts)

    tiny = commands.add_parser("tiny-model", help="write the tiny JoyCaption-shaped test model")
    tiny.add_argument("dir")
    tiny.add_argument("--seed", type=int, default=0)
    tiny.set_defaults(func=cmd_tiny_model)

    samples = commands.add_parser("samples", help="write the bundled sample photographs")
    samples.add_argument("dir")
    samples.set_defaults(func=cmd_samples)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _setup_logging(args.verbose)
    return int(args.func(args))
