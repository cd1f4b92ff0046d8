"""The storage interface: every byte ckptstore reads or writes goes through it.

A :class:`Storage` is rooted at one directory (or object prefix); names are relative
POSIX paths below it. Backends implement a few primitives; the commit strategy
(`ckptstore.commit`) is built on top of them, and fault-injection wrappers
(`ckptstore.storage.faulty`) count or break each primitive. This is the single seam
that makes kill-point sweeps and power-loss simulation possible.

Call order for a durable file on a backend with ``capabilities.rename``::

    h = s.open_write(tmp); h.write(...)*; h.fsync(); h.close()
    s.rename(tmp, final)   # or s.link_exclusive(tmp, final) for create-only
    s.fsync_dir()

On object stores (no rename) an object becomes visible, whole, when its handle is
closed; create-only objects go through :meth:`Storage.put_exclusive`.
"""
from __future__ import annotations

import mmap
import posixpath
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any

from ckptstore.errors import UnsafeCheckpointError, UnsupportedOperationError
from ckptstore.storage.capabilities import ObjectInfo, plain_class, remake


@dataclass(frozen=True, slots=True)
class Capabilities:
    """What a backend can do; the commit layer picks its strategy from these."""

    rename: bool  #: atomic rename within a directory (POSIX)
    fsync: bool  #: fsync of files and directories means something
    create_only: bool  #: put_exclusive is enforced by the backend
    local_path: bool  #: names map to local filesystem paths (mmap, O_DIRECT...)
    #: the bytes live in this process only (fsspec ``memory://``): a pickled copy in
    #: another process (a writer, a promoter) sees a different, empty store
    process_local: bool = False


class WriteHandle(ABC):
    """An open file being written sequentially."""

    @abstractmethod
    def write(self, data: memoryview | bytes) -> int:
        """Write all of ``data``; returns its length."""

    def write_held(self, data: memoryview | bytes) -> int:
        """Write all of ``data``, which the caller keeps valid and unchanged until this
        handle is fsynced, closed or aborted: a backend may write it asynchronously,
        with several requests in flight and no copy (O_DIRECT, multipart uploads).
        Errors surface at the latest from :meth:`fsync` or :meth:`close`."""
        return self.write(data)

    @abstractmethod
    def fsync(self) -> None:
        """Make written data durable (no-op where the backend has no such notion)."""

    @abstractmethod
    def close(self) -> None:
        """Close; on object stores this is what makes the object visible."""

    def abort(self) -> None:
        """Close without committing (object stores discard the upload)."""
        self.close()


def check_name(name: str) -> str:
    """Validate a relative name: no absolute paths, no ``..``, no empty or odd parts."""
    if not isinstance(name, str) or not name or "\x00" in name or "\\" in name:
        raise UnsafeCheckpointError(f"invalid file name in checkpoint: {name!r}")
    if name.startswith("/") or posixpath.normpath(name) != name:
        raise UnsafeCheckpointError(
            f"file name {name!r} is not a plain relative path; a checkpoint may only "
            "name files inside itself")
    if any(part in ("", ".", "..") for part in name.split("/")):
        raise UnsafeCheckpointError(f"file name {name!r} leaves the checkpoint directory")
    return name


