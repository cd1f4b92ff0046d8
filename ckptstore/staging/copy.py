"""The copy step: every piece of a planned file into its staging region.

The pipeline sees only this small interface, so that its ordering can be tested
without a GPU by a double that completes copies later on another thread::

    session = copier.session(leaves)          # one per save
    batch = session.copy(arena, offset, fp)   # issue one file's copies
    batch.wait()      # block (never spin) until every byte of the file is staged
    batch.fence()     # order the producer's later work after these copies
    session.close()   # once every batch completed: drop the temporaries

:class:`DeviceCopier` is the real one. Host memory is copied with ``memmove``,
split over the calling thread and helper threads (:class:`HostCopies`), before
``copy`` returns, so a host-only batch is already complete. CUDA tensors are
copied device-to-host on a side stream per device that first waits for the work
already queued on the current stream; temporaries
(contiguous copies, resolved conj/neg views) are made on that side stream after
the wait, so freeing them is ordered after the copies, and every source tensor is
referenced until ``close`` (after its copies landed), so the caching allocator
cannot hand its memory to other work while a copy reads it. One CUDA event per device and file
is recorded after its copies: ``wait`` synchronises on the events, ``fence`` makes
the current stream wait for them (a later kernel that overwrites a parameter then
runs after the copy).
"""
from __future__ import annotations

import concurrent.futures as cf
import ctypes
import os
from typing import Any, Protocol

import numpy as np
import torch

from ckptstore.plan.layout import FilePlan
from ckptstore.plan.tree import Leaf
from ckptstore.staging.arena import Arena


class CopyBatch(Protocol):
    """The copies of one file, issued and perhaps still running."""

    def done(self) -> bool: ...

    def wait(self) -> None: ...

    def fence(self) -> None: ...


class CopySession(Protocol):
    """The copies of one save."""

    def copy(self, arena: Arena, offset: int, fp: FilePlan) -> CopyBatch: ...

    def close(self) -> None: ...


class Copier(Protocol):
    def session(self, leaves: list[Leaf]) -> CopySession: ...

    def close(self) -> None: ...


class Completed:
    """A batch whose copies all finished before ``copy`` returned."""

    def done(self) -> bool:
        return True

    def wait(self) -> None:
        return None

    def fence(self) -> None:
        return None


COMPLETED = Completed()


class CudaBatch:
    """One event per device, recorded on its side stream after the file's copies."""

    def __init__(self, events: list[tuple[torch.device, Any]]) -> None:
        self.events = events

    def done(self) -> bool:
        return all(ev.query() for _, ev in self.events)

    def wait(self) -> None:
        for _, ev in self.events:  # cudaEventSynchronize: blocks the thread, no spinning
            ev.synchronize()

    def fence(self) -> None:
        for dev, ev in self.events:
            torch.cuda.current_stream(dev).wait_event(ev)


def byte_view(t: torch.Tensor) -> torch.Tensor:
    """The raw bytes of a contiguous tensor as a 1-D uint8 tensor (no copy)."""
    n = t.numel() * t.element_size()
    out = torch.empty(0, dtype=torch.uint8, device=t.device)
    return out.set_(t.untyped_storage(), t.storage_offset() * t.element_size(), (n,), (1,))


def logical(t: torch.Tensor) -> torch.Tensor:
    """``t`` with lazy conjugate/negative bits applied: its memory then holds the
    values it shows (a conj or neg view's raw memory does not)."""
    t = t.detach()
    if t.is_conj():
        t = t.resolve_conj()
    if t.is_neg():
        t = t.resolve_neg()
    return t


def host_object(value: Any) -> tuple[Any, int]:
    """A C-contiguous host object holding ``value``'s bytes, and its address (the
    object must stay referenced while the address is used)."""
    if isinstance(value, torch.Tensor):
        t = logical(value)
        if not t.is_contiguous():
            t = t.contiguous()
        return t, t.data_ptr()
    a = np.ascontiguousarray(value)
    return a, a.ctypes.data


class SideStreams:
    """One CUDA copy stream per device, created on first use and kept for the
    lifetime of the engine that owns this object."""

    def __init__(self) -> None:
        self._streams: dict[torch.device, Any] = {}

    def get(self, device: torch.device) -> Any:
        if device not in self._streams:
            self._streams[device] = torch.cuda.Stream(device=device)
        return self._streams[device]


#: below this many bytes a file's host copies run on the calling thread alone
PARALLEL_MIN = 8 << 20


def copy_threads() -> int:
    """Threads that copy host memory (``CKPTSTORE_COPY_THREADS``; default
    min(4, CPUs)): one core's memcpy does not reach the memory bandwidth."""
    env = os.environ.get("CKPTSTORE_COPY_THREADS", "").strip()
    if env:
        try:
            return max(1, int(env))
        except ValueError:
            raise ValueError(f"CKPTSTORE_COPY_THREADS must be a positive integer, not {env!r}") from None
    return max(1, min(4, os.cpu_count() or 1))


class HostCopies:
    """``memmove`` jobs split by bytes over the calling thread and helper threads
    (the GIL is released during each ``memmove``)."""

    def __init__(self, threads: int) -> None:
        self.threads = threads
        self._pool: cf.ThreadPoolExecutor | None = None

    def run(self, jobs: list[tuple[int, int, int]]) -> None:
        """Run every (dst, src, n) job; returns when all are done."""
        total = sum(n for _, _, n in jobs)
        if self.threads < 2 or total < PARALLEL_MIN:
            _memmove_all(jobs)
            return
        if self._pool is None:
            self._pool = cf.ThreadPoolExecutor(self.threads - 1, thread_name_prefix="ckptstore-copy")
        parts = _split(jobs, total, self.threads)
        futures = [self._pool.submit(_memmove_all, part) for part in parts[1:]]
        _memmove_all(parts[0])
        for f in futures:
            f.result()

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None


