"""`python -m pipeline` / `pipeline`: run, status, export, gallery, prompts, tiny-model, samples."""

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
    from pipeline.lease import LeaseHeldError
    from pipeline.ledger import FingerprintMismatchError, ForeignOutputError
    from pipeline.run import UnhealthyOutputError, execute, format_summary, validate_before_start

    try:
        config = load_config(args.config, args.set, input_uri=args.input, output_uri=args.output)
        validate_before_start(config)
    except (ConfigError, SourceError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    try:
        summary = execute(config, overwrite=args.overwrite, retry_errors=args.retry_errors,
                          allow_existing=args.allow_existing, on_wait=_say_waiting())
    except ForeignOutputError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except FingerprintMismatchError as err:
        print(f"error: {err}", file=sys.stderr)
        return 3
    except LeaseHeldError as err:
        print(f"error: {err}", file=sys.stderr)
        return 4
    except UnhealthyOutputError as err:
        print(json.dumps(err.summary) if args.json else format_summary(err.summary))
        print(f"error: {err}", file=sys.stderr)
        return 5
    except Exception as err:  # a failed run: say why in one line after Ray's traceback
        logging.getLogger("pipeline").exception("run failed")
        message = _root_message(err)
        if "TransientStorageError" in message:
            message += " (committed shards are kept: run the same command again once storage recovers)"
        print(f"error: run failed: {message}", file=sys.stderr)
        return 1
    print(json.dumps(summary) if args.json else format_summary(summary))
    return 0


def _say_waiting():  # -> Callable[[LeaseInfo, float], None]
    """Tell the user, once every 10 s, that the run waits for a silent holder's lease to expire."""
    import time

    said = [0.0]

    def say(info, seconds_left: float) -> None:  # (LeaseInfo, float)
        if time.monotonic() - said[0] >= 10:
            said[0] = time.monotonic()
            print(f"waiting {seconds_left:.0f} s for the lease of the silent run on {info.host} (pid {info.pid}) "
                  "to expire", file=sys.stderr)

    return say


def cmd_status(args: argparse.Namespace) -> int:
    from pipeline.status import format_status, status

    try:
        report = status(args.output)
    except FileNotFoundError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(json.dumps(report, indent=1) if args.json else format_status(report))
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from dataclasses import asdict

    from pipeline.exports.jsonl import export_jsonl
    from pipeline.exports.txt import export_txt

    modes = [name.strip() for name in args.modes.split(",") if name.strip()] if args.modes else None
    try:
        if args.format == "jsonl":
            if not args.to or args.beside_images or modes:
                raise ValueError("jsonl export takes --to FILE and no --modes or --beside-images")
            print(f"{export_jsonl(args.output, args.to)} rows written to {args.to}")
            return 0
        if bool(args.to) == args.beside_images:
            raise ValueError("txt export takes either --to FOLDER or --beside-images")
        counts = export_txt(args.output, args.to, modes, beside_images=args.beside_images,
                            overwrite=args.overwrite)
    except (FileNotFoundError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(", ".join(f"{value} {name.replace('_', ' ')}" for name, value in asdict(counts).items()))
    return 0


def cmd_gallery(args: argparse.Namespace) -> int:
    from pipeline.exports.gallery import write_gallery

    try:
        shown = write_gallery(args.output, args.to, sample=args.sample, seed=args.seed)
    except (FileNotFoundError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"{shown} rows in {args.to}")
    return 0


# Lines that say what went wrong better than whatever wraps them (Ray wraps task errors several times), and
# whether the line is cut to start at the marker (dropping a module path such as `pipeline.io.retry.`).
TELLING_LINES = (("engine failed to start", False), ("TransientStorageError:", True))


def _root_message(err: BaseException) -> str:
    """The most telling message of a chain of wrapped errors: a known cause when one is named anywhere in
    it, else the innermost non-empty one (Ray Data chains an empty SystemException or UserCodeException
    under the real error)."""
    texts = []
    current: BaseException | None = err
    while current is not None:
        texts.append(f"{type(current).__name__}: {current}")
        current = current.__cause__ or current.__context__
    for marker, from_marker in TELLING_LINES:
        for text in texts:
            for line in text.splitlines():
                if marker in line:
                    line = line.strip()
                    return line[line.find(marker):] if from_marker else line
    meaningful = [text for text in texts if text.split(": ", 1)[1].strip()]
    return (meaningful or texts)[-1].splitlines()[0]


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
    run.add_argument("--allow-existing", action="store_true",
                     help="write into a folder that holds other files (they are never touched)")
    run.add_argument("--retry-errors", action="store_true",
                     help="also re-caption the error rows of committed shards (e.g. after fixing files)")
    run.add_argument("--json", action="store_true", help="print the summary as JSON")
    run.set_defaults(func=cmd_run)

    status = commands.add_parser("status", help="progress, counts, glitch rates and ETA of an output")
    status.add_argument("output", help="output folder or s3:// prefix of a run")
    status.add_argument("--json", action="store_true", help="print the report as JSON")
    status.set_defaults(func=cmd_status)

    export = commands.add_parser("export", help="write committed captions as sidecar .txt files or JSONL")
    export.add_argument("output", help="output folder or s3:// prefix of a run")
    export.add_argument("--format", choices=("txt", "jsonl"), required=True)
    export.add_argument("--to", help="txt: target folder; jsonl: target file (.gz/.zst compress)")
    export.add_argument("--modes", help="txt: comma-separated modes, one line each (default: all, run order)")
    export.add_argument("--beside-images", action="store_true",
                        help="txt: write each .txt next to its image (local folder inputs only)")
    export.add_argument("--overwrite", action="store_true", help="txt: replace existing .txt files")
    export.set_defaults(func=cmd_export)

    gallery = commands.add_parser("gallery", help="write a static HTML page reviewing a sample of captions")
    gallery.add_argument("output", help="output folder or s3:// prefix of a run")
    gallery.add_argument("--to", required=True, help="the HTML page to write")
    gallery.add_argument("--sample", type=int, default=48, help="rows to show (default 48)")
    gallery.add_argument("--seed", type=int, default=0, help="which sample (same seed, same rows)")
    gallery.set_defaults(func=cmd_gallery)

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
