"""Fault injection over the Storage interface: count, journal, fail or kill at any call.

:class:`FaultyStorage` wraps another storage and is driven by data, not code
(a table of data, not hand-written copies)::

    FaultyStorage(inner, fail={"fsync": 3})            # the 3rd fsync raises EIO
    FaultyStorage(inner, fail={"write": "*"}, errno=errno.ENOSPC)
    FaultyStorage(inner, kill_at=12, kill_when="after")  # SIGKILL after mutating op 12

Writer processes receive the storage pickled, so the counts live in a *ledger*: a
small file shared by every process that holds a copy (updated under ``flock``). The
ledger also keeps a journal of every mutating call, optionally with the bytes
written (``record=True``); :mod:`fuzz.power` replays that journal to build the
states a power loss can leave behind.

A kill takes down the whole process group (the trainer and its writers, like a lost
node) or only the calling process (``kill_scope="self"``: a writer dies). Group
kills are only armed in a process-group leader, so a test cannot kill its runner.
"""
from __future__ import annotations

import errno as _errno
import fcntl
import fnmatch
import json
import os
import signal
import struct
import tempfile
from collections.abc import Iterable
from typing import Any

from ckptstore.storage.base import Storage, WriteHandle
from ckptstore.storage.capabilities import (
    IncompleteUpload,
    MultipartGC,
    ObjectInfo,
    plain_class,
    remake,
)

#: calls that change what is stored; these are the kill points of a sweep
MUTATING = ("makedirs", "open_write", "write", "fsync", "close", "abort", "rename",
            "link_exclusive", "put_exclusive", "fsync_dir", "remove", "abort_upload")
READING = ("exists", "size", "read", "readinto", "listdir", "isdir", "mtime", "info",
           "incomplete_uploads")

_LEN = struct.Struct("<Q")


class Ledger:
    """Per-op call counts and a journal in files shared across processes."""

    def __init__(self, path: str | None = None) -> None:
        if path is None:
            fd, path = tempfile.mkstemp(prefix="ckptstore-ledger-")
            os.close(fd)
        self.path = os.fspath(path)

    def _locked(self):
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        fcntl.flock(fd, fcntl.LOCK_EX)
        return fd

    def tick(self, op: str, name: str, counted: bool, *, mutating: bool,
             record: dict | None = None, data: bytes | memoryview | None = None) -> tuple[int, int]:
        """Count one call; returns (n-th call of ``op`` that matches, mutating index).

        ``counted`` says whether the call matches the fault filter (``where``);
        the mutating index counts every mutating call (0 for reads).
        """
        fd = self._locked()
        try:
            raw = os.pread(fd, 1 << 20, 0)
            counts: dict[str, int] = json.loads(raw) if raw else {}
            counts[op] = counts.get(op, 0) + 1
            nth = 0
            if counted:  # the n-th call that the fault filter matches
                nth = counts.get("match:" + op, 0) + 1
                counts["match:" + op] = nth
            index = 0
            if mutating:
                index = counts.get("_mutating", 0) + 1
                counts["_mutating"] = index
            text = json.dumps(counts).encode()
            os.pwrite(fd, text, 0)
            os.ftruncate(fd, len(text))
            if record is not None and mutating:
                rec = dict(record, op=op, name=name, index=index)
                self._append(rec, data)
            return nth, index
        finally:
            os.close(fd)  # closing drops the flock

    def _append(self, rec: dict, data: bytes | memoryview | None) -> None:
        head = json.dumps(rec).encode()
        body = b"" if data is None else bytes(data)
        with open(self.path + ".journal", "ab") as j:
            j.write(_LEN.pack(len(head)) + head + _LEN.pack(len(body)) + body)

    def mark(self, index: int, **fields: Any) -> None:
        """Add fields to the journal as a separate note (e.g. an injected error)."""
        fd = self._locked()
        try:
            self._append(dict(fields, op="note", index=index), None)
        finally:
            os.close(fd)

    def counts(self) -> dict[str, int]:
        """Calls per op so far, and ``"_mutating"``: the number of mutating calls."""
        try:
            with open(self.path, "rb") as f:
                raw = f.read()
        except FileNotFoundError:
            return {}
        return json.loads(raw) if raw else {}

    def journal(self) -> list[tuple[dict, bytes]]:
        """Every journaled call in order: (record, bytes written or b"")."""
        out: list[tuple[dict, bytes]] = []
        try:
            with open(self.path + ".journal", "rb") as j:
                blob = j.read()
        except FileNotFoundError:
            return out
        pos = 0
        while pos < len(blob):
            (n,) = _LEN.unpack_from(blob, pos)
            rec = json.loads(blob[pos + 8:pos + 8 + n])
            pos += 8 + n
            (m,) = _LEN.unpack_from(blob, pos)
            out.append((rec, blob[pos + 8:pos + 8 + m]))
            pos += 8 + m
        return out

    def reset(self) -> None:
        for p in (self.path, self.path + ".journal"):
            try:
                os.unlink(p)
            except FileNotFoundError:
                pass

    def remove(self) -> None:
        self.reset()


