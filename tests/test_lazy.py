"""Lazy open and partial loads read only the bytes they need."""
from __future__ import annotations

import numpy as np
import pytest
import torch

import ckptstore
from ckptstore.errors import CorruptCheckpointError
from ckptstore.read.lazy import LazyCheckpoint
from ckptstore.storage import LocalStorage
from conftest import assert_same_tree


class CountingStorage(LocalStorage):
    """Records every data read as (file, offset, length)."""

    def __init__(self, root) -> None:
        super().__init__(root)
        self.reads: list[tuple[str, int, int]] = []

    def read(self, name, offset=0, length=None):
        data = super().read(name, offset, length)
        self.reads.append((name, offset, len(data)))
        return data

    def readinto(self, name, offset, buf):
        n = super().readinto(name, offset, buf)
        self.reads.append((name, offset, n))
        return n

    def read_extent(self, name, offset, length):
        view = super().read_extent(name, offset, length)
        self.reads.append((name, offset, len(view)))
        return view

    def map_file(self, name):
        return None  # no copy-on-write maps: every byte goes through the calls above


def _state():
    torch.manual_seed(0)
    w = torch.randn(64, 64)
    return {"model": {"enc.weight": w, "enc.bias": torch.randn(64),
                      "head.weight": torch.randn(10, 64)},
            "optim": {"state": {0: {"exp_avg": torch.randn(64, 64)}}, "lr": 0.5},
            "tied": w, "hist": [torch.arange(3), 7, np.arange(4.0)], "step": 9}


@pytest.fixture(params=["none", "zstd"])
def ckpt(tmp_path, request):
    path = tmp_path / "c"
    ckptstore.save(_state(), path, compression=request.param, chunk_size=4096,
                   shard_size=8192, blocking=True)
    return path


def _chunk_ranges(storage, names):
    """The bytes of these tensors' chunks, as merged (file, start, end) ranges."""
    m = ckptstore.open(storage).manifest
    recs = [t for t in m.tensors if t.name in names]
    return _merged((c.file, c.offset, c.length) for t in recs for c in t.chunks)


def _merged(reads):
    """(file, offset, length) reads as the set of merged (file, start, end) ranges:
    whether a tensor's bytes came in one extent or chunk by chunk is not the point."""
    out = []
    for f, o, n in sorted(reads):
        if out and out[-1][0] == f and o <= out[-1][2]:
            out[-1] = (f, out[-1][1], max(out[-1][2], o + n))
        else:
            out.append((f, o, o + n))
    return set(out)


def _data_reads(storage):
    """Reads of tensor data (not the manifest, not the verified safetensors headers)."""
    files = ckptstore.open(LocalStorage(storage.root)).manifest.files
    headers = {(f.name, 0, f.header_length) for f in files if f.header_length}
    return [r for r in storage.reads if r[0] != "manifest.json" and r not in headers]


def test_open_reads_only_the_manifest(ckpt):
    storage = CountingStorage(ckpt)
    lazy = ckptstore.open(storage)
    assert isinstance(lazy, LazyCheckpoint)
    assert set(lazy) == {"model.enc.weight", "model.enc.bias", "model.head.weight",
                         "optim.state.0.exp_avg", "tied", "hist.0", "hist.2"}
    info = lazy.info("model.head.weight")
    assert info.shape == (10, 64) and info.dtype == "float32" and info.nbytes == 2560
    assert len(info.digest) == 32
    assert {r[0] for r in storage.reads} == {"manifest.json"}
    assert lazy.metadata is None and len(lazy) == 7


def test_getitem_reads_one_tensor(ckpt):
    storage = CountingStorage(ckpt)
    lazy = ckptstore.open(storage)
    storage.reads.clear()
    t = lazy["model.head.weight"]
    assert torch.equal(t, _state()["model"]["head.weight"])
    wanted = _chunk_ranges(CountingStorage(ckpt), {"model.head.weight"})
    assert _merged(_data_reads(storage)) == wanted
    assert torch.equal(lazy["tied"], _state()["tied"])  # the alias has its own name
    assert isinstance(lazy["hist.2"], np.ndarray)
    with pytest.raises(KeyError):
        lazy["step"]  # not an array: it is in tree()
    with pytest.raises(TypeError):
        lazy["tied"] = torch.zeros(1)  # read-only
    assert lazy.tree()["step"] == 9


def test_partial_load_reads_only_selected(ckpt):
    storage = CountingStorage(ckpt)
    state = ckptstore.load(storage, keys=["model.enc."])
    assert set(state) == {"model"} and set(state["model"]) == {"enc.weight", "enc.bias"}
    assert_same_tree({"enc.weight": _state()["model"]["enc.weight"],
                      "enc.bias": _state()["model"]["enc.bias"]}, state["model"])
    wanted = _chunk_ranges(CountingStorage(ckpt), {"model.enc.weight", "model.enc.bias"})
    got = _merged(_data_reads(storage))
    assert got == wanted
    # a list keeps its positions: unselected entries are None
    state = ckptstore.load(ckpt, keys=lambda n: n in ("hist.1", "step"))
    assert state == {"hist": [None, 7, None], "step": 9}


def test_partial_load_ignores_damage_elsewhere(ckpt):
    m = ckptstore.open(ckpt).manifest
    rec = next(t for t in m.tensors if t.name == "optim.state.0.exp_avg")
    c = rec.chunks[0]
    with open(ckpt / c.file, "r+b") as f:
        f.seek(c.offset + 7)
        b = f.read(1)
        f.seek(c.offset + 7)
        f.write(bytes([b[0] ^ 0x40]))
    state = ckptstore.load(ckpt, keys="model.")
    assert torch.equal(state["model"]["head.weight"], _state()["model"]["head.weight"])
    with pytest.raises(CorruptCheckpointError, match="optim.state.0.exp_avg"):
        ckptstore.load(ckpt, keys="optim.")
    with pytest.raises(CorruptCheckpointError):
        ckptstore.open(ckpt)["optim.state.0.exp_avg"]


def test_flat_and_into_with_keys(ckpt):
    lazy = ckptstore.open(ckpt)
    flat = lazy.flat("model.")
    assert set(flat) == {"model.enc.weight", "model.enc.bias", "model.head.weight"}
    target = {"model": {"enc.weight": torch.zeros(64, 64), "enc.bias": torch.zeros(64),
                        "new.weight": torch.zeros(3)}}
    report = ckptstore.load(ckpt, into=target, keys="model.enc.", strict=False)
    assert sorted(report.loaded) == ["model.enc.bias", "model.enc.weight"]
    assert report.missing == () and report.unexpected == ()  # new.weight lies outside keys
    assert torch.equal(target["model"]["enc.weight"], _state()["model"]["enc.weight"])
