"""`pipeline jobs status|logs|stop|list`: the Ray jobs that `pipeline submit` started, seen from anywhere.

Every command talks HTTP to the cluster's job server (the head node's dashboard, port 8265) with Ray's
`JobSubmissionClient`; nothing here joins the cluster. The address is `--address`, else `RAY_ADDRESS`,
else http://127.0.0.1:8265. A job's result maps onto this process's exit code (`job_exit_code`), so a
script that follows a job sees the same codes as one that runs `pipeline run` itself. A job server on this
machine that asks for Ray's authentication token gets the token found here, as `ray.init()` sends it to a
local cluster (`client_auth`).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ipaddress
import json
import os
import re
import shlex
import socket
import sys
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any
from urllib.parse import urlsplit

if TYPE_CHECKING:
    from ray.job_submission import JobDetails, JobSubmissionClient

DEFAULT_ADDRESS = "http://127.0.0.1:8265"
# Ray's client lets these variables override the address it is given; `--address` must win, so they are
# hidden while the client is built (the address resolved here already took RAY_ADDRESS into account).
OVERRIDING_VARIABLES = ("RAY_API_SERVER_ADDRESS", "RAY_ADDRESS")
EXIT_JOB_FAILED = 1  # the job failed without a pipeline exit code (runtime env set-up, a lost driver...)
EXIT_INTERRUPTED = 130  # Ctrl-C while following: only the following stopped, the job keeps running
EXIT_STOPPED = 143  # the job was stopped (`pipeline jobs stop` sends SIGTERM: 128 + 15)
# How Ray's job supervisor words a failed entrypoint when a server leaves driver_exit_code unset.
ENTRYPOINT_FAILED = re.compile(r"^Job entrypoint command failed with exit code (-?\d+)")
SETTLE_SECONDS = 30.0  # after the log stream ends, how long the status may take to turn terminal

# Ray's token authentication, as the installed Ray 2.60 does it (paths under site-packages/ray/):
# - `ray start --head` (scripts/scripts.py `start` -> maybe_enable_token_auth_if_token_available in
#   _private/authentication/authentication_token_setup.py): with RAY_AUTH_MODE unset it turns token auth on
#   (RAY_AUTH_MODE=token in the environment of every process of the node) when a token already exists here,
#   and leaves it off, with a warning, when none does. It never writes a token; `RAY_AUTH_MODE=token ray
#   start --head` without one fails. The token is usually there: `ray.init()` starting a local cluster (the
#   demo's `pipeline run`; _private/worker.py -> enable_token_auth_by_default, ensure_token_if_auth_enabled
#   with create_token_if_missing) turns it on and writes ~/.ray/auth_token (generate_and_save_token,
#   _get_default_token_path); `ray get-auth-token --generate` writes the same file.
# - A worker node's `ray start --address` never turns it on by itself (scripts.py only checks
#   ensure_token_if_auth_enabled): it needs RAY_AUTH_MODE=token and the token, else joining fails with
#   InvalidAuthToken.
# - Where a token is read (the C++ AuthenticationTokenLoader in _raylet.so; the order is the one of
#   _private/authentication_test_utils.py and of ray.exceptions.AuthenticationError's help text):
#   RAY_AUTH_TOKEN, else the file named by RAY_AUTH_TOKEN_PATH (an AuthenticationError when it cannot be
#   read or is empty), else ~/.ray/auth_token; surrounding whitespace is dropped. No copy under the session dir.
# - Whether a client sends it: only when its RayConfig says AUTH_MODE token, i.e. RAY_AUTH_MODE=token (any
#   case) in its environment. JobSubmissionClient (dashboard/modules/dashboard_sdk.py, SubmissionClient
#   __init__) then adds `authorization: Bearer TOKEN` (get_auth_headers_if_auth_enabled in
#   _private/authentication/http_token_authentication.py), unless the caller passes an Authorization
#   header of its own. `ray.init()` to an existing cluster turns the mode on by itself only for a local
#   cluster it finds (address None or "auto", _private/worker.py); an explicit address never does.
# - The job server (the dashboard's token_auth_middleware, http_token_authentication.py) answers every path,
#   /api/version included, 401 "Missing authentication token" without a header and 403 "Invalid
#   authentication token" with a wrong one; the client raises ray.exceptions.AuthenticationError starting
#   "Authentication required" or "Authentication failed" (format_authentication_http_error).
# So `pipeline submit` and `pipeline jobs` do what ray.init() does for a local cluster: with RAY_AUTH_MODE
# unset and the job server on this machine (`is_local`), they send the token found here (`find_token`, in
# Ray's order) as their own Authorization header, to that client only: no variable is set. With
# RAY_AUTH_MODE=token they send it to any address (as Ray would); with any other RAY_AUTH_MODE, or unset and
# a remote address, they send nothing, and a 401 or 403 becomes one line naming what to set (`auth_error`).
AUTH_MODE, AUTH_TOKEN, AUTH_TOKEN_PATH = "RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH"
LOOPBACK_NAMES = frozenset({"localhost", "localhost.localdomain", "ip6-localhost", "ip6-loopback"})


class JobsError(Exception):
    """What the user can fix (the address, a job id, the arguments): one line, exit 2."""


@dataclass(frozen=True)
class Address:
    url: str
    origin: str  # where it came from: "--address", "RAY_ADDRESS" or "the default"

    def flag(self) -> list[str]:
        """The `--address URL` words that a printed command needs to reach the same cluster."""
        return [] if self.origin == "the default" else ["--address", self.url]


def resolve_address(flag: str | None, environ: Mapping[str, str] = os.environ) -> Address:
    """`--address`, else RAY_ADDRESS, else the local job server; `host:port` means http://host:port."""
    if flag:
        text, origin = flag, "--address"
    elif environ.get("RAY_ADDRESS"):
        text, origin = environ["RAY_ADDRESS"], "RAY_ADDRESS"
    else:
        text, origin = DEFAULT_ADDRESS, "the default"
    text = text.strip().rstrip("/")
    return Address(text if "://" in text else f"http://{text}", origin)


