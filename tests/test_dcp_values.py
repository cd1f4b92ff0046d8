"""DCP's StorageWriter/Reader and non-tensor values, single process.

* ``dcp.load`` with :class:`CkptStoreReader` of a plain ``ckptstore.save`` checkpoint
  serves its non-tensor values (optimizer param_groups: floats, tuples, ints, bools,
  strings, None) as well as its tensors.
* A checkpoint written by ``dcp.save`` with :class:`CkptStoreWriter` loads with
  ``ckptstore.load`` as the nested state given to ``dcp.save``, its non-tensors as
  typed JSON (no pickled bytes stored); ``dcp.load`` reads it back too.
(Resharded DCP loads at world sizes 2 and 3: tests/test_distributed.py.)
"""
from __future__ import annotations

import copy
import fractions
import warnings

import numpy as np
import pytest
import torch
import torch.distributed.checkpoint as dcp

import ckptstore
from ckptstore.distributed.dcp import CkptStoreReader, CkptStoreWriter
from ckptstore.distributed.dcp_tree import nest
from ckptstore.manifest.io import read_manifest
from ckptstore.storage import LocalStorage

pytestmark = [pytest.mark.timeout(120),
              pytest.mark.filterwarnings("ignore:torch.distributed is disabled:UserWarning")]


