"""Failures of a distributed save that used to hang the other ranks (gloo, CPU, 2 ranks).

- A rank that fails before the first collective (a value it cannot store, a stale
  error of an earlier save, ``if_busy="raise"`` while busy) makes every rank raise the
  same DistributedSaveError naming it, at once rather than after the collective timeout.
- A rank late past the timeout fails that save, and the next save in the same
  processes commits (the broken coordination group is rebuilt).
- A rank whose state holds no DTensors, saving to the path of a collective save, fails
  it on every rank instead of committing its own checkpoint there; one rank saving a
  full state alone still works without the others.
"""
from __future__ import annotations

import os
import time

import pytest
import torch
import torch.distributed as dist
from test_distributed import _init, _spawn

import ckptstore
from ckptstore.distributed.dsave import MARKER
from ckptstore.errors import DistributedSaveError, StagingBusyError
from ckptstore.storage import LocalStorage

pytestmark = pytest.mark.timeout(300)

TIMEOUT = 60.0  #: collective and join timeout of the failure runs: far above what they take


class BrokenDisk(LocalStorage):
    """Every data file write fails (this rank's disk died)."""

    def open_write(self, name):
        if "shard-" in name:
            raise OSError(5, "injected EIO on this rank")
        return super().open_write(name)

    def open_bulk_write(self, name):
        if "shard-" in name:
            raise OSError(5, "injected EIO on this rank")
        return super().open_bulk_write(name)


class SlowDisk(LocalStorage):
    """Data files take seconds to open: a save that is still writing."""

    def open_bulk_write(self, name):
        time.sleep(4)
        return super().open_bulk_write(name)

    def open_write(self, name):
        time.sleep(4)
        return super().open_write(name)


def _sharded(step: int = 3) -> dict:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    w = torch.arange(64, dtype=torch.float32).reshape(8, 8)
    return {"w": distribute_tensor(w, mesh, [Shard(0)]), "bias": torch.ones(3), "step": step}


def _same_on_every_rank(text: str) -> None:
    got: list = [None] * dist.get_world_size()
    dist.all_gather_object(got, text)
    assert all(t == got[0] for t in got), got


def _fails_fast(save, culprit: int, what: str) -> DistributedSaveError:
    """``save()`` raises, on every rank, the same DistributedSaveError naming ``culprit``,
    well within the timeout (the ranks used to wait it out)."""
    t0 = time.monotonic()
    with pytest.raises(DistributedSaveError) as info:
        save()
    elapsed = time.monotonic() - t0
    err = info.value
    assert err.ranks == (culprit,), err.failures
    assert what in str(err), str(err)
    assert elapsed < TIMEOUT / 2, (elapsed, str(err))
    _same_on_every_rank(str(err))
    return err


def _pre_collective_run(rank: int, world: int, tmp: str) -> None:
    _init(rank, world, tmp)
    os.environ["CKPTSTORE_DIST_TIMEOUT"] = os.environ["CKPTSTORE_DIST_JOIN_TIMEOUT"] = str(TIMEOUT)
    state = _sharded()
    # a value that cannot be stored, on rank 1 only
    bad = dict(state, extra=object() if rank == 1 else 0)
    err = _fails_fast(lambda: ckptstore.save(bad, f"{tmp}/a", blocking=True), 1,
                      "UnsupportedTypeError")
    if rank == 1:
        assert isinstance(err.__cause__, ckptstore.UnsupportedTypeError)
    # a stale error of an earlier save that nobody waited for, on rank 1 only
    if rank == 1:
        lonely = ckptstore.save({"x": torch.ones(4)}, BrokenDisk(f"{tmp}/lonely"))
        while not lonely.done():
            time.sleep(0.05)
    err = _fails_fast(lambda: ckptstore.save(state, f"{tmp}/b", blocking=True), 1,
                      "injected EIO")
    if rank == 1:
        assert isinstance(err.__cause__, OSError)
    # if_busy="raise" while rank 1 alone is still writing an earlier save
    if rank == 1:
        slow = ckptstore.save({"x": torch.ones(4)}, SlowDisk(f"{tmp}/slow"))
    _fails_fast(lambda: ckptstore.save(state, f"{tmp}/c", if_busy="raise", blocking=True), 1,
                StagingBusyError.__name__)
    if rank == 1:
        slow.wait()
    for name in "abc":
        assert not os.path.exists(f"{tmp}/{name}/manifest.json")
    dist.barrier()
    # the group still works: the next save commits
    ckptstore.save(state, f"{tmp}/d", blocking=True)
    assert ckptstore.load(f"{tmp}/d")["step"] == 3
    dist.barrier()
    dist.destroy_process_group()


