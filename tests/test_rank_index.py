"""Schema 2: a distributed save's chunk records live in per-rank index files.

A 4-rank save (gloo) of DTensors sharded unevenly (a dimension of 6 over 4 ranks:
2, 2, 2, 0) plus plain values is checked: the manifest holds grids and index
records only, a load reads only the indexes that hold the boxes it needs, and every
kind of damage to an index or a grid is a typed error naming it.
"""
from __future__ import annotations

import json
import os
import shutil

import pytest
import torch
import torch.distributed as dist
from test_distributed import _init, _spawn

import ckptstore
from ckptstore import manifest as fmt
from ckptstore.errors import CorruptCheckpointError, UnsafeCheckpointError
from ckptstore.manifest import jsonio, ranked, rle
from ckptstore.pipeline.codec import hash_bytes
from ckptstore.storage import open_storage

pytestmark = pytest.mark.timeout(300)
WORLD = 4


def _full() -> dict:
    g = torch.Generator().manual_seed(7)
    return {"w": torch.randn(6, 5, generator=g), "v": torch.randn(9, generator=g),
            "m": torch.randn(8, 4, generator=g).to(torch.bfloat16),
            "plain": torch.arange(12.0), "step": 3}


def _save_run(rank: int, world: int, tmp: str) -> None:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    _init(rank, world, tmp)
    mesh = init_device_mesh("cpu", (world,))
    full = _full()
    state = {"w": distribute_tensor(full["w"], mesh, [Shard(0)]),
             "v": distribute_tensor(full["v"], mesh, [Shard(0)]),
             "m": distribute_tensor(full["m"], mesh, [Shard(1)]),
             "plain": full["plain"], "step": full["step"]}
    ckptstore.save(state, f"{tmp}/ckpt", blocking=True)
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ranked")
    _spawn(_save_run, WORLD, tmp)
    return tmp / "ckpt"


def _raw(path) -> dict:
    return json.loads((path / fmt.MANIFEST_NAME).read_text().split(',"manifest_checksum"')[0] + "}")


def test_manifest_holds_grids_and_indexes_only(saved):
    raw = _raw(saved)
    assert raw["schema_version"] == 2 and len(raw["indexes"]) == WORLD
    assert [f["format"] for f in raw["files"]] == ["index"] * WORLD
    by_name = {t["name"]: t for t in raw["tensors"]}
    assert all("chunks" not in by_name[n] for n in ("w", "v", "m", "plain"))
    # 6 rows over 4 ranks: 2, 2, 2 and an empty rank, which writes nothing
    assert by_name["w"]["grid"] == {"cuts": [[[2, 3]], [[5, 1]]], "writers": [[0, 3, 1]]}
    assert by_name["m"]["grid"]["cuts"] == [[[8, 1]], [[1, 4]]]
    assert sum(n for _, n, _ in by_name["plain"]["grid"]["writers"]) == 1


def test_loads_whole_and_fsck_checks_every_index(saved):
    got = ckptstore.load(saved)
    full = _full()
    for k in ("w", "v", "m", "plain"):
        assert torch.equal(got[k], full[k]), k
    assert got["step"] == 3
    report = ckptstore.fsck(saved, deep=True)
    assert report.ok and report.files == WORLD + len({f.name for f in fmt.read_manifest(
        open_storage(saved)).files if f.format != "index"})


class _Spy:
    """Counts the files read through a storage."""

    def __init__(self, storage):
        self.storage, self.read_names = storage, []

    def __getattr__(self, name):
        return getattr(self.storage, name)

    def read(self, name, *a, **k):
        self.read_names.append(name)
        return self.storage.read(name, *a, **k)


