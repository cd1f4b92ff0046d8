"""The manifest's records: frozen dataclasses, the format's constants and names.

The manifest file is one JSON object whose last member is
``"manifest_checksum":"<xxh3-128 hex>"`` (:mod:`ckptstore.manifest.jsonio` encodes and
decodes it); docs/format.md is the full specification.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from itertools import accumulate
from typing import Any

from ckptstore.errors import UnsafeCheckpointError
from ckptstore.pipeline.codec import hash_bytes

MANIFEST_NAME = "manifest.json"
FORMAT_NAME = "ckptstore"
#: the schema version this library writes and reads up to. Everything reads it here at
#: call time (``ckptstore.manifest.SCHEMA_VERSION`` forwards to it), so patching this one
#: attribute simulates a newer library.
SCHEMA_VERSION = 2
#: ``FileRecord.format`` of a rank index (schema 2): the whole file is its "header"
INDEX_FORMAT = "index"
INDEX_FORMAT_NAME = "ckptstore-index"
MAX_MANIFEST_BYTES = 1 << 30
MAX_SIZE = 1 << 50  #: no file, tensor or chunk is larger than a petabyte

#: torch dtypes a tensor may have in a checkpoint: those rebuilt safely from their
#: bytes. Quantized (qint8, quint4x2, ...), bit-container (bits8, ...) and sub-byte
#: shell dtypes (int4, uint2, ...) are refused on save and rejected by validation.
TORCH_DTYPES = frozenset({
    "bool", "uint8", "uint16", "uint32", "uint64", "int8", "int16", "int32", "int64",
    "float16", "bfloat16", "float32", "float64", "complex32", "complex64", "complex128",
    "float8_e4m3fn", "float8_e5m2", "float8_e4m3fnuz", "float8_e5m2fnuz", "float8_e8m0fnu",
})


@dataclass(frozen=True, slots=True)
class ChunkRecord:
    """One chunk of a tensor: ``raw_length`` bytes of the tensor stored as
    ``length`` bytes at ``offset`` of ``file`` (planes concatenated)."""

    file: str
    offset: int
    length: int
    raw_length: int
    group: int
    planes: tuple[tuple[str, int], ...]  # ((codec, length), ...)
    hash: str
    raw_hash: str


@dataclass(frozen=True, slots=True)
class TensorRecord:
    """A tensor (``kind="torch"``) or numpy array (``kind="numpy"``) and its chunks,
    in order: their raw bytes concatenated are the array's C-contiguous bytes.

    A tensor saved by several ranks has ``shards`` (:class:`ShardRecord`, which tile
    ``shape``): its chunks are then each shard's C-contiguous bytes in turn, every
    shard starting on a chunk boundary. Empty ``shards`` means one whole tensor.
    """

    name: str
    kind: str
    dtype: str
    shape: tuple[int, ...]
    nbytes: int
    digest: str
    chunks: tuple[ChunkRecord, ...]
    shards: tuple[ShardRecord, ...] = ()
    grid: Grid | None = None

    @property
    def resolved(self) -> bool:
        """False for a tensor of a distributed save whose chunks are still in the
        rank indexes (:func:`ckptstore.manifest.ranked.resolve` reads them)."""
        return self.grid is None or bool(self.chunks) or self.nbytes == 0


@dataclass(frozen=True, slots=True)
class Grid:
    """Where a tensor of a distributed save lies (schema 2): each dimension cut into
    intervals of ``cuts[d]`` elements, the cells in C order, and the rank whose index
    holds each cell's chunks (``writers``, one per cell)."""

    cuts: tuple[tuple[int, ...], ...]
    writers: tuple[int, ...]

    def starts(self, dim: int) -> list[int]:
        """Where each interval of dimension ``dim`` starts."""
        return list(accumulate(self.cuts[dim][:-1], initial=0)) if self.cuts[dim] else []


@dataclass(frozen=True, slots=True)
class ShardRecord:
    """A box of a sharded tensor: ``shape`` elements from ``offsets`` (global
    coordinates); its bytes are the next ``nchunks`` chunks of the tensor record."""

    offsets: tuple[int, ...]
    shape: tuple[int, ...]
    nchunks: int


@dataclass(frozen=True, slots=True)
class FileRecord:
    """A data file: ``safetensors`` (header + raw data) or ``chunks`` (frames only).

    ``base`` is None for a file inside this checkpoint; an incremental save sets it to
    the name of a sibling checkpoint directory (same parent) that holds the file.
    """

    name: str
    size: int
    format: str
    header_length: int
    header_hash: str
    base: str | None = None


@dataclass(frozen=True, slots=True)
class Manifest:
    """Everything a reader needs; written last, its presence is the commit."""

    schema_version: int
    writer: dict[str, Any]
    created: str
    save_id: str
    chunk_size: int
    compression: str
    metadata: Any
    tree: Any
    tensors: tuple[TensorRecord, ...]
    files: tuple[FileRecord, ...]
    #: rank -> name of its index file (a distributed save; schema 2); () when every
    #: tensor's chunks are in this manifest
    indexes: tuple[str, ...] = ()
    #: ranks whose index has been read into this manifest (not stored: how far a reader
    #: resolved it, see :func:`ckptstore.manifest.ranked.resolve`)
    indexes_read: frozenset[int] = frozenset()

    @property
    def resolved(self) -> bool:
        """Every tensor's chunks are known (always true without ``indexes``)."""
        return all(t.resolved for t in self.tensors)

    def file(self, name: str) -> FileRecord:
        for f in self.files:
            if f.name == name:
                return f
        raise KeyError(name)


#: a sibling checkpoint directory named by ``FileRecord.base``: one plain name component
BASE_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,127}")


def check_base(base: Any) -> str | None:
    """Validate ``FileRecord.base``: None, or a sibling directory name (no separators,
    no dots, so it can never leave the parent of the checkpoint)."""
    if base is None:
        return None
    if not isinstance(base, str) or not BASE_RE.fullmatch(base):
        raise UnsafeCheckpointError(f"file base {base!r} is not a plain sibling checkpoint name")
    return base


def digest_of(raw_hashes: list[str]) -> str:
    """A tensor's content digest: xxh3-128 over its chunks' raw hashes."""
    return hash_bytes("".join(raw_hashes).encode("ascii"))


