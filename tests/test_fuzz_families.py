"""Short runs of the ``enospc`` and ``groupkill`` fuzz families, checks that their
oracles can fail, and regression tests for what they found."""
from __future__ import annotations

import errno
import os

import pytest
import torch

import ckptstore
from fuzz import enospc
from fuzz.common import SMALL, Budget, Report, make_state

MOUNT_REFUSED = enospc.mount_refusal()
needs_mount = pytest.mark.skipif(MOUNT_REFUSED is not None,
                                 reason=f"no tmpfs mount here: {MOUNT_REFUSED}")

def _assert_clean(report: Report, key: str) -> None:
    assert report.counts["failures"] == 0 and not report.details, report.details
    assert report.counts[key] > 0, report.counts


# -- enospc --------------------------------------------------------------------
@needs_mount
@pytest.mark.timeout(300)
def test_enospc_short_run_every_mode_and_a_checkpointer_run():
    """Real ENOSPC (blocks and inodes) on a tmpfs: one round of every case at least."""
    report = Report()
    enospc.run(report, Budget(4), seed=3)
    _assert_clean(report, "enospc_hits")
    # 3 modes x 2 kinds x 2 scenarios + a Checkpointer run per kind
    assert report.counts["enospc_cases"] >= 14
    assert report.counts["enospc_ckpt_steps"] > 2
    assert "enospc_skipped" not in report.counts


@needs_mount
@pytest.mark.timeout(120)
def test_enospc_oracle_notices_untyped_errors(monkeypatch):
    """A save error left untyped must fail the oracle."""
    import ckptstore.pipeline.engine as engine_mod

    monkeypatch.setattr(engine_mod, "typed_os_error", lambda e, path: e)
    report = Report()
    enospc.run(report, Budget(1), seed=1, modes=("none",), kinds=("space",), checkpointer=False)
    assert any("is not a StorageError" in d for d in report.details), report.details


def test_enospc_oracle_notices_debris_a_gc_leaves(monkeypatch, tmp_path):
    """Temp files, an orphan shard and an uncommitted step left after gc must fail the
    oracle (here gc removes nothing); the real gc removes them all."""
    from ckptstore.runs.layout import step_name
    from fuzz.common import tree_digest

    run = tmp_path / "run"
    ckptstore.save(make_state(1), run / step_name(1), blocking=True, **SMALL)
    for p in (run / step_name(1) / ".tmp-manifest.json.1.ab", run / step_name(1) / "shard-00009-0abc.chunks",
              run / step_name(2) / ".tmp-shard-00000-0abc.chunks.1.cd"):
        p.parent.mkdir(exist_ok=True)
        p.write_bytes(b"x")
    assert len(enospc.debris(str(run))) == 4  # three files and the uncommitted step
    want = {1: tree_digest(make_state(1))}
    monkeypatch.setattr(enospc, "gc", lambda root, grace: [])
    report = Report()
    enospc._after_gc(report, str(run), want, "blind gc")
    assert report.counts["failures"] == 1 and "gc left" in report.details[0], report.details
    monkeypatch.undo()
    report = Report()
    enospc._after_gc(report, str(run), want, "gc")
    assert report.counts["failures"] == 0, report.details
    assert sorted(os.listdir(run)) == [step_name(1)]


@needs_mount
def test_filler_leaves_exactly_the_pages_and_inodes_asked(tmp_path):
    with enospc.tmpfs(1 << 20, 128) as mount:
        f = enospc.Filler(mount)
        for n in (5, 0, 17, 3):
            f.leave("space", n)
            assert f.free_pages() == n
        f.clear()
        for n in (10, 0, 4):
            f.leave("inodes", n)
            assert f.free_inodes() == n
        f.clear()
        assert f.free_pages() > 200


def test_enospc_skips_cleanly_where_mounting_is_refused(monkeypatch):
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    report = Report()
    enospc.run(report, Budget(1))
    assert report.counts["enospc_skipped"] == 1 and report.counts["failures"] == 0
    assert len(report.skipped) == 1 and "needs root" in report.skipped[0], report.skipped


# -- what enospc found -----------------------------------------------------------
def test_enospc_creating_the_step_directory_is_a_typed_error(tmp_path):
    """Found by the enospc family with no inodes left: mkdir of the step directory
    fails with ENOSPC, which must be a StorageError keeping its errno like every other
    ENOSPC of a save."""
    from ckptstore.storage.faulty import FaultyStorage
    from ckptstore.storage.local import LocalStorage

    s = FaultyStorage(LocalStorage(tmp_path / "c"), fail={"makedirs": 1}, errno=errno.ENOSPC)
    with pytest.raises(OSError) as e:
        ckptstore.save({"x": torch.arange(10.0)}, s, blocking=True)
    assert e.value.errno == errno.ENOSPC
    assert isinstance(e.value, ckptstore.StorageError), type(e.value)


