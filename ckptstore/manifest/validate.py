"""Structural validation of decoded manifests: what makes reading a checkpoint safe."""
from __future__ import annotations

import math

from ckptstore.errors import CorruptCheckpointError, UnsafeCheckpointError
from ckptstore.manifest.records import (
    INDEX_FORMAT,
    MANIFEST_NAME,
    MAX_SIZE,
    TORCH_DTYPES,
    Manifest,
    TensorRecord,
)
from ckptstore.pipeline.codec import CHUNK_LIMIT_ENV, CODECS, max_coded_chunk, plane_bound


def validate(m: Manifest) -> None:
    """Structural checks that make reading safe: names inside the checkpoint,
    sizes within files, no overlapping ranges, sizes consistent with dtype/shape."""
    files = {}
    for f in m.files:
        if f.name in files or f.name == MANIFEST_NAME:
            raise UnsafeCheckpointError(f"file {f.name!r} is listed twice or shadows the manifest")
        if f.format not in ("safetensors", "chunks", INDEX_FORMAT):
            raise CorruptCheckpointError(f"file {f.name!r} has unknown format {f.format!r}")
        if f.header_length > f.size:
            raise UnsafeCheckpointError(f"file {f.name!r}: header longer than the file")
        if f.format == INDEX_FORMAT and (f.header_length != f.size or f.base is not None):
            raise UnsafeCheckpointError(f"rank index {f.name!r} must be hashed whole, in place")
        files[f.name] = f
    if len(set(m.indexes)) != len(m.indexes) or any(
            files.get(n) is None or files[n].format != INDEX_FORMAT for n in m.indexes):
        raise CorruptCheckpointError("the manifest's rank indexes are not each listed once as "
                                     "index files")
    ranges: dict[str, list[tuple[int, int, str]]] = {n: [] for n in files}
    coded_cap = max_coded_chunk()
    for t in m.tensors:
        if t.kind not in ("torch", "numpy"):
            raise CorruptCheckpointError(f"tensor {t.name!r} has unknown kind {t.kind!r}")
        if t.kind == "torch" and t.dtype not in TORCH_DTYPES:
            raise UnsafeCheckpointError(
                f"tensor {t.name!r} has dtype {t.dtype!r}, which cannot be rebuilt safely from "
                "bytes (allowed: " + ", ".join(sorted(TORCH_DTYPES)) + ")")
        if len(t.shape) > 64:
            raise UnsafeCheckpointError(f"tensor {t.name!r} has {len(t.shape)} dimensions")
        if math.prod(t.shape) > MAX_SIZE:
            raise UnsafeCheckpointError(f"tensor {t.name!r} has an absurd shape {t.shape}")
        if not t.resolved:  # its chunks are in the rank indexes: check where it lies
            validate_grid(t, len(m.indexes))
            continue
        total = 0
        for i, c in enumerate(t.chunks):
            where = f"tensor {t.name!r} chunk {i}"
            holder = files.get(c.file)
            if holder is None:
                raise CorruptCheckpointError(f"{where} names file {c.file!r} that is not listed")
            if c.offset < holder.header_length or c.offset + c.length > holder.size:
                raise UnsafeCheckpointError(
                    f"{where}: bytes [{c.offset}, {c.offset + c.length}) lie outside the data "
                    f"of {c.file!r} (size {holder.size})")
            if c.raw_length > max(m.chunk_size, 1) or c.group < 1 or c.raw_length % c.group:
                raise UnsafeCheckpointError(f"{where}: raw length {c.raw_length} / group {c.group} invalid")
            if len(c.planes) != c.group or sum(p[1] for p in c.planes) != c.length:
                raise CorruptCheckpointError(f"{where}: plane lengths do not add up to {c.length}")
            for codec, length in c.planes:
                if codec not in CODECS:
                    raise CorruptCheckpointError(f"{where}: unknown codec {codec!r}")
                if codec == "raw" and length * c.group != c.raw_length:
                    raise CorruptCheckpointError(f"{where}: raw plane of wrong length")
                check_coded_plane(where, codec, length, c.raw_length // c.group)
            if c.raw_length > coded_cap and any(codec != "raw" for codec, _ in c.planes):
                raise UnsafeCheckpointError(
                    f"{where}: a compressed chunk of {c.raw_length} raw bytes is over the "
                    f"{coded_cap}-byte limit of what a reader decodes at once; if the checkpoint "
                    f"is trusted, set {CHUNK_LIMIT_ENV} to a larger number of bytes")
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


def check_coded_plane(where: str, codec: str, stored: int, raw: int) -> None:
    """A compressed plane of ``stored`` bytes claiming ``raw`` bytes: no larger than its
    raw size (a writer keeps a plane compressed only when that pays) and no more than
    the codec can decode to (:data:`ckptstore.pipeline.codec.MAX_RATIO`)."""
    if codec == "raw":
        return
    if stored > raw:
        raise CorruptCheckpointError(f"{where}: a {codec} plane of {stored} bytes is larger than "
                                     f"the {raw} bytes it decodes to")
    if raw > plane_bound(codec, stored):
        raise UnsafeCheckpointError(f"{where}: a {codec} plane of {stored} stored bytes claims {raw} "
                                    f"raw bytes, more than {codec} can decode to "
                                    f"(at most {plane_bound(codec, stored)})")


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


def validate_grid(t: TensorRecord, ranks: int) -> None:
    """A tensor of a distributed save: its grid tiles its shape, every cell has a
    writer among the ``ranks`` indexes, and its size fits its shape."""
    g = t.grid
    assert g is not None
    n = math.prod(t.shape)
    if not n or t.nbytes % n:
        raise CorruptCheckpointError(f"tensor {t.name!r}: {t.nbytes} bytes do not fit its shape")
    if len(g.cuts) != len(t.shape) or any(sum(c) != d for c, d in zip(g.cuts, t.shape)):
        raise UnsafeCheckpointError(f"tensor {t.name!r}: its grid does not tile {t.shape}")
    if len(g.writers) != math.prod(len(c) for c in g.cuts):
        raise CorruptCheckpointError(f"tensor {t.name!r}: its grid has {len(g.writers)} writers "
                                     "for a different number of cells")
    if g.writers and not (0 <= min(g.writers) and max(g.writers) < ranks):
        raise UnsafeCheckpointError(f"tensor {t.name!r} names a rank index that is not listed")
