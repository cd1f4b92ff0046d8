"""Every DTensor placement FSDP2, HSDP and FSDP2 + tensor parallelism produce, saved on
N ranks and loaded on M (gloo, CPU, spawned ranks), bit for bit; and the spread of
replicated writes over the ranks that hold them.

One world-size-4 run (a dp x tp = 2 x 2 mesh, and a 1-D mesh of 4) saves: an FSDP2 + TP
state with ``_StridedShard`` (uneven and empty boxes, a parameter on the sliced "dp"
mesh), a real ``parallelize_module`` + ``fully_shard`` model, an HSDP state (replicate
x shard) with plain tensors, and uneven 1-D shards (a dim of 5 over 4 ranks). World
sizes 4 (strided targets), 3 and 2 load them into DTensors; world size 1 loads them
whole without a process group. The full tensors are rebuilt from a seed everywhere.
"""
from __future__ import annotations

import json

import pytest
import torch
import torch.distributed as dist
from conftest import assert_same_tree
from test_distributed import _init, _spawn

import ckptstore
from ckptstore.errors import DistributedSaveError, UnsupportedTypeError

pytestmark = pytest.mark.timeout(300)


def _full(kind: str) -> dict[str, torch.Tensor]:
    """The whole tensors of each saved state (the same on every rank and here)."""
    shapes = {
        # FSDP2 + TP: colwise (10 rows: tp 5 + 5, then dp 3 + 2), 7 rows (4 + 3 -> 2 2 2 1),
        # 3 rows (2 + 1 -> 1 1 1 0: an empty box), rowwise and its bias, a norm on "dp"
        "tp": {"colwise.w": (10, 6), "colwise.b": (10,), "odd.w": (7, 3), "tiny.w": (3, 4),
               "rowwise.w": (6, 10), "rowwise.b": (6,), "norm.w": (6,)},
        "hsdp": {"a": (64, 32), "b": (48, 32), "c": (32, 32), "d": (128, 16), "e": (16, 8),
                 "f": (40, 8), "p1": (16, 16), "p2": (8, 8), "p3": (24,)},
        "uneven": {"five": (5, 3), "three": (3,), "two": (2, 5), "even": (8, 4), "col": (4, 5)},
    }[kind]
    g = torch.Generator().manual_seed(len(kind))
    out = {k: torch.randn(s, generator=g) for k, s in shapes.items()}
    if kind == "hsdp":
        out["p3"] = out["p3"].to(torch.bfloat16)
    return out


def _layouts(kind: str, mesh2, mesh1) -> dict[str, tuple]:
    """name -> (mesh, placements) of the saved states on 4 ranks (None: a plain tensor)."""
    from torch.distributed.tensor import Replicate, Shard
    from torch.distributed.tensor.placement_types import _StridedShard

    ss = (_StridedShard(0, split_factor=2), Shard(0))  # what fully_shard puts over colwise TP
    if kind == "tp":
        return {"colwise.w": (mesh2, ss), "colwise.b": (mesh2, ss), "odd.w": (mesh2, ss),
                "tiny.w": (mesh2, ss), "rowwise.w": (mesh2, (Shard(0), Shard(1))),
                "rowwise.b": (mesh2, (Shard(0), Replicate())), "norm.w": (mesh2["dp"], (Shard(0),))}
    if kind == "hsdp":
        return {k: (None if k.startswith("p") else (mesh2, (Replicate(), Shard(0))))
                for k in _full(kind)}
    return {k: (mesh1, (Shard(1) if k == "col" else Shard(0),)) for k in _full(kind)}


def _distribute(full: dict, layouts: dict, zero: bool = False) -> dict:
    from torch.distributed.tensor import distribute_tensor

    out = {}
    for k, t in full.items():
        t = torch.zeros_like(t) if zero else t
        if layouts[k] is None:
            out[k] = t.clone()
        else:  # every rank has the whole tensor: split locally (uneven strided needs it)
            out[k] = distribute_tensor(t, layouts[k][0], layouts[k][1], src_data_rank=None)
    return out


