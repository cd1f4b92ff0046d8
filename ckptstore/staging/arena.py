"""Staging memory: one reusable shared-memory arena, pinned when CUDA is present.

The arena is an anonymous ``memfd`` mapped by the trainer and by the writer
processes (they open it through ``/proc/<pid>/fd/<fd>``), so writers read staged
bytes without another copy and the memory disappears with the processes that map
it, even after a SIGKILL. It is allocated and touched once (fresh memory costs
~0.3 s/GB in page faults on this class of machine) and then reused by
every save; it only grows. A ring allocator hands out regions; with a
``staging_budget`` smaller than the state, regions are recycled as writers finish.
"""
from __future__ import annotations

import logging
import mmap
import os
import secrets
import tempfile
import threading
from collections import deque
from collections.abc import Callable

import torch

from ckptstore.staging.ref import ArenaRef

log = logging.getLogger("ckptstore.staging")

ALIGN = 4096


def _round_up(n: int, a: int = ALIGN) -> int:
    return (n + a - 1) // a * a


def _shared_fd() -> tuple[int, str | None]:
    """A file descriptor of anonymous shared memory and the path other processes
    open it by (``/proc/<pid>/fd/<fd>``): a ``memfd``, or where ``memfd_create`` is
    missing or refused (ENOSYS, EPERM under some sandboxes) a file in ``/dev/shm``
    unlinked at once, so nothing is left behind even after a SIGKILL. ``(-1, None)``
    where neither works (no ``/proc``)."""
    proc = f"/proc/{os.getpid()}/fd"
    if hasattr(os, "memfd_create"):
        try:
            fd = os.memfd_create("ckptstore-staging", os.MFD_CLOEXEC)
            return fd, f"{proc}/{fd}"
        except OSError as e:
            log.warning("memfd_create failed (%s); staging in an unlinked /dev/shm file", e)
    if os.path.isdir(proc):
        d = "/dev/shm" if os.path.isdir("/dev/shm") else tempfile.gettempdir()
        name = os.path.join(d, f"ckptstore-{os.getpid()}-{secrets.token_hex(6)}")
        fd = os.open(name, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        os.unlink(name)  # the memory lives while a process holds or maps it
        return fd, f"{proc}/{fd}"
    return -1, None


class Arena:
    """A shared, touched, optionally pinned block of host memory."""

    def __init__(self, size: int, pin: bool) -> None:
        self.size = max(_round_up(size), ALIGN)
        self._unlink: str | None = None
        self.fd, path = _shared_fd()
        if path is None:  # no /proc to reopen an unlinked file by: remove it at close
            d = "/dev/shm" if os.path.isdir("/dev/shm") else tempfile.gettempdir()
            path = os.path.join(d, f"ckptstore-{os.getpid()}-{secrets.token_hex(6)}")
            self.fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
            self._unlink = path
        os.ftruncate(self.fd, self.size)
        self.mm = mmap.mmap(self.fd, self.size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        if hasattr(mmap, "MADV_HUGEPAGE"):
            try:
                self.mm.madvise(mmap.MADV_HUGEPAGE)
            except OSError:
                pass
        self.tensor = torch.frombuffer(self.mm, dtype=torch.uint8)
        self.tensor.fill_(0)  # take the page faults now, not during a save
        self.pinned = False
        if pin and torch.cuda.is_available():
            rc = torch.cuda.cudart().cudaHostRegister(self.tensor.data_ptr(), self.size, 0)
            self.pinned = int(rc) == 0
            if not self.pinned:
                log.warning("cudaHostRegister failed (%s); staging is not pinned", rc)
        self.ref = ArenaRef(path, self.size, secrets.token_hex(8))

    def close(self) -> None:
        if self.pinned:
            torch.cuda.cudart().cudaHostUnregister(self.tensor.data_ptr())
            self.pinned = False
        del self.tensor
        try:
            self.mm.close()
        except BufferError:  # a view is still alive; the mapping goes with it
            pass
        os.close(self.fd)
        if self._unlink:
            os.unlink(self._unlink)


class Ring:
    """FIFO region allocator over an arena.

    ``alloc(n)`` returns an offset; regions are freed in any order but reused in
    allocation order. ``alloc`` blocks (calling ``wait_oldest``) while the region
    would overlap memory still being written.
    """

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.head = 0
        self.live: deque[list] = deque()  # [start, end, freed]
        self.cv = threading.Condition()

    def alloc(self, n: int, before_wait: Callable[[], None] | None = None) -> tuple[int, list]:
        """A region of ``n`` bytes; ``before_wait`` runs (unlocked) before blocking."""
        n = _round_up(max(n, 1))
        if n > self.capacity:
            raise ValueError(f"region of {n} bytes exceeds the staging capacity {self.capacity}")
        with self.cv:
            start = self.head if self.head + n <= self.capacity else 0
            if before_wait is not None and not self._free_for(start, n):
                self.cv.release()
                try:
                    before_wait()
                finally:
                    self.cv.acquire()
            while not self._free_for(start, n):
                self.cv.wait()
                self._drop_freed()
            region = [start, start + n, False]
            self.live.append(region)
            self.head = start + n
            return start, region

    def _drop_freed(self) -> None:
        while self.live and self.live[0][2]:
            self.live.popleft()

    def _free_for(self, start: int, n: int) -> bool:
        self._drop_freed()
        return all(r[2] or r[1] <= start or r[0] >= start + n for r in self.live)

    def free(self, region: list) -> None:
        with self.cv:
            region[2] = True
            self._drop_freed()
            self.cv.notify_all()


class StagingPool:
    """Owns the arena; grows it between saves when a larger one is needed."""

    def __init__(self, pin: bool = True) -> None:
        self.pin = pin
        self.arena: Arena | None = None

    def ensure(self, capacity: int) -> Arena:
        if self.arena is None or self.arena.size < capacity:
            if self.arena is not None:
                self.arena.close()
                self.arena = None
            log.debug("allocating %d bytes of staging memory", capacity)
            self.arena = Arena(capacity, self.pin)
        return self.arena

    def close(self) -> None:
        if self.arena is not None:
            self.arena.close()
            self.arena = None
