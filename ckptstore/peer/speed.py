"""The yardstick for peer transfers: plain TCP throughput over 127.0.0.1 here.

:func:`loopback_speed` moves bytes from memory to memory through one loopback
connection with the same socket settings and piece size as the peer protocol
(:mod:`ckptstore.peer.wire`), without files, hashing or framing; a push or fetch is
compared with it in the same run. No torch import.
"""
from __future__ import annotations

import socket
import threading
import time

from ckptstore.peer import wire


def loopback_speed(nbytes: int) -> float:
    """Bytes per second of one plain socket transfer of ``nbytes`` over 127.0.0.1
    in this process (a sender thread, the receiver here)."""
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
        while got < nbytes:
            k = conn.recv_into(buf[:min(len(buf), nbytes - got)])
            if k == 0:
                break
            got += k
        elapsed = time.perf_counter() - start
        t.join()
    if errors or got != nbytes:
        raise OSError(f"loopback transfer moved {got} of {nbytes} bytes: {errors[:1]}")
    return nbytes / elapsed
