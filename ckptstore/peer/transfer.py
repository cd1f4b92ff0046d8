"""Moving one committed checkpoint over a peer connection, in either direction.

The sender (:func:`source_files`, :func:`send_files`) streams each data file from its
storage (``sendfile(2)`` from a local file, else pieces through ``readinto``); the
receiver (:func:`receive_files`, :func:`commit_verified`) writes each through the
atomic-write path (temp name, fsync, rename), checks every file with the one
verifier (:class:`ckptstore.verify.checks.Verifier`: sizes, safetensors header
hashes, chunk hashes) and only then creates the manifest, create-only. A failure at
any point removes what this transfer wrote; nothing torn is ever committed.

The keeper receives pushes and sends fetches; the client does the opposite, with
the same code. This module imports no torch.
"""
from __future__ import annotations

import logging
import os
import socket
import stat
from dataclasses import dataclass, replace

from ckptstore import manifest as fmt
from ckptstore.commit.atomic import AtomicFile, commit_manifest, is_temp_name
from ckptstore.errors import CheckpointExistsError, CorruptCheckpointError, UnsafeCheckpointError
from ckptstore.manifest.jsonio import TEXT_COST, max_parse_memory, too_big
from ckptstore.manifest.records import MAX_MANIFEST_BYTES, MAX_SIZE
from ckptstore.peer import splice, wire
from ckptstore.storage import LocalStorage, Storage
from ckptstore.storage.local import LocalWriteHandle
from ckptstore.verify.checks import Verifier

log = logging.getLogger("ckptstore.peer")


@dataclass(frozen=True, slots=True)
class Outgoing:
    """One data file to send: where it is held and its manifest record."""

    holder: Storage
    record: fmt.FileRecord


def source_files(src: Storage) -> tuple[bytes, fmt.Manifest, tuple[Outgoing, ...]]:
    """The manifest bytes to send for the committed checkpoint ``src``, what they
    decode to, and its data files. Files an incremental step reads from an older
    step (``FileRecord.base``) are sent too and their ``base`` cleared, so a peer
    copy is complete on its own (the manifest is then re-encoded, same save_id)."""
    data, m = fmt.read_manifest_bytes(src)
    first = {f.name for f in fmt.decode(data).files}  # a distributed save's rank indexes
    items = tuple(Outgoing(src.sibling(f.base) if f.base else src, f)
                  for f in sorted(m.files, key=lambda f: f.name not in first))
    if any(f.base for f in m.files):
        m = replace(m, files=tuple(replace(f, base=None) for f in m.files))
        data = fmt.encode(m)
    return data, m, items


def check_incoming(m: fmt.Manifest) -> None:
    """A manifest a receiver accepts: complete (no file of another step), flat names."""
    for f in m.files:
        wire.check_file_name(f.name)
        if f.base is not None:
            raise UnsafeCheckpointError(f"file {f.name} names another step ({f.base}); a peer copy "
                                        "must hold all its files")


def send_files(sock: socket.socket, items: tuple[Outgoing, ...]) -> int:
    """Each file as a ``{"op": "file"}`` frame and its body; returns the bytes sent.
    A file that is missing or not at its manifest size raises (FileNotFoundError,
    CorruptCheckpointError) before its frame goes out, so the peer can be told; a
    failure inside a body raises EOFError (the stream is then broken)."""
    total = 0
    for it in items:
        f = it.record
        fh = _open_local(it.holder, f.name) if isinstance(it.holder, LocalStorage) else None
        try:
            size = os.fstat(fh.fileno()).st_size if fh is not None else it.holder.size(f.name)
            if size != f.size:
                raise CorruptCheckpointError(f"{it.holder.url}/{f.name} is {size} bytes, its manifest "
                                             f"says {f.size}; a damaged checkpoint is never sent")
            wire.send(sock, {"op": "file", "name": f.name, "size": f.size})
            sent = (sock.sendfile(fh, 0, f.size) if f.size else 0) if fh is not None else \
                _send_pieces(sock, it.holder, f.name, f.size)
        finally:
            if fh is not None:
                fh.close()
        if sent != f.size:  # the peer expects f.size bytes: the stream cannot go on
            raise EOFError(f"{it.holder.url}/{f.name} ended after {sent} of {f.size} bytes")
        total += sent
    return total


