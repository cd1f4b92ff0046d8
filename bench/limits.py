"""Hardware limits for the same bytes: memcpy, fsync'd sequential write, cold/warm read.

Page-cache dropping: ``posix_fadvise(POSIX_FADV_DONTNEED)`` on each file after it
was fsync'd (clean pages are dropped; it touches nothing but our own files, which
matters on a shared machine). ``/proc/sys/vm/drop_caches`` is used only when asked
for and writable. ``resident_fraction`` checks, with mincore(2), that the drop worked.
"""
from __future__ import annotations

import concurrent.futures as cf
import ctypes
import ctypes.util
import mmap
import os
import time
from pathlib import Path

import numpy as np
import torch

from ckptstore.storage.direct import drop_cached

WRITE_CHUNK = 64 << 20  # large os.write calls, like dd bs=64M


class CacheDropper:
    """Drops the page cache of files; ``method`` says which mechanism was used."""

    def __init__(self, use_drop_caches: bool = False) -> None:
        self.method = "posix_fadvise(POSIX_FADV_DONTNEED) per file after fsync"
        self._global = False
        if use_drop_caches and os.access("/proc/sys/vm/drop_caches", os.W_OK):
            try:
                self._write_drop_caches()
                self._global = True
                self.method = "sync + /proc/sys/vm/drop_caches (3)"
            except OSError:
                pass

    @staticmethod
    def _write_drop_caches() -> None:
        os.sync()
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")

    def drop(self, path: str | os.PathLike[str]) -> None:
        """Drop cached pages of ``path`` (a file, or every file under a directory)."""
        if self._global:
            self._write_drop_caches()
            return
        drop_cached(path)


def _files(p: Path) -> list[Path]:
    if p.is_dir():
        return sorted(q for q in p.rglob("*") if q.is_file())
    return [p]


def resident_fraction(path: str | os.PathLike[str]) -> float | None:
    """Fraction of the pages of ``path`` (file or directory) in the page cache, via mincore."""
    libc_name = ctypes.util.find_library("c")
    if libc_name is None:
        return None
    libc = ctypes.CDLL(libc_name, use_errno=True)
    libc.mmap.restype = ctypes.c_void_p
    libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int,
                          ctypes.c_int, ctypes.c_long]
    libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
    libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    page = mmap.PAGESIZE
    resident = total = 0
    for f in _files(Path(path)):
        size = f.stat().st_size
        if size == 0:
            continue
        fd = os.open(f, os.O_RDONLY)
        try:
            addr = libc.mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, fd, 0)
            if addr in (None, ctypes.c_void_p(-1).value):
                return None
            try:
                npages = (size + page - 1) // page
                vec = (ctypes.c_ubyte * npages)()
                if libc.mincore(addr, size, vec) != 0:
                    return None
                resident += sum(b & 1 for b in bytes(vec))
                total += npages
            finally:
                libc.munmap(addr, size)
        finally:
            os.close(fd)
    return resident / total if total else None


def byte_views(tensors: list[torch.Tensor]) -> list[memoryview]:
    """Zero-copy byte views of CPU tensors (for os.write)."""
    out = []
    for t in tensors:
        t = t.detach().contiguous()
        out.append(memoryview(t.view(torch.uint8).reshape(-1).numpy()))
    return out


def scratch_buffer(nbytes: int, pinned: bool = False) -> torch.Tensor:
    """One preallocated, page-aligned byte buffer (O_DIRECT needs the alignment),
    touched once, shared by the memcpy, write and read limits."""
    if pinned:
        buf = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
    else:
        buf = torch.frombuffer(mmap.mmap(-1, max(nbytes, 1)), dtype=torch.uint8)[:nbytes]
    buf.fill_(0)  # touch every page once: the cost a reused buffer never pays again
    return buf


class MemcpyLimit:
    """Copy of the state's bytes into a preallocated, already-touched buffer.

    On CPU two copies are timed per run: torch ``copy_`` (OpenMP, all intra-op
    threads) and numpy slice assignment (one thread, plain memcpy). Under load
    from other processes the OpenMP copy can collapse (its threads wait on each
    other), so the limit is the faster of the two in the same run. With CUDA
    tensors and a pinned ``dst`` this is the pinned device-to-host copy.
    """

    def __init__(self, tensors: list[torch.Tensor], dst: torch.Tensor) -> None:
        self.src = [t.detach().reshape(-1).view(torch.uint8) for t in tensors]
        self.cuda = any(s.is_cuda for s in self.src)
        self.dst = dst
        if not self.cuda:
            self.np_src = [s.numpy() for s in self.src]
            self.np_dst = dst.numpy()
        self.measure()

    def _torch(self) -> float:
        if self.cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        off = 0
        for s in self.src:
            n = s.numel()
            self.dst[off : off + n].copy_(s, non_blocking=self.cuda)
            off += n
        if self.cuda:
            torch.cuda.synchronize()
        return time.perf_counter() - t0

    def _numpy(self) -> float:
        t0 = time.perf_counter()
        off = 0
        for s in self.np_src:
            self.np_dst[off : off + s.size] = s
            off += s.size
        return time.perf_counter() - t0

    def measure(self) -> dict[str, float]:
        """``total`` is the limit (fastest variant); each variant is kept too."""
        if self.cuda:
            return {"total": self._torch()}
        t, n = self._torch(), self._numpy()
        return {"total": min(t, n), "torch_copy": t, "numpy_copy": n}

    def run(self) -> float:
        """Seconds of the fastest copy."""
        return self.measure()["total"]


