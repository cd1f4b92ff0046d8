"""Manifest ``shards`` field: round-trip through encode/decode, and hostile layouts."""
from __future__ import annotations

import dataclasses

import pytest

from ckptstore import manifest as fmt
from ckptstore.errors import CorruptCheckpointError, UnsafeCheckpointError


def _chunk(offset: int, n: int) -> fmt.ChunkRecord:
    return fmt.ChunkRecord("f.chunks", offset, n, n, 1, (("raw", n),), "0" * 32, "0" * 32)


def _manifest(shards: list) -> fmt.Manifest:
    """A (4, 6) float32 tensor stored as the given [(offsets, shape)] boxes."""
    chunks, recs, pos = [], [], 0
    for off, shape in shards:
        n = shape[0] * shape[1] * 4
        chunks.append(_chunk(pos, n))
        recs.append(fmt.ShardRecord(off, shape, 1))
        pos += n
    t = fmt.TensorRecord("w", "torch", "float32", (4, 6), 96, "0" * 32, tuple(chunks), tuple(recs))
    return fmt.Manifest(1, {}, "", "id", 1 << 20, "none", None, {"T": "tensor", "id": 0}, (t,),
                        (fmt.FileRecord("f.chunks", max(pos, 1), "chunks", 0, "0" * 32),))


def test_grid_shards_roundtrip():
    m = _manifest([((0, 0), (2, 3)), ((0, 3), (2, 3)), ((2, 0), (2, 3)), ((2, 3), (2, 3))])
    back = fmt.decode(fmt.encode(m))
    assert back.tensors[0].shards == m.tensors[0].shards
    assert back.tensors[0].shards[3] == fmt.ShardRecord((2, 3), (2, 3), 1)


def test_records_without_shards_encode_as_before():
    m = _manifest([((0, 0), (4, 6))])
    m = dataclasses.replace(m, tensors=(dataclasses.replace(m.tensors[0], shards=()),))
    assert b'"shards"' not in fmt.encode(m)
    assert fmt.decode(fmt.encode(m)).tensors[0].shards == ()


@pytest.mark.parametrize("boxes", [
    [((0, 0), (2, 6)), ((1, 0), (2, 6))],  # overlap (and not a grid)
    [((0, 0), (2, 6)), ((3, 0), (1, 6))],  # gap
    [((0, 0), (2, 6)), ((2, 0), (3, 6))],  # outside the tensor
    [((0, 0), (2, 3)), ((2, 0), (2, 6)), ((0, 3), (2, 3))],  # boxes that are not a grid
    [((0, 0), (2, 6)), ((0, 0), (2, 6))],  # the same box twice
])
def test_hostile_shard_layouts_are_refused(boxes):
    with pytest.raises(CorruptCheckpointError):  # UnsafeCheckpointError included
        fmt.decode(fmt.encode(_manifest(boxes)))


def test_shard_must_own_whole_chunks():
    m = _manifest([((0, 0), (2, 6)), ((2, 0), (2, 6))])
    t = m.tensors[0]
    bad = fmt.TensorRecord(t.name, t.kind, t.dtype, t.shape, t.nbytes, t.digest, t.chunks,
                           (fmt.ShardRecord((0, 0), (2, 6), 2), fmt.ShardRecord((2, 0), (2, 6), 0)))
    with pytest.raises(CorruptCheckpointError):
        fmt.validate_shards(bad)
    with pytest.raises(UnsafeCheckpointError):
        fmt.validate_shards(fmt.TensorRecord(t.name, t.kind, t.dtype, t.shape, t.nbytes, t.digest,
                                             t.chunks, (fmt.ShardRecord((0,), (2,), 1),) * 2))
