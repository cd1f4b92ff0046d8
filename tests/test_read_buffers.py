"""Read buffers: never pre-filled, and no staging buffer where a box can be read in place.

With deterministic algorithms on (as a trainer that resumes bit-exactly runs),
``torch.empty`` fills new memory with NaN, a second pass over the whole state before
the read writes it: loads must run no ``aten::fill_``. A box that is whole rows of a
stored shard on chunk borders (every same-placement resume) is read straight into
its output."""
from __future__ import annotations

import math
import os
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import Shard, distribute_tensor
from torch.profiler import ProfilerActivity, profile

import ckptstore
from ckptstore.errors import CorruptCheckpointError
from ckptstore.manifest.io import read_catalog
from ckptstore.manifest.ranked import resolve
from ckptstore.read import boxes
from ckptstore.read.alloc import host_bytes, host_empty
from ckptstore.storage import open_storage


@pytest.fixture
def deterministic():
    before = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    assert torch.utils.deterministic.fill_uninitialized_memory
    yield
    torch.use_deterministic_algorithms(before)


def _filled(fn) -> int:
    """Elements that ``aten::fill_`` wrote while ``fn`` ran."""
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as p:
        fn()
    return sum(math.prod(e.input_shapes[0]) for e in p.events()
               if e.name == "aten::fill_" and e.input_shapes)


SMALL = 1024  # bookkeeping tensors of torch's own (DTensor metadata) may be filled


def test_torch_empty_fills_in_deterministic_mode(deterministic):
    # the premise: if torch stops filling, these tests no longer prove anything
    assert _filled(lambda: torch.empty(1 << 16)) == 1 << 16


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.int64, torch.complex128,
                                   torch.bool, torch.float8_e4m3fn])
def test_host_empty_has_the_shape_and_dtype_and_does_not_fill(deterministic, dtype):
    t = host_empty((3, 5, 7), dtype)
    assert t.shape == (3, 5, 7) and t.dtype == dtype and t.is_contiguous() and t.device.type == "cpu"
    assert host_empty((), dtype).shape == () and host_empty((0, 4), dtype).numel() == 0
    assert host_bytes(10).shape == (10,) and host_bytes(10).dtype == torch.uint8
    assert _filled(lambda: host_empty((1 << 16,), dtype)) == 0


def test_plain_load_does_not_fill(tmp_path, deterministic):
    state = {"w": torch.randn(256, 1024), "b": torch.arange(1000).to(torch.bfloat16)}
    ckptstore.save(state, tmp_path / "c", blocking=True, compression="zstd")  # chunk by chunk
    out = {}
    assert _filled(lambda: out.update(ckptstore.load(tmp_path / "c", mmap=False))) <= SMALL
    assert torch.equal(out["w"], state["w"]) and torch.equal(out["b"], state["b"])


def test_box_reads_of_a_distributed_save_do_not_fill(tmp_path, deterministic):
    os.environ.setdefault("CKPTSTORE_WRITERS", "1")
    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/pg", rank=0, world_size=1)
    try:
        mesh = init_device_mesh("cpu", (1,))
        full = torch.randn(64, 512)
        ckptstore.save({"w": distribute_tensor(full, mesh, [Shard(0)])}, tmp_path / "d",
                       blocking=True)
        target = {"w": distribute_tensor(torch.zeros(64, 512), mesh, [Shard(0)])}
        filled = _filled(lambda: ckptstore.load(tmp_path / "d", into=target))
        assert torch.equal(target["w"].to_local(), full)
        whole: dict = {}
        filled += _filled(lambda: whole.update(ckptstore.load(tmp_path / "d")))
        assert torch.equal(whole["w"], full)
    finally:
        dist.destroy_process_group()
    assert filled <= SMALL