def test_a_reader_reads_only_the_indexes_holding_its_boxes(saved):
    spy = _Spy(open_storage(saved))
    m = fmt.read_catalog(spy)
    assert not m.resolved and spy.read_names == [fmt.MANIFEST_NAME]
    w = next(i for i, t in enumerate(m.tensors) if t.name == "w")
    part = fmt.resolve(spy, m, {w: [((2, 0), (2, 5))]})  # rank 1's rows
    assert spy.read_names[1:] == [m.indexes[1]]
    t = part.tensors[w]
    assert [s.offsets for s in t.shards] == [(2, 0)] and t.digest == ""
    whole = fmt.resolve(spy, m)
    assert sorted(spy.read_names[2:]) == sorted(m.indexes)
    assert whole.resolved and whole.tensors[w].digest == fmt.digest_of(
        [c.raw_hash for c in whole.tensors[w].chunks])
    n = len(spy.read_names)
    assert fmt.resolve(spy, whole).resolved and len(spy.read_names) == n  # nothing read twice


@pytest.fixture
def copy(saved, tmp_path):
    dst = tmp_path / "c"
    shutil.copytree(saved, dst)
    return dst


def _reseal(path, obj: dict) -> None:
    obj.pop("manifest_checksum", None)
    (path / fmt.MANIFEST_NAME).write_bytes(jsonio.seal(obj))


