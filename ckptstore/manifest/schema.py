"""The manifest: frozen records, JSON encoding with a self-checksum, strict parsing.

The manifest file is one JSON object whose last member is
``"manifest_checksum":"<xxh3-128 hex>"``; the checksum covers every byte before the
``,"manifest_checksum"`` that introduces it. docs/format.md is the full specification.
"""
from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from typing import Any

from ckptstore.errors import CorruptCheckpointError, SchemaVersionError, UnsafeCheckpointError
from ckptstore.pipeline.codec import CODECS, hash_bytes
from ckptstore.storage.base import check_name

MANIFEST_NAME = "manifest.json"
FORMAT_NAME = "ckptstore"
SCHEMA_VERSION = 1
MAX_MANIFEST_BYTES = 1 << 30
MAX_SIZE = 1 << 50  #: no file, tensor or chunk is larger than a petabyte
_CHECKSUM_KEY = b',"manifest_checksum":"'


@dataclass(frozen=True, slots=True)
class ChunkRecord:
    """One chunk of a tensor: ``raw_length`` bytes of the tensor stored as
    ``length`` bytes at ``offset`` of ``file`` (planes concatenated)."""

    file: str
    offset: int
    length: int
    raw_length: int
    group: int
    planes: tuple  # ((codec, length), ...)
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
    shape: tuple
    nbytes: int
    digest: str
    chunks: tuple
    shards: tuple = ()


@dataclass(frozen=True, slots=True)
class ShardRecord:
    """A box of a sharded tensor: ``shape`` elements from ``offsets`` (global
    coordinates); its bytes are the next ``nchunks`` chunks of the tensor record."""

    offsets: tuple
    shape: tuple
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
    writer: dict
    created: str
    save_id: str
    chunk_size: int
    compression: str
    metadata: Any
    tree: Any
    tensors: tuple
    files: tuple

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


# -- encoding ---------------------------------------------------------------

def encode(m: Manifest) -> bytes:
    body = {
        "format": FORMAT_NAME,
        "schema_version": m.schema_version,
        "writer": m.writer,
        "created": m.created,
        "save_id": m.save_id,
        "hash": "xxh3_128",
        "chunk_size": m.chunk_size,
        "compression": m.compression,
        "metadata": m.metadata,
        "files": [{"name": f.name, "size": f.size, "format": f.format,
                   "header_length": f.header_length, "header_hash": f.header_hash,
                   **({"base": f.base} if f.base is not None else {})}
                  for f in m.files],
        "tensors": [{"name": t.name, "kind": t.kind, "dtype": t.dtype, "shape": list(t.shape),
                     "nbytes": t.nbytes, "digest": t.digest,
                     "chunks": [[c.file, c.offset, c.length, c.raw_length, c.group,
                                 [list(p) for p in c.planes], c.hash, c.raw_hash]
                                for c in t.chunks],
                     **({"shards": [[list(h.offsets), list(h.shape), h.nchunks] for h in t.shards]}
                        if t.shards else {})}
                    for t in m.tensors],
        "tree": m.tree,
    }
    text = json.dumps(body, separators=(",", ":"), ensure_ascii=True, allow_nan=False).encode()
    prefix = text[:-1]  # drop the closing brace
    return prefix + _CHECKSUM_KEY + hash_bytes(prefix).encode() + b'"}\n'


# -- decoding ---------------------------------------------------------------

def _no_duplicates(pairs: list) -> dict:
    out = {}
    for k, v in pairs:
        if k in out:
            raise UnsafeCheckpointError(f"manifest has a duplicate JSON key {k!r}")
        out[k] = v
    return out


def _reject_constant(name: str):
    raise UnsafeCheckpointError(f"manifest contains the non-JSON constant {name}")


def parse_json(data: bytes) -> dict:
    """Strict JSON: no duplicate keys, no NaN/Infinity, bounded size and depth."""
    if len(data) > MAX_MANIFEST_BYTES:
        raise UnsafeCheckpointError(f"manifest is {len(data)} bytes, over the {MAX_MANIFEST_BYTES} limit")
    try:
        text = data.decode("utf-8")
        obj = json.loads(text, object_pairs_hook=_no_duplicates, parse_constant=_reject_constant)
    except RecursionError:
        raise UnsafeCheckpointError("manifest JSON nests too deeply") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CorruptCheckpointError(f"manifest is not valid JSON: {e}") from None
    if not isinstance(obj, dict):
        raise CorruptCheckpointError("manifest is not a JSON object")
    return obj


def check_checksum(data: bytes) -> None:
    cut = data.rfind(_CHECKSUM_KEY)
    if cut < 0:
        raise CorruptCheckpointError("manifest has no manifest_checksum; it is not a ckptstore "
                                     "manifest or it was truncated")
    expected = hash_bytes(data[:cut]).encode()
    start = cut + len(_CHECKSUM_KEY)
    if data[start:start + 32] != expected or data[start + 32:].strip() != b'"}':
        raise CorruptCheckpointError("manifest checksum mismatch: the manifest was modified "
                                     "or damaged after it was written")


