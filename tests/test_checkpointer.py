"""Checkpointer on the local tier: steps, latest, retention, incremental saves, fallback."""
from __future__ import annotations

import json
import os
import time

import pytest
import torch

import ckptstore
from ckptstore import manifest as fmt
from ckptstore.api.checkpointer import CheckpointFallbackWarning
from ckptstore.runs.layout import step_name
from conftest import assert_same_tree, step_state


def _manifest(d, step: int) -> dict:
    with open(os.path.join(d, step_name(step), fmt.MANIFEST_NAME), "rb") as f:
        return json.loads(f.read())


def _flip_shard_byte(root, step: int, mask: int):
    """XOR the middle byte of step's first shard with ``mask``; returns the shard path."""
    shard = sorted(n for n in os.listdir(root / step_name(step)) if n.startswith("shard"))[0]
    p = root / step_name(step) / shard
    raw = bytearray(p.read_bytes())
    raw[len(raw) // 2] ^= mask
    p.write_bytes(bytes(raw))
    return p


def test_save_latest_load_and_keep_last(tmp_path, frozen):
    with ckptstore.Checkpointer(tmp_path, keep_last=2) as ck:
        for s in (100, 200, 300, 400):
            ck.save(s, step_state(s, frozen))
        ck.wait()
        assert ck.steps() == [300, 400]
        assert ck.latest() == 400
        assert_same_tree(ck.load(), step_state(400, frozen))
        assert ck.loaded_step == 400
        assert_same_tree(ck.load(300), step_state(300, frozen))
    names = sorted(os.listdir(tmp_path))
    assert names[-2:] == [step_name(300), step_name(400)]
    assert names == sorted(names, key=lambda n: int(n.split("-")[1]))


def test_keep_every_and_keep_best(tmp_path, frozen):
    losses = {1: 5.0, 2: 1.0, 3: 4.0, 4: 3.0, 5: 6.0, 6: 7.0}
    with ckptstore.Checkpointer(tmp_path, keep_last=1, keep_every=4,
                                keep_best=("loss", "min", 1)) as ck:
        for s, loss in losses.items():
            ck.save(s, step_state(s, frozen), metrics={"loss": loss})
        ck.wait()
        assert ck.steps() == [2, 4, 6]
        assert ck.metadata(2) == {"step": 2, "metrics": {"loss": 1.0}}


def test_incremental_references_unchanged_tensor(tmp_path, frozen):
    with ckptstore.Checkpointer(tmp_path, keep_last=1) as ck:
        first = ck.save(1, step_state(1, frozen)).wait()
        second = ck.save(2, step_state(2, frozen)).wait()
        third = ck.save(3, step_state(3, frozen)).wait()
        ck.wait()
        assert second.stored_bytes < first.stored_bytes / 5
        assert third.stored_bytes < first.stored_bytes / 5
        assert ck.steps() == [3]
        m = _manifest(tmp_path, 3)
        assert {f.get("base") for f in m["files"]} == {None, step_name(1)}
        # step 1 is no longer a checkpoint, but the file step 3 needs is still there
        assert not os.path.exists(tmp_path / step_name(1) / fmt.MANIFEST_NAME)
        assert not os.path.exists(tmp_path / step_name(2))
        assert_same_tree(ck.load(3), step_state(3, frozen))
    report = ckptstore.fsck(ckptstore.storage.open_storage(tmp_path / step_name(3)))
    assert report.ok, report.damage


def test_incremental_off(tmp_path, frozen):
    with ckptstore.Checkpointer(tmp_path, incremental=False) as ck:
        a = ck.save(1, step_state(1, frozen)).wait()
        b = ck.save(2, step_state(2, frozen)).wait()
    assert b.stored_bytes > a.stored_bytes / 2
    assert all("base" not in f for f in _manifest(tmp_path, 2)["files"])


def test_base_outside_parent_is_refused(tmp_path, frozen):
    with ckptstore.Checkpointer(tmp_path) as ck:
        ck.save(1, step_state(1, frozen))
        ck.save(2, step_state(2, frozen))
    path = tmp_path / step_name(2) / fmt.MANIFEST_NAME
    data = path.read_bytes()
    assert b'"base":"step-000000000001"' in data
    bad = data.replace(b'"base":"step-000000000001"', b'"base":"../../etc"    ')
    cut = bad.rfind(b',"manifest_checksum":"')
    bad = bad[:cut] + b',"manifest_checksum":"' + fmt.hash_bytes(bad[:cut]).encode() + b'"}\n'
    with pytest.raises(ckptstore.UnsafeCheckpointError):
        fmt.decode(bad)


def test_corrupt_latest_falls_back_to_older(tmp_path, frozen):
    with ckptstore.Checkpointer(tmp_path, keep_last=3, incremental=False) as ck:
        for s in (1, 2):
            ck.save(s, step_state(s, frozen))
        ck.wait()
        p = _flip_shard_byte(tmp_path, 2, 0x40)
        with pytest.warns(CheckpointFallbackWarning, match="step 2"):
            out = ck.load()
        assert ck.loaded_step == 1
        assert_same_tree(out, step_state(1, frozen))
        os.truncate(p, 10)
        with pytest.warns(CheckpointFallbackWarning, match="bytes"):
            assert ck.latest() == 1


def test_uncommitted_step_is_not_latest(tmp_path, frozen):
    with ckptstore.Checkpointer(tmp_path) as ck:
        ck.save(1, step_state(1, frozen))
        ck.wait()
        os.makedirs(tmp_path / step_name(2))
        (tmp_path / step_name(2) / "shard-00000-abc.chunks").write_bytes(b"partial")
        assert ck.steps() == [1]
        assert ck.latest() == 1
        with pytest.raises(ckptstore.CheckpointNotFoundError), \
                pytest.warns(CheckpointFallbackWarning, match="not committed|missing"):
            ck.load(2)


def test_empty_run(tmp_path):
    ck = ckptstore.Checkpointer(tmp_path / "none")
    assert ck.latest() is None and ck.steps() == []
    with pytest.raises(ckptstore.CheckpointNotFoundError):
        ck.load()
    ck.close()
    with pytest.raises(RuntimeError):
        ck.save(1, {})


def test_load_into_module(tmp_path):
    torch.manual_seed(0)
    model = torch.nn.Linear(8, 4)
    with ckptstore.Checkpointer(tmp_path) as ck:
        ck.save(5, {"model": model.state_dict()})
        ck.wait()
        other = torch.nn.Linear(8, 4)
        report = ck.load(into={"model": other.state_dict()})
        assert report.ok
        assert torch.equal(other.weight, model.weight)


def test_local_directory_as_remote_tier(tmp_path, frozen):
    remote = tmp_path / "remote"
    with ckptstore.Checkpointer(tmp_path / "local", f"file://{remote}", keep_last=1,
                                remote_keep_last=2) as ck:
        for s in (1, 2, 3):
            ck.save(s, step_state(s, frozen))
        ck.wait()
    assert sorted(os.listdir(remote))[-2:] == [step_name(2), step_name(3)]
    assert not (remote / step_name(1) / fmt.MANIFEST_NAME).exists()
    assert (tmp_path / "local" / step_name(3) / fmt.MANIFEST_NAME).exists()
    assert not (tmp_path / "local" / step_name(2) / fmt.MANIFEST_NAME).exists()
    for s in (2, 3):
        report = ckptstore.fsck(remote / step_name(s))
        assert report.ok, report.damage
        assert_same_tree(ckptstore.load(remote / step_name(s)), step_state(s, frozen))


def test_keep_best_does_not_narrow_a_remote_that_keeps_everything(tmp_path, frozen):
    """With no remote retention (both remote_keep_* None) the remote keeps every step,
    as documented; keep_best used to turn it into "newest and best only"."""
    remote = tmp_path / "remote"
    with ckptstore.Checkpointer(tmp_path / "local", f"file://{remote}", keep_last=1,
                                keep_best=("loss", "min", 1)) as ck:
        for s, loss in ((1, 3.0), (2, 1.0), (3, 2.0), (4, 4.0)):
            ck.save(s, step_state(s, frozen), metrics={"loss": loss})
        ck.wait()
    on_remote = [s for s in (1, 2, 3, 4) if (remote / step_name(s) / fmt.MANIFEST_NAME).exists()]
    assert on_remote == [1, 2, 3, 4]
    local = [s for s in (1, 2, 3, 4)
             if (tmp_path / "local" / step_name(s) / fmt.MANIFEST_NAME).exists()]
    assert local == [2, 4]  # keep_best still applies locally: the best and the newest


def test_resaving_a_damaged_step_after_fallback(tmp_path, frozen):
    """A run that fell back past a damaged step reaches that step again and saves it."""
    with ckptstore.Checkpointer(tmp_path, keep_last=5, incremental=False) as ck:
        for s in (1, 2):
            ck.save(s, step_state(s, frozen))
        ck.wait()
        _flip_shard_byte(tmp_path, 2, 0x01)  # a flip only chunk hashes see
        with pytest.warns(CheckpointFallbackWarning):
            ck.load()
        assert ck.loaded_step == 1
        ck.save(2, step_state(2, frozen)).wait()  # the resumed run saves step 2 again
        assert_same_tree(ck.load(2), step_state(2, frozen))
        assert ckptstore.fsck(tmp_path / step_name(2)).ok
        with pytest.raises(ckptstore.CheckpointExistsError):  # intact: never replaced
            ck.save(2, step_state(2, frozen))


def test_gc_removes_what_any_killed_writer_left(tmp_path, frozen):
    """Data files of a step that never committed go, whichever save wrote them: one
    process (shard-NNNNN-<id>), a rank of a distributed or DCP save (shard-NNNNN-<id>-rN)
    or an unfinished temp file; the committed step keeps all of its files."""
    from ckptstore.runs.gc import gc
    from ckptstore.storage import LocalStorage

    with ckptstore.Checkpointer(tmp_path) as ck:
        ck.save(1, step_state(1, frozen))
    kept = sorted(os.listdir(tmp_path / step_name(1)))
    torn = tmp_path / step_name(2)
    os.makedirs(torn)
    left = ["shard-00000-0123456789ab.chunks", "shard-00001-0123456789ab-r1.safetensors",
            "shard-00000-0123456789ab-r12.chunks", ".tmp-shard-00000-0123456789ab.chunks.1.ab"]
    for name in left:
        (torn / name).write_bytes(b"partial")
    removed = gc(LocalStorage(str(tmp_path)), grace=0)
    assert sorted(r.rpartition("/")[2] for r in removed) == sorted(left)
    assert not torn.exists()
    assert sorted(os.listdir(tmp_path / step_name(1))) == kept


def test_a_base_reached_through_a_symlink_outside_the_run_is_refused(tmp_path, frozen):
    run, elsewhere = tmp_path / "run", tmp_path / "elsewhere"
    with ckptstore.Checkpointer(run) as ck:
        ck.save(1, step_state(1, frozen)).wait()
        ck.save(2, step_state(2, frozen)).wait()
    assert {f.get("base") for f in _manifest(run, 2)["files"]} == {None, step_name(1)}
    os.rename(run / step_name(1), elsewhere)  # the base now lives outside the run ...
    os.symlink(elsewhere, run / step_name(1))  # ... reached through a symlink
    with pytest.raises(ckptstore.UnsafeCheckpointError, match="outside"):
        ckptstore.load(run / step_name(2))
    assert not ckptstore.fsck(run / step_name(2)).ok
    os.unlink(run / step_name(1))  # a symlink that stays inside the run is followed
    os.rename(elsewhere, run / "moved")
    os.symlink(run / "moved", run / step_name(1))
    assert_same_tree(ckptstore.load(run / step_name(2)), step_state(2, frozen))


def test_gc_removes_stray_files_in_committed_steps_and_plain_checkpoints(tmp_path, frozen):
    """Left by two saves overwriting one path, or by a killed writer: a shard its
    step's manifest does not name, and temp files; never a file a manifest names, and
    nothing younger than the grace period (a save may be writing it)."""
    from ckptstore.runs.gc import gc
    from ckptstore.storage import LocalStorage

    run = tmp_path / "run"
    with ckptstore.Checkpointer(run) as ck:
        ck.save(1, step_state(1, frozen)).wait()
        ck.save(2, step_state(2, frozen)).wait()  # references files of step 1
    old = time.time() - 7200
    strays = {step_name(1): "shard-00003-0123456789ab.chunks",
              step_name(2): ".tmp-shard-00000-0123456789ab.chunks.7.ab"}
    for d, name in strays.items():
        (run / d / name).write_bytes(b"stray")
        os.utime(run / d / name, (old, old))
    (run / step_name(2) / "shard-00004-0123456789ab.chunks").write_bytes(b"young")
    named = {d: sorted(f for f in os.listdir(run / d) if f not in strays.values())
             for d in strays}
    for f in os.listdir(run / step_name(1)):  # the committed files are old too
        os.utime(run / step_name(1) / f, (old, old))
    removed = gc(LocalStorage(str(run)), grace=3600)
    assert sorted(r.rpartition("/")[2] for r in removed) == sorted(strays.values())
    for d in strays:
        assert sorted(os.listdir(run / d)) == named[d]
    assert_same_tree(ckptstore.load(run / step_name(2)), step_state(2, frozen))

    plain = tmp_path / "plain"
    ckptstore.save(step_state(3, frozen), plain).wait()
    files = sorted(os.listdir(plain))
    (plain / ".tmp-shard-00000-0123456789ab.chunks.9.cd").write_bytes(b"tmp")
    os.utime(plain / ".tmp-shard-00000-0123456789ab.chunks.9.cd", (old, old))
    (plain / "shard-00009-0123456789ab.chunks").write_bytes(b"maybe a sibling's")
    os.utime(plain / "shard-00009-0123456789ab.chunks", (old, old))
    removed = gc(LocalStorage(str(plain)), grace=3600)
    assert [r.rpartition("/")[2] for r in removed] == [".tmp-shard-00000-0123456789ab.chunks.9.cd"]
    assert sorted(os.listdir(plain)) == sorted(files + ["shard-00009-0123456789ab.chunks"])


def test_gc_spares_an_empty_step_directory_a_save_just_made(tmp_path):
    """A save makes its directory before its first file: gc (run by retention too)
    must not remove it in between (it did, and the save then failed)."""
    from ckptstore.runs.gc import gc
    from ckptstore.storage import LocalStorage

    fresh, stale = tmp_path / step_name(7), tmp_path / step_name(3)
    os.makedirs(fresh)
    os.makedirs(stale)
    old = time.time() - 7200
    os.utime(stale, (old, old))
    gc(LocalStorage(str(tmp_path)), grace=3600)
    assert fresh.exists() and not stale.exists()


def test_full_every_bounds_the_incremental_chain(tmp_path, frozen):
    def full(step: int) -> bool:
        return all("base" not in f for f in _manifest(tmp_path, step)["files"])

    with ckptstore.Checkpointer(tmp_path, keep_last=None, full_every=3) as ck:
        for step in range(1, 8):
            ck.save(step, step_state(step, frozen)).wait()
    assert [s for s in range(1, 8) if full(s)] == [1, 4, 7]
    with ckptstore.Checkpointer(tmp_path, keep_last=None, full_every=3) as ck:  # restart
        ck.save(8, step_state(8, frozen)).wait()  # its base (7) is full: a chain goes on
        ck.save(9, step_state(9, frozen)).wait()
    assert not full(8) and not full(9)
    with ckptstore.Checkpointer(tmp_path, keep_last=None, full_every=3) as ck:
        ck.save(10, step_state(10, frozen)).wait()  # its base is incremental: start afresh
    assert full(10)
    for s in (7, 9, 10):
        assert_same_tree(ckptstore.load(tmp_path / step_name(s)), step_state(s, frozen))
    with pytest.raises(ValueError, match="full_every"):
        ckptstore.Checkpointer(tmp_path / "x", full_every=0)