def default_token_file(environ: Mapping[str, str] = os.environ) -> Path:
    """~/.ray/auth_token of this user: where `ray.init()` and `ray get-auth-token --generate` write the token."""
    return Path(environ.get("HOME") or os.path.expanduser("~")) / ".ray" / "auth_token"


@dataclass(frozen=True)
class Token:
    """The token Ray's loader would use in this process: `value` is None when `source` is set but unreadable."""

    source: str  # "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH=/path" or the default file's path
    value: str | None
    problem: str = ""  # why value is None


def find_token(environ: Mapping[str, str] = os.environ) -> Token | None:
    """RAY_AUTH_TOKEN, else the file RAY_AUTH_TOKEN_PATH names, else ~/.ray/auth_token (Ray's order); None when
    none of them is set or present."""
    if environ.get(AUTH_TOKEN, "").strip():
        return Token(AUTH_TOKEN, environ[AUTH_TOKEN].strip())
    named = environ.get(AUTH_TOKEN_PATH)
    if named:
        source = f"{AUTH_TOKEN_PATH}={named}"
        try:
            value = Path(named).expanduser().read_text().strip()
        except (OSError, UnicodeDecodeError) as err:
            return Token(source, None, f"{AUTH_TOKEN_PATH} names {named}, which cannot be read "
                                       f"({getattr(err, 'strerror', None) or err})")
        return Token(source, value) if value else Token(source, None, f"{AUTH_TOKEN_PATH} names {named}, "
                                                                      "which is empty")
    path = default_token_file(environ)
    try:
        value = path.read_text().strip()
    except (OSError, UnicodeDecodeError):
        return None
    return Token(str(path), value) if value else None


def _own_addresses() -> set[str]:
    try:
        import psutil

        return {entry.address.split("%")[0] for entries in psutil.net_if_addrs().values() for entry in entries}
    except (ImportError, OSError):
        return set()


def is_local(url: str) -> bool:
    """The job server at `url` runs on this machine: a loopback name or address, or one of this machine's own
    names or interface addresses (no DNS lookup)."""
    try:
        host = (urlsplit(url).hostname or "").lower().rstrip(".")
    except ValueError:
        return False
    if not host:
        return False
    if host in LOOPBACK_NAMES or host == socket.gethostname().lower():
        return True
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return False
    mapped = getattr(ip, "ipv4_mapped", None)
    ip = mapped or ip
    return ip.is_loopback or ip.is_unspecified or str(ip) in _own_addresses()


@dataclass(frozen=True)
class Auth:
    """How requests to the job server authenticate (Ray token authentication; see the notes above)."""

    mode: str | None  # RAY_AUTH_MODE as set here, lower case; None when unset
    local: bool  # the job server runs on this machine
    token: Token | None  # what Ray's loader would read here
    send: bool  # requests carry the token (when there is one)

    def headers(self) -> dict[str, str]:
        if self.send and self.token is not None and self.token.value:
            return {"Authorization": f"Bearer {self.token.value}"}
        return {}