def _check_loaded(path: str, full: dict, layouts: dict) -> None:
    """Load ``path`` into zeroed DTensors laid out as ``layouts``; each rank's local part
    must equal what torch itself puts there."""
    state = _distribute(full, layouts, zero=True)
    state["step"] = 0
    report = ckptstore.load(path, into=state)
    assert report.ok and not report.missing and state.pop("step") == 5, report.summary()
    want = _distribute(full, layouts)
    for k, v in state.items():
        a, b = (v.to_local(), want[k].to_local()) if layouts[k] else (v, want[k])
        assert a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b), (path, k)


def _meshes(world: int):
    from torch.distributed.device_mesh import init_device_mesh

    mesh1 = init_device_mesh("cpu", (world,), mesh_dim_names=("all",))
    mesh2 = init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp", "tp")) if world == 4 else None
    return mesh2, mesh1


def _model_run(tmp: str, mesh2) -> None:
    """A real FSDP2 + TP model: its state holds _StridedShard and a sliced-mesh norm."""
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

    torch.manual_seed(3)
    model = torch.nn.Sequential(torch.nn.Linear(6, 10), torch.nn.ReLU(), torch.nn.Linear(10, 6),
                                torch.nn.LayerNorm(6))
    with torch.no_grad():  # not ones and zeros: the norm lives on the sliced "dp" mesh
        model[3].weight.normal_()
        model[3].bias.normal_()
    parallelize_module(model, mesh2["tp"], {"0": ColwiseParallel(), "2": RowwiseParallel()})
    fully_shard(model, mesh=mesh2["dp"])
    sd = model.state_dict()
    assert "_StridedShard" in str(sd["0.weight"].placements)
    ckptstore.save({"model": sd}, f"{tmp}/model", blocking=True)
    full = type(sd)((k, v.full_tensor()) for k, v in sd.items())
    if dist.get_rank() == 0:
        ckptstore.save({"model": full}, f"{tmp}/model-ref", blocking=True)


def _step(rank: int, tmp: str, name: str, fn, *args) -> None:
    """Run one part of the save run; a failure is left in ``<name>.error`` for the test
    of that part to report (every part fails alike on every rank, so the run goes on)."""
    try:
        fn(*args)
    except Exception as e:
        if rank == 0:
            with open(f"{tmp}/{name}.error", "w") as f:
                f.write(f"{type(e).__name__}: {e}")


def _save_kind(kind: str, tmp: str, mesh2, mesh1) -> None:
    from ckptstore.distributed.shards import describe, flatten_global, local_shards

    state = _distribute(_full(kind), _layouts(kind, mesh2, mesh1))
    state["step"] = 5
    ckptstore.save(state, f"{tmp}/{kind}", compression="none", blocking=True)
    if kind == "hsdp":  # the bytes each rank writes
        rank, world = dist.get_rank(), dist.get_world_size()
        _, leaves, dtensors = flatten_global(state)
        boxes = local_shards(describe(leaves, dtensors), leaves, dtensors, rank, world)
        per_rank: list = [None] * world
        dist.all_gather_object(per_rank, sum(t.numel() * t.element_size() for _, t in boxes))
        if rank == 0:
            with open(f"{tmp}/hsdp-bytes.json", "w") as f:
                json.dump(per_rank, f)


def _refused(tmp: str, mesh2, mesh1) -> None:
    """Partial, and a _StridedShard that gives ranks non-contiguous rows, are refused
    with a typed error naming the placement, on every rank alike."""
    from torch.distributed.tensor import DTensor, Partial, Shard
    from torch.distributed.tensor.placement_types import _StridedShard

    odd = (Shard(0), _StridedShard(0, split_factor=2))  # rank (0, 0) holds rows 0 and 2
    for name, value, words in [
            ("partial", DTensor.from_local(torch.ones(3), mesh1, [Partial()]), "Partial"),
            ("rows", _distribute({"w": torch.ones(8, 2)}, {"w": (mesh2, odd)})["w"],
             "non-contiguous")]:
        with pytest.raises(DistributedSaveError) as info:
            ckptstore.save({"x": value}, f"{tmp}/{name}", blocking=True)
        assert "UnsupportedTypeError" in str(info.value) and words in str(info.value), info.value
        assert all(f[1] == "stage" for f in info.value.failures), info.value.failures
    # loading into such a target is refused too (it used to fill it with the wrong rows)
    src = torch.arange(16.0).reshape(8, 2)
    ckptstore.save({"w": _distribute({"w": src}, {"w": (mesh1, (Shard(0),))})["w"]},
                   f"{tmp}/odd-src", blocking=True)
    target = _distribute({"w": torch.zeros(8, 2)}, {"w": (mesh2, odd)})
    with pytest.raises(UnsupportedTypeError, match="non-contiguous"):
        ckptstore.load(f"{tmp}/odd-src", into=target)