def decode(data: bytes, *, migrate=None) -> Manifest:
    """Parse, check and validate manifest bytes. ``migrate(obj) -> obj`` upgrades
    older schema versions (see :mod:`ckptstore.migrations` once it exists)."""
    if data[:1] != b"{":
        raise CorruptCheckpointError("manifest does not start with '{' (not JSON; pickle or "
                                     "another format is never loaded)")
    check_checksum(data)
    obj = parse_json(data)
    if obj.get("format") != FORMAT_NAME:
        raise CorruptCheckpointError(f"manifest format is {obj.get('format')!r}, not {FORMAT_NAME!r}")
    version = obj.get("schema_version")
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise CorruptCheckpointError(f"invalid schema_version {version!r}")
    if version > SCHEMA_VERSION:
        writer = obj.get("writer", {})
        ver = writer.get("version", "?") if isinstance(writer, dict) else "?"
        raise SchemaVersionError(
            f"checkpoint uses schema version {version}, written by ckptstore {ver}; this "
            f"ckptstore reads up to schema version {SCHEMA_VERSION}: upgrade ckptstore to "
            f"{ver} or newer to load it")
    if version < SCHEMA_VERSION and migrate is not None:
        obj = migrate(obj)
    return _build(obj)


def _int(v: Any, what: str, hi: int = MAX_SIZE) -> int:
    if not isinstance(v, int) or isinstance(v, bool) or not 0 <= v <= hi:
        raise UnsafeCheckpointError(f"{what} is {v!r}: not an integer in [0, {hi}]")
    return v


def _str(v: Any, what: str) -> str:
    if not isinstance(v, str):
        raise CorruptCheckpointError(f"{what} is not a string")
    return v


def _build(obj: dict) -> Manifest:
    try:
        files = []
        for f in obj["files"]:
            files.append(FileRecord(
                name=check_name(_str(f["name"], "file name")), size=_int(f["size"], "file size"),
                format=_str(f["format"], "file format"),
                header_length=_int(f["header_length"], "header length"),
                header_hash=_str(f["header_hash"], "header hash"),
                base=check_base(f.get("base"))))
        tensors = []
        for t in obj["tensors"]:
            chunks = tuple(ChunkRecord(
                file=_str(c[0], "chunk file"), offset=_int(c[1], "chunk offset"),
                length=_int(c[2], "chunk length"), raw_length=_int(c[3], "chunk raw length"),
                group=_int(c[4], "chunk group", 16),
                planes=tuple((_str(p[0], "codec"), _int(p[1], "plane length")) for p in c[5]),
                hash=_str(c[6], "chunk hash"), raw_hash=_str(c[7], "chunk raw hash"))
                for c in t["chunks"])
            tensors.append(TensorRecord(
                name=_str(t["name"], "tensor name"), kind=_str(t["kind"], "tensor kind"),
                dtype=_str(t["dtype"], "dtype"),
                shape=tuple(_int(d, "dimension", 1 << 48) for d in t["shape"]),
                nbytes=_int(t["nbytes"], "tensor size"), digest=_str(t["digest"], "digest"),
                chunks=chunks, shards=tuple(ShardRecord(
                    offsets=tuple(_int(d, "shard offset", 1 << 48) for d in h[0]),
                    shape=tuple(_int(d, "shard dimension", 1 << 48) for d in h[1]),
                    nchunks=_int(h[2], "shard chunk count")) for h in t.get("shards", ()))))
        m = Manifest(
            schema_version=obj["schema_version"], writer=obj.get("writer", {}),
            created=str(obj.get("created", "")), save_id=_str(obj["save_id"], "save_id"),
            chunk_size=_int(obj["chunk_size"], "chunk_size"),
            compression=_str(obj["compression"], "compression"),
            metadata=obj.get("metadata"), tree=obj["tree"],
            tensors=tuple(tensors), files=tuple(files))
    except (KeyError, IndexError, TypeError) as e:
        raise CorruptCheckpointError(f"manifest is missing or has malformed field: {e!r}") from None
    validate(m)
    return m