def _normalise(fail: dict | None) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for op, when in (fail or {}).items():
        if op not in MUTATING and op not in READING:
            raise ValueError(f"unknown storage call {op!r} in fail table")
        if when == "*":
            out[op] = "*"
        elif isinstance(when, int):
            out[op] = frozenset([when])
        else:
            out[op] = frozenset(int(x) for x in when)
    return out


class _FaultyObjectInfo:
    """:class:`ObjectInfo` of a FaultyStorage whose inner storage has it."""

    def info(self, name: str) -> dict:
        return self._call("info", name, lambda: self.inner.info(name))  # type: ignore


class _FaultyMultipartGC:
    """:class:`MultipartGC` of a FaultyStorage whose inner storage has it."""

    def incomplete_uploads(self) -> list[IncompleteUpload]:
        return self._call("incomplete_uploads", "", self.inner.incomplete_uploads)  # type: ignore

    def abort_upload(self, upload: IncompleteUpload) -> None:
        self._call("abort_upload", upload.key, lambda: self.inner.abort_upload(upload),  # type: ignore
                   extra={"upload_id": upload.upload_id})


class FaultyStorage(Storage):
    """A :class:`Storage` that counts every primitive call and breaks chosen ones.

    It implements the optional protocols of :mod:`ckptstore.storage.capabilities`
    that ``inner`` implements; their calls are counted and breakable like the rest.

    Args:
        inner: the storage doing the real I/O.
        fail: op name -> call numbers (1-based, counted across processes), a list of
            them, or ``"*"`` for every call. The call raises ``OSError(errno)``
            instead of running; a failing ``write`` first writes half of its data
            (a short write ending in an error, like ENOSPC part-way).
        errno: the error number raised, or a dict op -> errno.
        fail_when: ``"before"`` the call runs (default) or ``"after"`` it succeeded
            (the call happened but its caller is told it failed).
        where: only calls on names matching this glob (of the base name) count
            towards ``fail``.
        kill_at: SIGKILL at this mutating call (1-based, across processes).
        kill_when: ``"before"`` or ``"after"`` that call runs.
        kill_scope: ``"group"`` (the process group: trainer and writers) or ``"self"``.
        ledger: path of the shared counts file (a temp file by default).
        record: journal the bytes of every write too (for power-loss replay).
    """

    _MIXINS: dict[type, type] = {ObjectInfo: _FaultyObjectInfo, MultipartGC: _FaultyMultipartGC}

    def __new__(cls, inner: Storage, *args: Any, **kwargs: Any) -> "FaultyStorage":
        return remake(cls, inner, cls._MIXINS)

    def __reduce__(self):
        return remake, (plain_class(type(self)), self.inner, self._MIXINS), self.__dict__

    def __init__(self, inner: Storage, *, fail: dict | None = None,
                 errno: int | dict = _errno.EIO, fail_when: str = "before",
                 where: str | None = None, kill_at: int | None = None,
                 kill_when: str = "before", kill_scope: str = "group",
                 ledger: "str | Ledger | None" = None, record: bool = False) -> None:
        if kill_when not in ("before", "after") or fail_when not in ("before", "after"):
            raise ValueError("kill_when and fail_when are 'before' or 'after'")
        if kill_scope not in ("group", "self"):
            raise ValueError("kill_scope is 'group' or 'self'")
        self.inner = inner
        self.capabilities = inner.capabilities
        self.fail = _normalise(fail)
        self.errno = errno
        self.fail_when = fail_when
        self.where = where
        self.kill_at = kill_at
        self.kill_when = kill_when
        self.kill_scope = kill_scope
        self.ledger = ledger if isinstance(ledger, Ledger) else Ledger(ledger)
        self.record = record
        self.pgid: int | None = None
        if kill_at is not None and kill_scope == "group":
            # Only a group leader (a harness child started with a new session) may
            # kill its group; anything else would take the test runner with it.
            if os.getpgrp() != os.getpid():
                raise RuntimeError("kill_scope='group' needs a process-group leader; start "
                                   "the saving process with start_new_session=True")
            self.pgid = os.getpgrp()

    def __repr__(self) -> str:
        return f"FaultyStorage({self.inner!r}, fail={self.fail!r}, kill_at={self.kill_at})"

    # -- the one place every call goes through ------------------------------
    def _call(self, op: str, name: str, fn, *, data: bytes | memoryview | None = None, extra=None):
        base = name.rpartition("/")[2]
        counted = op in self.fail and (self.where is None or fnmatch.fnmatch(base, self.where))
        mutating = op in MUTATING
        record = None
        if mutating:
            record = dict(extra or {})
            if data is not None:
                record["nbytes"] = len(data)
        nth, index = self.ledger.tick(op, name, counted, mutating=mutating, record=record,
                                      data=data if self.record else None)
        if mutating and index == self.kill_at and self.kill_when == "before":
            self._kill()
        failing = counted and (self.fail[op] == "*" or nth in self.fail[op])
        code = self.errno.get(op, _errno.EIO) if isinstance(self.errno, dict) else self.errno
        if failing and self.fail_when == "before":
            if op == "write" and data is not None and len(data) > 1:
                fn(memoryview(data)[: len(data) // 2])  # short write, then the error
            self.ledger.mark(index, injected=op, name=name, errno=code)
            raise OSError(code, f"injected {os.strerror(code)} on {op} #{nth}", name)
        result = fn() if data is None else fn(data)
        if mutating and index == self.kill_at and self.kill_when == "after":
            self._kill()
        if failing:
            self.ledger.mark(index, injected=op, name=name, errno=code, after=True)
            raise OSError(code, f"injected {os.strerror(code)} after {op} #{nth}", name)
        return result

    def _kill(self) -> None:
        if self.kill_scope == "group" and self.pgid is not None and os.getpgrp() == self.pgid:
            os.killpg(self.pgid, signal.SIGKILL)
        os.kill(os.getpid(), signal.SIGKILL)

    def _wrap(self, inner: Storage) -> "FaultyStorage":
        clone = remake(type(self), inner, self._MIXINS)
        clone.__dict__.update(self.__dict__)
        clone.inner = inner
        return clone

    # -- Storage ------------------------------------------------------------
    @property
    def url(self) -> str:
        return self.inner.url

    def child(self, name: str) -> "FaultyStorage":
        return self._wrap(self.inner.child(name))

    def sibling(self, name: str) -> "FaultyStorage":
        return self._wrap(self.inner.sibling(name))

    def parent(self) -> "FaultyStorage":
        return self._wrap(self.inner.parent())

    def makedirs(self) -> None:
        self._call("makedirs", "", self.inner.makedirs)

    def open_write(self, name: str) -> WriteHandle:
        h = self._call("open_write", name, lambda: self.inner.open_write(name))
        return FaultyWriteHandle(self, h, name)

    def open_bulk_write(self, name: str) -> WriteHandle:
        # counted and journaled as open_write: the power model knows one way to create
        h = self._call("open_write", name, lambda: self.inner.open_bulk_write(name))
        return FaultyWriteHandle(self, h, name)

    def rename(self, src: str, dst: str) -> None:
        self._call("rename", src, lambda: self.inner.rename(src, dst), extra={"dst": dst})

    def link_exclusive(self, src: str, dst: str) -> None:
        self._call("link_exclusive", src, lambda: self.inner.link_exclusive(src, dst),
                   extra={"dst": dst})

    def put_exclusive(self, name: str, data: bytes) -> None:
        self._call("put_exclusive", name, lambda d: self.inner.put_exclusive(name, bytes(d)),
                   data=bytes(data))

    def fsync_dir(self, name: str = "") -> None:
        self._call("fsync_dir", name, lambda: self.inner.fsync_dir(name))

    def remove(self, name: str) -> None:
        self._call("remove", name, lambda: self.inner.remove(name))

    def exists(self, name: str) -> bool:
        return self._call("exists", name, lambda: self.inner.exists(name))

    def size(self, name: str) -> int:
        return self._call("size", name, lambda: self.inner.size(name))

    def read(self, name: str, offset: int = 0, length: int | None = None) -> bytes:
        return self._call("read", name, lambda: self.inner.read(name, offset, length))

    def readinto(self, name: str, offset: int, buf: memoryview) -> int:
        return self._call("readinto", name, lambda: self.inner.readinto(name, offset, buf))

    def read_extent(self, name: str, offset: int, length: int) -> memoryview:
        return self._call("read", name, lambda: self.inner.read_extent(name, offset, length))

    def listdir(self, name: str = "") -> list[str]:
        return self._call("listdir", name, lambda: self.inner.listdir(name))

    def isdir(self, name: str) -> bool:
        return self._call("isdir", name, lambda: self.inner.isdir(name))

    def mtime(self, name: str) -> float:
        return self._call("mtime", name, lambda: self.inner.mtime(name))

    def _rmdir(self, name: str) -> None:
        self.inner._rmdir(name)


class FaultyWriteHandle(WriteHandle):
    """A write handle whose calls go through the owning FaultyStorage."""

    def __init__(self, storage: FaultyStorage, inner: WriteHandle, name: str) -> None:
        self.storage = storage
        self.inner = inner
        self.name = name

    def write(self, data: memoryview | bytes) -> int:
        view = memoryview(data).cast("B")
        self.storage._call("write", self.name, self.inner.write, data=view)
        return len(view)

    def write_held(self, data: memoryview | bytes) -> int:
        view = memoryview(data).cast("B")
        self.storage._call("write", self.name, self.inner.write_held, data=view)
        return len(view)

    def fsync(self) -> None:
        self.storage._call("fsync", self.name, self.inner.fsync)

    def close(self) -> None:
        self.storage._call("close", self.name, self.inner.close)

    def abort(self) -> None:
        self.storage._call("abort", self.name, self.inner.abort)


def ops_of(journal: Iterable[tuple[dict, bytes]]) -> list[dict]:
    """The call records of a journal, without the injected-error notes."""
    return [r for r, _ in journal if r.get("op") != "note"]
