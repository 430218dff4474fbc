"""`python -m pipeline` / `pipeline`: run, status, export, gallery, prompts, tiny-model, samples."""

from __future__ import annotations

import argparse
import errno
import importlib
import json
import logging
import signal
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from pipeline.config import ConfigError, RunConfig, load_config
from pipeline.run.hooks import NO_HOOKS, RunHooks

if TYPE_CHECKING:
    from pipeline.cli.console import Console
    from pipeline.run.progress import Progress
    from pipeline.run.redo import Selection

# Modules with an `add_commands(subparsers)` of their own: `plan`, `submit` and `jobs`.
COMMAND_MODULES: tuple[str, ...] = ("pipeline.cli.plan", "pipeline.cli.submit", "pipeline.cli.review")


def _setup_logging(verbose: bool) -> None:
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")


def _setup_worker_logging() -> None:
    """Run by Ray first in each worker process of a run: Ray starts workers with Python's default logging
    (WARNING and up), and the caption actors' INFO lines (engine start, `engine use`) belong in the run's log
    like the driver's own. A module-level function: Ray pickles it by name."""
    _setup_logging(verbose=False)


class RunInterruptedError(BaseException):
    """SIGINT or SIGTERM during a run (a BaseException, like KeyboardInterrupt, so no `except Exception`
    on the way up swallows it)."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def _raise_interrupted(signum: int, frame: object) -> None:
    # One stop is enough: a second Ctrl-C while Ray winds down must not print a traceback.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    raise RunInterruptedError(signum)


def cmd_run(args: argparse.Namespace, hooks: RunHooks = NO_HOOKS) -> int:
    from pipeline.io.sources import SourceError
    from pipeline.run.driver import validate_before_start

    try:
        config = load_config(args.config, args.set, input_uri=args.input, output_uri=args.output)
        validate_before_start(config)
        args.redo_selection = _redo_selection(args, config)
    except (ConfigError, SourceError, ValueError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    from pipeline.cli.console import Console, default_log_path

    log_path = Path(args.log_file) if args.log_file else default_log_path(config.output.uri)
    console = Console(None if args.verbose else log_path, verbose=args.verbose, line_every_s=args.progress_every)
    previous = {sig: signal.signal(sig, _raise_interrupted) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        with console:
            if not args.verbose:
                console.say(f"log: {log_path}")
            return _run_with_console(config, args, console, hooks)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _redo_selection(args: argparse.Namespace, config: RunConfig) -> Selection | None:
    """`--redo` parsed (run/redo.py), None without it; ValueError on a bad criterion or unknown mode."""
    if not getattr(args, "redo", None):
        return None
    from pipeline.run.redo import parse_selection

    selection = parse_selection(args.redo)
    selection.modes([mode.name for mode in config.modes])
    return selection


def _run_with_console(config: RunConfig, args: argparse.Namespace, console: Console, hooks: RunHooks) -> int:
    from pipeline.cli.console import ProgressDisplay
    from pipeline.run.driver import UnhealthyOutputError, execute, format_summary
    from pipeline.table.lease import LeaseHeldError
    from pipeline.table.ledger import FingerprintMismatchError, ForeignOutputError

    shown: list[Progress] = []

    def display(progress: Progress) -> ProgressDisplay:
        shown.append(progress)
        return ProgressDisplay(console, progress)

    console.say(f"captioning {config.input.uri} -> {config.output.uri} with {len(config.modes)} modes "
                f"({', '.join(mode.name for mode in config.modes)})")
    try:
        summary = execute(config, overwrite=args.overwrite, retry_errors=args.retry_errors,
                          allow_existing=args.allow_existing, on_wait=_say_waiting(console), display=display,
                          hooks=hooks, worker_setup=_setup_worker_logging,
                          redo=getattr(args, "redo_selection", None))
    except RunInterruptedError as err:
        done = shown[0].committed_images if shown else 0
        console.say(f"interrupted ({err}) after {done:,} images committed this run; nothing is lost: run the same "
                    "command to resume")
        return 128 + err.signum
    except KeyboardInterrupt:
        console.say("interrupted; run the same command to resume")
        return 130
    except (ForeignOutputError, FingerprintMismatchError, LeaseHeldError) as err:
        console.say(f"error: {err}")
        return {ForeignOutputError: 2, FingerprintMismatchError: 3, LeaseHeldError: 4}[type(err)]
    except UnhealthyOutputError as err:
        console.result(json.dumps(err.summary.to_dict()) if args.json else format_summary(err.summary))
        _write_report(config, args, console)
        console.say(f"error: {err}")
        return 5
    except Exception as err:  # one line for people; the traceback is in the log (and on screen with -v)
        # The traceback: in the log, and on the console only with -v (pipeline.trace never reaches it).
        trace = logging.getLogger("pipeline.run.driver" if args.verbose else "pipeline.trace")
        trace.error("run failed", exc_info=True)
        code, message = explain_failure(err, config.output.uri)
        console.say(f"error: {message}" + ("" if args.verbose else f" (details: {console.log_path})"))
        return code
    console.result(json.dumps(summary.to_dict()) if args.json else format_summary(summary))
    _write_report(config, args, console)
    return 0


def _write_report(config: RunConfig, args: argparse.Namespace, console: Console) -> None:
    """The run report (<output>/report.html, pipeline/exports/report.py); failing to write it is a warning."""
    if not getattr(args, "no_report", False):
        from pipeline.exports.report import write_run_report

        console.say(write_run_report(config.output.uri, config.output.storage_options, config.input.storage_options))


# errno values that mean the output path, not the pipeline, is the problem.
PATH_ERRNOS = {errno.ENOSPC: "no space left on device", errno.EDQUOT: "disk quota exceeded",
               errno.EACCES: "permission denied", errno.EPERM: "operation not permitted",
               errno.EROFS: "read-only file system", errno.ENOTDIR: "a path component is not a folder",
               errno.EEXIST: "a file is in the way", errno.EISDIR: "a folder is in the way"}
CREDENTIAL_ERRORS = ("NoCredentialsError", "PartialCredentialsError", "InvalidAccessKeyId", "SignatureDoesNotMatch",
                     "ExpiredToken", "AccessDenied", "InvalidToken")


def explain_failure(err: BaseException, output_uri: str) -> tuple[int, str]:
    """(exit code, one line) for a failed run: 2 when the user's paths, disk or credentials are the cause
    (named), else 1 with the most telling message of the chain."""
    chain = _chain(err)
    for item in chain:
        if isinstance(item, OSError) and item.errno in PATH_ERRNOS:
            where = item.filename or output_uri
            hint = "; committed shards are kept: free space and run the same command to resume" \
                if item.errno in (errno.ENOSPC, errno.EDQUOT) else ""
            return 2, f"{PATH_ERRNOS[item.errno]}: {where}{hint}"
    for item in chain:
        text = f"{type(item).__name__}: {item}"
        if any(name in text for name in CREDENTIAL_ERRORS):
            return 2, f"storage refused the credentials for {output_uri}: {text.splitlines()[0]}"
    message = _root_message(err)
    if "TransientStorageError" in message:
        message += " (committed shards are kept: run the same command again once storage recovers)"
    if any("No space left on device" in str(item) for item in chain):  # an OSError Ray passed on as text
        return 2, f"{PATH_ERRNOS[errno.ENOSPC]}: {output_uri}; committed shards are kept: free space and run the " \
                  "same command to resume"
    return 1, f"run failed: {message}"


def _chain(err: BaseException) -> list[BaseException]:
    chain, current = [], err
    while current is not None and current not in chain:
        chain.append(current)
        current = current.__cause__ or current.__context__
    return chain


def _say_waiting(console: Console):  # -> Callable[[LeaseInfo, float], None]
    """Tell the user, once every 10 s, that the run waits for a silent holder's lease to expire."""
    import time

    said = [0.0]

    def say(info, seconds_left: float) -> None:  # (LeaseInfo, float)
        if time.monotonic() - said[0] >= 10:
            said[0] = time.monotonic()
            console.say(f"waiting {seconds_left:.0f} s for the lease of the silent run on {info.host} "
                        f"(pid {info.pid}) to expire")

    return say