def validate(m: Manifest) -> None:
    """Structural checks that make reading safe: names inside the checkpoint,
    sizes within files, no overlapping ranges, sizes consistent with dtype/shape."""
    files = {}
    for f in m.files:
        if f.name in files or f.name == MANIFEST_NAME:
            raise UnsafeCheckpointError(f"file {f.name!r} is listed twice or shadows the manifest")
        if f.format not in ("safetensors", "chunks"):
            raise CorruptCheckpointError(f"file {f.name!r} has unknown format {f.format!r}")
        if f.header_length > f.size:
            raise UnsafeCheckpointError(f"file {f.name!r}: header longer than the file")
        files[f.name] = f
    ranges: dict[str, list[tuple[int, int, str]]] = {n: [] for n in files}
    for t in m.tensors:
        if t.kind not in ("torch", "numpy"):
            raise CorruptCheckpointError(f"tensor {t.name!r} has unknown kind {t.kind!r}")
        if len(t.shape) > 64:
            raise UnsafeCheckpointError(f"tensor {t.name!r} has {len(t.shape)} dimensions")
        if math.prod(t.shape) > MAX_SIZE:
            raise UnsafeCheckpointError(f"tensor {t.name!r} has an absurd shape {t.shape}")
        total = 0
        for i, c in enumerate(t.chunks):
            where = f"tensor {t.name!r} chunk {i}"
            f = files.get(c.file)
            if f is None:
                raise CorruptCheckpointError(f"{where} names file {c.file!r} that is not listed")
            if c.offset < f.header_length or c.offset + c.length > f.size:
                raise UnsafeCheckpointError(
                    f"{where}: bytes [{c.offset}, {c.offset + c.length}) lie outside the data "
                    f"of {c.file!r} (size {f.size})")
            if c.raw_length > max(m.chunk_size, 1) or c.group < 1 or c.raw_length % c.group:
                raise UnsafeCheckpointError(f"{where}: raw length {c.raw_length} / group {c.group} invalid")
            if len(c.planes) != c.group or sum(p[1] for p in c.planes) != c.length:
                raise CorruptCheckpointError(f"{where}: plane lengths do not add up to {c.length}")
            for codec, length in c.planes:
                if codec not in CODECS:
                    raise CorruptCheckpointError(f"{where}: unknown codec {codec!r}")
                if codec == "raw" and length * c.group != c.raw_length:
                    raise CorruptCheckpointError(f"{where}: raw plane of wrong length")
            ranges[c.file].append((c.offset, c.offset + c.length, where))
            total += c.raw_length
        if total != t.nbytes:
            raise CorruptCheckpointError(
                f"tensor {t.name!r}: chunks hold {total} bytes, the tensor needs {t.nbytes}")
        if t.shards:
            validate_shards(t)
    for name, rs in ranges.items():
        rs.sort()
        for (_a0, a1, wa), (b0, _b1, wb) in zip(rs, rs[1:]):
            if b0 < a1:
                raise UnsafeCheckpointError(f"{wa} and {wb} overlap in file {name!r}")


def validate_shards(t: TensorRecord) -> None:
    """Shards must tile the tensor as a grid (each dimension cut into disjoint
    intervals, every combination present once) and own whole chunks."""
    nd = len(t.shape)
    if t.nbytes % max(math.prod(t.shape), 1):
        raise CorruptCheckpointError(f"tensor {t.name!r}: {t.nbytes} bytes do not fit its shape")
    itemsize = t.nbytes // max(math.prod(t.shape), 1)
    cuts: list[set] = [set() for _ in range(nd)]
    boxes = set()
    first = 0
    for h in t.shards:
        if len(h.offsets) != nd or len(h.shape) != nd or not all(h.shape):
            raise UnsafeCheckpointError(f"tensor {t.name!r}: shard {h.offsets} is malformed")
        if any(o + n > d for o, n, d in zip(h.offsets, h.shape, t.shape)):
            raise UnsafeCheckpointError(f"tensor {t.name!r}: shard {h.offsets} lies outside {t.shape}")
        box = tuple(zip(h.offsets, h.shape))
        if box in boxes:
            raise UnsafeCheckpointError(f"tensor {t.name!r}: shard {h.offsets} is listed twice")
        boxes.add(box)
        for d, iv in enumerate(box):
            cuts[d].add(iv)
        raw = sum(c.raw_length for c in t.chunks[first:first + h.nchunks])
        if h.nchunks < 1 or first + h.nchunks > len(t.chunks) or raw != math.prod(h.shape) * itemsize:
            raise CorruptCheckpointError(f"tensor {t.name!r}: shard {h.offsets} does not own "
                                         "whole chunks of its size")
        first += h.nchunks
    if first != len(t.chunks):
        raise CorruptCheckpointError(f"tensor {t.name!r}: chunks left over after its shards")
    for d, ivs in enumerate(cuts):
        end = 0
        for o, n in sorted(ivs):
            if o != end:
                raise UnsafeCheckpointError(f"tensor {t.name!r}: shards overlap or leave a gap "
                                            f"in dimension {d}")
            end = o + n
        if end != t.shape[d]:
            raise UnsafeCheckpointError(f"tensor {t.name!r}: shards do not cover dimension {d}")
    if len(boxes) != math.prod(len(c) for c in cuts):
        raise UnsafeCheckpointError(f"tensor {t.name!r}: shards do not tile its shape")
