"""Resources: nothing left in /dev/shm after a SIGKILL of a saving process group,
stale semaphore names cleaned safely at the next start, fds and threads steady over
many saves, and a short run of the ``resources`` fuzz family."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile

import pytest

from ckptstore.pipeline import semaphores
from fuzz import resources
from fuzz.__main__ import main as fuzz_main
from fuzz.common import Budget, Report

pytestmark = pytest.mark.skipif(not semaphores.supported(), reason="needs /dev/shm and /proc")


@pytest.mark.timeout(120)
@pytest.mark.parametrize("when", ["idle", "busy"])
def test_sigkill_of_saving_group_leaves_no_semaphores(tmp_path, when):
    """A child group saves (its writers started), then os.killpg(SIGKILL): no new
    /dev/shm entry of that group may remain, even before any later start (the pool's
    five named semaphores used to stay forever)."""
    report = Report()
    got = resources.kill_group(report, str(tmp_path), seed=1, when=when, delay=0.1, next_start=False)
    assert got["left_by_kill"] == 0, (got, report.details)
    assert got["remaining"] == 0
    assert report.counts["failures"] == 0, report.details
    assert report.counts["kills"] == 1


@pytest.mark.timeout(120)
def test_group_killed_while_writers_start_is_cleaned_at_next_start(tmp_path):
    """Killed inside the writers' start (names recorded, not yet unlinked): the names
    stay, and the next engine start in the same temp dir removes exactly them."""
    report = Report()
    got = resources.kill_group(report, str(tmp_path), seed=2, when="startup")
    assert got["left_by_kill"] == 5, got  # the call queue's 3 and the result queue's 2
    assert got["cleaned_at_next_start"] == 5, got
    assert got["remaining"] == 0, got
    assert report.counts["failures"] == 0, report.details


def _make_sem(name: str, keep: list) -> str:
    """A named semaphore, left in /dev/shm; mapped by this process if kept."""
    import _multiprocessing

    lock = _multiprocessing.SemLock(1, 1, 1, name, False)
    if keep is not None:
        keep.append(lock)
    del lock
    return semaphores.shm_file(name)


def test_clean_stale_unlinks_only_dead_owners_unmapped_names(tmp_path, monkeypatch):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    tag = f"/mp-cktest{os.getpid()}"
    live: list = []
    names = {k: f"{tag}-{k}" for k in ("dead", "mapped", "owner_alive", "reused")}
    try:
        files = {k: _make_sem(n, live if k == "mapped" else None) for k, n in names.items()}
        dead = subprocess.Popen([sys.executable, "-c", "pass"])
        dead.wait()
        reg = semaphores.registry()
        assert reg is not None
        (reg / f"{dead.pid}-1-0").write_text(f"{names['dead']}\n{names['mapped']}\n../../etc/passwd\n")
        me = semaphores.start_time(os.getpid())
        (reg / f"{os.getpid()}-{me}-0").write_text(names["owner_alive"] + "\n")
        (reg / f"{os.getpid()}-{int(me or 0) + 1}-0").write_text(names["reused"] + "\n")

        assert semaphores.clean_stale() == 2
        assert not os.path.exists(files["dead"])
        assert not os.path.exists(files["reused"])  # a reused pid is a dead owner
        assert os.path.exists(files["mapped"])  # a live process maps it: never unlinked
        assert os.path.exists(files["owner_alive"])
        assert sorted(p.name for p in reg.iterdir()) == sorted(
            [f"{dead.pid}-1-0", f"{os.getpid()}-{me}-0"])  # kept for the mapped name; live owner
        del live[:]
        assert semaphores.clean_stale() == 1  # no longer mapped: gone now
        assert not os.path.exists(files["mapped"])
    finally:
        live.clear()
        for n in names.values():
            try:
                os.unlink(semaphores.shm_file(n))
            except FileNotFoundError:
                pass


@pytest.mark.timeout(180)
def test_fds_threads_children_steady_over_50_saves(tmp_path):
    report = Report()
    got = resources.saves(report, Budget(120), str(tmp_path), n=50, seed=3)
    assert report.counts["failures"] == 0, report.details
    assert got["saves"] == 50 and got["loads"] == 10
    before, after = got["before"], got["after"]
    assert after["fds"] - before["fds"] <= resources.SLACK, got
    assert after["threads"] - before["threads"] <= resources.SLACK, got
    assert after["children"] == before["children"], got
    assert after["shm"] == 0, got  # the writers' semaphores exist only as mappings


@pytest.mark.timeout(180)
def test_resources_family_short_run(tmp_path):
    out = tmp_path / "report.json"
    assert fuzz_main(["resources", "--budget", "6", "--json", str(out)]) == 0
    counts = json.loads(out.read_text())
    assert counts["failures"] == 0, counts["failure_details"]
    assert counts["resource_saves"] > 0 and counts["kills"] >= 1, counts
