"""S3 test infrastructure: a moto server, fresh buckets, a fault-injecting proxy, dead endpoints.

The moto server is a real HTTP endpoint on 127.0.0.1, so boto3, pyarrow, subprocesses and Ray
workers can all reach it (in-process ``mock_aws`` reaches none of them). :class:`FaultProxy` sits
in front of it and breaks a seeded-random share of requests the ways real object stores and
networks do, so retry and resume code is exercised over real sockets.
"""

from __future__ import annotations

import contextlib
import http.client
import logging
import random
import socket
import socketserver
import threading
import uuid
from collections.abc import Iterator
from typing import Any

import pytest

# A distinctive secret, so tests can assert it never leaks into messages or logs.
FAKE_SECRET = "fusedist-fake-secret-Zq8XvT3n"
FAKE_ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": FAKE_SECRET,
    "AWS_DEFAULT_REGION": "us-east-1",
    # Keep a developer's ~/.aws (profiles, retry settings) out of the tests.
    "AWS_CONFIG_FILE": "/nonexistent/fusedist-test-aws-config",
    "AWS_SHARED_CREDENTIALS_FILE": "/nonexistent/fusedist-test-aws-credentials",
    "AWS_EC2_METADATA_DISABLED": "true",
}
_UNSET = ("AWS_PROFILE", "AWS_DEFAULT_PROFILE", "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN",
          "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_REGION", "AWS_RETRY_MODE",
          "AWS_MAX_ATTEMPTS")


# ----------------------------------------------------------------------------- moto

@pytest.fixture(scope="session")
def moto_server() -> Iterator[str]:
    """A moto S3 server on 127.0.0.1 (free port) for the session; yields its endpoint URL."""
    from moto.server import ThreadedMotoServer

    # werkzeug logs one line per request; thousands of them would drown test output.
    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    with pytest.MonkeyPatch.context() as mp:
        for k, v in FAKE_ENV.items():
            mp.setenv(k, v)
        for k in _UNSET:
            mp.delenv(k, raising=False)
        # Port 0: the OS picks a free port at bind time, so no race with other test processes.
        server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
        server.start()
        host, port = server.get_host_and_port()
        try:
            yield f"http://{host}:{port}"
        finally:
            server.stop()