def assert_same(a, b, where="") -> None:
    """Tensors bit-exact (torch.equal, same dtype), everything else == and same type."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype, where
        assert torch.equal(a, b), where
    elif isinstance(a, dict):
        # (DCP's flatten mapping does not say OrderedDict: dicts compare by content and order)
        assert isinstance(b, dict) and list(a) == list(b), f"{where}: {list(a)} != {list(b)}"
        for k in a:
            assert_same(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (list, tuple)):
        assert type(a) is type(b) and len(a) == len(b), f"{where}: {a!r} != {b!r}"
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, f"{where}.{i}")
    else:
        assert type(a) is type(b) and a == b, f"{where}: {a!r} != {b!r}"


def trained(seed: int, lr: float = 1e-3):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.Tanh(), torch.nn.Linear(5, 3))
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.8, 0.95), weight_decay=0.05)
    for _ in range(2):
        model(torch.randn(4, 6)).pow(2).sum().backward()
        opt.step()
        opt.zero_grad()
    return model, opt


def plain_state(seed: int, lr: float = 1e-3) -> dict:
    model, opt = trained(seed, lr)
    osd = opt.state_dict()
    osd["param_groups"][0]["name"] = "all"  # a string in a param group
    return {"model": model.state_dict(), "optim": osd, "step": 7 + seed, "note": f"run {seed}",
            "nothing": None if seed == 0 else "x", "scale": 0.1 * (seed + 1), "flag": seed == 0}


def dcp_state(seed: int) -> dict:
    """A state as DCP hands it back (DCP's flattening turns every dict key into a str)."""
    model, opt = trained(seed)
    osd = opt.state_dict()
    osd["state"] = {str(k): v for k, v in osd["state"].items()}
    return {"model": model.state_dict(), "optim": osd, "step": 3 + seed,
            "meta": {"name": f"run-{seed}", "tags": ["a", "b"], "shape": (2, 3), "ratio": 0.25 + seed,
                     "none": None, "big": 2 ** 70, "blob": b"\x00\xff"},
            "buffers": [torch.arange(4) + seed, {"inner": torch.ones(2, dtype=torch.bfloat16) * seed}]}


def test_dcp_load_of_a_plain_ckptstore_checkpoint(tmp_path):
    saved = plain_state(0)
    ckptstore.save(saved, tmp_path / "plain", blocking=True)
    target = plain_state(1, lr=0.5)  # different weights, optimizer state and hyper-parameters
    assert target["optim"]["param_groups"][0]["lr"] == 0.5
    dcp.load(target, storage_reader=CkptStoreReader(tmp_path / "plain"))
    assert_same(target, saved)
    pg = target["optim"]["param_groups"][0]
    assert pg["betas"] == (0.8, 0.95) and pg["lr"] == 1e-3 and pg["params"] == [0, 1, 2, 3]
    assert pg["foreach"] is None and pg["name"] == "all"


def test_dcp_load_of_plain_checkpoint_restores_training(tmp_path):
    model, opt = trained(0)
    ckptstore.save({"model": model.state_dict(), "optim": opt.state_dict()}, tmp_path / "c", blocking=True)
    model2, opt2 = trained(5, lr=0.3)
    sd = {"model": model2.state_dict(), "optim": opt2.state_dict()}
    dcp.load(sd, storage_reader=CkptStoreReader(tmp_path / "c"))
    model2.load_state_dict(sd["model"])
    opt2.load_state_dict(sd["optim"])
    x = torch.randn(4, 6)
    for m, o in ((model, opt), (model2, opt2)):
        m(x).pow(2).sum().backward()
        o.step()
    for p, q in zip(model.parameters(), model2.parameters()):
        assert torch.equal(p, q)


def test_dcp_written_checkpoint_is_the_nested_tree(tmp_path):
    state = dcp_state(0)
    expected = copy.deepcopy(state)
    dcp.save(state, storage_writer=CkptStoreWriter(tmp_path / "d"))
    assert ckptstore.fsck(LocalStorage(str(tmp_path / "d"))).ok
    assert_same(ckptstore.load(tmp_path / "d"), expected)
    m = read_manifest(LocalStorage(str(tmp_path / "d")))
    assert m.metadata["dcp"]["bytes"] == []  # no pickled bytes stored
    assert all(r.kind == "torch" for r in m.tensors)


def test_dcp_written_checkpoint_round_trips_through_dcp_load(tmp_path):
    saved = dcp_state(0)
    expected = copy.deepcopy(saved)
    dcp.save(saved, storage_writer=CkptStoreWriter(tmp_path / "d"))
    target = dcp_state(1)
    dcp.load(target, storage_reader=CkptStoreReader(tmp_path / "d"))
    assert_same(target, expected)
    # and the plain checkpoint of what DCP loaded equals the DCP-written one
    ckptstore.save(target, tmp_path / "again", blocking=True)
    assert_same(ckptstore.load(tmp_path / "again"), ckptstore.load(tmp_path / "d"))


def test_value_typed_json_cannot_hold_keeps_dcp_bytes(tmp_path):
    state = {"w": torch.arange(3.0), "frac": fractions.Fraction(1, 3), "n": 4}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp.save(state, storage_writer=CkptStoreWriter(tmp_path / "d"))
    out = ckptstore.load(tmp_path / "d")
    assert out["n"] == 4 and torch.equal(out["w"], torch.arange(3.0))
    assert isinstance(out["frac"], np.ndarray) and out["frac"].dtype == np.uint8  # DCP's bytes
    target = {"w": torch.zeros(3), "frac": None, "n": 0}
    dcp.load(target, storage_reader=CkptStoreReader(tmp_path / "d"))
    assert target["frac"] == fractions.Fraction(1, 3) and target["n"] == 4


def test_dcp_load_serves_numpy_arrays_and_tensors_inside_values(tmp_path):
    saved = {"arr": np.arange(5, dtype=np.int16), "pair": (torch.ones(2), 3), "t": torch.zeros(2)}
    ckptstore.save(saved, tmp_path / "c", blocking=True)
    target = {"arr": None, "pair": None, "t": torch.ones(2)}
    dcp.load(target, storage_reader=CkptStoreReader(tmp_path / "c"))
    assert np.array_equal(target["arr"], saved["arr"]) and target["arr"].dtype == np.int16
    assert target["pair"][1] == 3 and torch.equal(target["pair"][0], torch.ones(2))
    assert torch.equal(target["t"], torch.zeros(2))


def test_nest_follows_dcp_object_paths():
    nodes = {"a.b": 1, "a.l.0": 2, "a.l.1.x": 3, "c": "s"}
    paths = {"a.b": ("a", "b"), "a.l.0": ("a", "l", 0), "a.l.1.x": ("a", "l", 1, "x"), "c": ("c",)}
    assert nest(nodes, paths) == {"T": "dict", "items": [
        ["a", {"T": "dict", "items": [["b", 1], ["l", {"T": "list", "items": [
            2, {"T": "dict", "items": [["x", 3]]}]}]]}], ["c", "s"]]}
    flat = {"T": "dict", "items": [[k, v] for k, v in nodes.items()]}
    assert nest(nodes, None) == flat  # a custom planner without a mapping
    assert nest(nodes, {**paths, "c": ("a", "b", "z")}) == flat  # paths that collide
    assert nest(nodes, {**paths, "c": ("c", -1)}) == flat  # an invalid list position


def test_same_tree_as_importing_a_dcp_checkpoint(tmp_path):
    from ckptstore.interop.convert import import_checkpoint

    state = dcp_state(0)
    dcp.save(copy.deepcopy(state), checkpoint_id=str(tmp_path / "native"))
    import_checkpoint(tmp_path / "native", tmp_path / "imported", compression="none")
    dcp.save(copy.deepcopy(state), storage_writer=CkptStoreWriter(tmp_path / "ours"))
    assert_same(ckptstore.load(tmp_path / "ours"), ckptstore.load(tmp_path / "imported"))


def test_dcp_save_of_values_only_writes_no_data_file(tmp_path):
    state = {"a": 1, "b": {"c": "x", "d": [1.5, None]}}
    dcp.save(copy.deepcopy(state), storage_writer=CkptStoreWriter(tmp_path / "v"))
    assert ckptstore.load(tmp_path / "v") == state
    assert read_manifest(LocalStorage(str(tmp_path / "v"))).files == ()
    target = {"a": 0, "b": {"c": "", "d": None}}
    dcp.load(target, storage_reader=CkptStoreReader(tmp_path / "v"))
    assert target == state
