"""Distributed save/load on torch.distributed (gloo, CPU, spawned ranks).

One world-size-2 run saves an FSDP2 model + AdamW state (ckptstore and DCP through
CkptStoreWriter) plus a full reference; world sizes 1, 2 and 3 load it back and must
reproduce the reference bit for bit. A rank that fails mid-save must leave nothing
committed, make every rank raise, and keep the previous checkpoint.
"""
from __future__ import annotations

import dataclasses
import json
import os
import re
import uuid

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import ckptstore
from ckptstore import manifest as fmt
from ckptstore.errors import DistributedSaveError
from ckptstore.storage import LocalStorage, open_storage
from conftest import assert_same_tree

pytestmark = pytest.mark.timeout(300)


# -- helpers that run inside the spawned ranks ---------------------------------------

def _init(rank: int, world: int, tmp: str) -> None:
    os.environ["CKPTSTORE_WRITERS"] = "1"  # 2 cores shared by every rank's writers
    os.environ["CKPTSTORE_DIST_TIMEOUT"] = "60"
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{tmp}/store-{os.environ['RUN_ID']}",
                            rank=rank, world_size=world)


def _model(seed: int):
    from torch.distributed.fsdp import fully_shard

    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(48, 80), torch.nn.ReLU(), torch.nn.Linear(80, 48),
                                torch.nn.ReLU(), torch.nn.Linear(48, 5))
    for layer in model:
        if isinstance(layer, torch.nn.Linear):
            fully_shard(layer)
    fully_shard(model)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    torch.manual_seed(seed + 1)
    for _ in range(2):
        model(torch.randn(4, 48)).pow(2).sum().backward()
        opt.step()
        opt.zero_grad()
    return model, opt


def _sharded(model, opt) -> dict:
    from torch.distributed.checkpoint.state_dict import get_state_dict

    msd, osd = get_state_dict(model, opt)
    return {"model": msd, "optim": osd, "step": 11, "note": "fsdp2"}


def _full(model, opt) -> dict:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

    msd, osd = get_state_dict(model, opt, options=StateDictOptions(full_state_dict=True,
                                                                   cpu_offload=True))
    return {"model": msd, "optim": osd, "step": 11, "note": "fsdp2"}


def _restore(model, opt, state: dict) -> None:
    from torch.distributed.checkpoint.state_dict import set_state_dict

    set_state_dict(model, opt, model_state_dict=state["model"], optim_state_dict=state["optim"])


def _save_run(rank: int, world: int, tmp: str) -> None:
    _init(rank, world, tmp)
    model, opt = _model(seed=1)
    state = _sharded(model, opt)
    h = ckptstore.save(state, f"{tmp}/ckpt", compression="none")
    res = h.wait()
    assert res.path.endswith("ckpt")
    full = _full(model, opt)
    if rank == 0:  # the reference: a plain single-rank save of the gathered state
        ckptstore.save(full, f"{tmp}/ref", blocking=True)
    import torch.distributed.checkpoint as dcp
    from ckptstore.distributed.dcp import CkptStoreWriter

    dcp.save({"model": state["model"], "optim": state["optim"]},
             storage_writer=CkptStoreWriter(f"{tmp}/dcp"))
    dist.barrier()
    dist.destroy_process_group()


def _load_run(rank: int, world: int, tmp: str) -> None:
    _init(rank, world, tmp)
    model, opt = _model(seed=100 + world)  # different weights and optimizer state
    state = _sharded(model, opt)
    state["step"], state["note"] = 0, ""
    report = ckptstore.load(f"{tmp}/ckpt", into=state)
    assert report.ok and not report.missing, report.summary()
    assert state["step"] == 11 and state["note"] == "fsdp2"
    _restore(model, opt, state)
    full = _full(model, opt)
    if rank == 0:
        ckptstore.save(full, f"{tmp}/out-{world}", blocking=True)
    # the same through DCP's own load with our StorageReader
    import torch.distributed.checkpoint as dcp
    from ckptstore.distributed.dcp import CkptStoreReader

    model2, opt2 = _model(seed=200 + world)
    sd = _sharded(model2, opt2)
    dcp.load({"model": sd["model"], "optim": sd["optim"]},
             storage_reader=CkptStoreReader(f"{tmp}/dcp"))
    _restore(model2, opt2, sd)
    full2 = _full(model2, opt2)
    if rank == 0:
        ckptstore.save(full2, f"{tmp}/dcp-out-{world}", blocking=True)
    dist.barrier()
    dist.destroy_process_group()


