"""Manifest bytes: JSON encoding with a self-checksum, strict parsing into records.

The checksum covers every byte before the ``,"manifest_checksum"`` member that
introduces it (the last member of the object). Parsing is strict (no duplicate keys,
no NaN, bounded size and depth) and every record is validated before it is returned.
"""
from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

from ckptstore.errors import CorruptCheckpointError, SchemaVersionError, UnsafeCheckpointError
from ckptstore.manifest import migrations, records as rec, rle
from ckptstore.manifest.records import FORMAT_NAME, MAX_MANIFEST_BYTES, MAX_SIZE
from ckptstore.manifest.validate import validate
from ckptstore.pipeline.codec import env_bytes, hash_bytes
from ckptstore.storage.base import check_name

_CHECKSUM_KEY = b',"manifest_checksum":"'

#: The memory a manifest's parse may take, estimated from its bytes before parsing
#: (:func:`parse_estimate`); ``CKPTSTORE_MAX_MANIFEST_MEMORY`` (bytes) raises it.
MAX_PARSE_MEMORY = 512 << 20
PARSE_LIMIT_ENV = "CKPTSTORE_MAX_MANIFEST_MEMORY"
#: bytes one JSON value costs once parsed, at most (an empty dict or list: 64-72
#: bytes and its slot in the list holding it; a short string or float a little less)
VALUE_COST = 72
#: bytes per byte of text: the bytes read, the decoded text, the checksum's slice
TEXT_COST = 3


def max_parse_memory() -> int:
    """The parse memory cap (``CKPTSTORE_MAX_MANIFEST_MEMORY``, read at call time)."""
    return env_bytes(PARSE_LIMIT_ENV, MAX_PARSE_MEMORY)


def parse_estimate(data: bytes) -> int:
    """An upper bound of the memory parsing ``data`` takes: every ``{``/``[`` opens a
    container and every ``,``/``:`` separates values (counted inside strings too, which
    only raises the bound). A legitimate manifest is estimated at about 12 bytes per
    byte (it takes 7-8); one made of empty objects at 50 (it takes 25)."""
    values = data.count(b"{") + data.count(b"[") + data.count(b",") + data.count(b":")
    return VALUE_COST * values + TEXT_COST * len(data)


def too_big(what: str) -> UnsafeCheckpointError:
    return UnsafeCheckpointError(
        f"{what}, over the {max_parse_memory()}-byte limit on the memory a manifest may take "
        f"to read; if the checkpoint is trusted, set {PARSE_LIMIT_ENV} to a larger number of bytes")


def file_json(f: rec.FileRecord) -> dict:
    return {"name": f.name, "size": f.size, "format": f.format,
            "header_length": f.header_length, "header_hash": f.header_hash,
            **({"base": f.base} if f.base is not None else {})}


def chunk_json(c: rec.ChunkRecord) -> list:
    return [c.file, c.offset, c.length, c.raw_length, c.group, [list(p) for p in c.planes],
            c.hash, c.raw_hash]


def tensor_json(t: rec.TensorRecord) -> dict:
    """A tensor's entry: its chunks, or (a tensor of a distributed save) its grid."""
    head = {"name": t.name, "kind": t.kind, "dtype": t.dtype, "shape": list(t.shape),
            "nbytes": t.nbytes}
    if t.grid is not None:
        return {**head, "grid": {"cuts": [rle.pack_sizes(c) for c in t.grid.cuts],
                                 "writers": rle.pack_ranks(t.grid.writers)}}
    return {**head, "digest": t.digest, "chunks": [chunk_json(c) for c in t.chunks],
            **({"shards": [[list(h.offsets), list(h.shape), h.nchunks] for h in t.shards]}
               if t.shards else {})}


def seal(body: dict) -> bytes:
    """``body`` as compact JSON whose last member is the checksum of what precedes it."""
    text = json.dumps(body, separators=(",", ":"), ensure_ascii=True, allow_nan=False).encode()
    prefix = text[:-1]  # drop the closing brace
    return prefix + _CHECKSUM_KEY + hash_bytes(prefix).encode() + b'"}\n'


