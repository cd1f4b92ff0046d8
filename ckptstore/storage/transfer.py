"""Parallel transfers for object stores: uploads in parts straight from held memory,
and ranged reads into one buffer, with several requests in flight.

A shard is tens of MiB to GiBs. Buffered whole and sent in one request, it was
copied once more than needed and moved at the speed of one connection, after the
writer was done with it. :class:`PartedUpload` instead keeps references to the
memory given to :meth:`~ckptstore.storage.base.WriteHandle.write_held`, cuts it
into parts as it arrives and sends each part while the writer goes on (hashing,
the next piece). A part is materialised as one ``bytes`` object only when it is
sent (botocore takes no memoryview body), so at most one part per request in
flight is ever copied, never the whole object. The store-specific requests are a
:class:`PartTarget` (S3 multipart uploads, GCS resumable uploads:
:mod:`ckptstore.storage.object_requests`).

The object appears only when the upload completes, in ``close``; ``abort`` and a
failed part end the upload, so nothing is left, visible or not.
:func:`read_ranges` fills one new ``bytearray`` from ranged requests in parallel.

Settings: a storage option, else an environment variable, else the default. Sizes
take ``16M``-style suffixes.

==========================  ==================================  =======
storage option              environment variable                default
==========================  ==================================  =======
``ckptstore_part_size``     ``CKPTSTORE_PART_SIZE``             16M
``ckptstore_gcs_part_size`` ``CKPTSTORE_GCS_PART_SIZE``         64M
``ckptstore_range_size``    ``CKPTSTORE_RANGE_SIZE``            32M
``ckptstore_concurrency``   ``CKPTSTORE_TRANSFER_CONCURRENCY``  8
==========================  ==================================  =======

Objects up to one part are sent in one request. Parts sent one at a time, in order
(GCS resumable uploads) are larger: fewer requests, as gcsfs (50M) and Google's
clients (100M) do. The concurrency is the number of requests in flight per process
(uploads of all files and reads together).
"""
from __future__ import annotations

import collections
import concurrent.futures as cf
import logging
import os
import re
import threading
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, NoReturn, Protocol

from ckptstore.errors import CkptError, StorageError
from ckptstore.storage.base import WriteHandle

log = logging.getLogger("ckptstore.storage")

MIB = 1 << 20
PART_SIZE = 16 * MIB  #: bytes per part of an upload
SERIAL_PART_SIZE = 64 * MIB  #: bytes per part of an upload whose parts go in order
RANGE_SIZE = 32 * MIB  #: bytes per ranged read
CONCURRENCY = 8  #: requests in flight per process
#: parts of one upload after which the part size doubles (S3: at most 10,000 parts)
PARTS_PER_DOUBLING = 1000
#: storage options read here; they are not passed on to fsspec
OPTION_KEYS = frozenset({"ckptstore_part_size", "ckptstore_gcs_part_size", "ckptstore_range_size",
                         "ckptstore_concurrency"})
_SIZE = re.compile(r"^\s*(\d+)\s*([KMG]?)(?:i?B)?\s*$", re.IGNORECASE)
_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30}


def parse_count(value: Any, what: str) -> int:
    """A positive integer, given as a number or as text such as ``16M`` or ``4``."""
    if isinstance(value, int) and not isinstance(value, bool):
        n = value
    else:
        m = _SIZE.match(str(value))
        if not m:
            raise ValueError(f"{what}: cannot parse {value!r}; use e.g. 16M or 8")
        n = int(m.group(1)) * _UNITS[m.group(2).upper()]
    if n < 1:
        raise ValueError(f"{what} must be at least 1, got {value!r}")
    return n


