"""The client of a peer keeper: push a committed step there, list, fetch and drop.

One TCP connection, opened on first use and again after an error or after the
keeper closed it. Every transport failure (refused, reset, closed, timed out) is a
:class:`ckptstore.peer.PeerUnavailableError` naming the address; a refusal by
the keeper comes back as the typed error it raised there (CorruptCheckpointError,
CheckpointExistsError, ...). No torch import.
"""
from __future__ import annotations

import logging
import socket
from collections.abc import Callable
from typing import TypeVar

from ckptstore import manifest as fmt
from ckptstore.errors import CheckpointExistsError, CkptError, PeerUnavailableError, UnsafeCheckpointError
from ckptstore.peer import transfer, wire
from ckptstore.storage import Storage

log = logging.getLogger("ckptstore.peer")
T = TypeVar("T")


class PeerClient:
    """A connection to the keeper at ``address`` ("HOST:PORT"); ``timeout`` bounds
    the connect and every single read or write (not a whole transfer)."""

    def __init__(self, address: str, timeout: float = 30.0) -> None:
        self.address = address
        self.timeout = timeout
        self._where = wire.split_address(address)
        self._sock: socket.socket | None = None

    def __enter__(self) -> PeerClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        sock, self._sock = self._sock, None
        if sock is not None:
            sock.close()

    # -- connection -----------------------------------------------------------
    def _conn(self) -> socket.socket:
        if self._sock is not None and wire.readable(self._sock, 0):
            self.close()  # idle, yet readable: the keeper closed it (or stopped)
        if self._sock is None:
            try:
                sock = socket.create_connection(self._where, timeout=self.timeout)
            except OSError as e:
                raise PeerUnavailableError(self.address, f"cannot connect ({e})") from e
            wire.tune(sock, self.timeout)
            self._sock = sock
        return self._sock

    def _call(self, what: str, fn: Callable[[socket.socket], T]) -> T:
        """Run one request; on any failure the connection is closed (the stream may be
        out of step) and transport failures become PeerUnavailableError."""
        sock = self._conn()
        try:
            return fn(sock)
        except TimeoutError as e:
            self.close()
            raise PeerUnavailableError(self.address, f"{what}: no answer within "
                                            f"{self.timeout} s") from e
        except (ConnectionError, EOFError) as e:
            err = self._late_reply(sock)
            self.close()
            if err is not None:
                raise err from e
            raise PeerUnavailableError(self.address, f"{what}: connection lost ({e})") from e
        except BaseException:
            self.close()
            raise

    def _late_reply(self, sock: socket.socket) -> Exception | None:
        """The keeper's error frame, when it refused a request while we were sending."""
        try:
            sock.settimeout(min(self.timeout, 2.0))
            reply = wire.recv(sock, eof_ok=True)
            if reply is not None and reply.get("ok") is False:
                wire.raise_reply(reply, f"peer keeper at {self.address}")
        except CkptError as e:
            return e
        except (OSError, EOFError):
            return None
        return None

    def _reply(self, sock: socket.socket) -> dict:
        reply = wire.recv(sock)
        assert reply is not None
        return wire.raise_reply(reply, f"peer keeper at {self.address}")

    # -- operations -----------------------------------------------------------
    def hello(self) -> dict:
        """The keeper's protocol version and root (a liveness check)."""
        def run(sock: socket.socket) -> dict:
            wire.send(sock, {"op": "hello", "protocol": wire.PROTOCOL})
            return self._reply(sock)
        return self._call("hello", run)

    def push(self, src: Storage, run: str, step: int) -> int:
        """Send the committed checkpoint ``src`` (a step directory) to the keeper as
        step ``step`` of ``run``; it verifies every file against the manifest and then
        commits. Returns the bytes sent (0 when the keeper already held this very
        checkpoint); CheckpointExistsError when it holds a different one there."""
        wire.check_run(run)
        wire.check_step(step)
        data, m, items = transfer.source_files(src)

        def go(sock: socket.socket) -> int:
            wire.send(sock, {"op": "push", "run": run, "step": step, "size": len(data)}, data)
            if self._reply(sock).get("already"):
                return 0
            sent = transfer.send_files(sock, items)
            wire.send(sock, {"op": "commit"})
            self._reply(sock)
            return sent + len(data)
        n = self._call(f"push of step {step} of {run}", go)
        log.info("pushed %s to %s as %s/%d (%d bytes)", src.url, self.address, run, step, n)
        return n

    def steps(self, run: str) -> list[int]:
        """The committed steps the keeper holds for ``run``, ascending."""
        wire.check_run(run)

        def go(sock: socket.socket) -> list[int]:
            wire.send(sock, {"op": "steps", "run": run})
            steps = self._reply(sock).get("steps")
            if not isinstance(steps, list) or not all(isinstance(s, int) for s in steps):
                raise UnsafeCheckpointError(f"keeper at {self.address} sent a malformed step list")
            return steps
        return self._call(f"steps of {run}", go)

    def fetch(self, run: str, step: int, dst: Storage) -> int:
        """Stream step ``step`` of ``run`` into ``dst`` (a local directory, created if
        needed): data files through the atomic-write path, every file verified, the
        manifest last, create-only. Returns the bytes received (0 when ``dst``
        already holds this very checkpoint; CheckpointExistsError when it holds
        another). Raises CheckpointNotFoundError when the keeper holds no such step."""
        wire.check_run(run)
        wire.check_step(step)
        have = fmt.read_catalog(dst).save_id if dst.exists(fmt.MANIFEST_NAME) else None

        def go(sock: socket.socket) -> int:
            wire.send(sock, {"op": "fetch", "run": run, "step": step, "have": have})
            head = self._reply(sock)
            if have is not None:
                if head.get("save_id") != have:
                    raise CheckpointExistsError(
                        f"{dst.url} already holds a different committed checkpoint than step "
                        f"{step} of {run} at {self.address}; it was not replaced")
                return 0
            data, m = transfer.receive_manifest(sock, head)
            landing = transfer.Landing(dst)
            try:
                dst.makedirs()
                got = transfer.receive_files(sock, landing, m, f"peer keeper at {self.address}")
                self._reply(sock)
                transfer.commit_verified(landing, data, m, f"fetch of {run}/{step} from {self.address}")
            finally:
                landing.discard()
            return got + len(data)
        n = self._call(f"fetch of step {step} of {run}", go)
        log.info("fetched %s/%d from %s into %s (%d bytes)", run, step, self.address, dst.url, n)
        return n

    def drop(self, run: str, step: int) -> None:
        """Remove step ``step`` of ``run`` from the keeper (manifest first, then its
        files); a step it does not hold is no error."""
        wire.check_run(run)
        wire.check_step(step)

        def go(sock: socket.socket) -> None:
            wire.send(sock, {"op": "drop", "run": run, "step": step})
            self._reply(sock)
        self._call(f"drop of step {step} of {run}", go)
