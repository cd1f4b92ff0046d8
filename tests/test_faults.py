"""FaultyStorage itself, and regression tests for engine bugs the fault suite found."""
from __future__ import annotations

import errno
import os
import pickle
import stat
import threading

import pytest
import torch

import ckptstore
from ckptstore.errors import CheckpointNotFoundError, CkptError, CorruptCheckpointError
from ckptstore.storage import LocalStorage
from ckptstore.storage.faulty import FaultyStorage, Ledger, ops_of
from fuzz.common import SMALL, make_state, outcome, tree_digest


@pytest.fixture
def ledger(tmp_path):
    led = Ledger(str(tmp_path / "ledger"))
    yield led
    led.remove()


def test_counts_and_journal_every_call(tmp_path, ledger):
    s = FaultyStorage(LocalStorage(tmp_path / "d"), ledger=ledger, record=True)
    s.makedirs()
    h = s.open_write("a")
    h.write(b"hello")
    h.write(memoryview(b" world"))
    h.fsync()
    h.close()
    s.rename("a", "b")
    s.fsync_dir()
    assert s.read("b") == b"hello world"
    counts = ledger.counts()
    assert counts["write"] == 2 and counts["rename"] == 1 and counts["read"] == 1
    assert counts["_mutating"] == 8  # reads are not kill points
    ops = ledger.journal()
    assert [r["op"] for r, _ in ops] == ["makedirs", "open_write", "write", "write", "fsync",
                                          "close", "rename", "fsync_dir"]
    assert ops[2][1] == b"hello" and ops[6][0]["dst"] == "b"


def test_fail_table_nth_call_and_errno(tmp_path, ledger):
    s = FaultyStorage(LocalStorage(tmp_path), fail={"fsync": 2}, errno=errno.ENOSPC,
                      ledger=ledger)
    h = s.open_write("x")
    h.fsync()  # the first passes
    with pytest.raises(OSError) as e:
        h.fsync()
    assert e.value.errno == errno.ENOSPC
    h.fsync()  # only the second call was in the table


def test_failing_write_is_short(tmp_path, ledger):
    s = FaultyStorage(LocalStorage(tmp_path), fail={"write": "*"}, ledger=ledger)
    h = s.open_write("x")
    with pytest.raises(OSError):
        h.write(b"0123456789")
    h.close()
    assert (tmp_path / "x").read_bytes() == b"01234"


def test_where_filter_and_fail_after(tmp_path, ledger):
    s = FaultyStorage(LocalStorage(tmp_path), fail={"rename": 1}, where="m*",
                      fail_when="after", ledger=ledger)
    for name in ("a", "m"):
        h = s.open_write(name)
        h.close()
    s.rename("a", "b")  # does not match the filter
    with pytest.raises(OSError):
        s.rename("m", "n")
    assert (tmp_path / "n").exists()  # "after": the call happened, the caller was told not


def test_picklable_and_shared_counts(tmp_path, ledger):
    s = FaultyStorage(LocalStorage(tmp_path), fail={"write": [3]}, ledger=ledger)
    clone = pickle.loads(pickle.dumps(s))
    h = s.open_write("x")
    h.write(b"a")
    clone.open_write("y").write(b"b")  # counts are shared through the ledger file
    with pytest.raises(OSError):
        h.write(b"c")


def test_group_kill_needs_a_group_leader(tmp_path):
    if os.getpgrp() == os.getpid():
        pytest.skip("the test runner leads its own process group")
    with pytest.raises(RuntimeError):
        FaultyStorage(LocalStorage(tmp_path), kill_at=1)


def test_unknown_op_in_table_is_refused(tmp_path):
    with pytest.raises(ValueError):
        FaultyStorage(LocalStorage(tmp_path), fail={"fsnyc": 1})


# -- the save path under injected faults ---------------------------------------------

def test_fsync_eio_aborts_without_retry(tmp_path, ledger):
    target = tmp_path / "ck"
    s = FaultyStorage(LocalStorage(target), fail={"fsync": 1}, where=".tmp-shard-*",
                      ledger=ledger)
    with pytest.raises(OSError) as e:
        ckptstore.save(make_state(2), s, compression="zstd", blocking=True, **SMALL)
    # typed (a StorageError is still the OSError, with its errno), never retried
    assert e.value.errno == errno.EIO and isinstance(e.value, ckptstore.StorageError)
    assert not isinstance(e.value, ckptstore.TransientStorageError)
    journal = [r for r, _ in ledger.journal()]
    note = next(r for r in journal if r["op"] == "note")
    later = [r["op"] for r in ops_of(ledger.journal())
             if r["index"] > note["index"] and r["name"] == note["name"]]
    assert "fsync" not in later and "rename" not in later
    with pytest.raises(CheckpointNotFoundError):
        ckptstore.load(target)
    assert not [n for n in os.listdir(target) if n != "manifest.json"]