@dataclass(frozen=True, slots=True)
class TransferSettings:
    """Part size, range size and requests in flight (see the module docstring)."""

    part_size: int = PART_SIZE
    serial_part_size: int = SERIAL_PART_SIZE
    range_size: int = RANGE_SIZE
    concurrency: int = CONCURRENCY

    @classmethod
    def from_options(cls, options: Mapping[str, Any]) -> "TransferSettings":
        def pick(key: str, env: str, default: int) -> int:
            value = options.get(key)
            if value is None or value == "":
                value = os.environ.get(env, "")
            return default if value == "" else parse_count(value, key)

        return cls(part_size=pick("ckptstore_part_size", "CKPTSTORE_PART_SIZE", PART_SIZE),
                   serial_part_size=pick("ckptstore_gcs_part_size", "CKPTSTORE_GCS_PART_SIZE",
                                         SERIAL_PART_SIZE),
                   range_size=pick("ckptstore_range_size", "CKPTSTORE_RANGE_SIZE", RANGE_SIZE),
                   concurrency=pick("ckptstore_concurrency", "CKPTSTORE_TRANSFER_CONCURRENCY",
                                    CONCURRENCY))


_pools: dict[int, cf.ThreadPoolExecutor] = {}
_pools_pid = 0
_pools_lock = threading.Lock()


def request_threads(workers: int) -> cf.ThreadPoolExecutor:
    """The process's request threads, ``workers`` of them: each blocks on one request
    of the filesystem's event loop, which runs them all at once (one pool per process:
    writer processes are spawned)."""
    global _pools_pid
    with _pools_lock:
        if _pools_pid != os.getpid():
            _pools.clear()
            _pools_pid = os.getpid()
        pool = _pools.get(workers)
        if pool is None:
            pool = _pools[workers] = cf.ThreadPoolExecutor(workers, thread_name_prefix="ckptstore-xfer")
        return pool


@dataclass(frozen=True, slots=True)
class Part:
    """Bytes ``[offset, offset + nbytes)`` of the object, as views of the writer's memory
    (or of copies made by ``write``). ``last``: the upload ends with it (it may be empty)."""

    number: int
    offset: int
    views: tuple[memoryview, ...]
    last: bool = False
    nbytes: int = 0

    def body(self) -> bytes:
        """The part as one ``bytes`` object: the copy a client that takes no views needs."""
        return joined(self.views)

    def view(self) -> memoryview | bytes:
        """The part without a copy where it lies in one piece (clients taking views)."""
        return self.views[0] if len(self.views) == 1 else self.body()


class PartTarget(Protocol):
    """The requests of one upload on one store. ``send`` is called from request
    threads, the others from the writer's; each retries its requests itself."""

    #: parts other than the last are at least ``min_part`` bytes, a multiple of ``granule``
    min_part: int
    granule: int
    #: parts may go in any order, several at once (S3); else one at a time, in order
    parallel: bool

    def put(self, body: bytes) -> None:
        """Store the whole object in one request."""

    def begin(self) -> None:
        """Start the upload (before the first part)."""

    def send(self, part: Part) -> Any:
        """Send one part; returns what :meth:`finish` needs to know of it."""

    def finish(self, receipts: list[Any], size: int) -> None:
        """Complete the upload: the object becomes visible, whole, with ``size`` bytes."""

    def abort(self) -> None:
        """End the upload without an object; its parts are discarded."""


def joined(views: Iterable[memoryview]) -> bytes:
    """``views`` as one ``bytes`` object; no copy when that is what the one view shows."""
    views = tuple(views)
    if len(views) == 1 and type(views[0].obj) is bytes and views[0].nbytes == len(views[0].obj):
        return views[0].obj
    return b"".join(views)


def as_bytes_view(data: memoryview | bytes) -> memoryview:
    """``data`` as a flat view of bytes (typed arrays count their bytes)."""
    mv = memoryview(data)
    if mv.ndim == 1 and mv.format in ("B", "b", "c"):
        return mv if mv.format == "B" else mv.cast("B")
    return mv.cast("B") if mv.c_contiguous else memoryview(mv.tobytes())


def raise_typed(e: BaseException, what: str) -> NoReturn:
    """Raise ``e`` itself when it is one of ckptstore's errors, else a StorageError
    naming it, caused by it."""
    if isinstance(e, CkptError) or not isinstance(e, Exception):
        raise e
    raise StorageError(f"{what} failed: {type(e).__name__}: {e}") from e


