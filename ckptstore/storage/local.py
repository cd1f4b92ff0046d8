"""Local POSIX filesystem backend: O_NOFOLLOW opens, fsync, rename, link."""
from __future__ import annotations

import errno
import mmap
import os
import stat

from ckptstore.errors import DestinationNotWritableError, StorageError, UnsafeCheckpointError
from ckptstore.storage import direct
from ckptstore.storage.base import Capabilities, Storage, WriteHandle, check_name

# O_NONBLOCK: opening a FIFO planted in a checkpoint must not block forever (the
# S_ISREG check then refuses it); it changes nothing for regular files.
_READ_FLAGS = (os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)
               | getattr(os, "O_NONBLOCK", 0))
_WRITE_FLAGS = (os.O_WRONLY | os.O_CREAT | os.O_TRUNC
                | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0))


class LocalWriteHandle(WriteHandle):
    """A file descriptor written with ``os.write`` (short writes are resumed)."""

    __slots__ = ("fd", "path")

    def __init__(self, fd: int, path: str) -> None:
        self.fd = fd
        self.path = path

    def write(self, data: memoryview | bytes) -> int:
        view = memoryview(data).cast("B")
        total = len(view)
        done = 0
        while done < total:
            n = os.write(self.fd, view[done:done + (1 << 30)])
            if n <= 0:
                raise StorageError(errno.EIO, f"write returned {n}", self.path)
            done += n
        return total

    def fsync(self) -> None:
        os.fsync(self.fd)

    def close(self) -> None:
        if self.fd >= 0:
            fd, self.fd = self.fd, -1
            os.close(fd)