def test_a_damaged_index_is_named(copy):
    name = _raw(copy)["indexes"][2]
    data = bytearray((copy / name).read_bytes())
    data[len(data) // 2] ^= 1
    (copy / name).write_bytes(bytes(data))
    with pytest.raises(CorruptCheckpointError, match=name):
        ckptstore.load(copy)
    with pytest.raises(CorruptCheckpointError, match=name):
        fmt.read_manifest(open_storage(copy))
    report = ckptstore.fsck(copy)  # names the broken index, not "the manifest"
    assert not report.ok and [d.file for d in report.damage] == [name]
    assert "rank 2" in report.damage[0].problem


def test_a_missing_index_is_named(copy):
    name = _raw(copy)["indexes"][0]
    os.remove(copy / name)
    with pytest.raises(CorruptCheckpointError, match=f"{name}.*missing"):
        ckptstore.load(copy)


def _replace_index(path, raw: dict, name: str, data: bytes) -> None:
    """Write ``data`` as index ``name`` and reseal the manifest with its new size and hash."""
    (path / name).write_bytes(data)
    for f in raw["files"]:
        if f["name"] == name:
            f["size"] = f["header_length"] = len(data)
            f["header_hash"] = hash_bytes(data)
    _reseal(path, raw)


def test_an_index_of_another_rank_is_refused(copy):
    """Index 1 swapped for index 0, its record in the manifest resealed to match."""
    raw = _raw(copy)
    a, b = raw["indexes"][0], raw["indexes"][1]
    _replace_index(copy, raw, a, (copy / b).read_bytes())
    with pytest.raises(CorruptCheckpointError, match="rank 1, not to this one"):
        ckptstore.load(copy)


def test_an_index_claiming_a_box_another_rank_wrote_is_refused(copy):
    """Rank 0's index rewritten (validly sealed, hash updated) to claim rank 1's box."""
    raw = _raw(copy)
    name = raw["indexes"][0]
    ix = ranked.decode_index((copy / name).read_bytes(), name)
    w = next(i for i, t in enumerate(raw["tensors"]) if t["name"] == "w")
    boxes = tuple((t, (2, 0) if t == w else o, s, cs) for t, o, s, cs in ix.boxes)
    _replace_index(copy, raw, name, ranked.encode_index(ranked.RankIndex(ix.save_id, 0, ix.files,
                                                                         boxes)))
    with pytest.raises(UnsafeCheckpointError, match="which rank 1 wrote"):
        ckptstore.load(copy)


@pytest.mark.parametrize("grid, error", [
    ({"cuts": [[[2, 3]], [[5, 1]]], "writers": [[0, 3, 1]], "x": 0}, None),  # extra key: fine
    ({"cuts": [[[2, 1 << 40]], [[5, 1]]], "writers": [[0, 3, 1]]}, UnsafeCheckpointError),  # bomb
    ({"cuts": [[[2, 2]], [[5, 1]]], "writers": [[0, 2, 1]]}, UnsafeCheckpointError),  # 4 of 6 rows
    ({"cuts": [[[2, 3]], [[5, 1]]], "writers": [[0, 3, 3]]}, UnsafeCheckpointError),  # rank 6
    ({"cuts": [[[2, 3]], [[5, 1]]], "writers": [[0, 2, 1]]}, CorruptCheckpointError),  # a cell short
    ({"cuts": [[[0, 3]], [[5, 1]]], "writers": [[0, 3, 1]]}, CorruptCheckpointError),  # empty cut
    ({"cuts": "x", "writers": []}, CorruptCheckpointError),
])
def test_hostile_grids_are_refused(copy, grid, error):
    raw = _raw(copy)
    next(t for t in raw["tensors"] if t["name"] == "w")["grid"] = grid
    _reseal(copy, raw)
    if error is None:
        assert torch.equal(ckptstore.load(copy)["w"], _full()["w"])
        return
    with pytest.raises(error):
        fmt.read_catalog(open_storage(copy))


def test_run_length_forms_roundtrip_and_are_bounded():
    for values in ([], [5], [5, 5, 5, 2], [0, 1, 2, 3, 7, 7, 1, 3, 5], list(range(1024))):
        assert list(rle.unpack_ranks(rle.pack_ranks(values), "w")) == values
    assert rle.pack_ranks(list(range(1024))) == [[0, 1024, 1]]
    assert rle.pack_sizes([3] * 1023 + [1]) == [[3, 1023], [1, 1]]
    with pytest.raises(UnsafeCheckpointError):
        rle.unpack_ranks([[0, 1 << 40, 1]], "w")
    with pytest.raises(CorruptCheckpointError):
        rle.unpack_sizes([[2, 0]], "cuts")


def test_open_and_keys_read_only_the_indexes_holding_the_selection(saved, monkeypatch):
    read: list[int] = []
    real = ranked.read_index

    def counted(storage, m, rank):
        read.append(rank)
        return real(storage, m, rank)

    monkeypatch.setattr(ranked, "read_index", counted)
    raw = _raw(saved)
    plain_writer = raw["tensors"][[t["name"] for t in raw["tensors"]].index("plain")]["grid"]
    (writer,) = rle.unpack_ranks(plain_writer["writers"], "plain")
    got = ckptstore.load(saved, keys=["plain", "step"])
    assert read == [writer] and torch.equal(got["plain"], _full()["plain"]) and got["step"] == 3
    read.clear()
    ckpt = ckptstore.open(saved)
    assert read == []  # opening reads the manifest alone
    assert ckpt.info("v").shape == (9,) and sorted(read) == [0, 1, 2]  # 9 rows: 3, 3, 3, 0
    full = fmt.read_manifest(open_storage(saved))
    assert ckpt.info("w").digest == next(t.digest for t in full.tensors if t.name == "w")
    for k in ("w", "m"):
        assert torch.equal(ckpt[k], _full()[k])
    renamed = ckptstore.load(saved, keys=["w"], rename={"w": "weight"})
    assert list(renamed) == ["weight"] and torch.equal(renamed["weight"], _full()["w"])


def test_a_schema_1_sharded_checkpoint_still_loads(copy):
    """As schema 1 wrote a distributed save: every chunk and shard in the manifest."""
    import dataclasses

    full = fmt.read_manifest(open_storage(copy))
    v1 = dataclasses.replace(
        full, schema_version=1, indexes=(), tensors=tuple(dataclasses.replace(t, grid=None)
                                                          for t in full.tensors),
        files=tuple(f for f in full.files if f.format != "index"))
    obj = json.loads(fmt.encode(v1).split(b',"manifest_checksum"')[0] + b"}")
    del obj["indexes"]  # schema 1 had no such member
    _reseal(copy, obj)
    for name in full.indexes:
        os.remove(copy / name)
    assert fmt.read_catalog(open_storage(copy)).indexes == ()
    got = ckptstore.load(copy)
    for k in ("w", "v", "m", "plain"):
        assert torch.equal(got[k], _full()[k]), k
    assert ckptstore.fsck(copy, deep=True).ok
