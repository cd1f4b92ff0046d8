"""The engine: what one process keeps between saves, with an explicit lifetime.

It owns the writer processes, the staging arena, the plan cache, the copy step
(CUDA side streams) and the save in flight. It is created by the first save, closed by
:func:`shutdown` (and at interpreter exit); a later save starts a new one.
"""
from __future__ import annotations

import atexit
import concurrent.futures.process  # noqa: F401 - its exit hook must be registered before ours
import concurrent.futures.thread  # noqa: F401 - likewise
import contextlib
import errno
import logging
import multiprocessing.util
import threading
from collections.abc import Callable, Iterator

from ckptstore.errors import StagingBusyError, StorageError
from ckptstore.pipeline.handle import SaveHandle, SaveResult
from ckptstore.pipeline.writer import WriterPool
from ckptstore.plan.cache import PlanCache
from ckptstore.staging.arena import StagingPool
from ckptstore.staging.copy import Copier, DeviceCopier

log = logging.getLogger("ckptstore")


class Engine:
    """Process-wide save machinery; one save at a time passes :meth:`admit`."""

    def __init__(self) -> None:
        self.writers = WriterPool()
        self.staging = StagingPool(pin=True)
        self.plans = PlanCache()
        self.copier: Copier = DeviceCopier()
        self.last: SaveHandle | None = None
        self.lock = threading.Lock()

    @contextlib.contextmanager
    def admit(self, if_busy: str) -> Iterator[None]:
        """Back-pressure: wait for the previous save (or refuse, ``if_busy="raise"``)
        and raise its error if nobody has seen it; then hold the engine while the
        caller stages. Staging memory is reused, so saves never overlap here."""
        with self.lock:
            prev = self.last
            if prev is not None:
                if not prev.done() and if_busy == "raise":
                    raise StagingBusyError(
                        f"the previous save to {prev.path} is still writing; wait for it or "
                        "use if_busy='wait'")
                prev.exception()
                err = prev.take_unobserved_error()
                if err is not None:
                    raise err
            yield

    def complete(self, handle: SaveHandle, finish: Callable[[], SaveResult], *,
                 background: bool = True) -> None:
        """Run ``finish`` (wait for the writers, commit) and record its outcome on
        ``handle``: in a commit thread, or here when ``background`` is False. A
        failure is kept with its own type, raised by ``wait()`` or the next save."""
        self.last = handle

        def run() -> None:
            try:
                result = finish()
            except BaseException as e:
                e = typed_os_error(e, handle.path)
                log.error("save to %s failed: %s", handle.path, e)
                handle.finish(None, e)
            else:
                log.debug("committed %s (%d bytes)", handle.path, result.stored_bytes)
                handle.finish(result, None)

        if background:
            threading.Thread(target=run, name="ckptstore-commit", daemon=True).start()
        else:
            run()

    def close(self) -> None:
        last = self.last
        if last is not None:
            last.exception()
        self.writers.shutdown()
        self.copier.close()
        self.staging.close()


def typed_os_error(e: BaseException, path: str) -> BaseException:
    """A plain ``OSError`` of a save (ENOSPC, EIO, EDQUOT, ...) as a
    :class:`StorageError`: still an ``OSError`` with its errno, and a CkptError
    that says what to do next. Anything else is returned unchanged."""
    if type(e) is not OSError:
        return e
    hint = ""
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        hint = ("; free space (or raise the quota) and save again: committed checkpoints "
                "are intact and nothing of this save was committed")
    out = StorageError(e.errno, f"saving to {path} failed: {e.strerror or e}{hint}", e.filename)
    out.__cause__ = e
    return out.with_traceback(e.__traceback__)


class _Current:
    """The engine of this process, if one is running."""

    def __init__(self) -> None:
        self.engine: Engine | None = None
        self.lock = threading.Lock()
        self.hooked = False

    def get(self) -> Engine:
        with self.lock:
            if self.engine is None:
                self.engine = Engine()
                if not self.hooked:
                    self.hooked = True
                    atexit.register(shutdown)
                    _before_executors_stop(shutdown)
                    # A multiprocessing child (e.g. a rank started by torch.multiprocessing
                    # .spawn) exits through os._exit without atexit hooks, after joining its
                    # children: our writers must be stopped first or that join waits forever.
                    multiprocessing.util.Finalize(None, shutdown, exitpriority=100)
            return self.engine

    def take(self) -> Engine | None:
        with self.lock:
            e, self.engine = self.engine, None
            return e


def _before_executors_stop(fn: Callable[[], None]) -> None:
    """Run ``fn`` at interpreter exit before ``concurrent.futures`` stops taking jobs.

    ``concurrent.futures`` refuses new work from its own exit hook, which runs before
    ``atexit`` hooks: a save still in flight at exit (never waited for), or writers
    still starting after a save that failed in the caller, would then fail in a
    background thread ("cannot schedule new futures after interpreter shutdown") and
    print its traceback. Hooks registered here run in reverse order, so this one runs
    before those of ``concurrent.futures`` (both executors' modules are imported above,
    so theirs are registered first)."""
    register = getattr(threading, "_register_atexit", None)
    if register is None:  # pragma: no cover - CPython has had it since 3.9
        return
    try:
        register(fn)
    except RuntimeError:  # already shutting down: atexit is all there is
        pass


_current = _Current()


def engine() -> Engine:
    """This process's engine, started on first use."""
    return _current.get()


def shutdown() -> None:
    """Wait for the save in flight, stop the writer processes and free staging memory.

    Runs by itself at interpreter exit; call it explicitly where ``atexit`` hooks do
    not run (e.g. processes started by ``torch.multiprocessing.spawn``). A later
    ``save()`` starts a new engine."""
    e = _current.take()
    if e is not None:
        try:
            e.close()
        except Exception:  # interpreter exit: nothing left to report to
            log.debug("error while shutting down ckptstore", exc_info=True)
