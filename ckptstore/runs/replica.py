"""The peer replica of the memory tier: push each newly committed memory step to a
buddy node's keeper (:mod:`ckptstore.peer`) in one low-priority background thread.

Training never waits for it: ``offer`` returns at once. While a push runs, a newer
step offered replaces any older one still waiting (the older is skipped). A failed
push is logged; the first failure is kept (``error``) and reported once, and saves
go on. Torch-free.
"""
from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable
from typing import Any

from ckptstore.runs.layout import step_name
from ckptstore.storage import Storage

log = logging.getLogger("ckptstore.peer")
PEER_NICE = 10  #: niceness added to the push thread (Linux: per thread)
#: seconds a restart waits for a peer's list of steps (connect, then the answer): a
#: blackholed buddy delays ``latest``/``load`` by this much at most
QUERY_TIMEOUT = float(os.environ.get("CKPTSTORE_PEER_QUERY_TIMEOUT", "5"))


def connect(address: str, timeout: float = 30.0) -> Any:
    """A ``PeerClient`` for the keeper at ``address`` ("host:port")."""
    from ckptstore.peer import PeerClient  # type: ignore[import-not-found,unused-ignore]

    return PeerClient(address, timeout=timeout)


class Replicator:
    """Pushes memory steps of run ``run`` below ``root`` to the keeper at ``address``."""

    def __init__(self, address: str, run: str, root: Storage,
                 report: Callable[[BaseException], None]) -> None:
        self.address, self.run, self.root = address, run, root
        self._report = report
        self._cond = threading.Condition()
        self._pending: int | None = None
        self._busy: int | None = None
        self._stopping = False
        self.pushed: list[int] = []  #: steps pushed, in order
        self.skipped: list[int] = []  #: steps replaced by a newer one before their push
        self.error: BaseException | None = None  #: the first failure
        self._thread = threading.Thread(target=self._loop, name="ckptstore-peer-push", daemon=True)
        self._thread.start()

    def offer(self, step: int) -> None:
        """Push ``step`` when the thread is free (replacing an older step waiting)."""
        with self._cond:
            if self._pending is not None and self._pending < step:
                log.info("peer push of step %d skipped: step %d is newer", self._pending, step)
                self.skipped.append(self._pending)
            if self._pending is None or self._pending < step:
                self._pending = step
            self._cond.notify_all()

    def busy(self) -> frozenset[int]:
        """Steps being pushed or waiting (memory eviction leaves them alone)."""
        with self._cond:
            return frozenset(s for s in (self._busy, self._pending) if s is not None)

    def drain(self, timeout: float | None = None) -> None:
        """Wait until nothing is being pushed or waiting."""
        with self._cond:
            self._cond.wait_for(lambda: self._busy is None and self._pending is None, timeout)

    def close(self, timeout: float | None = None) -> None:
        """Finish the push in flight (a waiting one is pushed too), then stop."""
        self.drain(timeout)
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        self._thread.join(timeout)

    def _loop(self) -> None:
        try:  # low priority: Linux applies a thread's own nice value
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), PEER_NICE)
        except (OSError, AttributeError):
            pass
        client = None
        while True:
            with self._cond:
                self._cond.wait_for(lambda: self._pending is not None or self._stopping)
                if self._pending is None:
                    break
                self._busy, self._pending = self._pending, None
            step = self._busy
            try:
                client = client or connect(self.address)
                n = client.push(self.root.child(step_name(step)), self.run, step)
                self.pushed.append(step)
                log.info("step %d pushed to the peer %s (%d bytes)", step, self.address, n)
            except Exception as e:  # never fails a save; the first failure is reported once
                log.warning("push of step %d to the peer %s failed: %s: %s", step, self.address,
                            type(e).__name__, e)
                _close(client)
                client = None
                if self.error is None:
                    self.error = e
                    self._report(e)
            finally:
                with self._cond:
                    self._busy = None
                    self._cond.notify_all()
        _close(client)


def _close(client: Any) -> None:
    if client is not None:
        try:
            client.close()
        except Exception as e:  # closing a broken connection: nothing more to do
            log.debug("closing the peer client: %s", e)


def peer_steps(address: str, run: str, timeout: float | None = None) -> list[int] | None:
    """The steps of ``run`` the keeper at ``address`` holds; None when it is unreachable,
    does not answer within ``timeout`` (default :data:`QUERY_TIMEOUT`) or answers
    nonsense (logged: the other tiers remain)."""
    try:
        client = connect(address, QUERY_TIMEOUT if timeout is None else timeout)
        try:
            return list(client.steps(run))
        finally:
            client.close()
    except (OSError, ValueError) as e:
        log.warning("the peer %s is unreachable (%s: %s); not restoring from it", address,
                    type(e).__name__, e)
        return None


def fetch_into(address: str, run: str, step: int, root: Storage) -> Storage:
    """Fetch the keeper's copy of ``step`` into run directory ``root`` (replacing a
    copy there that failed to load); its directory."""
    from ckptstore import manifest as fmt

    name = step_name(step)
    if root.isdir(name):
        log.warning("replacing the copy of step %d in %s by the peer's", step, root.url)
        if root.child(name).exists(fmt.MANIFEST_NAME):  # uncommitted first, as retention
            root.child(name).remove(fmt.MANIFEST_NAME)
        root.rmtree(name)
    client = connect(address)
    try:
        client.fetch(run, step, root.child(name))
    finally:
        client.close()
    return root.child(name)


def drop_all(address: str, run: str) -> None:
    """Drop every copy of ``run`` the keeper holds (the run ended cleanly)."""
    try:
        client = connect(address)
        try:
            for s in client.steps(run):
                client.drop(run, s)
        finally:
            client.close()
    except Exception as e:  # the buddy may be gone: nothing more to do here
        log.warning("could not drop the peer copies of %s: %s: %s", run, type(e).__name__, e)
