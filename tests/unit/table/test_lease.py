"""The single-writer lease, on a local folder and on a real (moto) S3 server."""

from __future__ import annotations

import dataclasses
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from pipeline.io.fs import open_fs, write_atomic
from pipeline.table import lease as lease_module
from pipeline.table.lease import LeaseHeldError, LeaseInfo, LeaseLostError, OutputLease, read_lease
from pipeline.table.names import lease_path
from tests.unit.waiting import FakeClock, wait_until

REPO = Path(__file__).resolve().parents[3]


@pytest.fixture(params=["local", "s3"])
def output(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "local":
        return str(tmp_path / "out")
    bucket = request.getfixturevalue("s3_bucket")
    return f"s3://{bucket}/runs/out"


def forge(output: str, now: float | None = None, **changes: object) -> LeaseInfo:
    """Write a lease record as another run would have, by default a fresh one from another host (`now` is the
    time it was renewed: wall time unless a test's clock says otherwise)."""
    now = time.time() if now is None else now
    info = LeaseInfo(holder="f" * 32, host="other-host", pid=4242, proc_start="linux:1", machine="other-machine",
                     user="someone", command="pipeline run other.yaml", acquired_at=now - 100, renewed_at=now,
                     expires_at=now + 2.0, ttl_s=2.0)
    info = dataclasses.replace(info, **changes)
    fs, root = open_fs(output)
    write_atomic(fs, lease_path(root), info.to_bytes())  # readers never see half a record
    return info


def wall_clock() -> FakeClock:
    """A fake wall clock that starts at the real time (records forged with the real time still make sense)."""
    return FakeClock(time.time())


def recorder(waits: list[float], then: Callable[[], object] = lambda: None) -> Callable[[LeaseInfo, float], None]:
    """An `on_wait` that records the seconds left at each poll, then runs `then` (time passing, a renewal...)."""
    def on_wait(info: LeaseInfo, left: float) -> None:
        waits.append(left)
        then()

    return on_wait


def never_wait(info: LeaseInfo, left: float) -> None:
    """An `on_wait` for a holder that must not be waited for (acquire calls it at every poll of a wait)."""
    raise AssertionError(f"acquire waited for {info.host} pid {info.pid} ({left:.1f} s left on its lease)")


def test_acquire_release(output: str) -> None:
    lease = OutputLease(output, ttl_s=5, command="test run")
    mine = lease.acquire(wait=False)
    stored = read_lease(output)
    assert stored == mine
    assert (stored.host, stored.pid, stored.command) == (socket.gethostname(), os.getpid(), "test run")
    assert stored.proc_start and stored.expires_at == pytest.approx(stored.renewed_at + 5)
    assert stored.state() == "held" and stored.is_live()
    lease.release()
    assert read_lease(output) is None
    lease.release()  # twice is harmless


def test_second_acquire_refused_naming_the_holder(output: str) -> None:
    clock = wall_clock()
    first = OutputLease(output, ttl_s=30, clock=clock)
    first.acquire()
    second = OutputLease(output, ttl_s=30, clock=clock)
    for wait in (False, True):  # a live holder is never waited for
        with pytest.raises(LeaseHeldError) as refused:
            second.acquire(wait=wait, on_wait=never_wait)
        message = str(refused.value)
        assert f"host {socket.gethostname()}, pid {os.getpid()}" in message
        assert "last heartbeat 0 s ago" in message and "One writer per output" in message
        assert refused.value.info.holder == first.holder
    first.release()
    assert second.acquire(wait=False).holder == second.holder
    second.release()


def test_context_manager_heartbeats_and_releases(output: str) -> None:
    clock = wall_clock()
    with OutputLease(output, ttl_s=0.9, clock=clock) as lease:
        clock.advance(2.0)  # well past the ttl
        stored = wait_until(lambda: (info := read_lease(output)).renewed_at >= info.acquired_at + 2.0 and info,
                            what="a heartbeat after the ttl has passed")
        assert stored.holder == lease.holder and stored.state(clock()) == "held"
        assert stored.renewed_at > stored.acquired_at + 1.0
        with pytest.raises(LeaseHeldError):
            OutputLease(output, clock=clock).acquire(wait=False)
        lease.check()
    assert read_lease(output) is None


def test_killed_run_on_this_host_is_taken_over_at_once(output: str) -> None:
    script = ("import sys, time; from pipeline.table.lease import OutputLease; "
              "OutputLease(sys.argv[1], ttl_s=60).acquire(wait=False); print('held', flush=True); time.sleep(60)")
    child = subprocess.Popen([sys.executable, "-c", script, output], cwd=REPO, stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline().strip() == "held"
        with pytest.raises(LeaseHeldError, match=f"pid {child.pid}"):
            OutputLease(output).acquire(wait=False)
        os.kill(child.pid, signal.SIGKILL)
        child.wait()
        assert read_lease(output).state() == "gone"
        OutputLease(output).acquire(wait=True, on_wait=never_wait)  # at once, though its lease had 60 s left
    finally:
        child.kill()
        child.wait()


def test_killed_but_unreaped_process_counts_as_gone(output: str) -> None:
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        mine = OutputLease(output)._record(time.time())
        alive, start = lease_module._process(child.pid)
        assert alive and start
        forge(output, host=mine.host, machine=mine.machine, pid=child.pid, proc_start=start,
              expires_at=time.time() + 60)
        assert read_lease(output).state() == "held"
        os.kill(child.pid, signal.SIGKILL)  # a zombie until reaped (in `finally`)
        wait_until(lambda: read_lease(output).state() == "gone", what="the killed, unreaped holder to count as gone")
    finally:
        child.kill()
        child.wait()


def test_reused_pid_is_not_the_holder(output: str) -> None:
    mine = OutputLease(output)._record(time.time())
    forge(output, host=mine.host, machine=mine.machine, pid=os.getpid(), proc_start="linux:1",
          expires_at=time.time() + 60)
    assert read_lease(output).state() == "gone"  # our pid, but not our start time
    forge(output, host=mine.host, machine=mine.machine, pid=os.getpid(), proc_start=mine.proc_start,
          expires_at=time.time() + 60)
    assert read_lease(output).state() == "held"


def test_same_hostname_on_another_machine_is_remote(output: str) -> None:
    exited = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    forge(output, host=socket.gethostname(), machine="another-boot", pid=int(exited.stdout),
          expires_at=time.time() + 60)
    assert read_lease(output).state() == "held"  # its pid means nothing here: only expiry can free it


def test_remote_holder_that_stopped_renewing_is_waited_for(output: str) -> None:
    clock = wall_clock()
    now = clock()
    stale = forge(output, now, renewed_at=now - 1.4, expires_at=now + 0.6)  # ttl 2 s: last heartbeat > 2/3 ttl ago
    clock.advance(0.05)  # a moment later
    assert read_lease(output).state(clock()) == "stale" and read_lease(output).is_live(clock())
    lease = OutputLease(output, clock=clock)
    with pytest.raises(LeaseHeldError, match=r"other-host.*may be dead") as refused:
        lease.acquire(wait=False)
    expiry = lease_module._when(refused.value.info.expires_at)
    assert f"wait until {expiry} or delete {lease.uri}" in str(refused.value)
    waits: list[tuple[str, float]] = []

    def waiting(info: LeaseInfo, left: float) -> None:
        waits.append((info.host, left))
        assert len(waits) <= 20, "still waiting, long after the lease expired"
        clock.advance(0.1)  # the poll's sleep

    mine = lease.acquire(wait=True, on_wait=waiting)
    assert mine.acquired_at >= stale.expires_at  # taken over once the holder's lease had expired, not before
    assert mine.holder == lease.holder == read_lease(output).holder
    assert waits and {host for host, _ in waits} == {"other-host"}
    assert 0 < waits[0][1] <= 0.6 and waits[-1][1] < waits[0][1]
    lease.release()


def test_remote_holder_that_renews_while_we_wait_is_refused(output: str) -> None:
    clock = wall_clock()
    now = clock()
    stale = forge(output, now, renewed_at=now - 1.4, expires_at=now + 0.6)
    waits: list[float] = []

    def meanwhile() -> None:
        assert len(waits) <= 20, "still waiting, long after the holder renewed"
        clock.advance(0.1)  # the poll's sleep
        if len(waits) == 3:  # the holder was alive after all: it renews (expiry 2 s ahead) while we wait
            forge(output, clock(), acquired_at=stale.acquired_at)

    with pytest.raises(LeaseHeldError, match="other-host"):
        OutputLease(output, clock=clock).acquire(wait=True, on_wait=recorder(waits, meanwhile))
    assert len(waits) == 3 and read_lease(output).holder == stale.holder


def test_expired_remote_lease_is_taken_over(output: str) -> None:
    forge(output, renewed_at=time.time() - 5, expires_at=time.time() - 3)
    assert read_lease(output).state() == "expired" and not read_lease(output).is_live()
    lease = OutputLease(output)
    assert lease.acquire(wait=False).holder == read_lease(output).holder == lease.holder
    lease.release()


def race(output: str, contenders: int) -> list[OutputLease]:
    leases = [OutputLease(output, ttl_s=30) for _ in range(contenders)]
    barrier, errors, winners = threading.Barrier(contenders), [], []

    def contend(lease: OutputLease) -> None:
        barrier.wait()
        try:
            lease.acquire(wait=False)
            winners.append(lease)
        except LeaseHeldError:
            pass
        except Exception as error:  # anything else fails the test
            errors.append(error)

    threads = [threading.Thread(target=contend, args=(lease,)) for lease in leases]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors
    return winners


@pytest.mark.parametrize("stale", [False, True], ids=["free", "expired"])
def test_contenders_race_exactly_one_wins(output: str, stale: bool) -> None:
    for _ in range(15 if output.startswith("s3") else 60):
        if stale:
            forge(output, renewed_at=time.time() - 5, expires_at=time.time() - 3)
        winners = race(output, contenders=4)
        assert len(winners) == 1
        assert read_lease(output).holder == winners[0].holder
        winners[0].release()
        assert read_lease(output) is None


def test_heartbeat_detects_a_takeover(output: str) -> None:
    reasons: list[str] = []
    first = OutputLease(output, ttl_s=0.6, on_lost=lambda reason: (reasons.append(reason), first.release()))
    first.acquire()
    first.start_heartbeat()
    # Forced through the protocol, as a run that judged it dead would: compare-and-swap until it lands.
    backend = lease_module._backend(output, None)
    new = dataclasses.replace(read_lease(output), holder="f" * 32, command="the new run", pid=1)
    while backend.replace_if(backend.read()[1], new.to_bytes()) is None:
        pass
    wait_until(lambda: reasons, what="the heartbeat to notice the takeover")  # `lost` is set just before on_lost
    assert first.lost and len(reasons) == 1 and "taken over" in reasons[0] and "the new run" in reasons[0]
    with pytest.raises(LeaseLostError):
        first.check()
    with pytest.raises(LeaseLostError):
        first.renew()
    first.release()  # (already released by on_lost) must not delete the new holder's lease
    assert read_lease(output).holder == "f" * 32


def test_release_never_deletes_another_holders_lease(output: str) -> None:
    first = OutputLease(output)
    first.acquire()  # no heartbeat: it does not notice the takeover
    forge(output, renewed_at=time.time(), expires_at=time.time() + 30)
    first.release()
    assert read_lease(output).holder == "f" * 32


def test_transient_renewal_errors_are_retried_until_expiry(output: str, monkeypatch: pytest.MonkeyPatch) -> None:
    clock = wall_clock()
    lease = OutputLease(output, ttl_s=0.9, clock=clock)
    acquired = lease.acquire().acquired_at
    failures = {"left": 2}
    replace_if = lease._backend.replace_if

    def flaky(version: object, data: bytes) -> object:
        if failures["left"] > 0:
            failures["left"] -= 1
            raise ConnectionError("network down")
        return replace_if(version, data)

    monkeypatch.setattr(lease._backend, "replace_if", flaky)
    lease.start_heartbeat()
    clock.advance(0.5)  # short of expiry (0.9 s)
    wait_until(lambda: failures["left"] == 0 and read_lease(output).renewed_at > acquired,
               what="a renewal after two failed tries")
    assert not lease.lost and read_lease(output).state(clock()) == "held"
    failures["left"] = never = 10**6  # now it never comes back: lost once the lease has expired
    wait_until(lambda: failures["left"] <= never - 3, what="three more failed renewals")
    assert not lease.lost  # retried: the lease is still good until it expires
    clock.advance(1.0)  # past expiry
    wait_until(lambda: lease.lost, what="the lease to count as lost at expiry")
    assert "before it expired" in lease.lost_reason and read_lease(output).expires_at <= clock()
    lease.release()


def test_conditional_writes_are_enforced(output: str) -> None:
    """The store itself refuses stale writes (moto enforces If-None-Match and If-Match on S3)."""
    backend = lease_module._backend(output, None)
    first = backend.create_exclusive(b'{"a": 1}')
    assert first is not None and backend.create_exclusive(b'{"a": 2}') is None
    second = backend.replace_if(first, b'{"a": 3}')
    assert second is not None and backend.replace_if(first, b'{"a": 4}') is None
    assert backend.delete_if(first) is False and backend.read()[0] == b'{"a": 3}'
    assert backend.delete_if(second) is True and backend.read() is None
    assert backend.replace_if(second, b'{"a": 5}') is None and backend.read() is None


def test_the_fence_refuses_once_the_last_renewal_is_too_old(output: str) -> None:
    """The fence (DESIGN invariant 12) goes by the local clock: valid while now + margin < renewal start + ttl."""
    monotonic = FakeClock(100.0)
    lease = OutputLease(output, ttl_s=30, monotonic=monotonic)
    with pytest.raises(LeaseLostError, match="not held"):
        lease.check()  # nothing to prove before it is acquired
    lease.acquire()
    assert lease.margin_s == 10 and lease.valid_for() == 20
    lease.check()
    monotonic.advance(19.9)  # a renewal late by a whole heartbeat and more: still provably ours
    lease.check()
    monotonic.advance(0.2)  # within the margin of its expiry: a write must not go through
    with pytest.raises(LeaseLostError, match=r"could not renew its lease .* in time \(last renewed 20 s ago"):
        lease.check()
    assert not lease.lost  # not known to be lost: a renewal that succeeds lets writes through again
    lease.renew()
    lease.check()
    lease.release()
    with pytest.raises(LeaseLostError):
        lease.check()


def test_a_stored_fence_checks_the_holder_and_expiry_in_the_record(output: str) -> None:
    """The fence a Ray-task commit carries: it reads the record, so it needs nothing of the driver's process."""
    import pickle

    lease = OutputLease(output, ttl_s=30)
    lease.acquire()
    fence = pickle.loads(pickle.dumps(lease.fence()))  # it travels to another process
    fence.check()
    forge(output, holder=lease.holder, renewed_at=time.time() - 25, expires_at=time.time() + 5)
    with pytest.raises(LeaseLostError, match="not renewed in time"):
        fence.check()  # 5 s left, under the 10 s margin
    forge(output, expires_at=time.time() + 30)  # another run's
    with pytest.raises(LeaseLostError, match="was taken over by host other-host"):
        fence.check()
    fs, root = open_fs(output)
    fs.rm_file(lease_path(root))
    with pytest.raises(LeaseLostError, match="is gone"):
        fence.check()