def _memmove_all(jobs: list[tuple[int, int, int]]) -> None:
    for d, src, n in jobs:
        ctypes.memmove(d, src, n)


def _split(jobs: list[tuple[int, int, int]], total: int, k: int) -> list[list[tuple[int, int, int]]]:
    """``jobs`` cut into ``k`` lists of about ``total / k`` bytes each (a job may be
    cut; the part before a cut is a multiple of 4 KiB long)."""
    share = -(-total // k)
    parts: list[list[tuple[int, int, int]]] = [[]]
    room = share
    for d, src, n in jobs:
        while n:
            if room <= 0 and len(parts) < k:
                parts.append([])
                room = share
            take = n if len(parts) == k else min(n, max(room, 0))
            if take < n:
                take = min(n, -(-take // 4096) * 4096)
            parts[-1].append((d, src, take))
            d, src, n, room = d + take, src + take, n - take, room - take
    return parts


class DeviceCopier:
    """Host copies by ``memmove`` (split over threads); CUDA copies on side
    streams, tracked by events."""

    def __init__(self) -> None:
        self.streams = SideStreams()
        self.host = HostCopies(copy_threads())

    def session(self, leaves: list[Leaf]) -> "DeviceSession":
        return DeviceSession(self.streams, self.host, leaves)

    def close(self) -> None:
        self.host.close()


class DeviceSession:
    def __init__(self, streams: SideStreams, host: HostCopies, leaves: list[Leaf]) -> None:
        self.streams, self.host, self.leaves = streams, host, leaves
        self.sides: dict[torch.device, Any] = {}  # devices whose side stream waited already
        # The source of the tensor being copied, kept while its pieces (consecutive in
        # plan order, possibly over several files) are copied: a tensor made contiguous
        # once, not once per piece, and only one such temporary alive at a time.
        self.device_src: tuple[int, torch.Tensor] | None = None
        self.host_src: tuple[int, Any, int] | None = None
        self.keep: list[torch.Tensor] = []  # CUDA sources, until their copies landed

    def _side(self, dev: torch.device) -> Any:
        side = self.sides.get(dev)
        if side is None:  # copies (and temporaries) ordered after the queued compute
            side = self.streams.get(dev)
            side.wait_stream(torch.cuda.current_stream(dev))
            self.sides[dev] = side
        return side

    def _device_source(self, tid: int, value: torch.Tensor, side: Any) -> torch.Tensor:
        if self.device_src is None or self.device_src[0] != tid:
            # held until close() (after every copy of the save landed): the caching
            # allocator cannot give its memory to other work while the copy reads it,
            # even if the caller drops the tensor right after save() returns
            self.keep.append(value)
            with torch.cuda.stream(side):  # temporaries (conj/neg resolved, contiguous) are
                # made on the side stream, after its wait, and freeing them is ordered
                # after the copies queued there
                t = logical(value)
                src = byte_view(t if t.is_contiguous() else t.contiguous())
            self.device_src = (tid, src)
        return self.device_src[1]

    def _host_source(self, tid: int, value: Any) -> tuple[Any, int]:
        if self.host_src is None or self.host_src[0] != tid:
            self.host_src = None  # free the previous temporary first
            obj, addr = host_object(value)
            self.host_src = (tid, obj, addr)
        return self.host_src[1], self.host_src[2]

    def copy(self, arena: Arena, offset: int, fp: FilePlan) -> CopyBatch:
        used: dict[torch.device, Any] = {}
        base = arena.tensor.data_ptr()
        jobs: list[tuple[int, int, int]] = []
        hold: list[Any] = []
        for p in fp.pieces:
            if not p.length:
                continue
            value = self.leaves[p.tensor].value
            at = offset + p.offset
            if isinstance(value, torch.Tensor) and value.is_cuda:
                dev = value.device
                side = used[dev] = self._side(dev)
                src = self._device_source(p.tensor, value, side)
                with torch.cuda.stream(side):
                    arena.tensor[at:at + p.length].copy_(src[p.start:p.start + p.length],
                                                         non_blocking=arena.pinned)
            elif isinstance(value, torch.Tensor) and value.device.type != "cpu":
                # other accelerators: a synchronous copy through torch
                src = byte_view(logical(value).contiguous())[p.start:p.start + p.length]
                arena.tensor[at:at + p.length].copy_(src)
            else:
                # Host memory: memcpy jobs, run below with the GIL released. (torch's
                # copy_ fans out to OpenMP threads, which on a busy machine made the
                # stall 4-12x slower than a plain memcpy.)
                obj, addr = self._host_source(p.tensor, value)
                hold.append(obj)  # alive until the jobs ran
                jobs.append((base + at, addr + p.start, p.length))
        if jobs:
            self.host.run(jobs)
        del hold
        if not used:
            return COMPLETED
        events = []
        for dev, side in used.items():
            ev = torch.cuda.Event(blocking=True)  # synchronize() sleeps, never spins
            ev.record(side)
            events.append((dev, ev))
        return CudaBatch(events)

    def close(self) -> None:
        """Called once every batch of the session completed."""
        self.device_src = self.host_src = None
        self.keep.clear()