@pytest.fixture
def s3_bucket(moto_server: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """A fresh, uniquely named bucket on the moto server; storage points at it. Yields s3://…"""
    import boto3

    from fusedist import storage

    name = f"test-{uuid.uuid4().hex[:16]}"
    boto3.client("s3", endpoint_url=moto_server).create_bucket(Bucket=name)
    monkeypatch.setenv("AWS_ENDPOINT_URL", moto_server)
    storage.configure(None)  # rebuild clients for the new endpoint and default options
    try:
        yield f"s3://{name}"
    finally:
        storage.configure(None)  # no test leaks its StorageConfig into the next


# ----------------------------------------------------------------------------- fault proxy

_HOP_BY_HOP = {"connection", "keep-alive", "proxy-connection", "transfer-encoding", "te",
               "trailer", "upgrade", "expect", "content-length"}
_ERRORS = [(500, "InternalError", "We encountered an internal error. Please try again."),
           (503, "SlowDown", "Please reduce your request rate.")]


class _Request:
    def __init__(self, method: str, target: str, headers: list[tuple[str, str]], body: bytes):
        self.method, self.target, self.headers, self.body = method, target, headers, body

    def header(self, name: str) -> str:
        return next((v for k, v in self.headers if k.lower() == name), "")


def _read_chunked(rfile: Any) -> bytes:
    """De-frame an HTTP/1.1 chunked body (aws-chunked content inside it stays as it is)."""
    out = bytearray()
    while True:
        size = int(rfile.readline(1024).split(b";")[0].strip() or b"0", 16)
        if size == 0:
            while rfile.readline(65537) not in (b"\r\n", b"\n", b""):
                pass  # HTTP trailers: moto does not need them
            return bytes(out)
        out += rfile.read(size)
        rfile.readline(1024)  # the CRLF after each chunk


class _Handler(socketserver.StreamRequestHandler):
    """One client connection: a keep-alive loop of read request -> fault or forward -> reply."""

    server: _Server
    timeout = 60  # an idle keep-alive connection is dropped after this, never hangs a thread

    def setup(self) -> None:
        # Without NODELAY, Nagle + delayed ACK add ~40 ms to every small request/response.
        self.request.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        super().setup()
        self.server.proxy._track(self.request, add=True)
        self.upstream: http.client.HTTPConnection | None = None

    def finish(self) -> None:
        self.server.proxy._track(self.request, add=False)
        if self.upstream is not None:
            self.upstream.close()
        with contextlib.suppress(OSError):
            super().finish()

    def handle(self) -> None:
        with contextlib.suppress(OSError, ValueError):
            while True:
                req = self._read_request()
                if req is None or not self.server.proxy._serve(self, req):
                    return

    def _read_request(self) -> _Request | None:
        line = self.rfile.readline(65537)
        if not line.strip():
            return None
        method, target, _version = line.decode("latin-1").split(" ", 2)
        headers = []
        while (h := self.rfile.readline(65537)) not in (b"\r\n", b"\n", b""):
            k, _, v = h.decode("latin-1").partition(":")
            headers.append((k.strip(), v.strip()))
        req = _Request(method, target, headers, b"")
        if req.header("expect").lower() == "100-continue":
            # botocore sends large PUT bodies only after this (or after a 1 s wait).
            self.wfile.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        if "chunked" in req.header("transfer-encoding").lower():
            req.body = _read_chunked(self.rfile)
        else:
            req.body = self.rfile.read(int(req.header("content-length") or 0))
        return req

    def forward(self, req: _Request) -> tuple[int, str, list[tuple[str, str]], bytes]:
        """Send the request to the upstream (moto) and return its full response."""
        for attempt in range(2):  # once more on a fresh connection if a pooled one went stale
            try:
                if self.upstream is None:
                    self.upstream = http.client.HTTPConnection(*self.server.proxy.upstream,
                                                               timeout=60)
                up = self.upstream
                up.putrequest(req.method, req.target, skip_host=True, skip_accept_encoding=True)
                for k, v in req.headers:
                    if k.lower() not in _HOP_BY_HOP:
                        up.putheader(k, v)
                if req.body or req.method in ("PUT", "POST"):
                    up.putheader("Content-Length", str(len(req.body)))
                up.endheaders(req.body or None)
                resp = up.getresponse()
                return resp.status, resp.reason, resp.getheaders(), resp.read()
            except (OSError, http.client.HTTPException):
                if self.upstream is not None:
                    self.upstream.close()
                self.upstream = None
                if attempt:
                    raise
        raise AssertionError("unreachable")

    def reply(self, req: _Request, status: int, reason: str, headers: list[tuple[str, str]],
              body: bytes, cut: bool = False) -> None:
        head = [f"HTTP/1.1 {status} {reason}"]
        head += [f"{k}: {v}" for k, v in headers if k.lower() not in _HOP_BY_HOP]
        no_body = req.method == "HEAD" or status in (204, 304)
        if no_body:  # HEAD keeps the object's real Content-Length, and sends no body
            head += [f"{k}: {v}" for k, v in headers if k.lower() == "content-length"]
        else:
            head.append(f"Content-Length: {len(body)}")
        head.append("Connection: close" if cut else "Connection: keep-alive")
        out = ("\r\n".join(head) + "\r\n\r\n").encode("latin-1")
        if not no_body:
            out += body[: len(body) // 2] if cut else body
        self.wfile.write(out)  # one write: headers and body in as few packets as possible
        self.wfile.flush()


class _Server(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True
    block_on_close = False  # stop() closes client sockets itself; never wait on idle ones
    proxy: FaultProxy


class FaultProxy:
    """A threaded HTTP/1.1 reverse proxy on 127.0.0.1 that injects S3-like faults.

    For each request (seeded RNG): with ``error_rate`` reply 500 InternalError or 503 SlowDown
    (all counted in ``errors``, the 503s also in ``slowdowns``) with an S3 XML body, without
    forwarding; else with ``drop_rate`` read the request and close the connection without a
    reply; else forward it, and for a GET that returns a body, with ``cut_rate`` send the
    headers and only half the body, then close. ``counts`` says what happened, so tests can
    assert that faults really occurred.
    """

    def __init__(self, upstream: str, *, error_rate: float = 0.0, drop_rate: float = 0.0,
                 cut_rate: float = 0.0, seed: int = 0):
        host, _, port = upstream.removeprefix("http://").rstrip("/").partition(":")
        self.upstream = (host, int(port or 80))
        self._lock = threading.Lock()
        self._conns: set[socket.socket] = set()
        self.set_faults(error_rate=error_rate, drop_rate=drop_rate, cut_rate=cut_rate,
                        seed=seed)
        self._server = _Server(("127.0.0.1", 0), _Handler)
        self._server.proxy = self
        self.endpoint = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread: threading.Thread | None = None

    def set_faults(self, *, error_rate: float = 0.0, drop_rate: float = 0.0,
                   cut_rate: float = 0.0, seed: int = 0, slowdown_share: float = 0.5) -> None:
        """Set fault rates (0..1) and reseed; resets the counters.

        ``slowdown_share`` of the injected errors are 503 SlowDown (a throttling error, which
        botocore backs off from with a 1 s base, not 50 ms), the rest 500 InternalError.
        """
        with self._lock:
            self.error_rate, self.drop_rate, self.cut_rate = error_rate, drop_rate, cut_rate
            self.slowdown_share = slowdown_share
            self._rng = random.Random(seed)
            self._counts = {"requests": 0, "forwarded": 0, "errors": 0, "slowdowns": 0,
                            "drops": 0, "cuts": 0}

    @property
    def counts(self) -> dict[str, int]:
        with self._lock:
            return dict(self._counts)

    @property
    def faults(self) -> int:
        c = self.counts
        return c["errors"] + c["drops"] + c["cuts"]

    def start(self) -> FaultProxy:
        self._thread = threading.Thread(target=self._server.serve_forever,
                                        kwargs={"poll_interval": 0.05}, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        with self._lock:
            conns = list(self._conns)
        for s in conns:  # wake handler threads blocked on idle keep-alive connections
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)
        self._server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def __enter__(self) -> FaultProxy:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _track(self, sock: socket.socket, add: bool) -> None:
        with self._lock:
            (self._conns.add if add else self._conns.discard)(sock)

    def _draw(self) -> tuple[str, int]:
        """Which fault (if any) this request gets: 'error', 'drop', 'cut' or '', and a variant."""
        with self._lock:
            self._counts["requests"] += 1
            r, c = self._rng.random(), self._rng.random()
            variant = int(self._rng.random() < self.slowdown_share)
        if r < self.error_rate:
            return "error", variant
        if r < self.error_rate + self.drop_rate:
            return "drop", variant
        return ("cut" if c < self.cut_rate else ""), variant

    def _count(self, key: str) -> None:
        with self._lock:
            self._counts[key] += 1

    def _serve(self, h: _Handler, req: _Request) -> bool:
        """Handle one request; False closes the client connection."""
        fault, variant = self._draw()
        if fault == "error":
            status, code, msg = _ERRORS[variant]
            body = (f'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>{code}</Code>'
                    f"<Message>{msg}</Message><Resource>{req.target}</Resource>"
                    f"<RequestId>fault-{uuid.uuid4().hex[:8]}</RequestId></Error>").encode()
            self._count("errors")
            if variant:
                self._count("slowdowns")
            h.reply(req, status, code, [("Content-Type", "application/xml")], body)
            return True
        if fault == "drop":
            self._count("drops")
            return False
        try:
            status, reason, headers, body = h.forward(req)
        except (OSError, http.client.HTTPException):
            h.reply(req, 502, "Bad Gateway", [], b"")
            return True
        self._count("forwarded")
        cut = fault == "cut" and req.method == "GET" and status in (200, 206) and len(body) > 1
        if cut:
            self._count("cuts")
        h.reply(req, status, reason, headers, body, cut=cut)
        return not cut


@pytest.fixture
def fault_proxy(moto_server: str) -> Iterator[FaultProxy]:
    """A started :class:`FaultProxy` in front of the moto server, no faults until set_faults()."""
    with FaultProxy(moto_server) as proxy:
        yield proxy


# ----------------------------------------------------------------------------- dead endpoints

@contextlib.contextmanager
def dead_endpoint() -> Iterator[str]:
    """An endpoint URL whose port is bound but not listening: every connect is refused.

    Holding the bound socket (rather than closing a probed free port) keeps any other process
    from starting to listen there while the test runs.
    """
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.bind(("127.0.0.1", 0))
    try:
        yield f"http://127.0.0.1:{s.getsockname()[1]}"
    finally:
        s.close()


@contextlib.contextmanager
def silent_endpoint() -> Iterator[str]:
    """An endpoint that accepts TCP connections (kernel backlog) but never answers a byte."""
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.bind(("127.0.0.1", 0))
    s.listen(64)  # never accept(): connects succeed, reads time out
    try:
        yield f"http://127.0.0.1:{s.getsockname()[1]}"
    finally:
        s.close()
