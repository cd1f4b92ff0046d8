"""The peer protocol's framing, names and errors (shared by the keeper and its client).

One TCP connection carries frames: a 4-byte big-endian length, then that many bytes
of UTF-8 JSON (a header, at most ``MAX_HEADER`` bytes, always an object). A header
that announces a body (``"size": n``) is followed by exactly ``n`` raw bytes: a
manifest, or a data file streamed in pieces of ``PIECE`` bytes, never held whole.
Nothing is ever unpickled: headers are JSON, bodies are checkpoint bytes that the
receiver verifies against the manifest before it commits.

Replies carry ``"ok": true``, or ``"ok": false`` with an ``error`` type name from
:mod:`ckptstore.errors` and a ``message``; :func:`raise_reply` turns them back into
the same typed error. This module imports no torch.
"""
from __future__ import annotations

import json
import re
import select
import socket
import struct

from ckptstore import errors as E
from ckptstore.errors import StorageError, UnsafeCheckpointError

MAX_HEADER = 64 << 10  #: bytes of one JSON header
PIECE = 8 << 20  #: bytes of a file body moved at a time (sendfile count, recv buffer)
SOCKET_BUFFER = 8 << 20  #: SO_SNDBUF / SO_RCVBUF asked for (the kernel may cap it)
PROTOCOL = 1
RUN_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}")
_LEN = struct.Struct(">I")

#: error types a reply may name; anything else comes back as StorageError
REPLY_ERRORS: dict[str, type[Exception]] = {
    c.__name__: c for c in (E.CheckpointExistsError, E.CheckpointNotFoundError, E.CorruptCheckpointError,
                            E.UnsafeCheckpointError, E.SchemaVersionError, E.StorageError,
                            E.CkptTimeoutError, E.UnsupportedOperationError)}

#: the line a keeper prints on stdout once it listens, followed by "HOST:PORT"
READY = "LISTENING "


def readable(fd: "int | socket.socket | object", timeout: float | None) -> bool:
    """Whether ``fd`` has data (or EOF) within ``timeout`` seconds (None: forever);
    poll(2), so descriptors above 1023 work too."""
    p = select.poll()
    p.register(fd, select.POLLIN)  # type: ignore[arg-type]
    return bool(p.poll(None if timeout is None else max(0, int(timeout * 1000))))


def check_run(run: object) -> str:
    """A run name the keeper accepts: one plain path component
    (``[A-Za-z0-9][A-Za-z0-9_.-]{0,127}``), never a path. UnsafeCheckpointError otherwise."""
    if not isinstance(run, str) or RUN_RE.fullmatch(run) is None:
        raise UnsafeCheckpointError(
            f"run name {str(run)[:140]!r} is not a plain name ([A-Za-z0-9][A-Za-z0-9_.-]{{0,127}}, "
            "no separators): a peer keeper stores runs only directly below its root")
    return run


def check_step(step: object) -> int:
    if not isinstance(step, int) or isinstance(step, bool) or not 0 <= step < 10 ** 12:
        raise UnsafeCheckpointError(f"step must be an integer in [0, 10**12), not {str(step)[:40]!r}")
    return step


def check_file_name(name: object) -> str:
    """A data file name inside one step directory: one plain component."""
    if not isinstance(name, str) or RUN_RE.fullmatch(name) is None or name.startswith(".tmp-"):
        raise UnsafeCheckpointError(f"file name {str(name)[:140]!r} is not a plain file name")
    return name


def tune(sock: socket.socket, timeout: float) -> None:
    """Large buffers (few wakeups per piece), no Nagle delay for headers, a timeout."""
    for opt in (socket.SO_SNDBUF, socket.SO_RCVBUF):
        try:
            sock.setsockopt(socket.SOL_SOCKET, opt, SOCKET_BUFFER)
        except OSError:  # a smaller cap is fine
            pass
    if sock.family in (socket.AF_INET, socket.AF_INET6):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.settimeout(timeout)


def send(sock: socket.socket, header: dict, body: bytes | memoryview | None = None) -> None:
    """One frame (and ``body``, whose length the caller put in ``header['size']``)."""
    data = json.dumps(header, separators=(",", ":")).encode()
    if len(data) > MAX_HEADER:
        raise UnsafeCheckpointError(f"a peer protocol header of {len(data)} bytes is over "
                                    f"{MAX_HEADER}")
    sock.sendall(_LEN.pack(len(data)) + data)
    if body is not None and len(body):
        sock.sendall(body)


def recv_exact(sock: socket.socket, n: int) -> bytearray:
    """Exactly ``n`` bytes (small: headers and manifests); EOF before them is an error."""
    buf = bytearray(n)
    view = memoryview(buf)
    got = 0
    while got < n:
        k = sock.recv_into(view[got:])
        if k == 0:
            raise EOFError(f"connection closed after {got} of {n} bytes")
        got += k
    return buf


def recv(sock: socket.socket, *, eof_ok: bool = False) -> dict | None:
    """The next header; None at a clean end of the stream when ``eof_ok``."""
    first = sock.recv(_LEN.size, socket.MSG_WAITALL) if eof_ok else bytes(recv_exact(sock, _LEN.size))
    if eof_ok and not first:
        return None
    if len(first) < _LEN.size:
        first = bytes(first) + bytes(recv_exact(sock, _LEN.size - len(first)))
    (n,) = _LEN.unpack(first)
    if n > MAX_HEADER:
        raise UnsafeCheckpointError(f"peer protocol header of {n} bytes is over {MAX_HEADER}: "
                                    "not a ckptstore peer on the other end?")
    try:
        header = json.loads(bytes(recv_exact(sock, n)))
    except ValueError as e:
        raise UnsafeCheckpointError(f"peer protocol header is not JSON: {e}") from None
    if not isinstance(header, dict):
        raise UnsafeCheckpointError("peer protocol header is not a JSON object")
    return header


def body_size(header: dict, cap: int) -> int:
    size = header.get("size")
    if not isinstance(size, int) or isinstance(size, bool) or not 0 <= size <= cap:
        raise UnsafeCheckpointError(f"peer protocol body size {str(size)[:40]!r} is not in [0, {cap}]")
    return size


def error_reply(exc: BaseException) -> dict:
    """The reply frame for a failed request."""
    name = type(exc).__name__
    for cls in type(exc).__mro__:  # the nearest type the other end can rebuild
        if cls.__name__ in REPLY_ERRORS and cls is REPLY_ERRORS[cls.__name__]:
            name = cls.__name__
            break
    else:
        name = "StorageError"
    return {"ok": False, "error": name, "message": str(exc)[:4000]}


def raise_reply(reply: dict, who: str) -> dict:
    """``reply`` if it says ok, else the typed error it names (its message starting
    with ``who``, the other end)."""
    if reply.get("ok") is True:
        return reply
    cls = REPLY_ERRORS.get(str(reply.get("error")), StorageError)
    raise cls(f"{who}: {str(reply.get('message', 'request failed'))[:4000]}")


def split_address(address: str) -> tuple[str, int]:
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit() or not host:
        raise ValueError(f"address {address!r} is not HOST:PORT")
    return host.strip("[]"), int(port)
