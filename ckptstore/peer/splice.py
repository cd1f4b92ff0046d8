"""Receiving a file body from a socket into a file without copying it through Python.

``splice(2)`` moves the socket's pages into a pipe and from the pipe into the file
(one copy, in the kernel); a second thread drains the pipe into the file while this
one fills it, so receiving and writing overlap. On loopback this runs near the speed
of a plain socket transfer, where ``recv_into`` + ``write`` copy every byte twice,
one after the other. Linux only (:data:`AVAILABLE`); callers fall back to
``recv_into`` elsewhere. No torch import.
"""
from __future__ import annotations

import fcntl
import os
import socket
import threading

from ckptstore.peer import wire

AVAILABLE = hasattr(os, "splice")
PIPE_SIZE = 1 << 20  #: bytes a pipe holds (``/proc/sys/fs/pipe-max-size`` is 1 MiB by default)
_F_SETPIPE_SZ = getattr(fcntl, "F_SETPIPE_SZ", 1031)


def _sink(r: int, fd: int, size: int, failure: list[OSError]) -> None:
    """Move ``size`` bytes from pipe ``r`` into ``fd``; after a write error, keep
    draining the pipe (discarding) so the socket side never blocks on a full pipe."""
    left = size
    while left:
        try:
            if failure:
                n = len(os.read(r, min(left, PIPE_SIZE)))
            else:
                n = os.splice(r, fd, min(left, PIPE_SIZE), flags=os.SPLICE_F_MOVE)
        except OSError as e:
            if failure:  # even the pipe cannot be read: the source will fail too
                return
            failure.append(e)
            continue
        if n == 0:  # the socket side stopped early and closed the pipe
            return
        left -= n


def splice_body(sock: socket.socket, fd: int, size: int) -> OSError | None:
    """Move exactly ``size`` bytes from ``sock`` to file descriptor ``fd`` (at its
    current offset). A connection failure raises (EOFError, TimeoutError,
    ConnectionError); a write failure is returned, after the whole body was read
    from the socket, so the stream stays in step."""
    r, w = os.pipe2(os.O_CLOEXEC)
    try:
        fcntl.fcntl(w, _F_SETPIPE_SZ, PIPE_SIZE)
    except OSError:  # a smaller pipe works too
        pass
    failure: list[OSError] = []
    sink = threading.Thread(target=_sink, args=(r, fd, size, failure), daemon=True,
                            name="ckptstore-peer-sink")
    sink.start()
    try:
        left = size
        timeout = sock.gettimeout()
        while left:
            try:
                n = os.splice(sock.fileno(), w, min(left, PIPE_SIZE),
                              flags=os.SPLICE_F_MOVE | os.SPLICE_F_MORE)
            except BlockingIOError:  # a socket with a timeout is non-blocking underneath
                if not wire.readable(sock, timeout):
                    raise TimeoutError(f"no data for {timeout} s inside a file body") from None
                continue
            if n == 0:
                raise EOFError(f"connection closed inside a file body ({size - left} of {size} bytes)")
            left -= n
    finally:
        os.close(w)
        sink.join()
        os.close(r)
    return failure[0] if failure else None
