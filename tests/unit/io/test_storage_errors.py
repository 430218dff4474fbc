"""Transient storage errors are retried and never become data; permanent ones are error rows.

The S3 tests go through tests/faults.py: a real HTTP proxy in front of the moto server that fails chosen
requests (503 SlowDown, 500, dropped connections, bodies cut short) before forwarding the rest.
"""

from __future__ import annotations

import asyncio
import errno
import io
import tarfile
from collections.abc import Callable, Iterator
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.config import InputConfig
from pipeline.io import retry
from pipeline.io.fs import RetryingReader, TransientStorageError, is_transient, open_fs, retrying
from pipeline.io.sources import Record, plan_shards, read_shard
from tests.faults import Fault, FaultProxy


@pytest.fixture(autouse=True)
def fast_retries(monkeypatch: pytest.MonkeyPatch) -> list[float]:
    """Short delays; returns the delays slept."""
    slept: list[float] = []
    monkeypatch.setattr(retry.RETRY, "base_delay", 0.001)
    monkeypatch.setattr(retry.RETRY, "max_delay", 0.004)
    monkeypatch.setattr(retry.time, "sleep", slept.append)
    return slept


# ------------------------------------------------------------------------------------------ classification
def _client_error(code: str, status: int) -> Exception:
    from botocore.exceptions import ClientError

    return ClientError({"Error": {"Code": code, "Message": "m"}, "ResponseMetadata": {"HTTPStatusCode": status}},
                       "GetObject")


def _s3fs(code: str, status: int) -> BaseException:
    from s3fs.errors import translate_boto_error

    return translate_boto_error(_client_error(code, status))


def _transient_errors() -> list[BaseException]:
    import aiohttp
    from botocore.exceptions import ConnectionClosedError, EndpointConnectionError, ReadTimeoutError

    return [_s3fs("SlowDown", 503), _s3fs("503", 503), _s3fs("InternalError", 500), _s3fs("502", 502),
            _s3fs("504", 504), _s3fs("RequestTimeout", 400), _s3fs("Throttling", 400), _client_error("SlowDown", 503),
            ConnectionClosedError(endpoint_url="http://s3"), ReadTimeoutError(endpoint_url="http://s3"),
            EndpointConnectionError(endpoint_url="http://s3"), aiohttp.ClientPayloadError("cut"),
            aiohttp.ServerDisconnectedError(), TimeoutError(), asyncio.TimeoutError(), ConnectionResetError(),
            ConnectionRefusedError(), BrokenPipeError(), OSError(errno.ETIMEDOUT, "timed out"),
            TransientStorageError("x")]


def _permanent_errors() -> list[BaseException]:
    return [_s3fs("NoSuchKey", 404), _s3fs("AccessDenied", 403), _s3fs("InvalidRange", 416), FileNotFoundError(),
            PermissionError(), OSError(errno.EIO, "disk error"), ValueError("corrupt"), tarfile.ReadError("bad"),
            pa.ArrowInvalid("bad page"), KeyError("x")]


def test_transient_and_permanent_errors_are_told_apart() -> None:
    assert [err for err in _transient_errors() if not is_transient(err)] == []
    assert [err for err in _permanent_errors() if is_transient(err)] == []
    wrapped = RuntimeError("while reading")
    wrapped.__cause__ = _s3fs("SlowDown", 503)
    assert is_transient(wrapped)  # found down the __cause__ chain
    assert not issubclass(TransientStorageError, OSError)


def _flaky(failures: list[BaseException], result: str = "done") -> tuple[Callable[..., str], list[tuple]]:
    calls: list[tuple] = []

    def fn(*args: object) -> str:
        calls.append(args)
        if len(calls) <= len(failures):
            raise failures[len(calls) - 1]
        return result

    return fn, calls


def test_retrying_backs_off_then_succeeds(fast_retries: list[float]) -> None:
    fn, calls = _flaky([_s3fs("SlowDown", 503), ConnectionResetError(), TimeoutError()])
    assert retrying(fn, "bucket/key", base_delay=1.0, max_delay=3.0) == "done"
    assert len(calls) == 4
    assert len(fast_retries) == 3
    assert 0.5 <= fast_retries[0] <= 1 and 1 <= fast_retries[1] <= 2 and 1.5 <= fast_retries[2] <= 3  # jittered