class Storage(ABC):
    """Byte I/O rooted at one location. Instances are picklable (sent to writers).

    Optional abilities beyond these methods are the protocols of
    :mod:`ckptstore.storage.capabilities` (``isinstance(s, ObjectInfo)``...)."""

    capabilities: Capabilities

    @property
    @abstractmethod
    def url(self) -> str:
        """Where this storage is rooted, as a path or URL."""

    @abstractmethod
    def child(self, name: str) -> "Storage":
        """A storage rooted at ``name`` below this one."""

    # -- write side ---------------------------------------------------------
    @abstractmethod
    def makedirs(self) -> None:
        """Create the root (and parents); durable where the backend allows."""

    @abstractmethod
    def open_write(self, name: str) -> WriteHandle:
        """Create or truncate ``name`` for writing."""

    def open_bulk_write(self, name: str) -> WriteHandle:
        """Like :meth:`open_write`, for large data files written once and read later
        (shards): a backend may bypass its cache (O_DIRECT) or upload in parallel
        parts. Same durability contract as :meth:`open_write`. A wrapper or subclass
        that intercepts :meth:`open_write` must intercept this too."""
        return self.open_write(name)

    @abstractmethod
    def rename(self, src: str, dst: str) -> None:
        """Atomically replace ``dst`` by ``src`` (rename-capable backends only)."""

    @abstractmethod
    def link_exclusive(self, src: str, dst: str) -> None:
        """Make ``src`` visible as ``dst`` only if ``dst`` does not exist
        (``FileExistsError`` otherwise), then drop ``src``."""

    @abstractmethod
    def put_exclusive(self, name: str, data: bytes) -> None:
        """Create ``name`` holding ``data`` only if it does not exist yet."""

    @abstractmethod
    def fsync_dir(self, name: str = "") -> None:
        """Make directory entries (creates, renames, unlinks) durable."""

    @abstractmethod
    def remove(self, name: str) -> None:
        """Delete a file; a missing file is not an error."""

    # -- read side ----------------------------------------------------------
    @abstractmethod
    def exists(self, name: str) -> bool: ...

    @abstractmethod
    def size(self, name: str) -> int:
        """Size in bytes; ``FileNotFoundError`` if missing."""

    @abstractmethod
    def read(self, name: str, offset: int = 0, length: int | None = None) -> bytes:
        """Read ``length`` bytes at ``offset`` (to the end if None). Short reads
        at end of file return fewer bytes."""

    def map_file(self, name: str) -> "mmap.mmap | None":
        """A private (copy-on-write) memory map of the whole file, or None where the
        backend has no local files. Writes through the map never reach the file."""
        check_name(name)
        return None

    def readinto(self, name: str, offset: int, buf: memoryview) -> int:
        """Fill ``buf`` from ``offset``; returns the number of bytes read."""
        data = self.read(name, offset, len(buf))
        buf[: len(data)] = data
        return len(data)

    def cached_fraction(self, name: str) -> float | None:
        """Roughly which fraction of ``name`` is in the page cache (a few probes), or
        None where the backend cannot tell (the reader then reads, never maps)."""
        check_name(name)
        return None

    def read_extent(self, name: str, offset: int, length: int) -> memoryview:
        """Bytes ``[offset, offset + length)`` of ``name`` in new, writable memory that
        the caller owns (tensors may be views of it), read with large requests in
        parallel where the backend can (O_DIRECT on local disks, ranged requests on
        object stores). Shorter at the end of the file."""
        buf = bytearray(length)
        n = self.readinto(name, offset, memoryview(buf))
        return memoryview(buf)[:n]

    @abstractmethod
    def listdir(self, name: str = "") -> list[str]:
        """Entry names directly below ``name`` (files and directories)."""

    @abstractmethod
    def isdir(self, name: str) -> bool: ...

    @abstractmethod
    def mtime(self, name: str) -> float:
        """Modification time (seconds since the epoch)."""

    def rmtree(self, name: str) -> None:
        """Remove ``name`` and everything below it."""
        for entry in self.listdir(name):
            sub = f"{name}/{entry}" if name else entry
            if self.isdir(sub):
                self.rmtree(sub)
            else:
                self.remove(sub)
        self._rmdir(name)

    def _rmdir(self, name: str) -> None:  # object stores have no directories
        return None

    def at(self, url: str) -> "Storage":
        """A storage of the same backend and options rooted at ``url`` (used by
        :meth:`sibling` and :meth:`parent`; wrappers override those instead)."""
        raise UnsupportedOperationError(f"{type(self).__name__} cannot open another root")

    def sibling(self, name: str) -> "Storage":
        """The storage rooted at directory ``name`` next to this one (same parent);
        incremental checkpoints read files that an older sibling step holds."""
        check_name(name)
        if "/" in name:
            raise UnsafeCheckpointError(f"sibling name {name!r} must be one path component")
        return self.at(posixpath.join(posixpath.dirname(self.url.rstrip("/")), name))

    def parent(self) -> "Storage":
        """The storage rooted at the directory holding this one (where its siblings
        are); an overwrite looks there for steps that still read its files."""
        return self.at(posixpath.dirname(self.url.rstrip("/")) or "/")