def client_auth(address: Address, environ: Mapping[str, str] = os.environ) -> Auth:
    """The token goes with the requests when RAY_AUTH_MODE=token, or when RAY_AUTH_MODE is unset and the job
    server is on this machine (what ray.init() does for a local cluster); never to a remote address on its own,
    never against an explicit RAY_AUTH_MODE=disabled. A token source that is set but unreadable is an error
    when the token would be sent (Ray's loader fails on it too)."""
    mode = environ.get(AUTH_MODE)
    mode = mode.strip().lower() if mode is not None else None
    local = is_local(address.url)
    token = find_token(environ)
    send = mode == "token" or (mode is None and local)
    if send and token is not None and token.value is None:
        raise JobsError(f"{token.problem}; point it at the cluster's token file, or unset it to use "
                        f"{default_token_file(environ)}")
    return Auth(mode, local, token, send)


def auth_error(address: Address, auth: Auth, err: BaseException,
               environ: Mapping[str, str] = os.environ) -> JobsError:
    """A 401 or 403 from the job server as one line: what was sent, and what to set."""
    text = str(getattr(err, "message", None) or err)
    where = f"the Ray job server at {address.url} (from {address.origin})"
    file = default_token_file(environ)
    give = (f"put the cluster's token (`ray get-auth-token` on the head prints it) in {file}, or set {AUTH_TOKEN} "
            f"to it, or {AUTH_TOKEN_PATH} to a file holding it")
    sent = auth.send and auth.token is not None and auth.token.value
    if text.startswith("Authentication failed") and sent:  # 403: a token went, not this cluster's
        return JobsError(f"{where} rejected the token from {auth.token.source}: it is not that cluster's token; "
                         f"{give}")
    if sent:  # 401 although a token went: a proxy dropping the header, or an odd server
        return JobsError(f"{where} asks for a token although the one from {auth.token.source} was sent: "
                         f"{server_reason(err)}")
    if auth.mode not in (None, "token"):
        found = f"the token in {auth.token.source}" if auth.token else "a token"
        return JobsError(f"{where} requires a token (Ray token authentication is on), and {AUTH_MODE}="
                         f"{environ.get(AUTH_MODE, '')} here sends none: unset {AUTH_MODE} (or set it to token) "
                         f"to send {found}" + ("" if auth.token else f"; {give}"))
    if auth.token is not None:  # remote, mode unset: a token is here but is not sent on its own
        return JobsError(f"{where} requires a token (Ray token authentication is on); {auth.token.source} holds "
                         f"one, but it goes to a remote address only with {AUTH_MODE}=token: set {AUTH_MODE}=token "
                         f"(and, if it is not that cluster's token, {give})")
    also = "" if auth.local or auth.mode == "token" else f"set {AUTH_MODE}=token and "
    return JobsError(f"{where} requires a token (Ray token authentication is on) and none was found here: "
                     f"{also}{give}")