def disk_write(path: Path, views: list[memoryview]) -> float:
    """Seconds to write the bytes sequentially with large os.write calls and fsync."""
    t0 = time.perf_counter()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        for v in views:
            for off in range(0, len(v), WRITE_CHUNK):
                chunk = v[off : off + WRITE_CHUNK]
                while len(chunk):
                    chunk = chunk[os.write(fd, chunk):]
        os.fsync(fd)
    finally:
        os.close(fd)
    _fsync_dir(path.parent)
    return time.perf_counter() - t0


def _fsync_dir(path: Path) -> None:
    """Make the directory entry of a file just written durable, as the engine does."""
    dfd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)


DIRECT_BLOCK = 16 << 20  #: one O_DIRECT request
DIRECT_INFLIGHT = 4  #: requests in flight


def disk_write_direct(path: Path, view: memoryview) -> float | None:
    """Seconds to write the bytes with O_DIRECT, ``DIRECT_INFLIGHT`` requests of
    ``DIRECT_BLOCK`` bytes in flight, then fsync of file and directory: what the
    device itself sustains without the page cache. None where O_DIRECT is refused
    or ``view`` is not page-aligned."""
    direct = getattr(os, "O_DIRECT", 0)
    n = len(view) - len(view) % 4096
    if not direct or n == 0 or int(np.frombuffer(view, np.uint8).ctypes.data) % 4096:
        return None
    t0 = time.perf_counter()
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | direct, 0o644)
    except OSError:
        return None
    try:
        blocks = [(o, min(o + DIRECT_BLOCK, n)) for o in range(0, n, DIRECT_BLOCK)]

        def put(a: int, b: int) -> None:
            done = a
            while done < b:
                done += os.pwrite(fd, view[done:b], done)

        with cf.ThreadPoolExecutor(DIRECT_INFLIGHT) as ex:
            for f in [ex.submit(put, a, b) for a, b in blocks]:
                f.result()
        os.fsync(fd)
    except OSError:
        return None
    finally:
        os.close(fd)
    _fsync_dir(path.parent)
    return time.perf_counter() - t0


def read_fresh(path: Path) -> float:
    """Seconds to read ``path`` into newly allocated memory (what a load that returns
    new tensors pays on top of the device: page faults of fresh memory), with the
    same O_DIRECT requests in flight as the engine's reads)."""
    t0 = time.perf_counter()
    size = path.stat().st_size
    size += -size % 4096  # O_DIRECT reads whole pages; the last one comes back short
    buf = mmap.mmap(-1, max(size, 1))
    view = memoryview(buf)
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECT", 0))
    except OSError:
        fd = os.open(path, os.O_RDONLY)
    try:
        def get(a: int, b: int) -> None:
            done = a
            while done < b:
                n = os.preadv(fd, [view[done:b]], done)
                if n <= 0:
                    break
                done += n

        blocks = [(o, min(o + DIRECT_BLOCK, size)) for o in range(0, size, DIRECT_BLOCK)]
        with cf.ThreadPoolExecutor(DIRECT_INFLIGHT) as ex:
            for f in [ex.submit(get, a, b) for a, b in blocks]:
                f.result()
    finally:
        os.close(fd)
    elapsed = time.perf_counter() - t0
    view.release()
    buf.close()
    return elapsed


class DiskRead:
    """Sequential read of a file into a preallocated, touched buffer (readv)."""

    def __init__(self, buf: torch.Tensor) -> None:
        self.view = memoryview(buf.numpy())

    def run(self, path: Path) -> float:
        """Seconds to read ``path`` (up to the buffer's size)."""
        t0 = time.perf_counter()
        fd = os.open(path, os.O_RDONLY)
        try:
            off = 0
            size = min(os.fstat(fd).st_size, len(self.view))
            while off < size:
                n = os.readv(fd, [self.view[off : min(off + WRITE_CHUNK, size)]])
                if n <= 0:
                    break
                off += n
        finally:
            os.close(fd)
        return time.perf_counter() - t0


def dir_bytes(path: str | os.PathLike[str]) -> int:
    """Bytes on disk (sum of file sizes) under ``path``."""
    return sum(f.stat().st_size for f in _files(Path(path)))