def encode(m: rec.Manifest) -> bytes:
    if m.indexes and not all(t.grid is not None or not t.chunks for t in m.tensors):
        raise ValueError("a manifest with rank indexes lists tensors by their grids")
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
        "files": [file_json(f) for f in m.files if not (m.indexes and f.format != rec.INDEX_FORMAT)],
        "indexes": list(m.indexes),
        "tensors": [tensor_json(t) for t in m.tensors],
        "tree": m.tree,
    }
    return seal(body)


# -- decoding ---------------------------------------------------------------

def refuse_duplicate_keys(message: str) -> Callable[[list], dict]:
    """A ``json.loads`` pairs hook raising :class:`UnsafeCheckpointError` (``message``
    formatted with ``key``) when an object names a key twice."""
    def pairs_hook(pairs: list) -> dict:
        out = {}
        for k, v in pairs:
            if k in out:
                raise UnsafeCheckpointError(message.format(key=repr(k)))
            out[k] = v
        return out

    return pairs_hook


_no_duplicates = refuse_duplicate_keys("manifest has a duplicate JSON key {key}")


def _reject_constant(name: str):
    raise UnsafeCheckpointError(f"manifest contains the non-JSON constant {name}")


def parse_json(data: bytes) -> dict:
    """Strict JSON: no duplicate keys, no NaN/Infinity, bounded size and depth."""
    if len(data) > MAX_MANIFEST_BYTES:
        raise UnsafeCheckpointError(f"manifest is {len(data)} bytes, over the {MAX_MANIFEST_BYTES} limit")
    need = parse_estimate(data)
    if need > max_parse_memory():
        raise too_big(f"manifest of {len(data)} bytes would take up to {need} bytes of memory to parse")
    try:
        text = data.decode("utf-8")
        obj = json.loads(text, object_pairs_hook=_no_duplicates, parse_constant=_reject_constant)
    except RecursionError:
        raise UnsafeCheckpointError("manifest JSON nests too deeply") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CorruptCheckpointError(f"manifest is not valid JSON: {e}") from None
    except ValueError as e:  # e.g. an integer over Python's digit limit
        raise UnsafeCheckpointError(f"manifest holds a value this reader refuses: {e}") from None
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


def decode(data: bytes, *, migrate: Callable[[dict], dict] | None = None) -> rec.Manifest:
    """Parse, check and validate manifest bytes. An older schema version is upgraded
    first by ``migrate(obj) -> obj``, by default the registered steps of
    :mod:`ckptstore.manifest.migrations`. Manifests in storage are read with
    :func:`ckptstore.manifest.io.read_manifest`, which also caps their size."""
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
    current = rec.SCHEMA_VERSION  # at call time: see records.SCHEMA_VERSION
    if version > current:
        writer = obj.get("writer", {})
        ver = writer.get("version", "?") if isinstance(writer, dict) else "?"
        raise SchemaVersionError(
            f"checkpoint uses schema version {version}, written by ckptstore {ver}; this "
            f"ckptstore reads up to schema version {current}: upgrade ckptstore to "
            f"{ver} or newer to load it")
    if version < current:
        obj = (migrate or migrations.migrate)(obj)
    return _build(obj)


def as_int(v: Any, what: str, hi: int = MAX_SIZE) -> int:
    if not isinstance(v, int) or isinstance(v, bool) or not 0 <= v <= hi:
        raise UnsafeCheckpointError(f"{what} is {v!r}: not an integer in [0, {hi}]")
    return v


def as_str(v: Any, what: str) -> str:
    if not isinstance(v, str):
        raise CorruptCheckpointError(f"{what} is not a string")
    return v


def build_file(f: Any) -> rec.FileRecord:
    return rec.FileRecord(
        name=check_name(as_str(f["name"], "file name")), size=as_int(f["size"], "file size"),
        format=as_str(f["format"], "file format"),
        header_length=as_int(f["header_length"], "header length"),
        header_hash=as_str(f["header_hash"], "header hash"), base=rec.check_base(f.get("base")))


