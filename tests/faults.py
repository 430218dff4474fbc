"""Real network faults for tests: a small HTTP reverse proxy that fails chosen requests first.

`FaultProxy(upstream)` listens on 127.0.0.1 and forwards every request (method, path, headers, body) to
`upstream` (the moto S3 server), streaming the response back as it comes (status, headers, body; Range
GETs and chunked bodies included). Before forwarding, it checks its rules in order: the first `Fault`
whose method and key pattern match, and that has not used up its `times`, answers instead:

- `Fault.slow_down(...)`: 503 with S3's `<Error><Code>SlowDown</Code>...` body;
- `Fault.internal_error(...)`: 500 `InternalError`;
- `Fault.status(code, s3_code)`: any status, with an S3 error body;
- `Fault.drop(...)`: the connection is closed before any response;
- `Fault.cut(...)`: the upstream response starts (status, headers, half the body) and the connection
  is then closed mid-body.

Use it as a context manager; `url` is its endpoint, `injected` counts the faults it has answered with
(each `Fault` counts its own too) and `requests` logs `(method, path)` of every request seen.

    with FaultProxy(s3_server, [Fault.slow_down(key=r"/images/a\\.jpg$", times=3)]) as proxy:
        fs = s3fs.S3FileSystem(endpoint_url=proxy.url, ...)
"""

from __future__ import annotations

import contextlib
import http.client
import re
import socket
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import unquote, urlsplit

HOP_BY_HOP = frozenset({"connection", "keep-alive", "proxy-connection", "transfer-encoding", "te", "trailer",
                        "upgrade", "expect"})


@dataclass
class Fault:
    """Fail up to `times` requests (None: all) whose path (URL-decoded, e.g. `/bucket/key`) matches `key`,
    after letting the first `after` matching requests through."""

    action: str  # "status" | "drop" | "cut"
    key: str = ".*"
    method: str | None = None  # "GET", "HEAD", ...; None: any
    times: int | None = 1
    status_code: int = 503
    s3_code: str = "SlowDown"
    message: str = "Please reduce your request rate."
    after: int = 0
    injected: int = 0
    passed: int = 0  # matching requests let through because of `after`

    @classmethod
    def slow_down(cls, key: str = ".*", method: str | None = None, times: int | None = 1, after: int = 0) -> Fault:
        return cls("status", key, method, times, after=after)

    @classmethod
    def internal_error(cls, key: str = ".*", method: str | None = None, times: int | None = 1,
                       after: int = 0) -> Fault:
        return cls("status", key, method, times, 500, "InternalError",
                   "We encountered an internal error. Please try again.", after=after)

    @classmethod
    def status(cls, code: int, s3_code: str, key: str = ".*", method: str | None = None,
               times: int | None = 1, message: str = "injected fault", after: int = 0) -> Fault:
        return cls("status", key, method, times, code, s3_code, message, after=after)

    @classmethod
    def drop(cls, key: str = ".*", method: str | None = None, times: int | None = 1, after: int = 0) -> Fault:
        return cls("drop", key, method, times, after=after)

    @classmethod
    def cut(cls, key: str = ".*", method: str | None = "GET", times: int | None = 1, after: int = 0) -> Fault:
        return cls("cut", key, method, times, after=after)

    def matches(self, method: str, path: str) -> bool:
        return ((self.method is None or self.method == method) and (self.times is None or self.injected < self.times)
                and re.search(self.key, path) is not None)

    def fires(self) -> bool:
        """Count one matching request; True when it is to be failed."""
        if self.passed < self.after:
            self.passed += 1
            return False
        self.injected += 1
        return True


def error_body(code: str, message: str, resource: str) -> bytes:
    return (f'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>{code}</Code><Message>{message}</Message>'
            f"<Resource>{resource}</Resource><RequestId>injected-fault</RequestId></Error>").encode()