def _late_rank_run(rank: int, world: int, tmp: str) -> None:
    _init(rank, world, tmp)
    os.environ["CKPTSTORE_DIST_TIMEOUT"] = "6"
    state = _sharded()
    ckptstore.save(state, f"{tmp}/first", blocking=True)  # the group exists and works
    if rank == 1:
        time.sleep(8)  # past the timeout of the others
    with pytest.raises(DistributedSaveError):
        ckptstore.save(state, f"{tmp}/late", blocking=True)
    assert not os.path.exists(f"{tmp}/late/manifest.json")
    # the same processes save again: the dead group must not be reused
    ckptstore.save(dict(state, step=4), f"{tmp}/again", blocking=True)
    assert ckptstore.load(f"{tmp}/again")["step"] == 4
    dist.barrier()
    dist.destroy_process_group()


def _stray_rank_run(rank: int, world: int, tmp: str) -> None:
    _init(rank, world, tmp)
    os.environ["CKPTSTORE_DIST_TIMEOUT"] = str(TIMEOUT)
    os.environ["CKPTSTORE_DIST_JOIN_TIMEOUT"] = "8"  # for the last case, where rank 1 never joins
    state = _sharded()
    # one rank saving a full (plain) state alone does not wait for the others
    if rank == 0:
        ckptstore.save({"w": torch.ones(8), "step": 1}, f"{tmp}/alone", blocking=True)
        assert ckptstore.load(f"{tmp}/alone")["step"] == 1
    dist.barrier()
    # rank 1's state holds no DTensors: it would save alone at the shared path
    path = f"{tmp}/shared"
    if rank == 1:
        plain = {"w": torch.zeros(8, 8), "bias": torch.ones(3), "step": 3}
        deadline = time.monotonic() + 20
        while not os.path.exists(f"{path}/{MARKER}"):  # rank 0 is in the collective save
            if time.monotonic() > deadline:
                break  # the collective save never marked its path
            time.sleep(0.05)
        _fails_fast(lambda: ckptstore.save(plain, path, blocking=True), 1, "no DTensors")
    else:
        _fails_fast(lambda: ckptstore.save(state, path, blocking=True), 1, "no DTensors")
    dist.barrier()
    assert not os.path.exists(f"{path}/manifest.json")
    # and the next collective save commits there
    ckptstore.save(state, path, blocking=True)
    assert ckptstore.load(path)["step"] == 3
    # rank 1 saving alone started first: it must not commit once the others began
    dist.barrier()
    path = f"{tmp}/raced"
    if rank == 1:
        h = ckptstore.save({"w": torch.zeros(8, 8), "step": 3}, SlowDisk(path))
        with pytest.raises(DistributedSaveError, match="no DTensors"):
            h.wait()
    else:
        time.sleep(1)  # rank 1's save is under way
        with pytest.raises(DistributedSaveError) as info:  # rank 1 never joins
            ckptstore.save(state, path, blocking=True)
        assert [f[1] for f in info.value.failures] == ["join"]
    dist.barrier()
    assert not os.path.exists(f"{path}/manifest.json")
    ckptstore.save(dict(state, step=5), path, blocking=True)  # both made new groups
    assert ckptstore.load(path)["step"] == 5
    dist.barrier()
    dist.destroy_process_group()


def test_failure_before_the_first_collective_reaches_every_rank_at_once(tmp_path):
    _spawn(_pre_collective_run, 2, tmp_path)


def test_a_late_rank_fails_one_save_and_the_next_commits(tmp_path):
    _spawn(_late_rank_run, 2, tmp_path)


def test_a_rank_without_dtensors_cannot_commit_over_a_collective_save(tmp_path):
    _spawn(_stray_rank_run, 2, tmp_path)


def test_a_mark_being_written_counts_as_fresh(tmp_path):
    """put_exclusive creates the mark empty, then writes it: a rank reading it in between
    must not take it for a stale mark and remove it (both ranks then claimed the path)."""
    from ckptstore.distributed import dsave
    from ckptstore.storage import LocalStorage

    (tmp_path / dsave.MARKER).write_bytes(b"")
    assert dsave._marked(LocalStorage(tmp_path))
    (tmp_path / dsave.MARKER).write_bytes(b'{"since": 0}')  # a crashed save's, long ago
    assert not dsave._marked(LocalStorage(tmp_path))