def cmd_status(args: argparse.Namespace) -> int:
    from pipeline.table.status import format_status, status

    try:
        report = status(args.output)
    except FileNotFoundError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(json.dumps(report.to_dict(), indent=1) if args.json else format_status(report))
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from pipeline.exports.command import export_command
    from pipeline.exports.pending import pending_note
    from pipeline.io.fs import TransientStorageError

    try:
        note = pending_note(args.output)  # before the export: what it holds is at least this much
        print(export_command(args))
    except (OSError, ValueError) as err:  # a missing output, a refused --to, an unreadable or unwritable path
        print(f"error: {err}", file=sys.stderr)
        return 2
    except TransientStorageError as err:
        print(f"error: {err} (run the export again once storage recovers)", file=sys.stderr)
        return 1
    if note:
        print(note, file=sys.stderr)
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from pipeline.exports.pending import pending_note
    from pipeline.exports.report import write_report

    try:
        note = pending_note(args.output, holder="this report covers")
        print(f"report: {write_report(args.output, args.to, overwrite=args.overwrite)}")
    except (OSError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if note:
        print(note, file=sys.stderr)
    return 0


def cmd_gallery(args: argparse.Namespace) -> int:
    from pipeline.exports.gallery import write_gallery
    from pipeline.exports.pending import pending_note

    try:
        note = pending_note(args.output, holder="this gallery samples")
        shown = write_gallery(args.output, args.to, sample=args.sample, seed=args.seed, overwrite=args.overwrite)
    except (OSError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"{shown} rows in {args.to}")
    if note:
        print(note, file=sys.stderr)
    return 0


# Lines that say what went wrong better than whatever wraps them (Ray wraps task errors several times), and
# whether the line is cut to start at the marker (dropping a module path such as `pipeline.io.retry.`).
TELLING_LINES = (("engine failed to start", False), ("TransientStorageError:", True),
                 ("RemoteServerDownError:", True), ("RemoteServerRefusedError:", True))


def _root_message(err: BaseException) -> str:
    """The most telling message of a chain of wrapped errors: a known cause when one is named anywhere in
    it, else the innermost non-empty one (Ray Data chains an empty SystemException or UserCodeException
    under the real error)."""
    texts = [f"{type(item).__name__}: {item}" for item in _chain(err)]
    for marker, from_marker in TELLING_LINES:
        for text in texts:
            for line in text.splitlines():
                # Ray's wrapped tracebacks quote source lines too: `raise EngineStartError(f"engine failed...`.
                if marker in line and not line.lstrip().startswith("raise "):
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
    from pipeline.cli.prompts import describe_catalog, describe_mode

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
    run.add_argument("--redo", action="append", default=[], metavar="SELECTION",
                     help="also re-caption committed rows it selects: 'confidence<0.3', 'glitch', 'glitch=repetition', "
                          "'keys=FILE' (repeatable; a row matching any is redone, each key still once)")
    run.add_argument("--json", action="store_true", help="print the summary as JSON")
    run.add_argument("--no-report", action="store_true", help="do not write OUTPUT/report.html at the end")
    run.add_argument("--log-file", help="where Ray's, vLLM's and the pipeline's full log goes (default: a new file "
                                        "under $PIPELINE_LOG_DIR or ~/.local/state/joycaption-pipeline/logs)")
    run.add_argument("--progress-every", type=float, default=30.0, metavar="SECONDS",
                     help="when the console is not a terminal, a progress line every SECONDS (default 30)")
    run.set_defaults(func=cmd_run)

    status = commands.add_parser("status", help="progress, counts, glitch rates and ETA of an output")
    status.add_argument("output", help="output folder or s3:// prefix of a run")
    status.add_argument("--json", action="store_true", help="print the report as JSON")
    status.set_defaults(func=cmd_status)

    export = commands.add_parser("export", help="write committed captions as sidecar .txt files, JSONL, a "
                                                "Hugging Face imagefolder, Parquet files or WebDataset tars")
    export.add_argument("output", help="output folder or s3:// prefix of a run")
    export.add_argument("--format", choices=("txt", "jsonl", "imagefolder", "parquet", "webdataset"), required=True)
    export.add_argument("--to", help="txt: target folder; jsonl: target file (.gz/.zst compress); imagefolder, "
                                     "parquet, webdataset: a local folder, new or empty (parquet, webdataset: or "
                                     "their own interrupted export, which is resumed)")
    export.add_argument("--modes", help="txt, imagefolder, parquet, webdataset: comma-separated modes (default: all, "
                                        "run order)")
    export.add_argument("--beside-images", action="store_true",
                        help="txt: write each .txt next to its image (local folder inputs only)")
    export.add_argument("--link", action="store_true",
                        help="imagefolder: hard-link the images (symlink across file systems) instead of copying "
                             "them (local folder inputs only)")
    export.add_argument("--extension", help="txt: the sidecar's extension instead of .txt (e.g. .caption)")
    export.add_argument("--one-mode", metavar="MODE",
                        help="txt: write only this mode's caption, on one line (instead of --modes)")
    export.add_argument("--columns", help="parquet: more table columns to carry, comma-separated (e.g. "
                                          "meta,tags_prompt)")
    export.add_argument("--with-images", action="store_true",
                        help="parquet: add an `image` column (Hugging Face Image feature) with each image's bytes")
    export.add_argument("--target-size", help="parquet, webdataset: the size of each file (default 256MB for "
                                              "parquet, 1GB for webdataset; 500MB, 1GB or bytes)")
    export.add_argument("--overwrite", action="store_true",
                        help="txt: replace existing .txt files; jsonl: replace the file; imagefolder: replace an "
                             "earlier imagefolder export; parquet, webdataset: start an earlier export over")
    export.set_defaults(func=cmd_export)

    gallery = commands.add_parser("gallery", help="write a static HTML page reviewing a sample of captions")
    gallery.add_argument("output", help="output folder or s3:// prefix of a run")
    gallery.add_argument("--to", required=True, help="the HTML page to write")
    gallery.add_argument("--sample", type=int, default=48, help="rows to show (default 48)")
    gallery.add_argument("--seed", type=int, default=0, help="which sample (same seed, same rows)")
    gallery.add_argument("--overwrite", action="store_true", help="replace the page if it exists")
    gallery.set_defaults(func=cmd_gallery)

    report = commands.add_parser("report", help="write the run report: one HTML page of charts and worst examples")
    report.add_argument("output", help="output folder or s3:// prefix of a run")
    report.add_argument("--to", help="the HTML page to write (default: OUTPUT/report.html, replaced)")
    report.add_argument("--overwrite", action="store_true", help="replace --to if it exists")
    report.set_defaults(func=cmd_report)

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

    # Commands that live in a module of their own register themselves (each imports its heavy parts lazily).
    for module in COMMAND_MODULES:
        importlib.import_module(module).add_commands(commands)
    return parser


def main(argv: Sequence[str] | None = None, hooks: RunHooks = NO_HOOKS) -> int:
    """The CLI. `hooks` reach into a run (tests/launch.py passes them; the `pipeline` command passes none)."""
    args = build_parser().parse_args(argv)
    if args.func is cmd_run:  # a run sets up its own console and log file
        return cmd_run(args, hooks)
    _setup_logging(args.verbose)
    return int(args.func(args))