def test_checkpointer_close_does_not_raise_again_an_error_wait_raised(tmp_path):
    """Found by the enospc family: after ``wait()`` raised a save's ENOSPC, ``close()``
    raised it a second time (the Checkpointer promises each error once)."""
    from ckptstore.storage.faulty import FaultyStorage
    from ckptstore.storage.local import LocalStorage

    run = FaultyStorage(LocalStorage(tmp_path / "run"), fail={"write": "*"}, errno=errno.ENOSPC)
    ck = ckptstore.Checkpointer(run, keep_last=2)
    ck.save(1, {"x": torch.arange(10.0)})
    with pytest.raises(ckptstore.StorageError) as e:
        ck.wait()
    assert e.value.errno == errno.ENOSPC
    ck.close()  # raised the same StorageError again


def test_checkpointer_close_does_not_raise_again_an_error_the_next_save_raised(tmp_path):
    """The same once-only promise when the next ``save()`` was the one to raise it."""
    from ckptstore.storage.faulty import FaultyStorage
    from ckptstore.storage.local import LocalStorage

    run = FaultyStorage(LocalStorage(tmp_path / "run"), fail={"write": "*"}, errno=errno.ENOSPC)
    ck = ckptstore.Checkpointer(run, keep_last=2)
    ck.save(1, {"x": torch.arange(10.0)})
    with pytest.raises(ckptstore.StorageError) as e:
        ck.save(2, {"x": torch.arange(11.0)})
    assert e.value.errno == errno.ENOSPC
    ck.close()  # raised the same StorageError again


@needs_mount
def test_a_checkpointer_resumes_after_real_enospc_and_gc_leaves_nothing():
    """End to end on a real full disk: the failed step is absent, the kept ones load,
    the same step saves once space is freed, gc leaves no debris."""
    from ckptstore.runs.layout import committed_steps, step_name
    from ckptstore.storage import open_storage
    from fuzz.common import outcome, tree_digest

    with enospc.tmpfs(2 << 20, 256) as mount:
        f = enospc.Filler(mount)
        run = os.path.join(mount, "run")
        ck = ckptstore.Checkpointer(run, keep_last=2, save_options=SMALL)
        for s in (1, 2, 3):
            ck.save(s, make_state(s))
            ck.wait()
        f.leave("space", 1)
        ck.save(4, make_state(4))
        with pytest.raises(ckptstore.StorageError) as e:
            ck.wait()
        assert e.value.errno == errno.ENOSPC
        assert committed_steps(open_storage(run)) == [2, 3]
        assert outcome(os.path.join(run, step_name(4))) == "absent"
        assert ck.latest() == 3
        f.clear()
        ck.save(4, make_state(4))
        ck.wait()
        assert committed_steps(open_storage(run)) == [3, 4]
        got = ck.load()
        assert ck.loaded_step == 4 and torch.equal(got["model"]["w"], make_state(4)["model"]["w"])
        assert outcome(os.path.join(run, step_name(4))) == tree_digest(make_state(4))
        enospc.gc(open_storage(run), grace=0)
        assert enospc.debris(run) == []


# -- groupkill -------------------------------------------------------------------
@pytest.mark.timeout(300)
def test_groupkill_short_run():
    """Whole-group SIGKILLs of Checkpointer runs promoting to S3 (moto)."""
    pytest.importorskip("moto")
    from fuzz import groupkill

    report = Report()
    groupkill.run(report, Budget(1), seed=5, max_delay=4.0, lives=(2, 2), min_lives=2)
    _assert_clean(report, "kills")
    assert report.counts["kills"] == report.counts["groupkill_lives"] >= 2


def test_groupkill_oracle_notices_a_lost_step_and_a_torn_one(tmp_path):
    """A record claiming a step that is not committed, and a committed step missing a
    shard, must fail the oracle."""
    pytest.importorskip("moto")
    import random

    from ckptstore.runs.layout import step_name
    from fuzz import groupkill
    from fuzz.servers import ObjectStore

    store = ObjectStore("s3")
    try:
        store.fs.mkdir("oracle")
        ep = groupkill.Episode(str(tmp_path), store, "oracle", 1, random.Random(0))
        ck = ckptstore.Checkpointer(ep.local, ep.remote, storage_options=ep.options,
                                    **ep.policy, save_options=SMALL)
        for s in (1, 2):
            ck.save(s, make_state(s, ep.scale))
            ck.wait()
        ck.close()
        groupkill._record(ep.record, [1, 2])
        report = Report()
        groupkill.check(report, ep, "clean")
        assert report.counts["failures"] == 0, report.details
        groupkill._record(ep.record, [3])  # "returned", never committed
        report = Report()
        groupkill.check(report, ep, "lost")
        assert any("latest() on the local tier is 2" in d for d in report.details), report.details
        d = os.path.join(ep.local, step_name(2))
        os.unlink(os.path.join(d, sorted(n for n in os.listdir(d) if n.startswith("shard-"))[0]))
        report = Report()
        groupkill.check(report, ep, "torn")
        assert any("local step 2 loads as error:" in d for d in report.details), report.details
    finally:
        store.close()
