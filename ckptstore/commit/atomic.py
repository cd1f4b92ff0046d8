"""The one atomic-write path, its two named commit strategies, and the manifest commit.

:class:`RenameCommit` (POSIX): write to a temp name in the same directory, fsync,
rename (or link for create-only), fsync the directory; the temp file is removed on
any exception. :class:`CreateOnlyCommit` (object stores): there is no rename, so data
objects are uploaded under their final names (invisible to readers until a manifest
names them) and the manifest object is created last with a create-only precondition.
:func:`strategy_for` picks one from the backend's capabilities.
"""
from __future__ import annotations

import logging
import os
import secrets
from collections.abc import Iterable

from ckptstore.storage.base import Storage, WriteHandle

log = logging.getLogger(__name__)

TEMP_PREFIX = ".tmp-"


def temp_name(name: str) -> str:
    """A unique temp name in the same directory as ``name``."""
    head, _, tail = name.rpartition("/")
    tmp = f"{TEMP_PREFIX}{tail}.{os.getpid()}.{secrets.token_hex(4)}"
    return f"{head}/{tmp}" if head else tmp


def is_temp_name(name: str) -> bool:
    return name.rpartition("/")[2].startswith(TEMP_PREFIX)


class RenameCommit:
    """POSIX: bytes go to a temp name in the same directory; after the fsync they are
    renamed (or, create-only, hard-linked) to the final name and the directory is
    fsynced. Readers never see a partial file under the final name."""

    name = "rename"

    def target(self, name: str) -> str:
        return temp_name(name)

    def publish(self, storage: Storage, target: str, name: str, *, exclusive: bool) -> None:
        if exclusive:
            storage.link_exclusive(target, name)
        else:
            storage.rename(target, name)
        storage.fsync_dir()

    def discard(self, storage: Storage, target: str) -> None:
        _quietly(lambda: storage.remove(target))


class CreateOnlyCommit:
    """Object stores: there is no rename, so an object is uploaded under its final
    name and becomes visible, whole, when the upload completes (an aborted upload
    leaves nothing). The manifest is created last with the backend's create-only
    precondition (S3 ``If-None-Match: *``, GCS ``ifGenerationMatch=0``)."""

    name = "create-only"

    def target(self, name: str) -> str:
        return name

    def publish(self, storage: Storage, target: str, name: str, *, exclusive: bool) -> None:
        return None  # closing the upload published it

    def discard(self, storage: Storage, target: str) -> None:
        return None  # the aborted upload left nothing


CommitStrategy = RenameCommit | CreateOnlyCommit


def strategy_for(storage: Storage) -> CommitStrategy:
    """The commit strategy a backend's capabilities call for."""
    return RenameCommit() if storage.capabilities.rename else CreateOnlyCommit()


class AtomicFile:
    """Context manager: ``with AtomicFile(storage, name) as f: f.write(...)``.

    On a clean exit the file is durable under ``name``; on an exception nothing
    appears under ``name`` and any partial bytes are removed.
    """

    def __init__(self, storage: Storage, name: str, *, exclusive: bool = False,
                 bulk: bool = False) -> None:
        self.storage = storage
        self.name = name
        self.exclusive = exclusive
        self.bulk = bulk  #: a large data file: ``Storage.open_bulk_write`` (O_DIRECT...)
        self.strategy = strategy_for(storage)
        self.target = self.strategy.target(name)
        self.handle: WriteHandle | None = None
        self.size = 0

    def __enter__(self) -> AtomicFile:
        try:
            open_ = self.storage.open_bulk_write if self.bulk else self.storage.open_write
            self.handle = open_(self.target)
        except BaseException:  # an open may fail after creating the file
            self.strategy.discard(self.storage, self.target)
            raise
        return self

    def write(self, data: memoryview | bytes) -> int:
        assert self.handle is not None
        n = self.handle.write(data)
        self.size += n
        return n

    def write_held(self, data: memoryview | bytes) -> int:
        """Write ``data`` that stays unchanged until this file is closed (see
        :meth:`ckptstore.storage.base.WriteHandle.write_held`)."""
        assert self.handle is not None
        n = self.handle.write_held(data)
        self.size += n
        return n

    def __exit__(self, exc_type, exc, tb) -> None:
        h, self.handle = self.handle, None
        assert h is not None
        if exc_type is not None:
            _quietly(h.abort)
            self.strategy.discard(self.storage, self.target)
            return
        try:
            h.fsync()  # a failed fsync aborts the save: never retried and trusted
            h.close()
            self.strategy.publish(self.storage, self.target, self.name, exclusive=self.exclusive)
        except BaseException:
            _quietly(h.abort)
            self.strategy.discard(self.storage, self.target)
            raise


