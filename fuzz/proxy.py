"""A fault-injecting HTTP proxy for object-store emulators (moto, fake-gcs-server),
shared by the fuzz harness (:mod:`fuzz.objstore`) and the tier tests.

Faults are data: ``proxy.inject(kind, count, method=..., path=...)`` makes the next
``count`` matching requests fail with ``kind``: ``"503"`` (S3 SlowDown / GCS 503),
``"reset"`` (connection closed without an answer), ``"delay"`` (answered after
``delay`` seconds) or ``"blackhole"`` (held ``delay`` seconds, then closed; the
request never reaches the server). ``rate=p`` makes each matching request fail with
probability ``p`` (seeded) instead of the next ``count`` ones.
"""
from __future__ import annotations

import http.client
import random
import socket
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Fault:
    kind: str
    count: int
    method: str | None = None
    path: str | None = None
    delay: float = 0.5
    hits: int = field(default=0)
    rate: float | None = None  #: fail each matching request with this probability
    rng: random.Random | None = None


class FaultProxy:
    """A forwarding HTTP proxy that injects faults into matching requests."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.faults: list[Fault] = []
        self.lock = threading.Lock()
        self.requests: list[tuple[str, str]] = []
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args) -> None:
                return None

            def _handle(self) -> None:
                n = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(n) if n else b""
                proxy.requests.append((self.command, self.path))
                fault = proxy._take(self.command, self.path)
                if fault is not None and fault.kind == "reset":
                    self.close_connection = True
                    self.connection.shutdown(socket.SHUT_RDWR)
                    return
                if fault is not None and fault.kind == "503":
                    msg = (b'<?xml version="1.0" encoding="UTF-8"?><Error><Code>SlowDown</Code>'
                           b"<Message>Please reduce your request rate.</Message></Error>")
                    self.send_response(503)
                    self.send_header("Content-Length", str(len(msg)))
                    self.send_header("Content-Type", "application/xml")
                    self.end_headers()
                    self.wfile.write(msg)
                    return
                if fault is not None and fault.kind == "blackhole":  # never reaches the server
                    time.sleep(fault.delay)
                    self.close_connection = True
                    self.connection.shutdown(socket.SHUT_RDWR)
                    return
                if fault is not None and fault.kind == "delay":
                    time.sleep(fault.delay)
                conn = http.client.HTTPConnection("127.0.0.1", proxy.target_port, timeout=60)
                headers = {k: v for k, v in self.headers.items()
                           if k.lower() not in ("connection", "transfer-encoding")}
                headers["Content-Length"] = str(len(body))
                conn.request(self.command, self.path, body=body, headers=headers)
                resp = conn.getresponse()
                data = resp.read()
                self.send_response(resp.status, resp.reason)
                head = self.command == "HEAD"  # HEAD answers carry the object's length
                for k, v in resp.getheaders():
                    if k.lower() not in ("connection", "transfer-encoding") and (
                            head or k.lower() != "content-length"):
                        self.send_header(k, v)
                if not head:
                    self.send_header("Content-Length", str(len(data)))
                try:
                    self.end_headers()
                    if not head:
                        self.wfile.write(data)
                except (BrokenPipeError, ConnectionResetError):
                    self.close_connection = True  # the client gave up on this answer
                conn.close()

            do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = do_PATCH = _handle

        self.port = free_port()
        self.server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        self.server.daemon_threads = True
        self.server.handle_error = lambda request, address: None  # clients hang up freely
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> "FaultProxy":
        self.thread.start()
        return self

    def stop(self) -> None:
        self.server.shutdown()

    def inject(self, kind: str, count: int, *, method: str | None = None,
               path: str | None = None, delay: float = 0.5, rate: float | None = None,
               seed: int = 0) -> Fault:
        """Fail the next ``count`` matching requests with ``kind`` (with ``rate``:
        each matching request with that probability, at most ``count`` times)."""
        assert kind in ("503", "reset", "delay", "blackhole")
        f = Fault(kind, count, method, path, delay, rate=rate,
                  rng=random.Random(seed) if rate is not None else None)
        with self.lock:
            self.faults.append(f)
        return f

    def clear(self) -> None:
        with self.lock:
            self.faults.clear()

    def _take(self, method: str, path: str) -> Fault | None:
        with self.lock:
            for f in self.faults:
                if f.count <= 0:
                    continue
                if f.method is not None and f.method != method:
                    continue
                if f.path is not None and f.path not in path:
                    continue
                if f.rng is not None and f.rng.random() >= f.rate:
                    continue
                f.count -= 1
                f.hits += 1
                return f
        return None


