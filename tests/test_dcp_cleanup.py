"""A failed ``dcp.save`` through :class:`CkptStoreWriter` leaves nothing of itself.

2 ranks on gloo save a state with ``dcp.save``, then save a changed state over it
(``overwrite=True``) while one rank fails: rank 1's data files fail to write, or the
coordinator's ``finish`` fails before its manifest is written. Every rank raises, the
directory holds exactly what it held before (no data file of the failed save from
any rank) and the first checkpoint loads bit-identically. When the manifest may
already be in place (the commit reported an error after it landed), the files are
kept: the manifest names them.
"""
from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist
from conftest import assert_same_tree
from test_distributed import _init, _spawn

import ckptstore

pytestmark = pytest.mark.timeout(300)


def _state(seed: int) -> dict:
    """The same on every rank; DCP's planner spreads the tensors over both ranks."""
    g = torch.Generator().manual_seed(seed)
    return {"model": {f"w{i}": torch.randn(64 + 8 * i, 16, generator=g) for i in range(8)},
            "half": torch.randn(33, 7, generator=g).to(torch.bfloat16), "step": seed}


def _sorted(tree):
    """Dicts in key order: a DCP save's key order is its planner's, not the state's."""
    if isinstance(tree, dict):
        return {k: _sorted(tree[k]) for k in sorted(tree)}
    return tree


def _same(want: dict, path: str) -> None:
    """The checkpoint at ``path`` loads as ``want``, bit for bit."""
    assert_same_tree(_sorted(want), _sorted(ckptstore.load(path)))


def _first_save(path: str) -> tuple[list[str], bytes]:
    import torch.distributed.checkpoint as dcp

    from ckptstore.distributed.dcp import CkptStoreWriter

    dcp.save(_state(1), storage_writer=CkptStoreWriter(path))
    dist.barrier()
    before = sorted(os.listdir(path))
    assert any("-r0." in n for n in before) and any("-r1." in n for n in before), before
    with open(f"{path}/manifest.json", "rb") as f:
        return before, f.read()


def _check_untouched(rank: int, path: str, before: list[str], manifest: bytes) -> None:
    dist.barrier()
    now = sorted(os.listdir(path))
    assert now == before, (now, before)  # no data or temp file of the failed save
    with open(f"{path}/manifest.json", "rb") as f:
        assert f.read() == manifest
    if rank == 0:
        _same(_state(1), path)
        assert ckptstore.fsck(path).ok
    dist.barrier()


def _failed_write_run(rank: int, world: int, tmp: str) -> None:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.api import CheckpointException

    from ckptstore.distributed.dcp import CkptStoreWriter
    from ckptstore.storage import LocalStorage
    from ckptstore.storage.faulty import FaultyStorage

    _init(rank, world, tmp)
    path = f"{tmp}/ckpt"
    before, manifest = _first_save(path)
    # rank 1's data files fail at their fsync; rank 0 writes all of its own
    target = FaultyStorage(LocalStorage(path), fail={"fsync": "*"}, where="*shard-*") \
        if rank == 1 else path
    with pytest.raises(CheckpointException) as info:
        dcp.save(_state(2), storage_writer=CkptStoreWriter(target, overwrite=True))
    assert "rank 1" in str(info.value).lower() and "injected" in str(info.value), str(info.value)
    _check_untouched(rank, path, before, manifest)
    dist.destroy_process_group()


def _failed_finish_run(rank: int, world: int, tmp: str) -> None:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.api import CheckpointException

    from ckptstore.distributed import dcp as module
    from ckptstore.distributed.dcp import CkptStoreWriter

    _init(rank, world, tmp)
    path = f"{tmp}/ckpt"
    before, manifest = _first_save(path)
    real = module.commit_manifest

    def refused(storage, m, **kw):  # the coordinator's commit fails before writing
        raise OSError(28, "injected ENOSPC writing the manifest")

    module.commit_manifest = refused  # type: ignore[assignment]
    try:
        with pytest.raises(CheckpointException) as info:
            dcp.save(_state(2), storage_writer=CkptStoreWriter(path, overwrite=True))
    finally:
        module.commit_manifest = real
    assert "injected ENOSPC" in str(info.value), str(info.value)
    _check_untouched(rank, path, before, manifest)

    def landed_then_failed(storage, m, **kw):  # e.g. the directory fsync after it failed
        real(storage, m, **kw)
        raise OSError(5, "injected EIO after the manifest was written")

    module.commit_manifest = landed_then_failed  # type: ignore[assignment]
    try:
        with pytest.raises(CheckpointException):
            dcp.save(_state(3), storage_writer=CkptStoreWriter(path, overwrite=True))
    finally:
        module.commit_manifest = real
    dist.barrier()
    if rank == 0:  # the outcome was unknown: the files were kept and the save is whole
        _same(_state(3), path)
        assert ckptstore.fsck(path).ok
    dist.barrier()
    dist.destroy_process_group()


def test_failed_rank_leaves_no_data_file_of_the_save(tmp_path):
    _spawn(_failed_write_run, 2, tmp_path)


def test_failed_finish_removes_every_rank_files_unless_the_manifest_may_be_visible(tmp_path):
    _spawn(_failed_finish_run, 2, tmp_path)
