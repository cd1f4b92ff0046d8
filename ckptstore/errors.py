"""Typed errors.

Every error the library raises derives from :class:`CkptError`; each subclass also
derives from the builtin it resembles, so ``except FileNotFoundError`` keeps working
for code that does not know about ckptstore.
"""
from __future__ import annotations


class CkptError(Exception):
    """Base class of every error raised by ckptstore."""


class CheckpointNotFoundError(CkptError, FileNotFoundError):
    """The path holds no committed checkpoint (no valid manifest).

    ``hint`` says what the path holds instead and what to do (a ``torch.save`` or
    safetensors file: ``ckptstore import``; a run directory: ``ckptstore ls``), or is
    None; the message already includes it."""

    def __init__(self, message: str, hint: str | None = None) -> None:
        super().__init__(message)
        self.hint = hint

    def __str__(self) -> str:  # OSError would format errno/filename
        return str(self.args[0]) if self.args else ""


class KeyNotFoundError(CkptError, KeyError):
    """A name asked of a checkpoint (``load(keys=...)``, ``ckptstore.open(...)[name]``)
    matches nothing in it. ``keys`` holds the names that matched nothing."""

    def __init__(self, message: str, keys: tuple[str, ...] = ()) -> None:
        super().__init__(message)
        self.keys = tuple(keys)

    def __str__(self) -> str:  # KeyError would repr() the message
        return str(self.args[0])


class CheckpointExistsError(CkptError, FileExistsError):
    """A committed checkpoint already exists where a new one was to be written."""


class CorruptCheckpointError(CkptError, ValueError):
    """Stored bytes do not match the manifest (hash, size or structure)."""

    def __init__(self, message: str, damage: list | None = None) -> None:
        super().__init__(message)
        self.damage = list(damage or [])


class UnsafeCheckpointError(CorruptCheckpointError):
    """The manifest asks for something dangerous: paths outside the checkpoint,
    absurd sizes, overlapping ranges, duplicate keys, excessive nesting."""


class CheckpointTooLargeError(CkptError, MemoryError):
    """A load would need more memory than this machine (or the process's limit)
    has: a tensor larger than physical memory, or an allocation the allocator
    refused. The message names the tensor; load fewer keys (``keys=``) or map the
    files (``mmap=True``) instead of copying them."""


class SchemaVersionError(CkptError, ValueError):
    """The checkpoint was written by a newer, unknown schema version."""


class UnsupportedTypeError(CkptError, TypeError):
    """A value in the state tree cannot be stored without pickle."""


class StagingBusyError(CkptError, RuntimeError):
    """A save was requested while the staging buffers are still in use and the
    caller asked not to wait (``if_busy="raise"``)."""


class WriterDiedError(CkptError, RuntimeError):
    """A background writer process died (killed, out of memory) during a save."""


class StrictLoadError(CkptError, KeyError):
    """``load(..., into=..., strict=True)`` found missing, unexpected or
    mismatched keys. ``report`` holds the whole diff."""

    def __init__(self, message: str, report: object = None) -> None:
        super().__init__(message)
        self.report = report

    def __str__(self) -> str:  # KeyError would repr() the message
        return str(self.args[0])


class StorageError(CkptError, OSError):
    """An I/O operation on a storage backend failed."""


class DestinationNotWritableError(StorageError, PermissionError):
    """A save's destination cannot be written (a read-only file system or directory,
    no permission, a file where a directory is needed, a read-only protocol): refused
    before anything is staged."""

    def __str__(self) -> str:  # the message names the path already
        return str(self.strerror or super().__str__())


class TransientStorageError(StorageError):
    """A storage fault that is worth retrying (5xx, throttling, reset, timeout)."""


class CkptTimeoutError(CkptError, TimeoutError):
    """A wait ran past its timeout."""


class DistributedSaveError(CkptError, RuntimeError):
    """A save by several ranks was not committed because some ranks failed.

    Every rank raises the same error; ``failures`` holds one
    ``(rank, phase, error type, message)`` tuple per failure (phase is ``"join"``,
    ``"plan"``, ``"stage"``, ``"write"``, ``"commit"`` or ``"collective"``; the rank is
    None when a rank that never joined cannot be named)."""

    def __init__(self, message: str, failures: tuple = ()) -> None:
        super().__init__(message)
        self.failures = tuple(failures)

    @property
    def ranks(self) -> tuple:
        """The ranks that failed, in order."""
        return tuple(sorted({f[0] for f in self.failures if isinstance(f[0], int)}))


class UnsupportedOperationError(CkptError, NotImplementedError):
    """The request is valid but not supported for this checkpoint or backend
    (e.g. rename rules on a checkpoint saved sharded by several ranks)."""


class PeerUnavailableError(StorageError, ConnectionError):
    """The keeper at ``address`` cannot be reached or went away mid-request
    (refused, reset, closed, silent past the timeout). Nothing it did not commit is
    visible there; retry once the keeper runs again, or use another tier."""

    def __init__(self, address: str, why: str) -> None:
        super().__init__(f"peer keeper at {address} is unavailable: {why}; start it "
                         f"(python -m ckptstore.peer.keeper) or restore from another tier")
        self.address = address

    def __str__(self) -> str:  # OSError would format errno/filename
        return str(self.args[0])