def _save4(rank: int, world: int, tmp: str) -> None:
    _init(rank, world, tmp)
    mesh2, mesh1 = _meshes(world)
    for kind in ("hsdp", "uneven", "tp"):
        _step(rank, tmp, kind, _save_kind, kind, tmp, mesh2, mesh1)
    # N = M = 4 with other placements: 1-D shards read into the FSDP2 + TP layout
    strided = _layouts("tp", mesh2, mesh1)["colwise.w"]
    full = _full("uneven")
    _step(rank, tmp, "strided-load", _check_loaded, f"{tmp}/uneven", full,
          {k: strided for k in full})
    _step(rank, tmp, "model", _model_run, tmp, mesh2)
    _step(rank, tmp, "refused", _refused, tmp, mesh2, mesh1)
    dist.barrier()
    dist.destroy_process_group()


def _load_m(rank: int, world: int, tmp: str) -> None:
    """M = 3 or 2 ranks on a 1-D mesh: Shard(0) and Shard(1) targets, plain tensors."""
    from torch.distributed.tensor import Shard

    _init(rank, world, tmp)
    _, mesh1 = _meshes(world)
    for kind in ("tp", "hsdp", "uneven"):
        full = _full(kind)
        for dim in (0, 1):
            layouts = {k: (None if kind == "hsdp" and k.startswith("p") else
                           (mesh1, (Shard(min(dim, t.dim() - 1)),))) for k, t in full.items()}
            _check_loaded(f"{tmp}/{kind}", full, layouts)
    dist.barrier()
    dist.destroy_process_group()


# -- tests -----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("placements")
    _spawn(_save4, 4, tmp)
    return tmp


def _ok(saved, part: str) -> None:
    err = saved / f"{part}.error"
    assert not err.exists(), err.read_text()


@pytest.mark.parametrize("kind", ["tp", "hsdp", "uneven"])
def test_loads_whole_at_world_size_1_without_process_group(saved, kind):
    assert not dist.is_initialized()
    _ok(saved, kind)
    got = ckptstore.load(saved / kind)
    assert got.pop("step") == 5
    assert_same_tree(_full(kind), got)


def test_loads_into_strided_targets(saved):
    _ok(saved, "strided-load")


def test_fsdp2_tp_model_with_strided_shards_roundtrips(saved):
    _ok(saved, "model")
    assert_same_tree(ckptstore.load(saved / "model-ref"), ckptstore.load(saved / "model"))


def test_partial_and_non_contiguous_placements_are_refused(saved):
    _ok(saved, "refused")
    assert not (saved / "partial" / "manifest.json").exists()


@pytest.mark.parametrize("world", [3, 2])
def test_loads_resharded_onto_fewer_ranks(saved, world):
    for part in ("tp", "hsdp", "uneven"):
        _ok(saved, part)
    _spawn(_load_m, world, saved)


def test_replicated_writes_are_spread(saved):
    """HSDP (2 replicas x 2 shards) plus plain tensors on 4 ranks: each byte is written
    once, and the busiest rank writes no more than the mean plus the largest single box
    (the greedy's bound); writing every replica at coordinate 0 gave about twice the mean."""
    _ok(saved, "hsdp")
    per_rank = json.loads((saved / "hsdp-bytes.json").read_text())
    full = _full("hsdp")
    sizes = {k: t.numel() * t.element_size() for k, t in full.items()}
    boxes = [n // 2 if not k.startswith("p") else n for k, n in sizes.items()]
    assert sum(per_rank) == sum(sizes.values())
    mean = sum(per_rank) / len(per_rank)
    assert max(per_rank) <= mean + max(boxes), per_rank