def build_chunk(c: Any) -> rec.ChunkRecord:
    """A chunk record from its JSON array. The loop that reads rank indexes runs this
    for every chunk of a job, so the usual case is checked with plain type tests; any
    doubt falls to the field-by-field checks, which name what is wrong."""
    if type(c) is list and len(c) == 8:
        file, offset, length, raw, group, planes, h, rh = c
        if (type(file) is str and type(h) is str and type(rh) is str and type(offset) is int
                and type(length) is int and type(raw) is int and type(group) is int
                and type(planes) is list and 0 <= offset <= MAX_SIZE and 0 <= length <= MAX_SIZE
                and 0 <= raw <= MAX_SIZE and 0 <= group <= 16):
            ps = tuple((p[0], p[1]) for p in planes if type(p) is list and len(p) == 2
                       and type(p[0]) is str and type(p[1]) is int and 0 <= p[1] <= MAX_SIZE)
            if len(ps) == len(planes):
                return rec.ChunkRecord(file, offset, length, raw, group, ps, h, rh)
    return _checked_chunk(c)


def _checked_chunk(c: Any) -> rec.ChunkRecord:
    return rec.ChunkRecord(
        file=as_str(c[0], "chunk file"), offset=as_int(c[1], "chunk offset"),
        length=as_int(c[2], "chunk length"), raw_length=as_int(c[3], "chunk raw length"),
        group=as_int(c[4], "chunk group", 16),
        planes=tuple((as_str(p[0], "codec"), as_int(p[1], "plane length")) for p in c[5]),
        hash=as_str(c[6], "chunk hash"), raw_hash=as_str(c[7], "chunk raw hash"))


def build_dims(v: Any, what: str) -> tuple[int, ...]:
    if type(v) is list and len(v) <= 64 and all(type(d) is int and 0 <= d <= 1 << 48 for d in v):
        return tuple(v)  # the usual case, in one pass
    if not isinstance(v, list) or len(v) > 64:
        raise UnsafeCheckpointError(f"{what} is not a list of at most 64 dimensions")
    return tuple(as_int(d, what, 1 << 48) for d in v)


def _grid(g: Any, name: str) -> rec.Grid:
    if not isinstance(g, dict) or not isinstance(g.get("cuts"), list) or len(g["cuts"]) > 64:
        raise CorruptCheckpointError(f"tensor {name!r} has a malformed grid")
    return rec.Grid(tuple(rle.unpack_sizes(c, f"tensor {name!r} cuts") for c in g["cuts"]),
                    rle.unpack_ranks(g.get("writers"), f"tensor {name!r} writers"))


def build_tensor(t: Any) -> rec.TensorRecord:
    name = as_str(t["name"], "tensor name")
    kind, dtype = as_str(t["kind"], "tensor kind"), as_str(t["dtype"], "dtype")
    shape, nbytes = build_dims(t["shape"], "dimension"), as_int(t["nbytes"], "tensor size")
    if "grid" in t:
        return rec.TensorRecord(name, kind, dtype, shape, nbytes, "", (), grid=_grid(t["grid"], name))
    return rec.TensorRecord(
        name, kind, dtype, shape, nbytes, digest=as_str(t["digest"], "digest"),
        chunks=tuple(build_chunk(c) for c in t["chunks"]),
        shards=tuple(rec.ShardRecord(
            offsets=build_dims(h[0], "shard offset"), shape=build_dims(h[1], "shard dimension"),
            nchunks=as_int(h[2], "shard chunk count")) for h in t.get("shards", ())))


def _build(obj: dict) -> rec.Manifest:
    try:
        indexes = obj.get("indexes", [])
        if not isinstance(indexes, list):
            raise CorruptCheckpointError("manifest indexes is not a list")
        m = rec.Manifest(
            schema_version=obj["schema_version"], writer=obj.get("writer", {}),
            created=str(obj.get("created", "")), save_id=as_str(obj["save_id"], "save_id"),
            chunk_size=as_int(obj["chunk_size"], "chunk_size"),
            compression=as_str(obj["compression"], "compression"),
            metadata=obj.get("metadata"), tree=obj["tree"],
            tensors=tuple(build_tensor(t) for t in obj["tensors"]),
            files=tuple(build_file(f) for f in obj["files"]),
            indexes=tuple(check_name(as_str(n, "index name")) for n in indexes))
    except (KeyError, IndexError, TypeError) as e:
        raise CorruptCheckpointError(f"manifest is missing or has malformed field: {e!r}") from None
    validate(m)
    return m
