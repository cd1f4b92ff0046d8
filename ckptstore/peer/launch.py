"""Starting a keeper process and the handle on it (:func:`start_keeper`, :class:`Keeper`).

The keeper itself (``python -m ckptstore.peer.keeper``) lives in :mod:`.keeper`; this
module only launches it, so importing ``ckptstore.peer`` never imports the server.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

from ckptstore.errors import CkptTimeoutError, StorageError
from ckptstore.peer import wire
from ckptstore.peer.wire import READY


class Keeper:
    """A handle on a keeper process: ``address`` ("HOST:PORT"), ``pid``, :meth:`stop`."""

    def __init__(self, address: str, pid: int, proc: subprocess.Popen | None = None) -> None:
        self.address = address
        self.pid = pid
        self._proc = proc

    def __repr__(self) -> str:
        return f"Keeper(address={self.address!r}, pid={self.pid})"

    def alive(self) -> bool:
        if self._proc is not None:
            return self._proc.poll() is None
        try:
            with open(f"/proc/{self.pid}/stat", "rb") as f:  # a zombie is not alive
                return f.read().rpartition(b")")[2].split()[0] != b"Z"
        except FileNotFoundError:
            return False
        except OSError:  # no /proc here
            pass
        try:
            os.kill(self.pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True

    def stop(self, timeout: float = 10.0) -> None:
        """Stop the keeper (SIGTERM, then SIGKILL after ``timeout``) and wait for it.
        Idempotent. Transfers in flight are abandoned; nothing they wrote is committed."""
        if not self.alive():
            return
        try:
            os.kill(self.pid, signal.SIGTERM)
        except ProcessLookupError:
            return
        if not _wait(self, timeout):
            try:
                os.kill(self.pid, signal.SIGKILL)
            except ProcessLookupError:
                return
            _wait(self, timeout)


def _wait(k: Keeper, timeout: float) -> bool:
    if k._proc is not None:
        try:
            k._proc.wait(timeout)
            return True
        except subprocess.TimeoutExpired:
            return False
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not k.alive():
            return True
        time.sleep(0.02)
    return False


def start_keeper(root: "str | os.PathLike", host: str = "127.0.0.1", port: int = 0, *,
                 log_file: "str | os.PathLike | None" = None, timeout: float = 60.0) -> Keeper:
    """Start a keeper process for ``root`` listening on ``host:port`` (0: a free port),
    in its own session (it outlives this process unless stopped), and return once it
    accepts connections. Its log goes to ``log_file`` (default ``<root>/.keeper.log``)."""
    root = os.path.abspath(os.fspath(root))
    os.makedirs(root, exist_ok=True)
    logf = os.fspath(log_file) if log_file is not None else os.path.join(root, ".keeper.log")
    with open(logf, "ab") as err:
        proc = subprocess.Popen(
            [sys.executable, "-m", "ckptstore.peer.keeper", "--root", root, "--listen",
             f"{host}:{port}"], stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=err,
            start_new_session=True, close_fds=True)
    assert proc.stdout is not None
    line = b""
    deadline = time.monotonic() + timeout
    while not line.endswith(b"\n"):
        left = deadline - time.monotonic()
        if left <= 0 or not wire.readable(proc.stdout, left):
            proc.kill()
            proc.wait()
            raise CkptTimeoutError(f"the keeper for {root} did not start within {timeout} s; "
                                   f"see {logf}")
        piece = os.read(proc.stdout.fileno(), 256)
        if not piece:
            proc.wait()
            raise StorageError(f"the keeper for {root} exited ({proc.returncode}) before it "
                                    f"listened; see {logf}")
        line += piece
    proc.stdout.close()
    text = line.decode(errors="replace").strip()
    if not text.startswith(READY):
        proc.kill()
        raise StorageError(f"the keeper for {root} said {text[:200]!r}; see {logf}")
    return Keeper(text[len(READY):], proc.pid, proc)