@dataclass
class FaultProxy:
    upstream: str  # http://host:port
    faults: list[Fault] = field(default_factory=list)
    requests: list[tuple[str, str]] = field(default_factory=list)
    injected: int = 0

    def __post_init__(self) -> None:
        self._lock = threading.Lock()
        target = urlsplit(self.upstream)
        self._target = (target.hostname or "127.0.0.1", target.port or 80)
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(self))
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, name="fault-proxy", daemon=True)

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def add(self, *faults: Fault) -> FaultProxy:
        with self._lock:
            self.faults.extend(faults)
        return self

    def take(self, method: str, path: str) -> Fault | None:
        """The fault to answer this request with (counted), if any; logs the request."""
        with self._lock:
            self.requests.append((method, path))
            for fault in self.faults:
                if fault.matches(method, path) and fault.fires():
                    self.injected += 1
                    return fault
        return None

    def __enter__(self) -> FaultProxy:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)


def _handler(proxy: FaultProxy) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"  # keep-alive, as S3 clients expect

        def log_message(self, format: str, *args: object) -> None:
            pass

        def _body(self) -> bytes | None:
            if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
                parts = []
                while size := int(self.rfile.readline().split(b";")[0].strip() or b"0", 16):
                    parts.append(self.rfile.read(size))
                    self.rfile.readline()
                while self.rfile.readline().strip():  # trailers, up to the blank line
                    pass
                return b"".join(parts)
            length = int(self.headers.get("Content-Length") or 0)
            return self.rfile.read(length) if length else None

        def _forward(self) -> None:
            body = self._body()
            path = unquote(urlsplit(self.path).path)
            fault = proxy.take(self.command, path)
            if fault is not None and fault.action == "drop":
                self._drop()
                return
            if fault is not None and fault.action == "status":
                self._fail(fault, path)
                return
            self._relay(body, cut=fault is not None)

        def _drop(self) -> None:
            self.close_connection = True
            with contextlib.suppress(OSError):  # the client may have gone already
                self.connection.shutdown(socket.SHUT_RDWR)

        def _fail(self, fault: Fault, path: str) -> None:
            payload = error_body(fault.s3_code, fault.message, path)
            self.send_response_only(fault.status_code)
            self.send_header("Content-Type", "application/xml")
            self.send_header("Content-Length", str(0 if self.command == "HEAD" else len(payload)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(payload)

        def _relay(self, body: bytes | None, cut: bool) -> None:
            upstream = http.client.HTTPConnection(*proxy._target, timeout=60)
            try:
                headers = {name: value for name, value in self.headers.items() if name.lower() not in HOP_BY_HOP}
                if body is not None:
                    headers["Content-Length"] = str(len(body))
                upstream.request(self.command, self.path, body=body, headers=headers)
                response = upstream.getresponse()
                self.send_response_only(response.status, response.reason)
                length = response.getheader("Content-Length")
                for name, value in response.getheaders():
                    if name.lower() not in HOP_BY_HOP:
                        self.send_header(name, value)
                chunked = length is None and self.command != "HEAD" and response.status not in (204, 304)
                if chunked:
                    self.send_header("Transfer-Encoding", "chunked")
                self.end_headers()
                self._stream(response, chunked, int(length) // 2 if cut and length else None)
            finally:
                upstream.close()

        def _stream(self, response: http.client.HTTPResponse, chunked: bool, stop_after: int | None) -> None:
            sent = 0
            while data := response.read1(64 * 1024) if self.command != "HEAD" else b"":
                if stop_after is not None and sent + len(data) > stop_after:
                    self.wfile.write(data[: stop_after - sent])
                    self.wfile.flush()
                    self._drop()
                    return
                self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data) if chunked else data)
                sent += len(data)
            if chunked:
                self.wfile.write(b"0\r\n\r\n")
            self.wfile.flush()

        do_GET = do_HEAD = do_PUT = do_POST = do_DELETE = _forward  # noqa: N815 - http.server's names

    return Handler
