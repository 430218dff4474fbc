"""A real multi-node Ray cluster on this machine, started the way users start one: `ray start` on loopback.

    with RayCluster() as cluster:              # the head node: GCS, dashboard (the job server), 1 CPU
        spot = cluster.add_worker(num_cpus=2, resources={"spot": 1})
        cluster.wait_for_job_agent()
        subprocess.run([...pipeline submit..., "--address", cluster.address], env=cluster.env)
        cluster.kill_node(spot)                # SIGKILL every process of that node, as a spot preemption does
        cluster.wait_for_node(spot, "DEAD")
        cluster.add_worker(num_cpus=2, resources={"spot": 1})

Token authentication is on by default, as users meet it with Ray 2.60 (the notes in pipeline/cli/jobs.py):
the head is a plain `ray start --head` on a machine that has a token in ~/.ray/auth_token (any local
`ray.init()` writes one; if there is none, the harness runs `ray get-auth-token --generate`, as a user
would); worker nodes are started with RAY_AUTH_MODE=token, which users must set there too, since a
worker's `ray start` never turns token auth on by itself. A client (`env`) gets no RAY_AUTH_* variable:
`pipeline` finds the token file itself. `RayCluster(auth="disabled")` starts every node, and clients,
with RAY_AUTH_MODE=disabled.

Every node is found by its own processes, never by name: each `ray start` runs with MARKER=<cluster>/<node>
in its environment, which every daemon it starts inherits (GCS, raylet, dashboard, log monitor...), and
a node's processes are those daemons and all their descendants (workers, agents, job drivers: Ray's
workers retitle themselves and that overwrites their /proc environ, so they are found as children).
`stop()` kills exactly those, for the whole cluster, instead of `ray stop --force`: that one kills every
Ray process on the machine, whatever its RAY_TMPDIR, including other people's clusters.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil

RAY = str(Path(sys.executable).with_name("ray"))
MARKER = "PIPELINE_TEST_RAY_NODE"
AUTH_VARIABLES = ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH")
# What a node's `ray start` must not inherit from the developer's shell: it would change the cluster asked for.
NOT_INHERITED = (*AUTH_VARIABLES, "RAY_ADDRESS", MARKER)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def default_token_file() -> Path:
    return Path.home() / ".ray" / "auth_token"


@dataclass(frozen=True)
class Node:
    """One `ray start` of the cluster."""

    name: str  # "head", "worker-1", ...
    marker: str  # the value of MARKER in its daemons' environment
    node_id: str  # Ray's node id (hex), from its raylet's command line
    raylet_pid: int
    head: bool = False


@dataclass
class RayCluster:
    """A head node at once (`start()`, or `with RayCluster() as cluster`), worker nodes with `add_worker`."""

    head_cpus: float = 1
    auth: str = "token"  # "token" (as users meet it) or "disabled"
    start_timeout: float = 300  # one `ray start`; minutes on a busy 2-core machine
    temp: str = ""
    gcs_port: int = 0
    dashboard_port: int = 0
    nodes: list[Node] = field(default_factory=list)
    killed: list[Node] = field(default_factory=list)
    token: str | None = None  # the token the cluster checks (auth "token")

    def __post_init__(self) -> None:
        if self.auth not in ("token", "disabled"):
            raise ValueError(f"auth must be 'token' or 'disabled', not {self.auth!r}")

    # -- what a client needs -------------------------------------------------------------------------------

    @property
    def address(self) -> str:
        """The job server (the head's dashboard): what `pipeline submit --address` takes."""
        return f"http://127.0.0.1:{self.dashboard_port}"

    @property
    def gcs_address(self) -> str:
        """What `ray start --address` and `ray.init(address=...)` take."""
        return f"127.0.0.1:{self.gcs_port}"

    @property
    def id(self) -> str:
        return Path(self.temp).name

    @property
    def env(self) -> dict[str, str]:
        """The environment of a client process (`pipeline submit`, `pipeline jobs`): the test's own, without
        any RAY_AUTH_* or RAY_ADDRESS variable (the token is found in ~/.ray/auth_token, as on a user's head
        node), with this Python's bin folder first on PATH."""
        env = {name: value for name, value in os.environ.items() if name not in NOT_INHERITED}
        env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
        if self.auth == "disabled":
            env["RAY_AUTH_MODE"] = "disabled"
        return env

    @property
    def ray_cli_env(self) -> dict[str, str]:
        """`env` for Ray's own CLI (`ray job submit`, `ray list`): with an explicit address it sends the token
        only with RAY_AUTH_MODE=token, which a user sets as well."""
        return {**self.env, **({"RAY_AUTH_MODE": "token"} if self.auth == "token" else {})}

    def _node_env(self, name: str, head: bool) -> dict[str, str]:
        env = {**self.env, "RAY_TMPDIR": self.temp, MARKER: f"{self.id}/{name}"}
        if self.auth == "token" and not head:
            env["RAY_AUTH_MODE"] = "token"  # a worker's `ray start` needs it; the head turns it on by itself
        return env

    # -- starting --------------------------------------------------------------------------------------------

    def __enter__(self) -> RayCluster:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self) -> RayCluster:
        """The head node: GCS, the dashboard with the job server, `head_cpus` CPUs, no GPU."""
        if self.temp:
            raise RuntimeError("this cluster was started already")
        # A short temp dir: Ray's Unix sockets live there and socket paths are limited to ~107 bytes.
        self.temp = tempfile.mkdtemp(prefix="ray-", dir="/tmp")
        try:
            if self.auth == "token":
                self.token = self._ensure_token()
            self.gcs_port, self.dashboard_port = free_port(), free_port()
            self._start_node("head", True, [
                "--head", f"--port={self.gcs_port}", f"--num-cpus={self.head_cpus}", "--include-dashboard=true",
                "--dashboard-host=127.0.0.1", f"--dashboard-port={self.dashboard_port}",
                f"--ray-client-server-port={free_port()}"])  # not 10001: another cluster may hold it
            self._check_auth()
        except BaseException:
            self.stop()
            raise
        return self

    def add_worker(self, num_cpus: float = 1, resources: Mapping[str, float] | None = None) -> Node:
        """A worker node joined to the head, with `num_cpus` CPUs, no GPU, and custom `resources`."""
        if not self.nodes:
            raise RuntimeError("start the head first")
        name = f"worker-{len(self.nodes) + len(self.killed)}"
        extra = [f"--resources={json.dumps(dict(resources))}"] if resources else []
        return self._start_node(name, False, [f"--address={self.gcs_address}", f"--num-cpus={num_cpus}", *extra])

    def _ensure_token(self) -> str:
        """The token `ray start --head` will find: ~/.ray/auth_token, generated as a user would if missing."""
        path = default_token_file()
        if not path.is_file() or not path.read_text().strip():
            subprocess.run([RAY, "get-auth-token", "--generate"], env=self.env, check=True, capture_output=True,
                           timeout=120)
        return path.read_text().strip()

    def _start_node(self, name: str, head: bool, args: list[str]) -> Node:
        # Each node's dashboard agent gets a port of its own: on the default (52365) the second agent to start
        # (under load, often the head's) cannot bind, stays up without its HTTP server, and the job server then
        # answers "No available agent" forever. Any other local Ray holding 52365 would do the same. Workers
        # take random ports, not the shared default range 10002-19999.
        common = ["--disable-usage-stats", "--num-gpus=0", "--node-ip-address=127.0.0.1",
                  f"--dashboard-agent-listen-port={free_port()}", "--min-worker-port=0", "--max-worker-port=0"]
        started = subprocess.run([RAY, "start", *args, *common], env=self._node_env(name, head), capture_output=True,
                                 text=True, timeout=self.start_timeout)
        if started.returncode != 0:
            raise RuntimeError(f"`ray start` of {name} failed ({started.returncode}): {started.stderr[-3000:]}")
        marker = f"{self.id}/{name}"
        raylets = [process for process in self._roots(lambda found: found == marker)
                   if process.info["name"] == "raylet"]
        if len(raylets) != 1:
            raise RuntimeError(f"`ray start` of {name} left {len(raylets)} raylets: {started.stderr[-3000:]}")
        [node_id] = [arg.split("=", 1)[1] for arg in raylets[0].info["cmdline"] if arg.startswith("--node_id=")]
        node = Node(name, marker, node_id, raylets[0].pid, head)
        self.nodes.append(node)
        return node

    def _check_auth(self, timeout: float = 120) -> None:
        """The head asks for a token exactly when `auth` says so (a token-less request gets 401)."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                urllib.request.urlopen(f"{self.address}/api/version", timeout=10).close()
                status = 200
            except urllib.error.HTTPError as err:
                status = err.code
            except OSError:
                status = 0  # the dashboard is not listening yet
            if status:
                break
            if time.monotonic() > deadline:
                raise RuntimeError(f"the job server at {self.address} never answered")
            time.sleep(1)
        wanted = 401 if self.auth == "token" else 200
        if status != wanted:
            raise RuntimeError(f"the head was asked for auth={self.auth} but answers a token-less request with "
                               f"{status} (token file: {default_token_file()})")

    # -- looking ------------------------------------------------------------------------------------------------

    def _request(self, path: str) -> Any:
        request = urllib.request.Request(f"{self.address}{path}")
        if self.token:
            request.add_header("Authorization", f"Bearer {self.token}")
        with urllib.request.urlopen(request, timeout=30) as answer:
            return json.load(answer)

    def list_nodes(self) -> list[dict[str, Any]]:
        """Every node the GCS knows, dead ones included (Ray's state API: `ray list nodes`)."""
        return self._request("/api/v0/nodes?limit=10000&detail=false")["data"]["result"]["result"]

    def node_state(self, node: Node) -> str | None:
        """"ALIVE", "DEAD", or None while the GCS does not know the node."""
        states = [entry["state"] for entry in self.list_nodes() if entry["node_id"] == node.node_id]
        return states[0] if states else None

    def wait_for_node(self, node: Node, state: str, timeout: float = 180) -> None:
        """Until the GCS says `state` of `node`; a SIGKILLed node is DEAD once its health checks fail."""
        deadline = time.monotonic() + timeout
        seen = None
        while time.monotonic() < deadline:
            try:
                seen = self.node_state(node)
            except OSError as err:  # the job server is busy: ask again
                seen = f"unknown ({err})"
            if seen == state:
                return
            time.sleep(1)
        raise AssertionError(f"{node.name} ({node.node_id}) is {seen}, not {state}, after {timeout:.0f} s")

    def wait_for_job_agent(self, timeout: float = 300) -> None:
        """The job server answers before its agent registers ("No available agent"): wait for a trivial job.

        The agent took over 120 s on a busy 2-core machine once, hence the long limit."""
        deadline = time.monotonic() + timeout
        while True:
            probe = subprocess.run([RAY, "job", "submit", "--address", self.address, "--", "true"],
                                   env=self.ray_cli_env, capture_output=True, text=True, timeout=120)
            if probe.returncode == 0:
                return
            if time.monotonic() > deadline:
                raise AssertionError(f"the job server never accepted a job: {probe.stderr[-2000:]}")
            time.sleep(2)

    def processes(self, node: Node | None = None) -> list[psutil.Process]:
        """The live processes of `node`, or of the whole cluster: its daemons and all their descendants."""
        return list(self._tree(self._matcher(node), {}).values())

    def _matcher(self, node: Node | None) -> Callable[[str], bool]:
        if node is not None:
            return lambda found: found == node.marker
        return lambda found: found.startswith(f"{self.id}/")

    @staticmethod
    def _roots(match: Callable[[str], bool]) -> list[psutil.Process]:
        """Processes whose (unretitled) environment carries a matching MARKER."""
        roots = []
        for process in psutil.process_iter(["name", "cmdline"]):
            try:
                found = process.environ().get(MARKER)
            except (psutil.Error, OSError):
                continue
            if found is not None and match(found) and process.pid != os.getpid():
                roots.append(process)
        return roots

    def _tree(self, match: Callable[[str], bool], known: dict[int, psutil.Process]) -> dict[int, psutil.Process]:
        found = {process.pid: process for process in self._roots(match)}
        found.update(known)
        for process in list(found.values()):
            with contextlib.suppress(psutil.Error):
                found.update((child.pid, child) for child in process.children(recursive=True))
        return {pid: process for pid, process in found.items() if _alive(process)}

    # -- killing ------------------------------------------------------------------------------------------------

    def kill_node(self, node: Node) -> list[int]:
        """SIGKILL every process of `node` at once, as a spot preemption ends a machine: the raylet, its workers
        and agents, and for the head the GCS and the job server too. Returns the pids killed."""
        killed = self._kill(self._matcher(node))
        if node in self.nodes:
            self.nodes.remove(node)
            self.killed.append(node)
        return killed

    def _kill(self, match: Callable[[str], bool]) -> list[int]:
        # Freeze first (SIGSTOP), so that no raylet starts a worker, or loses one to reparenting, between the
        # listing and the kill; list again until the frozen set stops growing; then SIGKILL them all.
        frozen: dict[int, psutil.Process] = {}
        for _ in range(20):
            fresh = {pid: process for pid, process in self._tree(match, frozen).items() if pid not in frozen}
            if not fresh:
                break
            for process in fresh.values():
                _signal(process, signal.SIGSTOP)
            frozen.update(fresh)
        for process in frozen.values():
            _signal(process, signal.SIGKILL)
        _, alive = psutil.wait_procs(list(frozen.values()), timeout=30)
        if alive:
            raise RuntimeError(f"still alive after SIGKILL: {[process.pid for process in alive]}")
        return sorted(frozen)

    def stop(self) -> None:
        """Kill every process of the cluster (its own, found by MARKER; never another cluster's) and remove its
        temp dir. Raises if any process of it is left."""
        if not self.temp:
            return
        try:
            self._kill(self._matcher(None))
            leftovers = [process for process in self.processes() + self._by_temp_dir() if _alive(process)]
            for process in leftovers:
                _signal(process, signal.SIGKILL)
            psutil.wait_procs(leftovers, timeout=30)
            left = [process.pid for process in self.processes() + self._by_temp_dir() if _alive(process)]
        finally:
            self.killed.extend(self.nodes)
            self.nodes.clear()
            shutil.rmtree(self.temp, ignore_errors=True)
        if left:
            raise RuntimeError(f"processes of the cluster in {self.temp} are left: {left}")

    def _by_temp_dir(self) -> list[psutil.Process]:
        """Any process whose command line names this cluster's temp dir (a last sweep after the kill)."""
        found = []
        for process in psutil.process_iter(["cmdline"]):
            if process.pid != os.getpid() and any(self.temp in arg for arg in process.info["cmdline"] or []):
                found.append(process)
        return found


def _alive(process: psutil.Process) -> bool:
    try:
        return process.is_running() and process.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def _signal(process: psutil.Process, signum: int) -> None:
    with contextlib.suppress(psutil.Error):
        process.send_signal(signum)