class FailingStorage(LocalStorage):
    """Local storage whose shard writes fail after the first bytes (a rank's disk dies)."""

    def open_write(self, name):
        return self._dying(super().open_write(name), name)

    def open_bulk_write(self, name):  # shards are written through this one
        return self._dying(super().open_bulk_write(name), name)

    @staticmethod
    def _dying(handle, name):
        if "shard-" not in name:
            return handle

        class Dying:
            def __init__(self):
                self.n = 0

            def write(self, data):
                self.n += 1
                if self.n > 1:
                    raise OSError(5, "injected EIO on this rank")
                return handle.write(data)

            def write_held(self, data):
                self.n += 1
                if self.n > 1:
                    raise OSError(5, "injected EIO on this rank")
                return handle.write_held(data)

            def __getattr__(self, attr):
                return getattr(handle, attr)

        return Dying()


def _fail_run(rank: int, world: int, tmp: str) -> None:
    _init(rank, world, tmp)
    model, opt = _model(seed=1)
    state = _sharded(model, opt)
    path = f"{tmp}/fail"
    ckptstore.save(state, path, compression="none").wait()
    first = json.loads(open(f"{path}/manifest.json").read().split(',"manifest_checksum"')[0] + "}")
    before = sorted(os.listdir(path))
    for layer in model:  # change the state, then save over it with rank 1's disk failing
        if isinstance(layer, torch.nn.Linear):
            layer.weight.data.add_(1)
    target = FailingStorage(path) if rank == 1 else path
    with pytest.raises(DistributedSaveError) as info:
        ckptstore.save(state, target, compression="none", overwrite=True).wait()
    err = info.value
    assert err.ranks == (1,), err.failures
    assert [f[1] for f in err.failures] == ["write"] and "injected EIO" in str(err)
    assert isinstance(err, RuntimeError) and isinstance(err, ckptstore.CkptError)
    dist.barrier()
    # nothing committed, nothing of the failed save left, the first checkpoint intact
    assert sorted(os.listdir(path)) == before, (sorted(os.listdir(path)), before)
    again = json.loads(open(f"{path}/manifest.json").read().split(',"manifest_checksum"')[0] + "}")
    assert again["save_id"] == first["save_id"]
    if rank == 0:
        assert ckptstore.fsck(LocalStorage(path)).ok
    dist.barrier()
    dist.destroy_process_group()


def _bad_path_run(rank: int, world: int, tmp: str) -> None:
    """Rank 0 cannot open its path: it raises its own error, the others a typed one
    naming rank 0, at once rather than after the collective timeout."""
    import time

    _init(rank, world, tmp)
    model, opt = _model(seed=1)
    state = _sharded(model, opt)
    path = "nosuchprotocol://bucket/x" if rank == 0 else f"{tmp}/ok"
    t0 = time.monotonic()
    with pytest.raises(Exception) as info:
        ckptstore.save(state, path).wait()
    if rank == 0:
        assert not isinstance(info.value, DistributedSaveError)
    else:
        assert isinstance(info.value, DistributedSaveError) and info.value.ranks == (0,)
        assert "could not start the save" in str(info.value)
    assert time.monotonic() - t0 < 30  # CKPTSTORE_DIST_TIMEOUT is 60 here
    assert not os.path.exists(f"{tmp}/ok/manifest.json")
    dist.barrier()
    dist.destroy_process_group()


def _rank_main(rank: int, fn, world: int, tmp: str) -> None:
    try:
        fn(rank, world, tmp)
    finally:
        # spawned children skip atexit: stop this rank's writer processes ourselves,
        # or the child's exit waits for them forever
        from ckptstore.pipeline import engine as saver
        saver.shutdown()


def _spawn(fn, world: int, tmp) -> None:
    os.environ["RUN_ID"] = uuid.uuid4().hex[:8]
    mp.spawn(_rank_main, args=(fn, world, str(tmp)), nprocs=world, join=True)


# -- tests -----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("dist")
    _spawn(_save_run, 2, tmp)
    return tmp


def _rank_bytes(path) -> dict[int, int]:
    """Bytes of the data files each rank wrote (their names carry the rank)."""
    m = fmt.read_manifest(open_storage(path))
    out: dict[int, int] = {}
    for f in m.files:
        if f.format == "index":
            continue
        r = int(re.search(r"-r(\d+)\.", f.name).group(1))
        out[r] = out.get(r, 0) + f.size
    return out


