"""The yardsticks for peer transfers: plain TCP throughput over 127.0.0.1 here.

:func:`loopback_speed` moves bytes from memory to memory through one loopback
connection with the same socket settings and piece size as the peer protocol
(:mod:`ckptstore.peer.wire`), without files, hashing or framing; a push or fetch is
compared with it in the same run. :func:`landing_speed` is the same transfer landed
with plain writes into a fresh file in a directory (tmpfs for a restore into
memory): the cost that any restore into new pages pays, whatever its protocol.
No torch import.
"""
from __future__ import annotations

import os
import socket
import threading
import time
from collections.abc import Callable

from ckptstore.peer import wire


def loopback_speed(nbytes: int) -> float:
    """Bytes per second of one plain socket transfer of ``nbytes`` over 127.0.0.1
    in this process (a sender thread, the receiver here)."""
    return _transfer(nbytes, lambda piece: None)


def landing_speed(nbytes: int, directory: str | os.PathLike[str]) -> float:
    """Bytes per second of the :func:`loopback_speed` transfer when the receiver
    writes each piece into a new file in ``directory`` (plain ``write``, no
    hashing); the file is removed again before this returns."""
    if nbytes <= 0:
        raise ValueError("nbytes must be positive")
    path = os.path.join(os.fspath(directory), f".tmp-landing-speed-{os.getpid()}-{threading.get_ident()}")
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        def land(piece: memoryview) -> None:
            done = 0
            while done < len(piece):
                done += os.write(fd, piece[done:])
        return _transfer(nbytes, land)
    finally:
        os.close(fd)
        os.unlink(path)


def _transfer(nbytes: int, sink: Callable[[memoryview], None]) -> float:
    """Bytes per second of sending ``nbytes`` over one loopback connection, each
    received piece handed to ``sink`` (timed too)."""
    if nbytes <= 0:
        raise ValueError("nbytes must be positive")
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as lsock:
        lsock.bind(("127.0.0.1", 0))
        lsock.listen(1)
        sender = socket.create_connection(lsock.getsockname(), timeout=60.0)
        conn, _ = lsock.accept()
    errors: list[BaseException] = []
    piece = memoryview(bytearray(b"\xa5" * min(wire.PIECE, nbytes)))

    def send() -> None:
        try:
            left = nbytes
            while left > 0:
                n = min(left, len(piece))
                sender.sendall(piece[:n])
                left -= n
        except BaseException as e:  # reported by the receiver below
            errors.append(e)

    with sender, conn:
        wire.tune(sender, 60.0)
        wire.tune(conn, 60.0)
        buf = memoryview(bytearray(min(wire.PIECE, nbytes)))
        t = threading.Thread(target=send, name="ckptstore-loopback", daemon=True)
        start = time.perf_counter()
        t.start()
        got = 0
        try:
            while got < nbytes:
                k = conn.recv_into(buf[:min(len(buf), nbytes - got)])
                if k == 0:
                    break
                sink(buf[:k])
                got += k
            elapsed = time.perf_counter() - start
        finally:
            if got < nbytes:  # the sender may be blocked on a full socket: unblock it
                conn.shutdown(socket.SHUT_RDWR)
            t.join()
    if errors or got != nbytes:
        raise OSError(f"loopback transfer moved {got} of {nbytes} bytes: {errors[:1]}")
    return nbytes / elapsed
