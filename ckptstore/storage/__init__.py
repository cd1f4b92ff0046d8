"""Storage backends and the function that picks one for a path or URL."""
from __future__ import annotations

import os
from typing import Any

from ckptstore.storage.base import Capabilities, Storage, WriteHandle, check_name
from ckptstore.storage.local import LocalStorage

__all__ = ["Capabilities", "Storage", "WriteHandle", "LocalStorage", "check_name", "open_storage"]


def open_storage(where: "str | os.PathLike | Storage",
                 storage_options: dict[str, Any] | None = None) -> Storage:
    """Return the storage for a local path, a ``file://`` URL, any other fsspec URL
    (``s3://``, ``gs://``, ``memory://``...), or an existing :class:`Storage`."""
    if isinstance(where, Storage):
        return where
    where = os.fspath(where)
    if where.startswith("file://"):
        return LocalStorage(where[len("file://"):])
    if "://" not in where:
        return LocalStorage(where)
    from ckptstore.storage.fsspec_backend import (
        FsspecStorage,  # optional dependency, imported on use
    )

    return FsspecStorage(where, storage_options or {})
