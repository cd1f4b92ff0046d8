"""The handle of a save in flight and the result of a committed one."""
from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass

from ckptstore.errors import CkptTimeoutError


@dataclass(frozen=True, slots=True)
class SaveResult:
    """What a committed save wrote."""

    path: str
    save_id: str
    logical_bytes: int
    stored_bytes: int
    files: int
    staged_seconds: float
    total_seconds: float


class SaveHandle:
    """A save in flight. ``wait()`` returns a :class:`SaveResult` once the
    checkpoint is durable and committed, or raises the writer's original error."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._done = threading.Event()
        self._wait_copied: Callable[[], None] | None = None
        self._result: SaveResult | None = None
        self._error: BaseException | None = None
        self._observed = False
        self.staged_seconds = 0.0

    def done(self) -> bool:
        """True once the save committed or failed."""
        return self._done.is_set()

    def wait_staged(self) -> None:
        """Block until every tensor of the state is copied into staging memory; from
        then on the state may be changed by any means, from any thread or stream.

        A default ``save()`` returns only after this point, so this returns at once.
        With ``save(..., overlap=True)`` device-to-host copies may still be running
        when ``save()`` returns: later work on the current CUDA stream is ordered after
        them, other streams and host writes into device memory are not."""
        if self._wait_copied is not None:
            self._wait_copied()

    def copies_pending(self, wait_copied: Callable[[], None]) -> None:
        """Record how to wait for this save's copies (called once they are issued;
        in the default mode they have completed already)."""
        self._wait_copied = wait_copied

    def wait(self, timeout: float | None = None) -> SaveResult:
        """Block until durable and committed; raise the background error if any."""
        if not self._done.wait(timeout):
            raise CkptTimeoutError(f"save to {self.path} still running after {timeout}s")
        if self._error is not None:
            self._observed = True
            raise self._error
        assert self._result is not None
        return self._result

    def exception(self, timeout: float | None = None) -> BaseException | None:
        """Block until the save ends and return its error, or None if it committed
        (as ``concurrent.futures.Future.exception``). The error is not consumed:
        ``wait()`` or the next ``save()`` still raises it once."""
        if not self._done.wait(timeout):
            raise CkptTimeoutError(f"save to {self.path} still running after {timeout}s")
        return self._error

    def finish(self, result: SaveResult | None, error: BaseException | None) -> None:
        """Record the outcome (called once, by the pipeline)."""
        self._result, self._error = result, error
        self._done.set()

    def take_unobserved_error(self) -> BaseException | None:
        """The error nobody has seen yet, once; None otherwise."""
        if self._done.is_set() and self._error is not None and not self._observed:
            self._observed = True
            return self._error
        return None