def test_retrying_gives_up_with_a_transient_error_naming_the_path() -> None:
    last = _s3fs("SlowDown", 503)
    fn, calls = _flaky([ConnectionResetError()] * 5 + [last])
    with pytest.raises(TransientStorageError, match=r"bucket/key: storage still failing after 6 attempts") as caught:
        retrying(fn, "bucket/key")
    assert len(calls) == 6 and caught.value.__cause__ is last and "OSError" in str(caught.value)


def test_retrying_raises_permanent_errors_at_once() -> None:
    fn, calls = _flaky([FileNotFoundError("bucket/key")])
    with pytest.raises(FileNotFoundError):
        retrying(fn, "bucket/key")
    assert len(calls) == 1


class _FlakyFiles:
    """A file system whose files fail now and then mid-read, as a dropped connection would."""

    def __init__(self, data: bytes, fail_every: int) -> None:
        self.data, self.fail_every, self.reads, self.opened = data, fail_every, 0, 0

    def open(self, path: str, mode: str = "rb", **_: Any) -> Any:
        self.opened += 1
        files = self

        class Handle(io.BytesIO):
            def read(self, size: int | None = -1) -> bytes:
                files.reads += 1
                if files.reads % files.fail_every == 0:
                    raise ConnectionResetError("reset by peer")
                return super().read(size)

        return Handle(self.data)


def test_a_retrying_reader_reopens_where_it_was() -> None:
    data = bytes(range(256)) * 100
    files = _FlakyFiles(data, fail_every=3)
    with RetryingReader(files, "bucket/key") as reader:  # type: ignore[arg-type]
        chunks = iter(lambda: reader.read(1000), b"")
        assert b"".join(chunks) == data
    assert files.opened > 5


# ---------------------------------------------------------------------------------------------------- S3
@pytest.fixture
def proxy(s3_server: str) -> Iterator[FaultProxy]:
    with FaultProxy(s3_server) as running:
        yield running


def _options(proxy: FaultProxy, **extra: Any) -> dict[str, Any]:
    # botocore and s3fs retry on their own too: one attempt each keeps the tests fast and the faults visible
    # (botocore's `max_attempts` counts retries, `total_max_attempts` attempts).
    options = {"endpoint_url": proxy.url, "config_kwargs": {"retries": {"total_max_attempts": 1}}, **extra}
    fs, _ = open_fs("s3://any", options)  # the instance the pipeline will use (fsspec caches it)
    fs.retries = 1
    return options


def _read_all(config: InputConfig) -> list[Record]:
    return [record for shard in plan_shards(config) for record in read_shard(shard, config)[1]]


def _images(s3_fs: Any, bucket: str) -> None:
    for name in ("a.jpg", "b.jpg", "c.jpg"):
        s3_fs.pipe_file(f"{bucket}/in/{name}", name.encode() * 100)


def test_a_few_503s_on_an_image_are_retried(proxy: FaultProxy, s3_fs: Any, s3_bucket: str) -> None:
    _images(s3_fs, s3_bucket)
    proxy.add(Fault.slow_down(key=r"/in/b\.jpg$", times=3))
    config = InputConfig(uri=f"s3://{s3_bucket}/in", storage_options=_options(proxy))
    records = _read_all(config)
    assert [(r.key, r.data, r.error) for r in records] == [(name, name.encode() * 100, None)
                                                           for name in ("a.jpg", "b.jpg", "c.jpg")]
    assert proxy.injected == 3


def test_a_persistent_503_raises_out_of_the_records(proxy: FaultProxy, s3_fs: Any, s3_bucket: str) -> None:
    _images(s3_fs, s3_bucket)
    fault = Fault.slow_down(key=r"/in/b\.jpg$", times=None)
    proxy.add(fault)
    config = InputConfig(uri=f"s3://{s3_bucket}/in", storage_options=_options(proxy))
    [shard] = plan_shards(config)
    records = read_shard(shard, config)[1]
    assert next(records).key == "a.jpg"
    with pytest.raises(TransientStorageError, match=r"in/b\.jpg.*after 6 attempts"):
        next(records)
    assert fault.injected >= 6


