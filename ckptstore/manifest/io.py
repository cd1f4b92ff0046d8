"""Reading a committed manifest from storage: the one way every layer does it.

Load, fsck, the Checkpointer (latest, retention, metadata), ``ls``, ``gc``, promotion
and commit all read manifests here, so they all get the same size cap and the same
schema migrations (:mod:`ckptstore.manifest.migrations`): after a schema bump an
older step reads the same everywhere.
"""
from __future__ import annotations

from ckptstore.errors import CheckpointNotFoundError, UnsafeCheckpointError
from ckptstore.manifest.jsonio import TEXT_COST, decode, max_parse_memory, too_big
from ckptstore.manifest.ranked import resolve
from ckptstore.manifest.records import MANIFEST_NAME, MAX_MANIFEST_BYTES, Manifest
from ckptstore.storage.base import Storage
from ckptstore.storage.preflight import describe


def _read_catalog_bytes(storage: Storage) -> tuple[bytes, Manifest]:
    """The committed manifest's bytes exactly as stored and what they decode to
    (migrated to this library's schema version), without its rank indexes.

    Raises CheckpointNotFoundError (a FileNotFoundError) if there is no manifest,
    UnsafeCheckpointError if it is over the size cap, CorruptCheckpointError or
    SchemaVersionError if it does not decode."""
    try:
        size = storage.size(MANIFEST_NAME)
        if size > MAX_MANIFEST_BYTES:
            raise UnsafeCheckpointError(f"{MANIFEST_NAME} is {size} bytes; refusing to read it")
        if size * TEXT_COST > max_parse_memory():  # refused unread: its text alone is too much
            raise too_big(f"{MANIFEST_NAME} is {size} bytes")
        data = storage.read(MANIFEST_NAME)
    except (FileNotFoundError, NotADirectoryError):
        hint = describe(storage)
        raise CheckpointNotFoundError(f"no committed checkpoint at {storage.url}: " + (hint or (
            f"{MANIFEST_NAME} is missing (an interrupted save never writes it; use ckptstore ls "
            "to list committed ones)")), hint) from None
    return data, decode(data)


def read_manifest_bytes(storage: Storage) -> tuple[bytes, Manifest]:
    """The committed manifest's bytes exactly as stored, and the manifest they decode
    to, every rank index of a distributed save read into it. Promotion copies the
    bytes and decides with the manifest. Errors as :func:`_read_catalog_bytes`, and a
    missing or damaged rank index raises CorruptCheckpointError naming it."""
    data, m = _read_catalog_bytes(storage)
    return data, resolve(storage, m)


def read_catalog(storage: Storage) -> Manifest:
    """The manifest alone: a distributed save's tensors keep their grids and no
    chunks (``resolved`` is False) until :func:`ckptstore.manifest.ranked.resolve`
    reads the rank indexes a reader needs. Loads start here; everything else reads
    :func:`read_manifest`."""
    return _read_catalog_bytes(storage)[1]


def read_manifest(storage: Storage) -> Manifest:
    """Read, migrate and validate the manifest of the checkpoint at ``storage``,
    with every rank index of a distributed save (errors as :func:`read_manifest_bytes`)."""
    return read_manifest_bytes(storage)[1]
