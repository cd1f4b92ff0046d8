"""Rank indexes (schema 2): where a distributed save keeps its chunk records.

Each rank of a distributed save writes its own index file, ``index-<save id>-r<rank>.json``,
next to its data files: the files it wrote and, for every box it wrote, the chunks
that hold it. The manifest (still written last by rank 0, still the commit) lists
the indexes as files hashed whole (format ``"index"``, ``header_length == size``) and
each tensor by its :class:`~ckptstore.manifest.records.Grid`: how its dimensions are
cut and which rank's index holds each cell. Its size depends on the number of
tensors and ranks, not on the number of chunks.

A reader reads the manifest first (:func:`ckptstore.manifest.io.read_catalog`), then
only the indexes that hold the boxes it wants (:func:`resolve`), in parallel; every
index is checked against its hash in the manifest, and its records are validated as
a manifest's are before any is used.
"""
from __future__ import annotations

import concurrent.futures as cf
import dataclasses
import gc
import math
from bisect import bisect_right
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from ckptstore.errors import CorruptCheckpointError, UnsafeCheckpointError
from ckptstore.manifest import jsonio, records as rec
from ckptstore.manifest.validate import validate
from ckptstore.pipeline.codec import hash_bytes
from ckptstore.storage.base import Storage

READ_THREADS = 16

#: (tensor index, global offsets, shape, chunks) of one box in a rank index
Box = tuple[int, tuple[int, ...], tuple[int, ...], tuple[rec.ChunkRecord, ...]]
#: tensor index -> the boxes (offsets, shape) a reader wants of it; None: all of it
Want = Mapping[int, Sequence[tuple[Sequence[int], Sequence[int]]] | None]


@dataclass(frozen=True, slots=True)
class RankIndex:
    """One rank's index: its data files and its boxes."""

    save_id: str
    rank: int
    files: tuple[rec.FileRecord, ...]
    boxes: tuple[Box, ...]


def index_name(save_id: str, rank: int) -> str:
    return f"index-{save_id}-r{rank:05d}.json"


def encode_index(ix: RankIndex) -> bytes:
    return jsonio.seal({
        "format": rec.INDEX_FORMAT_NAME, "schema_version": 2, "save_id": ix.save_id,
        "rank": ix.rank, "hash": "xxh3_128",
        "files": [jsonio.file_json(f) for f in ix.files],
        "boxes": [[t, list(o), list(s), [jsonio.chunk_json(c) for c in cs]]
                  for t, o, s, cs in ix.boxes]})


def index_record(name: str, data: bytes) -> rec.FileRecord:
    """The manifest's record of an index: the whole file is hashed."""
    return rec.FileRecord(name, len(data), rec.INDEX_FORMAT, len(data), hash_bytes(data))


def decode_index(data: bytes, name: str) -> RankIndex:
    """Parse an index's bytes (checksum, strict JSON, the manifest's size caps)."""
    if data[:1] != b"{":
        raise CorruptCheckpointError(f"rank index {name} is not JSON")
    try:
        jsonio.check_checksum(data)
    except CorruptCheckpointError as e:
        raise CorruptCheckpointError(f"rank index {name}: {e}") from None
    obj = jsonio.parse_json(data)
    if obj.get("format") != rec.INDEX_FORMAT_NAME:
        raise CorruptCheckpointError(f"{name} is not a ckptstore rank index")
    try:
        boxes = tuple((jsonio.as_int(b[0], "box tensor", 1 << 40),
                       jsonio.build_dims(b[1], "box offset"), jsonio.build_dims(b[2], "box shape"),
                       tuple(jsonio.build_chunk(c) for c in b[3])) for b in obj["boxes"])
        return RankIndex(jsonio.as_str(obj["save_id"], "save id"),
                         jsonio.as_int(obj["rank"], "rank", 1 << 30),
                         tuple(jsonio.build_file(f) for f in obj["files"]), boxes)
    except (KeyError, IndexError, TypeError) as e:
        raise CorruptCheckpointError(f"rank index {name} has a malformed field: {e!r}") from None