def test_a_404_is_an_error_row(proxy: FaultProxy, s3_fs: Any, s3_bucket: str) -> None:
    _images(s3_fs, s3_bucket)
    proxy.add(Fault.status(404, "NoSuchKey", key=r"/in/b\.jpg$", method="GET", times=None),
              Fault.status(404, "404", key=r"/in/b\.jpg$", method="HEAD", times=None))
    config = InputConfig(uri=f"s3://{s3_bucket}/in", storage_options=_options(proxy))
    a, b, c = _read_all(config)
    assert a.data and c.data and b.data is None
    assert (b.error or "").startswith("unreadable object: FileNotFoundError")


def test_listing_pages_are_retried(proxy: FaultProxy, s3_fs: Any, s3_bucket: str,
                                   monkeypatch: pytest.MonkeyPatch) -> None:
    _images(s3_fs, s3_bucket)
    listing = Fault.internal_error(key=rf"^/{s3_bucket}/?$", method="GET", times=2)
    proxy.add(listing)
    config = InputConfig(uri=f"s3://{s3_bucket}/in", format="folder", storage_options=_options(proxy))
    assert [m for s in plan_shards(config) for m in s.members] == ["a.jpg", "b.jpg", "c.jpg"]
    assert listing.injected == 2

    proxy.add(Fault.drop(key=rf"^/{s3_bucket}/?$", method="GET", times=None))
    monkeypatch.setattr(retry.RETRY, "attempts", 3)
    with pytest.raises(TransientStorageError, match=rf"s3://{s3_bucket}/in: storage still failing after 3 attempts"):
        list(plan_shards(config))


def _tar(count: int, size: int) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.USTAR_FORMAT) as archive:
        for index in range(count):
            info = tarfile.TarInfo(f"s{index:02d}.jpg")
            info.size = size
            archive.addfile(info, io.BytesIO(bytes([index]) * size))
    return buffer.getvalue()


def test_a_tar_streamed_through_dropped_connections(proxy: FaultProxy, s3_fs: Any, s3_bucket: str,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    s3_fs.pipe_file(f"{s3_bucket}/tars/t.tar", _tar(12, 20_000))
    options = _options(proxy, default_block_size=32 * 1024)  # many range GETs for one tar
    config = InputConfig(uri=f"s3://{s3_bucket}/tars", storage_options=options)
    [shard] = plan_shards(config)
    cut = Fault.cut(key=r"/t\.tar$", after=2, times=3)
    proxy.add(cut)
    records = list(read_shard(shard, config)[1])
    assert [(r.key, r.data) for r in records] == [(f"t/s{i:02d}", bytes([i]) * 20_000) for i in range(12)]
    assert cut.injected == 3

    proxy.add(Fault.drop(key=r"/t\.tar$", method="GET", after=2, times=None))
    monkeypatch.setattr(retry.RETRY, "attempts", 3)
    reading = read_shard(shard, config)[1]
    first = next(reading)
    assert first.key == "t/s00" and first.data  # the samples before the failure came out
    with pytest.raises(TransientStorageError, match=r"t\.tar"):
        list(reading)  # a persistent failure mid-stream is not an error row for the rest


def test_parquet_row_groups_read_through_500s(proxy: FaultProxy, s3_fs: Any, s3_bucket: str) -> None:
    buffer = io.BytesIO()
    values = [bytes([index]) * 3000 for index in range(40)]
    pq.write_table(pa.table({"image": pa.array(values, pa.binary())}), buffer, row_group_size=10)
    s3_fs.pipe_file(f"{s3_bucket}/pq/p.parquet", buffer.getvalue())
    fault = Fault.internal_error(key=r"/p\.parquet$", method="GET", times=4)
    proxy.add(fault)
    config = InputConfig(uri=f"s3://{s3_bucket}/pq", shard_size=20,
                         storage_options=_options(proxy, default_block_size=16 * 1024))
    records = _read_all(config)
    assert [(r.key, r.data) for r in records] == [(f"p/{row:08d}", values[row]) for row in range(40)]
    assert fault.injected == 4


def test_nested_storage_options_keep_one_file_system(s3_server: str, s3_bucket: str) -> None:
    options = {"config_kwargs": {"retries": {"total_max_attempts": 2}}}
    fs, _ = open_fs(f"s3://{s3_bucket}", options)
    fs.ls(s3_bucket)  # botocore builds its client here, filling in the nested `retries` dict it was given
    again, _ = open_fs(f"s3://{s3_bucket}/x", options)
    assert again is fs  # not a fresh file system (and session, and defaults) for every later call
    assert options == {"config_kwargs": {"retries": {"total_max_attempts": 2}}}