def server_reason(err: BaseException) -> str:
    """The last non-empty line of an error: the job server answers with a whole traceback as its text."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    return lines[-1].rstrip(".") if lines else type(err).__name__


def _unreachable(address: Address, why: str) -> JobsError:
    return JobsError(f"no Ray job server at {address.url} (from {address.origin}): {why}; give the head node's "
                     "dashboard address, e.g. --address http://HEAD:8265")


def _probe(address: Address, timeout: float = 10.0) -> None:
    """Fail in seconds on a host that drops packets, where an HTTP request would hang for minutes."""
    parts = urlsplit(address.url)
    if parts.scheme not in ("http", "https"):
        return  # ray://... and provider schemes: Ray's client resolves them itself
    try:
        port = parts.port or (443 if parts.scheme == "https" else 80)
    except ValueError as err:
        raise _unreachable(address, str(err)) from None
    try:
        socket.create_connection((parts.hostname or "", port), timeout=timeout).close()
    except OSError as err:
        raise _unreachable(address, err.strerror or str(err)) from None


@contextlib.contextmanager
def _hidden(names: tuple[str, ...]) -> Iterator[None]:
    saved = {name: os.environ.pop(name) for name in names if name in os.environ}
    try:
        yield
    finally:
        os.environ.update(saved)


def connect(address: Address) -> JobSubmissionClient:
    """A client for the job server at `address`, sending the token `client_auth` chose; or JobsError naming
    the address (nothing there) or what to set (a token is required, missing or wrong)."""
    auth = client_auth(address)
    _probe(address)
    from ray.exceptions import AuthenticationError
    from ray.job_submission import JobSubmissionClient

    with _hidden(OVERRIDING_VARIABLES):
        try:
            return JobSubmissionClient(address.url, headers=auth.headers() or None)
        except AuthenticationError as err:  # 401 or 403 from the job server
            raise auth_error(address, auth, err) from None
        except (OSError, RuntimeError, ValueError) as err:  # refused, 404, not Ray
            raise _unreachable(address, server_reason(err)) from None


def job_info(client: JobSubmissionClient, job_id: str, address: Address) -> JobDetails:
    try:
        return client.get_job_info(job_id)
    except RuntimeError as err:
        if "does not exist" in str(err):
            raise JobsError(f"no job {job_id} on {address.url}") from None
        raise JobsError(f"the job server at {address.url} did not answer for job {job_id}: "
                        f"{server_reason(err)}") from None
    except OSError as err:
        raise _unreachable(address, str(err)) from None


def job_exit_code(info: JobDetails) -> int:
    """0 succeeded; the pipeline's own exit code when it failed (1 run failed, 2 bad config or input, 3
    another config's output, 4 output busy, 5 unhealthy output); 1 when the job failed without one;
    143 stopped."""
    status = str(info.status)
    if status == "SUCCEEDED":
        return 0
    if status == "STOPPED":
        return EXIT_STOPPED
    code = info.driver_exit_code
    if code is None:
        match = ENTRYPOINT_FAILED.match(info.message or "")
        code = int(match.group(1)) if match else None
    if not code:
        return EXIT_JOB_FAILED
    return 128 - code if code < 0 else min(code, 255)  # a negative code is a signal, as a shell reports it


def commands(job_id: str, address: Address) -> str:
    """How to follow, inspect and stop the job from any shell."""
    where = shlex.join(address.flag())
    tail = f" {where}" if where else ""
    ident = shlex.quote(job_id)
    return (f"follow  pipeline jobs logs {ident} --follow{tail}\n"
            f"status  pipeline jobs status {ident}{tail}\n"
            f"stop    pipeline jobs stop {ident}{tail}")


async def _stream(client: JobSubmissionClient, job_id: str, out: IO[str]) -> None:
    async for chunk in client.tail_job_logs(job_id):
        out.write(chunk)
        out.flush()


def _settled(client: JobSubmissionClient, job_id: str, address: Address, seconds: float) -> JobDetails:
    """The job's info once its status is terminal, or the last one seen after `seconds`."""
    deadline = time.monotonic() + seconds
    info = job_info(client, job_id, address)
    while not info.status.is_terminal() and time.monotonic() < deadline:
        time.sleep(1)
        info = job_info(client, job_id, address)
    return info


def follow(client: JobSubmissionClient, job_id: str, address: Address, out: IO[str] | None = None) -> int:
    """Print the job's logs (to `out`, else stdout) as they come until it ends; the exit code says how it
    ended (`job_exit_code`)."""
    import aiohttp

    lost = ""
    try:
        asyncio.run(_stream(client, job_id, out or sys.stdout))
    except KeyboardInterrupt:
        print(f"\nstopped following; job {job_id} keeps running on the cluster:\n{commands(job_id, address)}",
              file=sys.stderr)
        return EXIT_INTERRUPTED
    except (RuntimeError, OSError, aiohttp.ClientError, asyncio.TimeoutError) as err:  # the stream broke
        lost = server_reason(err)
    info = _settled(client, job_id, address, 0 if lost else SETTLE_SECONDS)
    if not info.status.is_terminal():
        print(f"error: lost the logs of job {job_id} ({lost or 'the stream ended early'}); it is "
              f"{info.status} on the cluster:\n{commands(job_id, address)}", file=sys.stderr)
        return EXIT_JOB_FAILED
    return report(info, job_id)


def report(info: JobDetails, job_id: str) -> int:
    """One line on how the job ended (stderr), and its exit code."""
    code = job_exit_code(info)
    took = f" in {(info.end_time - info.start_time) / 1000:.0f} s" if info.start_time and info.end_time else ""
    if code == 0:
        print(f"job {job_id} succeeded{took}", file=sys.stderr)
    elif code == EXIT_STOPPED:
        print(f"error: job {job_id} was stopped{took}; committed shards are kept, submit the same command "
              "again to finish the rest", file=sys.stderr)
    elif getattr(info.error_type, "value", info.error_type) == "JOB_ENTRYPOINT_COMMAND_ERROR" or info.driver_exit_code:
        print(f"error: job {job_id} failed{took}: the pipeline exited with code {code} (its logs say why)",
              file=sys.stderr)
    else:  # it never ran the pipeline: the message is all there is (runtime env set-up, scheduling...)
        print(info.message or "", file=sys.stderr)
        print(f"error: job {job_id} failed before the pipeline ran ({info.error_type or 'no reason given'})",
              file=sys.stderr)
    return code