class PartedUpload(WriteHandle):
    """One object written in parts, several in flight (see the module docstring).

    Parts are cut once more than ``part_size`` bytes are pending, so the tail is never
    empty while writes go on and an object of up to one part is sent whole, in one
    request, on close. ``fsync`` sends what whole parts it can, waits for every part
    and copies the rest (less than one part): the caller's memory is then free."""

    def __init__(self, target: PartTarget, settings: TransferSettings, what: str) -> None:
        self.target = target
        self.what = what
        g = max(1, target.granule)
        size = settings.part_size if target.parallel else settings.serial_part_size
        self.part_size = max(target.min_part, -(-size // g) * g)
        self.pool = request_threads(settings.concurrency) if target.parallel else None
        self._serial: cf.ThreadPoolExecutor | None = None
        self.pending: collections.deque[memoryview] = collections.deque()
        self.pending_bytes = 0
        self.sent = 0  #: bytes handed to parts
        self.futures: list[cf.Future] = []
        self.started = False
        self.state = "open"
        self.error: BaseException | None = None

    # -- writing ----------------------------------------------------------------
    def write(self, data: memoryview | bytes) -> int:
        view = as_bytes_view(data)
        return self._add(memoryview(view.tobytes()))

    def write_held(self, data: memoryview | bytes) -> int:
        return self._add(as_bytes_view(data))

    def _add(self, view: memoryview) -> int:
        self._check("write")
        if view.nbytes:
            self.pending.append(view)
            self.pending_bytes += view.nbytes
        while self.pending_bytes > self.part_size:
            self._guarded(self._submit, self._take(self.part_size))
            if len(self.futures) % PARTS_PER_DOUBLING == 0:  # S3 takes 10,000 parts at most
                self.part_size *= 2
        return view.nbytes

    def _check(self, op: str) -> None:
        if self.state != "open":
            raise StorageError(f"{op} on a {self.state} upload of {self.what}")
        if self.error is not None:
            self._fail(self.error)

    def _take(self, n: int, last: bool = False) -> Part:
        """The next ``n`` pending bytes as a part (views split where needed, no copy)."""
        views = []
        need = n
        while need:
            v = self.pending.popleft()
            if v.nbytes > need:
                self.pending.appendleft(v[need:])
                v = v[:need]
            views.append(v)
            need -= v.nbytes
        self.pending_bytes -= n
        part = Part(len(self.futures) + 1, self.sent, tuple(views), last, n)
        self.sent += n
        return part

    def _guarded(self, fn: Callable[..., Any], *args: Any) -> Any:
        """``fn(*args)``; an error (starting the upload...) ends the upload, typed."""
        try:
            return fn(*args)
        except Exception as e:
            if self.state == "open":  # else a failed part already ended the upload
                self._fail(e)
            raise

    def _submit(self, part: Part) -> None:
        if not self.started:
            self.target.begin()
            self.started = True
        if self.pool is not None:
            fut = self.pool.submit(self._send, part)
        else:
            if self._serial is None:
                self._serial = cf.ThreadPoolExecutor(1, thread_name_prefix="ckptstore-upload")
            fut = self._serial.submit(self._send, part)
        fut.add_done_callback(self._note)
        self.futures.append(fut)

    def _send(self, part: Part) -> Any:
        if self.error is not None:  # the upload is lost: in order (GCS) a later part
            raise cf.CancelledError()  # could even complete an object with a hole
        try:
            return self.target.send(part)
        except Exception as e:
            raise_typed(e, f"{self.what} (part {part.number})")

    def _note(self, fut: cf.Future) -> None:
        if not fut.cancelled() and fut.exception() is not None and self.error is None:
            self.error = fut.exception()

    # -- waiting, failing ---------------------------------------------------------
    def _settle(self) -> None:
        """Cancel parts not started and wait for the others: once this returns no
        request reads the caller's memory any more."""
        for f in self.futures:
            f.cancel()
        cf.wait(self.futures)

    def _wait(self) -> list[Any]:
        """Every part sent so far, in order; a failed part fails the upload."""
        cf.wait(self.futures)
        if self.error is not None:
            self._fail(self.error)
        return [f.result() for f in self.futures]

    def _fail(self, e: BaseException) -> NoReturn:
        """End the upload (parts settled, upload aborted) and raise ``e``, typed."""
        self._settle()
        if self.started:
            self.started = False
            self._abort_quietly()
        self._release("failed")
        raise_typed(e, self.what)

    def _abort_quietly(self) -> None:
        try:
            self.target.abort()
        except Exception as e:  # the incomplete upload stays for MultipartGC
            log.warning("could not abort the upload of %s (%s: %s); `ckptstore gc` removes it",
                        self.what, type(e).__name__, e)

    def _release(self, state: str) -> None:
        self.state = state
        self.pending.clear()
        self.pending_bytes = 0
        self.futures = []
        if self._serial is not None:
            self._serial.shutdown(wait=False)
            self._serial = None

    # -- the WriteHandle calls --------------------------------------------------------
    def fsync(self) -> None:
        """Send the whole parts pending, wait for every part, copy the rest (a copy of
        up to one part costs less than the requests of starting an upload: measured)."""
        self._check("fsync")
        if self.started:
            g = max(1, self.target.granule)
            n = self.pending_bytes // g * g
            if n >= self.target.min_part:
                self._guarded(self._submit, self._take(n))
        self._wait()
        if self.pending_bytes:
            self.pending = collections.deque([memoryview(joined(self.pending))])

    def close(self) -> None:
        """Complete the upload; returns once the object is whole and visible."""
        if self.state == "closed":
            return
        self._check("close")
        size = self._guarded(self._complete)
        log.debug("uploaded %s: %d bytes, %d parts", self.what, size, len(self.futures))
        self._release("closed")

    def _complete(self) -> int:
        if not self.started:  # up to one part: one request
            body = joined(self.pending)
            self.target.put(body)
            return len(body)
        self._submit(self._take(self.pending_bytes, last=True))
        self.target.finish(self._wait(), self.sent)
        return self.sent

    def abort(self) -> None:
        """Discard the upload: no object appears, no part is kept."""
        if self.state != "open":
            return
        self._settle()
        started, self.started = self.started, False
        self._release("aborted")
        if started:
            try:
                self.target.abort()
            except Exception as e:
                raise_typed(e, f"abort of {self.what}")


def read_ranges(fetch: Callable[[int, memoryview], int], offset: int, length: int,
                settings: TransferSettings) -> memoryview:
    """Bytes ``[offset, offset + length)`` in a new bytearray, fetched in ranges of
    ``settings.range_size``, several at once: ``fetch(start, view)`` fills ``view``
    with the bytes from ``start`` and says how many there were, fewer only at the end
    of the object. The result is short at the end of the object."""
    buf = bytearray(length)
    view = memoryview(buf)
    step = max(1, settings.range_size)
    starts = list(range(0, length, step))
    counts: list[int] = []
    if len(starts) <= 1 or settings.concurrency <= 1:
        for s in starts:
            counts.append(fetch(offset + s, view[s:s + step]))
            if counts[-1] < min(step, length - s):
                break
    else:
        pool = request_threads(settings.concurrency)
        futures = [pool.submit(fetch, offset + s, view[s:s + step]) for s in starts]
        try:
            counts = [f.result() for f in futures]
        except BaseException:
            for f in futures:
                f.cancel()
            cf.wait(futures)  # no request writes into the buffer once this returns
            raise
    end = 0
    for i, (s, got) in enumerate(zip(starts, counts)):
        end = s + got
        if got < min(step, length - s):  # the end of the object: nothing may follow
            if any(counts[i + 1:]):
                raise StorageError(f"ranged reads at {offset} disagree on where the object ends "
                                   "(it changed during the read)")
            break
    return view[:end]
