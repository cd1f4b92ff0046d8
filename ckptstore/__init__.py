"""ckptstore: fast, atomic, verified checkpoints for PyTorch.

``ckptstore.save(state, path)`` snapshots and returns; background writer processes
compress, hash and write; the manifest written last is the commit.
``ckptstore.load(path)`` verifies what it reads. See README.md and docs/.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ckptstore.errors import (  # noqa: E402
    CheckpointExistsError,
    CheckpointNotFoundError,
    CheckpointTooLargeError,
    CkptError,
    CkptTimeoutError,
    CorruptCheckpointError,
    DestinationNotWritableError,
    DistributedSaveError,
    KeyNotFoundError,
    PeerUnavailableError,
    SchemaVersionError,
    StagingBusyError,
    StorageError,
    StrictLoadError,
    TransientStorageError,
    UnsafeCheckpointError,
    UnsupportedOperationError,
    UnsupportedTypeError,
    WriterDiedError,
)
from ckptstore.version import __version__

# The API modules import torch; they are loaded on first use so that writer
# processes (which import this package) stay small and start fast.
_LAZY = {
    "save": ("api.save", "save"),
    "SaveHandle": ("api.save", "SaveHandle"),
    "SaveResult": ("api.save", "SaveResult"),
    "load": ("api.load", "load"),
    "LoadReport": ("read.into", "LoadReport"),
    "fsck": ("verify.fsck", "fsck"),
    "FsckReport": ("verify.fsck", "FsckReport"),
    "Checkpointer": ("api.checkpointer", "Checkpointer"),
    "open": ("read.lazy", "open"),
    "shutdown": ("api.save", "shutdown"),
    "check": ("api.check", "check"),
    "CheckReport": ("api.check", "CheckReport"),
    "RNGState": ("api.rng", "RNGState"),
    "ModelState": ("api.states", "ModelState"),
    "OptimizerState": ("api.states", "OptimizerState"),
}

if TYPE_CHECKING:  # pragma: no cover
    from ckptstore.api.check import CheckReport, check
    from ckptstore.api.load import load
    from ckptstore.api.rng import RNGState
    from ckptstore.api.save import SaveHandle, SaveResult, save
    from ckptstore.api.states import ModelState, OptimizerState
    from ckptstore.read.into import LoadReport
    from ckptstore.verify.fsck import FsckReport, fsck


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        mod, attr = _LAZY[name]
        value = getattr(importlib.import_module(f".{mod}", __name__), attr)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'ckptstore' has no attribute {name!r}")


__all__ = ["__version__", "save", "load", "fsck", "open", "shutdown", "check", "CheckReport", "RNGState",
           "ModelState", "OptimizerState",
           "Checkpointer", "SaveHandle", "SaveResult",
           "LoadReport", "FsckReport", "CkptError", "CheckpointExistsError",
           "CheckpointNotFoundError", "CheckpointTooLargeError", "CkptTimeoutError", "CorruptCheckpointError",
           "DestinationNotWritableError", "KeyNotFoundError",
           "DistributedSaveError", "PeerUnavailableError",
           "SchemaVersionError", "StagingBusyError", "StorageError", "StrictLoadError",
           "TransientStorageError", "UnsafeCheckpointError", "UnsupportedOperationError",
           "UnsupportedTypeError",
           "WriterDiedError"]