def _when(milliseconds: int | None) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(milliseconds / 1000)) if milliseconds else "-"


def describe(info: JobDetails) -> dict[str, Any]:
    """The fields of a job a user asks about, JSON-ready."""
    return {"submission_id": info.submission_id, "status": str(info.status), "entrypoint": info.entrypoint,
            "output": (info.metadata or {}).get("output"), "config": (info.metadata or {}).get("config"),
            "start_time": _when(info.start_time), "end_time": _when(info.end_time),
            "driver_exit_code": info.driver_exit_code,
            "exit_code": job_exit_code(info) if info.status.is_terminal() else None,
            "message": info.message}


def format_job(fields: Mapping[str, Any]) -> str:
    message = (fields["message"] or "").strip().splitlines()
    rows = {"job": fields["submission_id"], "status": fields["status"], "entrypoint": fields["entrypoint"],
            "config": fields["config"], "output": fields["output"], "started": fields["start_time"],
            "ended": fields["end_time"], "exit code": fields["exit_code"], "message": message[0] if message else None}
    return "\n".join(f"{name:<11} {value}" for name, value in rows.items() if value is not None)


def cmd_status(args: argparse.Namespace) -> int:
    address = resolve_address(args.address)
    fields = describe(job_info(connect(address), args.job_id, address))
    print(json.dumps(fields, indent=1) if args.json else format_job(fields))
    return 0


def cmd_logs(args: argparse.Namespace) -> int:
    address = resolve_address(args.address)
    client = connect(address)
    if args.follow:
        job_info(client, args.job_id, address)  # an unknown id: one line, not a broken stream
        return follow(client, args.job_id, address)
    try:
        print(client.get_job_logs(args.job_id), end="")
    except RuntimeError as err:
        raise JobsError(f"no logs for job {args.job_id} on {address.url}: {server_reason(err)}") from None
    return 0


def cmd_stop(args: argparse.Namespace) -> int:
    address = resolve_address(args.address)
    client = connect(address)
    info = job_info(client, args.job_id, address)
    if info.status.is_terminal() or not client.stop_job(args.job_id):
        print(f"job {args.job_id} is not running ({info.status})")
        return 0
    print(f"stopping job {args.job_id}: committed shards are kept; submitting the same command again captions "
          "only what is missing")
    return 0


def cmd_list(args: argparse.Namespace) -> int:
    address = resolve_address(args.address)
    jobs = [describe(info) for info in connect(address).list_jobs() if info.submission_id]
    jobs.sort(key=lambda fields: fields["start_time"])
    if args.json:
        print(json.dumps(jobs, indent=1))
        return 0
    for fields in jobs:
        print(f"{fields['submission_id']:<40} {fields['status']:<10} {fields['start_time']:<23} "
              f"{fields['output'] or fields['entrypoint']}")
    return 0


def _guarded(command):  # (Namespace -> int) -> (Namespace -> int)
    """A user's mistake (address, id) is one `error:` line and exit 2."""

    def run(args: argparse.Namespace) -> int:
        try:
            return command(args)
        except JobsError as err:
            print(f"error: {err}", file=sys.stderr)
            return 2

    return run


def add_address(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--address", metavar="URL",
                        help=f"the cluster's job server (default: $RAY_ADDRESS, else {DEFAULT_ADDRESS})")


def add_commands(subparsers: argparse._SubParsersAction) -> None:
    jobs = subparsers.add_parser("jobs", help="status, logs, stop and list of Ray jobs on a cluster")
    actions = jobs.add_subparsers(dest="jobs_command", required=True)
    status = actions.add_parser("status", help="a job's status, config, output and exit code")
    status.add_argument("--json", action="store_true")
    logs = actions.add_parser("logs", help="a job's logs so far, or --follow them until it ends")
    logs.add_argument("--follow", action="store_true",
                      help="print new lines until the job ends; exit with its result, as `pipeline submit` does")
    stop = actions.add_parser("stop", help="stop a job (committed shards are kept)")
    for parser, command in ((status, cmd_status), (logs, cmd_logs), (stop, cmd_stop)):
        parser.add_argument("job_id", metavar="ID", help="the submission id `pipeline submit` printed")
        add_address(parser)
        parser.set_defaults(func=_guarded(command))
    listing = actions.add_parser("list", help="every job the cluster knows, oldest first")
    listing.add_argument("--json", action="store_true")
    add_address(listing)
    listing.set_defaults(func=_guarded(cmd_list))