def _cells(g: rec.Grid, boxes: Sequence[tuple[Sequence[int], Sequence[int]]] | None,
           starts: list[list[int]]) -> list[int]:
    """The cells (C order) of grid ``g`` that overlap any of ``boxes`` (all: None);
    ``starts`` are ``g.starts(d)`` for every dimension."""
    total = len(g.writers)
    if boxes is None:
        return list(range(total))
    out: set[int] = set()
    for offsets, shape in boxes:
        if not all(shape):
            continue
        ranges = []
        for d, (o, n) in enumerate(zip(offsets, shape)):
            lo = bisect_right(starts[d], o) - 1
            hi = bisect_right(starts[d], o + n - 1) - 1
            ranges.append(range(max(lo, 0), hi + 1))
        for combo in _product(ranges):
            cell = 0
            for d, i in enumerate(combo):
                cell = cell * len(g.cuts[d]) + i
            out.add(cell)
    return sorted(out)


def _product(ranges: list[range]) -> Iterable[tuple[int, ...]]:
    if not ranges:
        yield ()
        return
    for i in ranges[0]:
        for rest in _product(ranges[1:]):
            yield (i, *rest)


def read_index(storage: Storage, m: rec.Manifest, rank: int) -> RankIndex:
    """Rank ``rank``'s index of the distributed save ``m``, checked against the manifest
    and validated (CorruptCheckpointError / UnsafeCheckpointError naming it)."""
    name = m.indexes[rank]
    f = m.file(name)
    try:
        data = storage.read(name)
    except FileNotFoundError:
        raise CorruptCheckpointError(f"rank index {name} (rank {rank}) is missing; run "
                                     "ckptstore fsck on the checkpoint") from None
    if len(data) != f.size or hash_bytes(data) != f.header_hash:
        raise CorruptCheckpointError(f"rank index {name} (rank {rank}) does not match its hash in "
                                     "the manifest: it was damaged or replaced")
    ix = decode_index(data, name)
    if ix.save_id != m.save_id or ix.rank != rank:
        raise CorruptCheckpointError(f"rank index {name} belongs to save {ix.save_id} rank "
                                     f"{ix.rank}, not to this one")
    for df in ix.files:
        if df.format == rec.INDEX_FORMAT or df.base is not None:
            raise UnsafeCheckpointError(f"rank index {name} lists {df.name!r} as a data file")
    # the index's records must pass the checks a manifest's pass (bounds, codecs, overlaps)
    probe = []
    for t, offsets, shape, chunks in ix.boxes:
        if not 0 <= t < len(m.tensors) or m.tensors[t].grid is None:
            raise UnsafeCheckpointError(f"rank index {name} holds a box of tensor {t}, which is "
                                        "not a tensor of this distributed save")
        tr = m.tensors[t]
        itemsize = tr.nbytes // max(math.prod(tr.shape), 1)
        probe.append(rec.TensorRecord(f"{tr.name}@{list(offsets)}", tr.kind, tr.dtype, shape,
                                      math.prod(shape) * itemsize, "", chunks))
    validate(dataclasses.replace(m, tensors=tuple(probe), files=ix.files, indexes=()))
    return ix


def resolve(storage: Storage, m: rec.Manifest, want: Want | None = None,
            threads: int = READ_THREADS) -> rec.Manifest:
    """``m`` with the chunks of the wanted tensors' boxes (all tensors: ``want=None``)
    read from the rank indexes that hold them, and those indexes' data files.

    A tensor resolved only in part (some of its boxes) has ``digest == ""``; tensors
    not wanted stay unresolved, and tensors that have chunks already are kept as
    they are (resolving twice reads nothing twice). Raises CorruptCheckpointError /
    UnsafeCheckpointError naming the index when one is missing, damaged or
    inconsistent with the manifest."""
    if not m.indexes:
        return m
    was = gc.isenabled()
    gc.disable()  # hundreds of thousands of records, no cycles: collections would only cost
    try:
        return _resolve(storage, m, want, threads)
    finally:
        if was:
            gc.enable()