class _LinkedObjectInfo:
    """:class:`ObjectInfo` of a :class:`LinkedView` whose storage has it."""

    def info(self, name: str) -> dict:
        return self._route(name).info(name)  # type: ignore[attr-defined]


class LinkedView(Storage):
    """Read-only view of a checkpoint whose manifest names files held by sibling
    checkpoints (``FileRecord.base``): each such name is read from that sibling.
    It implements the read-side capability protocols its storage implements."""

    _MIXINS: dict[type, type] = {ObjectInfo: _LinkedObjectInfo}

    def __new__(cls, storage: Storage, bases: dict[str, str]) -> "LinkedView":
        return remake(cls, storage, cls._MIXINS)

    def __reduce__(self):
        return remake, (plain_class(type(self)), self.storage, self._MIXINS), self.__dict__

    def __init__(self, storage: Storage, bases: dict[str, str]) -> None:
        self.storage = storage
        self.capabilities = storage.capabilities
        self._bases = dict(bases)
        self._siblings: dict[str, Storage] = {}

    def _route(self, name: str) -> Storage:
        base = self._bases.get(name)
        if base is None:
            return self.storage
        s = self._siblings.get(base)
        if s is None:
            s = self._siblings[base] = self.storage.sibling(base)
        return s

    @property
    def url(self) -> str:
        return self.storage.url

    def child(self, name: str) -> Storage:
        return self.storage.child(name)

    def sibling(self, name: str) -> Storage:
        return self.storage.sibling(name)

    def parent(self) -> Storage:
        return self.storage.parent()

    def makedirs(self) -> None:
        raise PermissionError("a linked checkpoint view is read-only")

    def open_write(self, name: str) -> WriteHandle:
        raise PermissionError("a linked checkpoint view is read-only")

    def rename(self, src: str, dst: str) -> None:
        self.makedirs()

    def link_exclusive(self, src: str, dst: str) -> None:
        self.makedirs()

    def put_exclusive(self, name: str, data: bytes) -> None:
        self.makedirs()

    def fsync_dir(self, name: str = "") -> None:
        if name:
            check_name(name)

    def remove(self, name: str) -> None:
        self.makedirs()

    def exists(self, name: str) -> bool:
        return self._route(name).exists(name)

    def size(self, name: str) -> int:
        return self._route(name).size(name)

    def read(self, name: str, offset: int = 0, length: int | None = None) -> bytes:
        return self._route(name).read(name, offset, length)

    def readinto(self, name: str, offset: int, buf: memoryview) -> int:
        return self._route(name).readinto(name, offset, buf)

    def map_file(self, name: str) -> "mmap.mmap | None":
        return self._route(name).map_file(name)

    def read_extent(self, name: str, offset: int, length: int) -> memoryview:
        return self._route(name).read_extent(name, offset, length)

    def cached_fraction(self, name: str) -> float | None:
        return self._route(name).cached_fraction(name)

    def listdir(self, name: str = "") -> list[str]:
        return self.storage.listdir(name)

    def isdir(self, name: str) -> bool:
        return self.storage.isdir(name)

    def mtime(self, name: str) -> float:
        return self._route(name).mtime(name)


def linked(storage: Storage, files) -> Storage:
    """``storage`` itself, or a :class:`LinkedView` when some of ``files``
    (manifest FileRecords) live in sibling checkpoints."""
    bases = {f.name: f.base for f in files if getattr(f, "base", None)}
    return LinkedView(storage, bases) if bases else storage


def wrapped_storages(storage: "Storage") -> "list[Storage]":
    """``storage`` and every Storage it wraps (fault injection, linked views), each once."""
    seen: set[int] = set()
    todo: list[Any] = [storage]
    out: list[Storage] = []
    while todo:
        obj = todo.pop()
        if id(obj) in seen:
            continue
        seen.add(id(obj))
        out.append(obj)
        todo.extend(v for v in getattr(obj, "__dict__", {}).values() if isinstance(v, Storage))
    return out