def _open_local(holder: LocalStorage, name: str):
    """A local file opened for sendfile, with the storage's own refusals: no
    symbolic link, a regular file."""
    fd = os.open(holder.path(name), os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    fh = os.fdopen(fd, "rb", buffering=0)
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        fh.close()
        raise UnsafeCheckpointError(f"{holder.url}/{name} is not a regular file")
    return fh


def _send_pieces(sock: socket.socket, holder: Storage, name: str, size: int) -> int:
    buf = memoryview(bytearray(min(wire.PIECE, max(size, 1))))
    sent = 0
    while sent < size:
        n = holder.readinto(name, sent, buf[:min(len(buf), size - sent)])
        if n <= 0:
            break
        sock.sendall(buf[:n])
        sent += n
    return sent


def receive_manifest(sock: socket.socket, header: dict) -> tuple[bytes, fmt.Manifest]:
    """The manifest body announced by ``header``, decoded and validated."""
    size = wire.body_size(header, MAX_MANIFEST_BYTES)
    if size * TEXT_COST > max_parse_memory():  # refused unread, as a reader refuses it
        raise too_big(f"a manifest of {size} bytes")
    data = bytes(wire.recv_exact(sock, size))
    m = fmt.decode(data)
    check_incoming(m)
    return data, m


class Landing:
    """The files one transfer wrote into ``dst`` (removed again unless committed)."""

    def __init__(self, dst: Storage) -> None:
        self.dst = dst
        self.written: list[str] = []
        self.committed = False

    def discard(self) -> None:
        """Remove this transfer's files and temp files (never a committed step's)."""
        if self.committed or self.dst.exists(fmt.MANIFEST_NAME):
            return
        for name in self.written + [n for n in self.dst.listdir() if is_temp_name(n)]:
            try:
                self.dst.remove(name)
            except OSError as e:
                log.warning("could not remove %s/%s: %s", self.dst.url, name, e)
        self.written.clear()
        try:
            if not self.dst.listdir():
                self.dst.rmtree("")
        except OSError:
            pass


def receive_files(sock: socket.socket, landing: Landing, m: fmt.Manifest, who: str) -> int:
    """Read one ``file`` frame per data file of ``m`` (in any order, each once) and
    write it durably into ``landing.dst``. A distributed save's rank indexes come
    first: once they have landed (each checked against its hash in ``m``), the data
    files they list are expected too. A body is always read to its end, even when
    writing it fails (that error is raised after), so the stream stays in step."""
    want = {f.name: f.size for f in m.files}
    indexed = not m.indexes  # the data files of a distributed save are in its indexes
    buf = memoryview(bytearray(wire.PIECE))
    total = 0
    error: OSError | None = None
    while want:
        h = wire.recv(sock)
        assert h is not None
        if h.get("ok") is False:  # the sender could not go on (e.g. its copy is damaged)
            wire.raise_reply(h, who)
        name = h.get("name")
        if h.get("op") != "file" or name not in want:
            raise UnsafeCheckpointError(f"unexpected frame during a transfer: {str(h)[:200]}")
        size = wire.body_size(h, MAX_SIZE)
        if size != want.pop(name):
            raise UnsafeCheckpointError(f"file {name} is announced with {size} bytes, not its "
                                        "manifest size")
        if error is not None:
            _fill(sock, buf, size, drain=True)
            continue
        try:
            total += _land(sock, landing, name, size, buf)
        except _LocalWriteError as e:  # disk full, ...: read the rest of this body, go on
            error = e.cause
            _fill(sock, buf, size - e.done, drain=True)
        if not want and not indexed and error is None:
            indexed = True
            want = _indexed_files(landing, m)
    if error is not None:
        raise error
    return total


def _indexed_files(landing: Landing, m: fmt.Manifest) -> dict[str, int]:
    """The data files the landed rank indexes of ``m`` list: name -> size."""
    full = fmt.resolve(landing.dst, m)
    have = {f.name for f in m.files}
    for f in full.files:
        wire.check_file_name(f.name)
    return {f.name: f.size for f in full.files if f.name not in have}


class _LocalWriteError(Exception):
    """Writing a received file failed after ``done`` bytes of its body were read."""

    def __init__(self, cause: OSError, done: int) -> None:
        super().__init__(str(cause))
        self.cause = cause
        self.done = done


def _land(sock: socket.socket, landing: Landing, name: str, size: int, buf: memoryview) -> int:
    """Receive one file body into ``landing.dst`` through the atomic-write path: the
    storage's own handle on a temp name, fsync, rename. A local file's bytes go in
    by splice (:mod:`.splice`), others' through the handle's ``write``."""
    got = 0
    reading = False
    try:
        with AtomicFile(landing.dst, name) as out:
            fd = getattr(out.handle, "fd", None) if type(out.handle) is LocalWriteHandle else None
            if fd is not None and splice.AVAILABLE and size:
                reading = True
                failed = splice.splice_body(sock, fd, size)
                reading = False
                got = size
                if failed is not None:
                    raise failed
            while got < size:
                reading = True
                n = _fill(sock, buf, min(len(buf), size - got))
                reading = False
                got += n
                out.write(buf[:n])
    except OSError as e:
        if reading:  # the connection failed: the caller cannot go on
            raise
        raise _LocalWriteError(e, got) from e
    landing.written.append(name)
    return size


def _fill(sock: socket.socket, buf: memoryview, n: int, *, drain: bool = False) -> int:
    """Receive ``n`` bytes into ``buf`` (``drain``: any number, a piece at a time,
    discarded). EOF before them raises EOFError."""
    left = n
    while left > 0:
        at = 0 if drain else n - left
        k = sock.recv_into(buf[at:at + min(left, len(buf) - at)])
        if k == 0:
            raise EOFError("connection closed inside a file body")
        left -= k
    return n


def commit_verified(landing: Landing, data: bytes, m: fmt.Manifest, where: str) -> None:
    """Verify every landed file against ``m`` (sizes, headers, chunk hashes; rank
    indexes first for a distributed save), then create the manifest, create-only."""
    dst = landing.dst
    full = fmt.resolve(dst, m)  # a distributed save: its rank indexes (hashed whole) first
    v = Verifier(dst, full)
    damage = [*v.files(), *v.chunks()]
    if damage:
        raise CorruptCheckpointError(
            f"{where}: {len(damage)} problem(s) in the received copy, first: {damage[0].sentence()}; "
            "nothing was committed (the source copy is damaged: restore it from another tier)",
            [(d.tensor, d.chunk) for d in damage if d.tensor is not None])
    commit_manifest(dst, full, data=data)
    landing.committed = True


def same_commit(dst: Storage, save_id: str) -> bool:
    """True when ``dst`` holds a committed checkpoint with ``save_id``; False when it
    holds none; CheckpointExistsError when it holds a different one."""
    if not dst.exists(fmt.MANIFEST_NAME):
        return False
    try:
        there = fmt.read_catalog(dst)
    except CorruptCheckpointError:
        there = None
    if there is None or there.save_id != save_id:
        raise CheckpointExistsError(
            f"{dst.url} already holds a different committed checkpoint; it was not replaced "
            "(drop it first if it is wrong)")
    return True