@pytest.mark.parametrize("fail", [{"fail": {"link_exclusive": 1}, "fail_when": "after",
                                   "where": ".tmp-manifest.json.*"},
                                  {"fail": {"fsync_dir": "last"}}])
def test_commit_error_after_manifest_link_never_tears(tmp_path, ledger, fail):
    """Regression: a failure reported after the manifest was linked (or its directory
    fsync failed) made the save remove its shards under a visible manifest, leaving
    a torn checkpoint that fsck called damaged instead of absent."""
    fail = dict(fail)
    if fail["fail"].get("fsync_dir") == "last":
        clean = FaultyStorage(LocalStorage(tmp_path / "clean"), ledger=ledger)
        ckptstore.save(make_state(2), clean, compression="lz4", blocking=True, **SMALL)
        fail["fail"] = {"fsync_dir": ledger.counts()["fsync_dir"]}
        ledger.reset()
    target = tmp_path / "ck"
    s = FaultyStorage(LocalStorage(target), ledger=ledger, **fail)
    with pytest.raises(OSError):
        ckptstore.save(make_state(2), s, compression="lz4", blocking=True, **SMALL)
    assert outcome(str(target)) in ("absent", tree_digest(make_state(2)))


def test_open_error_after_create_leaves_no_temp(tmp_path, ledger):
    """Regression: an open_write that failed after creating its file left the temp."""
    target = tmp_path / "ck"
    s = FaultyStorage(LocalStorage(target), fail={"open_write": 1}, fail_when="after",
                      where=".tmp-manifest.json.*", ledger=ledger)
    with pytest.raises(OSError):
        ckptstore.save(make_state(2), s, compression="none", blocking=True, **SMALL)
    assert os.listdir(target) == []


@pytest.mark.timeout(60)
def test_fifo_in_checkpoint_does_not_block(tmp_path):
    """Regression: a FIFO planted as a shard made fsck (and reads) block forever."""
    target = tmp_path / "ck"
    ckptstore.save(make_state(1), target, compression="zstd", blocking=True, **SMALL)
    shard = sorted(n for n in os.listdir(target) if n.startswith("shard-"))[0]
    os.unlink(target / shard)
    os.mkfifo(target / shard)
    assert stat.S_ISFIFO(os.lstat(target / shard).st_mode)
    done = threading.Event()

    def work():
        with pytest.raises(CorruptCheckpointError):
            ckptstore.load(target)
        try:
            assert not ckptstore.fsck(str(target)).ok
        except CkptError:
            pass
        done.set()

    t = threading.Thread(target=work, daemon=True)
    t.start()
    t.join(30)
    if not done.is_set():  # release the blocked reader before failing
        fd = os.open(target / shard, os.O_WRONLY | os.O_NONBLOCK)
        os.close(fd)
    assert done.is_set()


def test_fsck_names_bad_tree_and_dtype(tmp_path):
    """Regression: fsck said OK on manifests that load refuses (a numpy object
    dtype, a state tree naming a tensor that does not exist)."""
    import json

    from fuzz.parsers import seal

    target = tmp_path / "ck"
    ckptstore.save(make_state(1), target, compression="zstd", blocking=True, **SMALL)
    obj = json.loads((target / "manifest.json").read_bytes())
    for change in ({"tree": {"T": "tensor", "id": 999}},
                   {"tensors": [dict(obj["tensors"][0], kind="numpy", dtype="O")]
                    + obj["tensors"][1:]}):
        (target / "manifest.json").write_bytes(seal(dict(obj, **change)))
        with pytest.raises(CkptError):
            ckptstore.load(target)
        report = ckptstore.fsck(str(target))
        assert not report.ok and any(d.file == "manifest.json" for d in report.damage)


@pytest.mark.parametrize("op", ["write", "fsync"])
def test_enospc_during_a_save_is_a_typed_error_that_keeps_its_errno(tmp_path, op):
    s = FaultyStorage(LocalStorage(tmp_path / "c"), fail={op: "*"}, errno=errno.ENOSPC)
    h = ckptstore.save({"x": torch.arange(1000.0)}, s, compression="none")
    with pytest.raises(ckptstore.StorageError) as e:
        h.wait()
    assert isinstance(e.value, OSError) and e.value.errno == errno.ENOSPC
    assert "free space" in str(e.value)
    assert not (tmp_path / "c" / "manifest.json").exists()
    ckptstore.save({"x": torch.ones(3)}, tmp_path / "d").wait()  # raised once, then gone