class LocalStorage(Storage):
    """Files below a local directory."""

    capabilities = Capabilities(rename=True, fsync=True, create_only=True, local_path=True)

    def __init__(self, root: str | os.PathLike) -> None:
        self.root = os.path.abspath(os.fspath(root))

    def __repr__(self) -> str:
        return f"LocalStorage({self.root!r})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, LocalStorage) and other.root == self.root

    def __hash__(self) -> int:
        return hash(self.root)

    @property
    def url(self) -> str:
        return self.root

    def path(self, name: str) -> str:
        """The local path of ``name`` (checked to stay below the root); ``""`` is
        the root itself (directory operations)."""
        if name == "":
            return self.root
        return os.path.join(self.root, check_name(name))

    def _file(self, name: str) -> str:
        """The local path of file ``name``: like :meth:`path`, but the root is no file."""
        return os.path.join(self.root, check_name(name))

    def child(self, name: str) -> "LocalStorage":
        return LocalStorage(self._file(name))

    def at(self, url: str) -> "LocalStorage":
        return LocalStorage(url)

    def sibling(self, name: str) -> "LocalStorage":
        """Like :meth:`Storage.sibling`, refusing a sibling that resolves (through a
        symlink) outside the directory holding this one: a manifest's base name
        must never lead a read out of its run."""
        out = super().sibling(name)
        assert isinstance(out, LocalStorage)
        here = os.path.realpath(os.path.dirname(self.root))
        if os.path.dirname(os.path.realpath(out.root)) != here:
            raise UnsafeCheckpointError(
                f"sibling checkpoint {name!r} of {self.root} resolves to "
                f"{os.path.realpath(out.root)}, outside {here}: refusing to follow it")
        return out

    def makedirs(self) -> None:
        missing = []
        p = self.root
        while not os.path.isdir(p):
            missing.append(p)
            p = os.path.dirname(p)
        os.makedirs(self.root, exist_ok=True)
        # New directory entries are only durable once their parents are fsynced.
        for d in reversed(missing):
            _fsync_dir(os.path.dirname(d))

    def check_writable(self) -> None:
        """Refuse, before a save stages anything, a root that cannot be created or
        written: a file on the way, a read-only file system, no write permission."""
        p = self.root
        while not os.path.lexists(p):
            p = os.path.dirname(p)
        if not os.path.isdir(p):
            raise DestinationNotWritableError(
                errno.ENOTDIR, f"cannot save to {self.root}: {p} is a file, not a directory; "
                "save to a directory path (a checkpoint is a directory)", p)
        if not os.access(p, os.W_OK | os.X_OK):
            readonly = bool(os.statvfs(p).f_flag & os.ST_RDONLY)
            why = "is on a read-only file system" if readonly else "is not writable by this user"
            raise DestinationNotWritableError(
                errno.EROFS if readonly else errno.EACCES,
                f"cannot save to {self.root}: {p} {why}; save to a writable directory "
                "(or fix its permissions)", p)

    def open_write(self, name: str) -> LocalWriteHandle:
        path = self._file(name)
        return LocalWriteHandle(os.open(path, _WRITE_FLAGS, 0o644), path)

    def open_bulk_write(self, name: str) -> WriteHandle:
        """O_DIRECT where the file system takes it (:mod:`ckptstore.storage.direct`)."""
        path = self._file(name)
        fd = direct.open_direct(path, _WRITE_FLAGS)
        return direct.DirectWriteHandle(fd, path)

    def rename(self, src: str, dst: str) -> None:
        os.rename(self._file(src), self._file(dst))

    def link_exclusive(self, src: str, dst: str) -> None:
        # link(2) fails with EEXIST where rename(2) would silently replace.
        os.link(self._file(src), self._file(dst))
        os.unlink(self._file(src))

    def put_exclusive(self, name: str, data: bytes) -> None:
        fd = os.open(self._file(name), _WRITE_FLAGS | os.O_EXCL, 0o644)
        h = LocalWriteHandle(fd, self._file(name))
        try:
            h.write(data)
            h.fsync()
        finally:
            h.close()

    def fsync_dir(self, name: str = "") -> None:
        _fsync_dir(self.path(name))

    def remove(self, name: str) -> None:
        try:
            os.unlink(self._file(name))
        except FileNotFoundError:
            pass

    def _rmdir(self, name: str) -> None:
        try:
            os.rmdir(self.path(name))
        except FileNotFoundError:
            pass

    def exists(self, name: str) -> bool:
        return os.path.lexists(self.path(name))

    def _open_read(self, name: str) -> int:
        path = self._file(name)
        try:
            fd = os.open(path, _READ_FLAGS)
        except OSError as e:
            if e.errno == errno.ELOOP:
                raise UnsafeCheckpointError(
                    f"{path} is a symbolic link; checkpoint files must be regular files "
                    "inside the checkpoint") from None
            raise
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            os.close(fd)
            raise UnsafeCheckpointError(f"{path} is not a regular file")
        if "/" in name:  # a symlinked directory component could lead outside
            real = os.path.realpath(path)
            if not real.startswith(os.path.realpath(self.root) + os.sep):
                os.close(fd)
                raise UnsafeCheckpointError(f"{path} resolves outside the checkpoint: {real}")
        return fd

    def size(self, name: str) -> int:
        st = os.lstat(self._file(name))
        if stat.S_ISLNK(st.st_mode):
            raise UnsafeCheckpointError(f"{self._file(name)} is a symbolic link")
        return st.st_size

    def read(self, name: str, offset: int = 0, length: int | None = None) -> bytes:
        fd = self._open_read(name)
        try:
            if length is None:
                length = max(0, os.fstat(fd).st_size - offset)
            buf = bytearray(length)
            n = _pread_into(fd, memoryview(buf), offset)
            return bytes(buf[:n]) if n < length else bytes(buf)
        finally:
            os.close(fd)

    def readinto(self, name: str, offset: int, buf: memoryview) -> int:
        fd = self._open_read(name)
        try:
            return _pread_into(fd, memoryview(buf).cast("B"), offset)
        finally:
            os.close(fd)

    def read_extent(self, name: str, offset: int, length: int) -> memoryview:
        fd = self._open_read(name)  # same checks as reads: no symlinks, regular file
        try:
            direct.prefer_direct(fd)
            return direct.read_extent(fd, offset, length)
        finally:
            os.close(fd)

    def cached_fraction(self, name: str) -> float | None:
        fd = self._open_read(name)
        try:
            return direct.cached_fraction(fd)
        finally:
            os.close(fd)

    def map_file(self, name: str) -> mmap.mmap | None:
        fd = self._open_read(name)  # same checks as reads: no symlinks, regular file
        try:
            if os.fstat(fd).st_size == 0:
                return None
            return mmap.mmap(fd, 0, access=mmap.ACCESS_COPY)
        finally:
            os.close(fd)

    def listdir(self, name: str = "") -> list[str]:
        try:
            return sorted(os.listdir(self.path(name)))
        except FileNotFoundError:
            return []

    def isdir(self, name: str) -> bool:
        p = self.path(name)
        return os.path.isdir(p) and not os.path.islink(p)

    def mtime(self, name: str) -> float:
        return os.lstat(self._file(name)).st_mtime


def _pread_into(fd: int, view: memoryview, offset: int) -> int:
    done = 0
    total = len(view)
    while done < total:
        n = os.preadv(fd, [view[done:done + (1 << 30)]], offset + done)
        if n == 0:
            break
        done += n
    return done


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0) | getattr(os, "O_CLOEXEC", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