@pytest.fixture
def rows_saved(tmp_path):
    """A 64x512 float32 tensor saved by a world of one as a DTensor, one row (2 KiB) per
    chunk; the storage and resolved manifest to read boxes of it from."""
    os.environ.setdefault("CKPTSTORE_WRITERS", "1")
    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/pg", rank=0, world_size=1)
    try:
        full = torch.randn(64, 512)
        mesh = init_device_mesh("cpu", (1,))
        ckptstore.save({"w": distribute_tensor(full, mesh, [Shard(0)])}, tmp_path / "r",
                       blocking=True, chunk_size=2048, compression="none")
    finally:
        dist.destroy_process_group()
    storage = open_storage(tmp_path / "r")
    manifest = resolve(storage, read_catalog(storage), {0: None})
    return full, storage, manifest


@pytest.mark.parametrize("box,in_place", [
    (((0, 0), (64, 512)), True),     # the whole shard
    (((8, 0), (16, 512)), True),     # whole rows on chunk borders
    (((3, 0), (1, 512)), True),
    (((0, 100), (64, 50)), False),   # part of each row: staged, then copied out
    (((5, 7), (2, 3)), False),
])
def test_boxes_of_whole_rows_on_chunk_borders_are_read_in_place(rows_saved, monkeypatch, box,
                                                                  in_place):
    full, storage, manifest = rows_saved
    staged = []
    real = boxes.host_bytes
    monkeypatch.setattr(boxes, "host_bytes", lambda n: staged.append(n) or real(n))
    (offsets, sizes), = [box]
    (got,) = boxes.read_boxes(storage, manifest, [(0, offsets, sizes)])
    want = full[tuple(slice(o, o + n) for o, n in zip(offsets, sizes))]
    assert torch.equal(got, want)
    assert (staged == []) is in_place, staged


def test_a_damaged_chunk_read_in_place_fails_the_read(rows_saved):
    _full, storage, manifest = rows_saved
    c = manifest.tensors[0].chunks[9]
    path = Path(storage.root) / c.file
    with open(path, "r+b") as f:  # flip a byte of row 9
        f.seek(c.offset + 5)
        b = f.read(1)
        f.seek(c.offset + 5)
        f.write(bytes([b[0] ^ 0xFF]))
    with pytest.raises(CorruptCheckpointError, match="chunk 9"):
        boxes.read_boxes(storage, manifest, [(0, (8, 0), (4, 512))])


def test_a_transient_box_of_a_cached_file_is_a_view_of_the_map_hashed_in_place(rows_saved,
                                                                                monkeypatch):
    full, storage, manifest = rows_saved
    (Path(storage.root) / manifest.tensors[0].chunks[0].file).read_bytes()  # in the page cache
    allocated = []
    monkeypatch.setattr(boxes, "host_empty", lambda *a: allocated.append(a) or host_empty(*a))
    hashed = []
    real = boxes.read_chunk
    monkeypatch.setattr(boxes, "read_chunk",
                        lambda s, rec, k, out, v: hashed.append(type(out).__name__) or real(s, rec, k, out, v))
    (whole, rows) = boxes.read_boxes(storage, manifest, [(0, (0, 0), (64, 512)), (0, (8, 0), (4, 512))],
                                     transient=True)
    assert torch.equal(whole, full) and torch.equal(rows, full[8:12])
    assert allocated == [] and hashed == ["Mapped"] * 68  # 64 + 4 rows, each verified
    # not transient (the caller keeps the tensors): never a view of a file
    (kept,) = boxes.read_boxes(storage, manifest, [(0, (0, 0), (64, 512))])
    assert torch.equal(kept, full) and len(allocated) == 1


def test_a_damaged_chunk_of_a_mapped_box_fails_the_read(rows_saved):
    _full, storage, manifest = rows_saved
    c = manifest.tensors[0].chunks[3]
    path = Path(storage.root) / c.file
    data = bytearray(path.read_bytes())
    data[c.offset + 100] ^= 0x01
    path.write_bytes(bytes(data))  # and in the page cache
    with pytest.raises(CorruptCheckpointError, match="chunk 3"):
        boxes.read_boxes(storage, manifest, [(0, (0, 0), (64, 512))], transient=True)