def _resolve(storage: Storage, m: rec.Manifest, want: Want | None, threads: int) -> rec.Manifest:
    need: dict[int, list[int]] = {}
    starts: dict[int, list[list[int]]] = {}  # tensor -> where its cells start, per dimension
    for i, t in enumerate(m.tensors):
        if not t.chunks and t.grid is not None and (want is None or i in want):
            boxes = None if want is None else want[i]
            if boxes is not None:
                starts[i] = [t.grid.starts(d) for d in range(len(t.grid.cuts))]
            need[i] = _cells(t.grid, boxes, starts.get(i, []))
    if not need:  # every wanted tensor has its chunks already: nothing to read
        return m
    ranks = sorted({w for i, cells in need.items() for w in
                    (m.tensors[i].grid.writers[c] for c in cells)})  # type: ignore[union-attr]
    with cf.ThreadPoolExecutor(max(1, min(threads, len(ranks)))) as ex:
        indexes = list(ex.map(lambda r: read_index(storage, m, r), ranks))
    found: dict[int, dict[int, tuple]] = {}  # every tensor's cells these indexes hold
    names = {f.name for f in m.files}
    files = list(m.files)
    for ix in indexes:
        if ix.rank not in m.indexes_read:  # its files are listed already when it was read before
            for f in ix.files:
                if f.name in names:
                    raise UnsafeCheckpointError(f"file {f.name!r} is listed by two rank indexes")
                names.add(f.name)
            files += ix.files
        for ti, offsets, shape, chunks in ix.boxes:
            g = m.tensors[ti].grid
            assert g is not None
            if ti not in starts:
                starts[ti] = [g.starts(d) for d in range(len(g.cuts))]
            cell = _cell_of(m.tensors[ti], g, starts[ti], offsets, shape, ix)
            if g.writers[cell] != ix.rank:
                raise UnsafeCheckpointError(f"rank index {m.indexes[ix.rank]} holds box {offsets} of "
                                            f"{m.tensors[ti].name!r}, which rank {g.writers[cell]} wrote")
            held = found.setdefault(ti, {})
            if cell in held:
                raise UnsafeCheckpointError(f"box {offsets} of {m.tensors[ti].name!r} is listed twice")
            held[cell] = (offsets, shape, chunks)
    # a tensor whose every cell was in the indexes just read is resolved too: reading
    # tensors one by one (ckptstore.open) then reads each index once, not once a tensor
    read = set(ranks)
    for i, t in enumerate(m.tensors):
        if i not in need and not t.chunks and t.grid is not None and i in found and all(
                w in read for w in t.grid.writers):
            need[i] = list(range(len(t.grid.writers)))
    tensors = list(m.tensors)
    for i, cells in need.items():
        tr = tensors[i]
        have = found.get(i, {})
        missing = [c for c in cells if c not in have]
        if missing:
            assert tr.grid is not None
            raise CorruptCheckpointError(
                f"tensor {tr.name!r}: rank index {m.indexes[tr.grid.writers[missing[0]]]} does not hold "
                "its box; run ckptstore fsck on the checkpoint")
        parts = [have[c] for c in cells]
        chunks = tuple(c for _, _, cs in parts for c in cs)
        whole = len(parts) == 1 and tuple(parts[0][1]) == tr.shape
        complete = len(cells) == len(tr.grid.writers)  # type: ignore[union-attr]
        tensors[i] = dataclasses.replace(
            tr, chunks=chunks, digest=rec.digest_of([c.raw_hash for c in chunks]) if complete else "",
            shards=() if whole else tuple(rec.ShardRecord(o, s, len(cs)) for o, s, cs in parts))
    return dataclasses.replace(m, tensors=tuple(tensors), files=tuple(files),
                               indexes_read=m.indexes_read | read)


def _cell_of(t: rec.TensorRecord, g: rec.Grid, starts: list[list[int]],
             offsets: tuple[int, ...], shape: tuple[int, ...], ix: RankIndex) -> int:
    """The cell of grid ``g`` (cells starting at ``starts``) that box (offsets, shape)
    is, or an error."""
    if len(offsets) != len(t.shape) or len(shape) != len(t.shape):
        raise UnsafeCheckpointError(f"rank {ix.rank}'s box {offsets} of {t.name!r} has the wrong rank")
    cell = 0
    for d, (o, n) in enumerate(zip(offsets, shape)):
        k = bisect_right(starts[d], o) - 1
        if k < 0 or starts[d][k] != o or g.cuts[d][k] != n:
            raise UnsafeCheckpointError(f"rank {ix.rank}'s box {offsets}+{shape} of {t.name!r} is not "
                                        "a cell of its grid")
        cell = cell * len(g.cuts[d]) + k
    return cell


__all__ = ["Box", "RankIndex", "Want", "read_index", "decode_index", "encode_index", "index_name",
           "index_record", "resolve"]
