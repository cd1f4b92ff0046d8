"""Optional storage capabilities, each a small protocol.

:class:`~ckptstore.storage.base.Storage` is what every backend does. A few backends
can do more, and the callers that want it ask with ``isinstance``, never by probing
attributes::

    if isinstance(dst, ObjectInfo):      # checksums of what an upload stored
        meta = dst.info(name)
    if isinstance(root, MultipartGC):    # uploads a killed writer left behind
        for up in root.incomplete_uploads(): ...

Flags every backend answers (rename, fsync, create-only, local paths, process-local)
are :class:`~ckptstore.storage.base.Capabilities`, not protocols.

Wrappers (:class:`~ckptstore.storage.faulty.FaultyStorage`,
:class:`~ckptstore.storage.base.LinkedView`) implement a protocol exactly when the
storage they wrap does: :func:`forwarding_class` picks, per wrapped storage, a
subclass of the wrapper that also inherits the wrapper's forwarding mixin of each
protocol the wrapped storage implements.
"""
from __future__ import annotations

import threading
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

__all__ = ["ObjectInfo", "MultipartGC", "IncompleteUpload", "forwarding_class", "plain_class",
           "remake"]


@runtime_checkable
class ObjectInfo(Protocol):
    """The backend reports metadata of a stored object (object stores)."""

    def info(self, name: str) -> dict[str, Any]:
        """The backend's metadata of ``name``: always ``"size"`` (bytes); where the
        backend reports them, ``"crc32c"`` (GCS: base64 of the big-endian CRC32C) and
        ``"ETag"`` or ``"etag"`` (S3: the hex MD5 of a single-part upload, quoted).
        ``FileNotFoundError`` if missing."""
        ...


@dataclass(frozen=True, slots=True)
class IncompleteUpload:
    """A multipart upload that was started and neither completed nor aborted."""

    url: str  #: the object being uploaded, as a URL
    key: str  #: the backend's name of that object (S3: the key in its bucket)
    upload_id: str  #: the backend's id of the upload
    started: float | None  #: when it was started (seconds since the epoch), if known


@runtime_checkable
class MultipartGC(Protocol):
    """The backend keeps the parts of unfinished multipart uploads (S3): a writer
    killed mid-upload leaves them behind, invisible to reads but billed."""

    def incomplete_uploads(self) -> list[IncompleteUpload]:
        """The incomplete uploads of objects below this storage's root (empty where
        the backend keeps none)."""
        ...

    def abort_upload(self, upload: IncompleteUpload) -> None:
        """Abort ``upload`` (one of :meth:`incomplete_uploads`): its parts are deleted."""
        ...


_classes: dict[tuple[type, tuple[type, ...]], type] = {}
_lock = threading.Lock()


def forwarding_class(base: type, inner: object, mixins: Mapping[type, type]) -> type:
    """``base`` itself, or (cached) a subclass of ``base`` that also inherits
    ``mixins[proto]`` for each protocol ``proto`` that ``inner`` implements."""
    base = plain_class(base)
    chosen = tuple(m for proto, m in mixins.items() if isinstance(inner, proto))
    if not chosen:
        return base
    with _lock:
        cls = _classes.get((base, chosen))
        if cls is None:
            ns = {"__module__": base.__module__, "__qualname__": base.__qualname__,
                  "__doc__": base.__doc__, "_plain_class": base}
            cls = _classes[(base, chosen)] = type(base)(base.__name__, (*chosen, base), ns)
        return cls


def plain_class(cls: type) -> type:
    """The class :func:`forwarding_class` derived ``cls`` from (``cls`` if none)."""
    return cls.__dict__.get("_plain_class", cls)


def remake(base: type, inner: object, mixins: Mapping[type, type]) -> Any:
    """An uninitialised instance of ``forwarding_class(base, inner, mixins)``
    (unpickling and cloning of wrappers)."""
    return object.__new__(forwarding_class(base, inner, mixins))
