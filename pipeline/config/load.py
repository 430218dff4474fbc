"""Loading a run config: YAML, `--set key=value` overrides (list items by index), canonical paths."""

from __future__ import annotations

import json
import logging
import os
import re
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from pipeline.config.engine_options import check_against_vllm
from pipeline.config.settings import ConfigError, RunConfig
from pipeline.config.uris import canonical_uri

log = logging.getLogger("pipeline.config.load")
OWN_KEY = re.compile(r"[a-z_]+(\.[\w-]+)+: ")  # a message that starts with the key path it is about


def _parse_value(text: str) -> Any:
    return yaml.safe_load(text) if text.strip() else ""


def apply_override(tree: dict[str, Any], assignment: str) -> None:
    """Apply `a.b.0.c=value` to a nested dict/list tree in place."""
    if "=" not in assignment:
        raise ConfigError(f"--set needs key=value, got {assignment!r}")
    path, raw = assignment.split("=", 1)
    parts = path.strip().split(".")
    node: Any = tree
    for depth, part in enumerate(parts):
        last = depth == len(parts) - 1
        where = ".".join(parts[: depth + 1])
        if isinstance(node, list):
            if not part.isdigit() or int(part) >= len(node):
                raise ConfigError(f"--set {path}: no list item {where}")
            index: int | str = int(part)
        elif isinstance(node, dict):
            index = part
            if not last and part not in node:
                node[part] = {}
        else:
            raise ConfigError(f"--set {path}: {'.'.join(parts[:depth])} is not a section")
        if last:
            node[index] = _parse_value(raw)
        else:
            node = node[index]


def _format_errors(err: ValidationError) -> str:
    lines = []
    for item in err.errors():
        where = ".".join(str(part) for part in item["loc"]) or "(top level)"
        message = item["msg"].removeprefix("Value error, ")
        if item["type"] == "extra_forbidden":
            message = "unknown key"
        # A check across items or sections names the exact key itself ("modes.2.requires: ..."): no second,
        # vaguer prefix.
        lines.append(message if OWN_KEY.match(message) else f"{where}: {message}")
    return "invalid config: " + "; ".join(lines)  # one line, like every error the console prints


def build_config(tree: dict[str, Any], overrides: list[str] | tuple[str, ...] = ()) -> RunConfig:
    tree = json.loads(json.dumps(tree))  # deep copy, keeps the caller's tree untouched
    for assignment in overrides:
        apply_override(tree, assignment)
    try:
        return RunConfig.model_validate(tree)
    except ValidationError as err:
        raise ConfigError(_format_errors(err)) from None


def absolute_paths(config: RunConfig) -> RunConfig:
    """URIs in their canonical form (`~` expanded, `file://` stripped, symlinks resolved, no trailing slash),
    so Ray workers with another working directory find them and one input has one fingerprint."""
    model_path = os.path.expanduser(config.model.path)
    try:
        input_uri, output_uri = canonical_uri(config.input.uri), canonical_uri(config.output.uri)
    except ValueError as err:
        raise ConfigError(str(err)) from None
    return config.model_copy(update={
        "input": config.input.model_copy(update={"uri": input_uri}),
        "output": config.output.model_copy(update={"uri": output_uri}),
        "model": config.model.model_copy(update={"path": os.path.abspath(model_path)})
        if os.path.isdir(model_path) else config.model,
    })


def read_yaml(path: str | Path, what: str, error: type[Exception]) -> Any:
    """The YAML document at `path`; a missing file or bad YAML raises `error` in one line naming `what`."""
    try:
        return yaml.safe_load(Path(path).read_text())
    except FileNotFoundError:
        raise error(f"{what} file not found: {path}") from None
    except yaml.YAMLError as err:
        raise error(f"{what} {path} is not valid YAML: {err}") from None


def load_config(path: str | Path, overrides: list[str] | tuple[str, ...] = (), input_uri: str | None = None,
                output_uri: str | None = None) -> RunConfig:
    """Read, override and validate a YAML run config."""
    tree = read_yaml(path, "config", ConfigError)
    if not isinstance(tree, dict):
        raise ConfigError(f"config {path} must be a mapping of sections")
    extra = list(overrides)
    if input_uri:
        extra.append(f"input.uri={json.dumps(input_uri)}")
    if output_uri:
        extra.append(f"output.uri={json.dumps(output_uri)}")
    config = absolute_paths(build_config(tree, extra))
    check_engine_options(config)
    return config


def check_engine_options(config: RunConfig) -> None:
    """`model.engine_kwargs` and `model.quantization` against the installed vLLM (engine_options.py): a key or
    method it does not know raises ConfigError naming it; without vLLM here, a note says the check runs where
    the engine starts."""
    problems = check_against_vllm(config.model.engine_kwargs, config.model.quantization)
    for note in (problem for problem in problems if problem.startswith("note:")):
        log.warning(note)
    errors = [problem for problem in problems if not problem.startswith("note:")]
    if errors:
        raise ConfigError("invalid config: " + "; ".join(errors))
