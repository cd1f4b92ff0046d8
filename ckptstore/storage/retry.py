"""Bounded exponential backoff for object-store calls, and the table that decides
which backend errors are transient.

The table is data: status codes and exception types that mean "try
again" (5xx, 429/503 throttling, connection resets, timeouts). Everything else is
permanent and raised at once. A fault that outlasts the schedule is raised as
:class:`TransientStorageError` with the last error as its cause.
"""
from __future__ import annotations

import logging
import os
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

from ckptstore.errors import TransientStorageError

log = logging.getLogger("ckptstore.retry")
T = TypeVar("T")

#: HTTP statuses worth retrying (S3 SlowDown is 503, GCS rate limits are 429)
TRANSIENT_STATUS = frozenset({408, 429, 500, 502, 503, 504})
#: S3/GCS error codes worth retrying
TRANSIENT_CODES = frozenset({"SlowDown", "InternalError", "ServiceUnavailable", "RequestTimeout",
                             "RequestTimeTooSkewed", "Throttling", "ThrottlingException",
                             "OperationAborted", "503", "500", "502", "504"})
#: exception class names (from aiohttp, botocore, requests, asyncio) worth retrying
TRANSIENT_TYPES = frozenset({"ConnectionResetError", "ConnectionAbortedError", "ConnectionError",
                             "TimeoutError", "ServerDisconnectedError", "ClientOSError",
                             "ClientConnectorError", "ClientPayloadError", "ServerTimeoutError",
                             "EndpointConnectionError", "ReadTimeoutError",
                             "ConnectTimeoutError", "ResponseStreamingError",
                             "IncompleteReadError", "ProxyError", "ChunkedEncodingError",
                             "ServiceUnavailable", "TransientStorageError"})


@dataclass(frozen=True, slots=True)
class Backoff:
    """``attempts`` tries, sleeping ``base * 2**i`` (capped, with jitter) between."""

    attempts: int = 6
    base: float = 0.05
    cap: float = 2.0

    def delays(self):
        for i in range(self.attempts - 1):
            d = min(self.cap, self.base * (2 ** i))
            yield d * (0.5 + random.random() / 2)


def default_backoff() -> Backoff:
    """The schedule, overridable with ``CKPTSTORE_RETRIES`` (attempts)."""
    n = os.environ.get("CKPTSTORE_RETRIES")
    return Backoff(attempts=max(1, int(n))) if n else Backoff()


def is_transient(e: BaseException) -> bool:
    """True when ``e`` (or an error it wraps) is a fault worth retrying."""
    seen = 0
    while e is not None and seen < 8:
        if isinstance(e, (FileNotFoundError, FileExistsError, PermissionError)):
            return False
        if type(e).__name__ in TRANSIENT_TYPES or isinstance(e, (ConnectionError, TimeoutError)):
            return True
        status = _status(e)
        if status in TRANSIENT_STATUS:
            return True
        code = _code(e)
        if code in TRANSIENT_CODES:
            return True
        e = e.__cause__ or e.__context__  # type: ignore[assignment]
        seen += 1
    return False


def _status(e: BaseException) -> int | None:
    for attr in ("status", "code", "status_code"):
        v = getattr(e, attr, None)
        if isinstance(v, int):
            return v
    resp = getattr(e, "response", None)
    if isinstance(resp, dict):
        v = resp.get("ResponseMetadata", {}).get("HTTPStatusCode")
        if isinstance(v, int):
            return v
    return None


def _code(e: BaseException) -> str | None:
    resp = getattr(e, "response", None)
    if isinstance(resp, dict):
        return resp.get("Error", {}).get("Code")
    text = str(e)
    for code in ("SlowDown", "ServiceUnavailable", "InternalError"):
        if code in text[:200]:
            return code
    return None


def retrying(fn: Callable[[], T], what: str, backoff: Backoff | None = None) -> T:
    """Call ``fn`` until it succeeds, a permanent error occurs, or the schedule ends."""
    backoff = backoff or default_backoff()
    delays = backoff.delays()
    while True:
        try:
            return fn()
        except Exception as e:
            if not is_transient(e):
                raise
            delay = next(delays, None)
            if delay is None:
                raise TransientStorageError(
                    f"{what} kept failing after {backoff.attempts} attempts: "
                    f"{type(e).__name__}: {e}; the object store is unavailable or throttling, "
                    "try again later") from e
            log.info("%s failed (%s: %s); retrying in %.2fs", what, type(e).__name__, e, delay)
            time.sleep(delay)