def atomic_write(storage: Storage, name: str, chunks: Iterable[bytes | memoryview],
                 *, exclusive: bool = False) -> int:
    """Write ``chunks`` durably and atomically to ``name``; returns the size.

    With ``exclusive=True`` an existing ``name`` is never replaced
    (``FileExistsError``); on object stores this is the create-only precondition.
    """
    if exclusive and isinstance(strategy_for(storage), CreateOnlyCommit):
        data = b"".join(bytes(c) for c in chunks)
        storage.put_exclusive(name, data)
        return len(data)
    with AtomicFile(storage, name, exclusive=exclusive) as f:
        for c in chunks:
            f.write(c)
    return f.size


def _quietly(fn) -> None:
    try:
        fn()
    except Exception:  # cleanup must not mask the original error
        pass


def check_readable(data: bytes, what: str) -> None:
    """Refuse, before anything is committed, manifest bytes (or a rank's index of a
    distributed save) that a reader with this environment would refuse: over
    ``MAX_MANIFEST_BYTES``, or estimated to take more memory to parse than
    ``max_parse_memory()`` (``CKPTSTORE_MAX_MANIFEST_MEMORY``). ``what`` names the
    bytes in the message. Raises UnsafeCheckpointError, as the reader would."""
    from ckptstore.errors import UnsafeCheckpointError
    from ckptstore.manifest import records
    from ckptstore.manifest.jsonio import PARSE_LIMIT_ENV, TEXT_COST, max_parse_memory, parse_estimate

    fewer = ("nothing was committed: save fewer tensors (e.g. concatenate small ones) or use a "
             "larger chunk_size, so that fewer records are written")
    size, cap = len(data), records.MAX_MANIFEST_BYTES
    if size > cap:
        raise UnsafeCheckpointError(f"{what} would be {size} bytes, over the {cap}-byte limit "
                                    f"every reader enforces; {fewer}")
    limit = max_parse_memory()
    need = max(parse_estimate(data), size * TEXT_COST)
    if need > limit:
        raise UnsafeCheckpointError(
            f"{what} ({size} bytes) would take up to {need} bytes of memory to read, over the "
            f"{limit}-byte limit of readers; {fewer}; or set {PARSE_LIMIT_ENV} to at least "
            f"{need} here and in every process that reads this checkpoint")


def commit_manifest(storage: Storage, manifest, *, overwrite: bool = False,
                    data: bytes | None = None) -> bytes:
    """Write ``manifest`` last: this is the commit. Returns the bytes written:
    ``data`` when the caller already encoded it (to tell later whether it landed).
    A manifest a reader would refuse (:func:`check_readable`) is refused first.

    Create-only unless ``overwrite``: a manifest already in place (another writer of
    the same path won) raises CheckpointExistsError and this save is discarded. With
    ``overwrite`` the previous manifest is replaced atomically and only then are its
    data files that the new one does not name removed: never files of another step,
    and never files that a sibling step saved incrementally on top of it still reads.
    """
    from ckptstore import manifest as fmt
    from ckptstore.errors import CheckpointExistsError

    if data is None:
        data = fmt.encode(manifest)
    check_readable(data, f"the manifest of {storage.url}")  # before anything is written
    old = None
    if overwrite and storage.exists(fmt.MANIFEST_NAME):
        try:
            old = fmt.read_manifest(storage)
        except (OSError, ValueError):  # unreadable: replace it, remove nothing
            old = None
        atomic_write(storage, fmt.MANIFEST_NAME, [data])
    else:
        try:
            atomic_write(storage, fmt.MANIFEST_NAME, [data], exclusive=True)
        except FileExistsError:
            raise CheckpointExistsError(
                f"another writer committed {storage.url} first; this save was discarded") from None
    if old is not None:
        keep = {f.name for f in manifest.files if f.base is None}
        gone = [f.name for f in old.files if f.base is None and f.name not in keep]
        if gone:
            keep |= referenced_by_siblings(storage)
        for name in gone:
            if name not in keep:
                storage.remove(name)
    return data


def referenced_by_siblings(storage: Storage) -> set[str]:
    """Names of this checkpoint's files that committed sibling checkpoints read
    through ``FileRecord.base`` (steps saved incrementally on top of this one).
    A sibling whose manifest cannot be read is skipped: it is not committed."""
    from ckptstore.errors import CkptError
    from ckptstore.manifest.io import read_manifest

    me = storage.url.rstrip("/").rpartition("/")[2]
    try:
        parent = storage.parent()
        entries = parent.listdir()
    except (OSError, ValueError, CkptError) as e:
        log.warning("cannot list the siblings of %s (%s); assuming none reads its files",
                    storage.url, e)
        return set()
    out: set[str] = set()
    for entry in entries:
        if entry == me:
            continue
        try:
            m = read_manifest(parent.child(entry))
        except (OSError, ValueError, CkptError):
            continue
        out.update(f.name for f in m.files if f.base == me)
    return out


def manifest_visible(storage: Storage, data: bytes | None) -> bool:
    """Whether the manifest ``data`` may be in place although its commit reported an
    error (e.g. the directory fsync after the link failed); unknown counts as yes."""
    from ckptstore import manifest as fmt

    if data is None:
        return False
    try:
        return storage.read(fmt.MANIFEST_NAME) == data
    except FileNotFoundError:
        return False
    except Exception:
        return True
