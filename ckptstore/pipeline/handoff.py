"""Hand staged files to the writers, each only once its copies have completed.

One thread per save takes the files in plan order: it blocks on the file's copy
batch (a CUDA event synchronisation, never a busy wait), then on the release of
the writers, then submits the file job. Until then a writer cannot read a byte of
the file's staging region, so no file is hashed or written from a region whose
copy is still in flight.

Writers are *held* while the caller is still copying: on a machine with few cores
they would otherwise take CPU and memory bandwidth from the copy the training
step waits for. The stage loop releases them when it has issued every copy, or
earlier when the staging ring is full and needs finished files to make room.
"""
from __future__ import annotations

import concurrent.futures as cf
import queue
import threading
from collections.abc import Callable
from typing import Any

from ckptstore.staging.copy import CopyBatch, CopySession

Submit = Callable[[], cf.Future]


class Handoff:
    """Per save: (copy batch, submit) pairs in, one outer future per file out."""

    def __init__(self, session: CopySession) -> None:
        self.session = session
        self.batches: list[CopyBatch] = []
        self._released = threading.Event()
        self._q: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name="ckptstore-handoff", daemon=True)
        self._thread.start()

    def put(self, batch: CopyBatch, submit: Submit, on_end: Callable[[], None]) -> cf.Future:
        """Queue one file; ``on_end`` runs once its job ended or will never run."""
        outer: cf.Future = cf.Future()
        self.batches.append(batch)
        self._q.put((batch, submit, on_end, outer))
        return outer

    def release(self) -> None:
        """Let writers start (idempotent)."""
        self._released.set()

    def close(self) -> None:
        """No more files: release the writers; the thread ends after the last one."""
        self.release()
        self._q.put(None)

    def wait_copied(self) -> None:
        """Block until every queued file's copies completed."""
        for b in list(self.batches):
            b.wait()

    def _run(self) -> None:
        while True:
            item = self._q.get()
            if item is None:
                break
            batch, submit, on_end, outer = item
            try:
                batch.wait()
                self._released.wait()
            except BaseException as e:  # a failed device copy fails its file's job
                _fail(outer, e, on_end)
                continue
            if not outer.set_running_or_notify_cancel():  # discarded before it started
                on_end()
                continue
            try:
                inner = submit()
            except BaseException as e:
                outer.set_exception(e)
                on_end()
                continue
            inner.add_done_callback(lambda f, outer=outer, on_end=on_end: _chain(f, outer, on_end))
        self.session.close()  # every batch completed: temporaries may go


def _fail(outer: cf.Future, e: BaseException, on_end: Callable[[], None]) -> None:
    if outer.set_running_or_notify_cancel():
        outer.set_exception(e)
    on_end()


def _chain(inner: cf.Future, outer: cf.Future, on_end: Callable[[], None]) -> None:
    on_end()  # the writer no longer reads the region
    if inner.cancelled():
        outer.set_exception(cf.CancelledError())
    elif inner.exception() is not None:
        outer.set_exception(inner.exception())
    else:
        outer.set_result(inner.result())
