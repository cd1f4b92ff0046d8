"""A CPU double of a CUDA device for the copy step (``ckptstore.staging.copy``).

Streams are FIFO worker threads; events are ``threading.Event``s set by the stream
when the work queued before them ran. The double's copies run on a side stream
after a delay and read the source tensor *when they run*, as a device-to-host copy
does, so ordering mistakes of the pipeline show up as wrong bytes in the
checkpoint, and every region's completion time is logged for ordering checks.
"""
from __future__ import annotations

import ctypes
import queue
import threading
import time
from collections.abc import Callable
from typing import Any

from ckptstore.plan.layout import FilePlan
from ckptstore.plan.tree import Leaf
from ckptstore.staging.arena import Arena
from ckptstore.staging.copy import host_object


class FakeStream:
    """Work runs in submission order on one thread, like a CUDA stream."""

    def __init__(self, name: str) -> None:
        self.q: queue.SimpleQueue = queue.SimpleQueue()
        self.errors: list[BaseException] = []
        threading.Thread(target=self._run, name=f"fake-stream-{name}", daemon=True).start()

    def _run(self) -> None:
        while True:
            fn, delay = self.q.get()
            if delay:
                time.sleep(delay)
            try:
                fn()
            except BaseException as e:  # kept for the test to see
                self.errors.append(e)

    def launch(self, fn: Callable[[], Any], delay: float = 0.0) -> None:
        self.q.put((fn, delay))

    def record(self) -> threading.Event:
        ev = threading.Event()
        self.launch(ev.set)
        return ev

    def wait_event(self, ev: threading.Event) -> None:
        self.launch(ev.wait)

    def synchronize(self) -> None:
        self.record().wait()


class FakeBatch:
    def __init__(self, ev: threading.Event, current: FakeStream, fail: BaseException | None) -> None:
        self.ev, self.current, self.fail = ev, current, fail

    def done(self) -> bool:
        return self.ev.is_set()

    def wait(self) -> None:
        self.ev.wait()
        if self.fail is not None:
            raise self.fail

    def fence(self) -> None:
        self.current.wait_event(self.ev)


class FakeDeviceCopier:
    """Every tensor is treated as device memory: copied later, on a side stream."""

    def __init__(self, current: FakeStream, delay: float = 0.05,
                 fail_file: int | None = None) -> None:
        self.current = current
        self.side = FakeStream("side")
        self.delay = delay
        self.fail_file = fail_file
        self.lock = threading.Lock()
        self.completed: dict[str, float] = {}  #: file name -> monotonic time its copies landed
        self.issued: list[str] = []
        self.closed = 0

    def session(self, leaves: list[Leaf]) -> "FakeSession":
        return FakeSession(self, leaves)

    def close(self) -> None:
        return None


class FakeSession:
    def __init__(self, dev: FakeDeviceCopier, leaves: list[Leaf]) -> None:
        self.dev, self.leaves = dev, leaves
        self.waited = False

    def copy(self, arena: Arena, offset: int, fp: FilePlan) -> FakeBatch:
        dev = self.dev
        if not self.waited:  # side stream ordered after the work queued on the current one
            dev.side.wait_event(dev.current.record())
            self.waited = True
        base = arena.tensor.data_ptr()
        for p in fp.pieces:
            if not p.length:
                continue
            value = self.leaves[p.tensor].value

            def run(value: Any = value, at: int = offset + p.offset, start: int = p.start,
                    n: int = p.length) -> None:
                obj, addr = host_object(value)  # read the source now, as the device would
                ctypes.memmove(base + at, addr + start, n)
                del obj
            dev.side.launch(run, self.dev.delay)

        def landed(name: str = fp.name) -> None:
            with dev.lock:
                dev.completed[name] = time.monotonic()
        dev.side.launch(landed)
        dev.issued.append(fp.name)
        fail = None
        if dev.fail_file is not None and len(dev.issued) - 1 == dev.fail_file:
            fail = RuntimeError("device copy failed (injected)")
        return FakeBatch(dev.side.record(), dev.current, fail)

    def close(self) -> None:
        self.dev.closed += 1