def test_each_rank_writes_its_share(saved):
    per_rank = _rank_bytes(saved / "ckpt")
    total = sum(per_rank.values())
    ref = ckptstore.load(saved / "ref")
    model_bytes = sum(t.numel() * t.element_size() for t in ref["model"].values())
    assert sorted(per_rank) == [0, 1]
    assert total < 1.1 * 3 * model_bytes  # weights + exp_avg + exp_avg_sq, written once
    for r, n in per_rank.items():  # evenly split FSDP2 shards: about half each
        assert 0.35 * total < n < 0.65 * total, per_rank
    m = json.loads((saved / "ckpt" / "manifest.json").read_text().split(',"manifest_checksum"')[0] + "}")
    # the manifest lists the two rank indexes and each sharded tensor's grid, no chunks
    assert len(m["indexes"]) == 2 and all(f["format"] == "index" for f in m["files"])
    sharded = [t for t in m["tensors"] if "grid" in t and t["grid"]["cuts"]
               and sum(n for _, n in t["grid"]["cuts"][0]) == 2]  # run-length: (size, count)
    assert sharded and all("chunks" not in t for t in sharded)
    assert all(t["grid"]["writers"] == [[0, 2, 1]] for t in sharded)
    full = fmt.read_manifest(open_storage(saved / "ckpt"))
    assert {t.name for t in full.tensors if len(t.shards) == 2} == {t["name"] for t in sharded}


def _plain(tree):
    """get_state_dict gives OrderedDicts when sharded, dicts when full: compare contents."""
    if isinstance(tree, dict):
        return {k: _plain(v) for k, v in tree.items()}
    if isinstance(tree, (list, tuple)):
        return type(tree)(_plain(v) for v in tree)
    return tree


def test_load_at_world_size_1_without_process_group(saved):
    assert not dist.is_initialized()
    assert_same_tree(ckptstore.load(saved / "ref"), _plain(ckptstore.load(saved / "ckpt")))
    assert ckptstore.fsck(LocalStorage(str(saved / "ckpt"))).ok


@pytest.mark.parametrize("world", [2, 3])
def test_load_resharded_and_dcp_roundtrip(saved, world):
    _spawn(_load_run, world, saved)
    ref = ckptstore.load(saved / "ref")
    assert_same_tree(ref, ckptstore.load(saved / f"out-{world}"))
    dcp_out = ckptstore.load(saved / f"dcp-out-{world}")
    assert_same_tree(ref["model"], dcp_out["model"])
    assert_same_tree(ref["optim"], dcp_out["optim"])


def test_dcp_checkpoint_is_a_ckptstore_checkpoint(saved):
    assert ckptstore.fsck(LocalStorage(str(saved / "dcp"))).ok
    nested = ckptstore.load(saved / "dcp")  # the nested state given to dcp.save
    ref = ckptstore.load(saved / "ref")
    for k, v in ref["model"].items():
        assert_same_tree(v, nested["model"][k], k)


def test_failed_rank_commits_nothing(tmp_path):
    _spawn(_fail_run, 2, tmp_path)


def test_coordinator_that_cannot_start_fails_every_rank_at_once(tmp_path):
    _spawn(_bad_path_run, 2, tmp_path)


@dataclasses.dataclass
class Holder:
    """A typed value holding a tensor (the tree stores it as a dataclass node)."""

    w: object
    note: str


def test_sharded_load_fills_arrays_inside_typed_values(saved, tmp_path):
    """Arrays inside a dataclass or a namespace of a sharded checkpoint load as arrays (they
    came back as internal references: the sharded path did not look inside typed values)."""
    import shutil

    from ckptstore.plan.values import type_name
    from fuzz.parsers import seal

    shutil.copytree(saved / "ckpt", tmp_path / "c")
    path = tmp_path / "c" / "manifest.json"
    obj = json.loads(path.read_text())
    items = obj["tree"]["items"]
    model = next(v for k, v in items if k == "model")
    first = model["items"][0][1]  # a sharded tensor node
    assert first["T"] == "tensor" and obj["tensors"][first["id"]].get("grid")
    items.append(["typed", {"T": "dataclass", "cls": type_name(Holder),
                            "fields": [["w", first], ["note", "x"]]}])
    items.append(["ns", {"T": "namespace", "items": [["w", first]]}])
    path.write_bytes(seal(obj))
    whole = ckptstore.load(tmp_path / "c")
    want = whole["model"][model["items"][0][0]]
    assert isinstance(whole["typed"], Holder) and whole["typed"].note == "x"
    assert torch.equal(whole["typed"].w, want) and torch.equal(whole["ns"].w, want)
    target = {"typed": None, "ns": None}
    report = ckptstore.load(tmp_path / "c", into=target, strict=False)
    assert "typed" in report.loaded and torch.equal(target["typed"].w, want)
