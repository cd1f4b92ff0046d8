"""Writer-process lifecycle and load(into=...) basics."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest
import torch

import ckptstore

ORPHAN_SCRIPT = r"""
import sys, torch, ckptstore
from ckptstore.pipeline import engine as saver
ckptstore.save({"x": torch.ones(4)}, sys.argv[1]).wait()
print(" ".join(map(str, saver.engine().writers.pids())), flush=True)
if sys.argv[2] == "hang":
    import time; time.sleep(600)
"""


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie is dead for our purposes
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ", 1)[1][0] != "Z"
    except FileNotFoundError:
        return False


@pytest.mark.parametrize("how", ["exit", "sigkill"])
def test_writers_exit_with_their_parent(tmp_path, how):
    proc = subprocess.Popen([sys.executable, "-c", ORPHAN_SCRIPT, str(tmp_path / "c"),
                             "hang" if how == "sigkill" else "exit"],
                            stdout=subprocess.PIPE, text=True)
    pids = [int(p) for p in proc.stdout.readline().split()]
    assert pids and all(_alive(p) for p in pids)
    if how == "sigkill":
        proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    deadline = time.time() + 15
    while time.time() < deadline and any(_alive(p) for p in pids):
        time.sleep(0.1)
    assert not any(_alive(p) for p in pids), "writer processes outlived their parent"


def test_writers_are_reused_between_saves(tmp_path):
    from ckptstore.pipeline import engine as saver

    ckptstore.save({"x": torch.ones(4)}, tmp_path / "a").wait()
    before = sorted(saver.engine().writers.pids())
    ckptstore.save({"x": torch.ones(4)}, tmp_path / "b").wait()
    assert sorted(saver.engine().writers.pids()) == before


def test_staging_is_reused_not_reallocated(tmp_path):
    from ckptstore.pipeline import engine as saver

    state = {"w": torch.randn(1000, 100)}
    ckptstore.save(state, tmp_path / "a").wait()
    arena = saver.engine().staging.arena
    for i in range(3):
        ckptstore.save(state, tmp_path / f"b{i}").wait()
        assert saver.engine().staging.arena is arena


def test_load_into_module_and_state_dict(tmp_path):
    torch.manual_seed(0)
    src = torch.nn.Linear(8, 4)
    ckptstore.save({"model": src.state_dict(), "step": 3}, tmp_path / "c").wait()
    dst = torch.nn.Linear(8, 4)
    target = {"model": dst.state_dict(), "step": 0}
    report = ckptstore.load(tmp_path / "c", into=target)
    assert report.ok and set(report.loaded) == {"model.weight", "model.bias", "step"}
    assert torch.equal(dst.weight, src.weight) and target["step"] == 3


def test_load_into_strict_reports_everything_and_changes_nothing(tmp_path):
    ckptstore.save({"a": torch.ones(3), "b": torch.ones(2), "extra": 1}, tmp_path / "c").wait()
    target = {"a": torch.zeros(3), "b": torch.zeros(5), "new": torch.zeros(1)}
    with pytest.raises(ckptstore.StrictLoadError) as e:
        ckptstore.load(tmp_path / "c", into=target)
    r = e.value.report
    assert r.missing == ("new",) and r.unexpected == ("extra",)
    assert [k for k, _ in r.mismatched] == ["b"]
    assert torch.equal(target["a"], torch.zeros(3))  # nothing modified
    assert isinstance(e.value, KeyError)
    report = ckptstore.load(tmp_path / "c", into=target, strict=False)
    assert report.loaded == ("a",) and torch.equal(target["a"], torch.ones(3))


def test_load_missing_checkpoint(tmp_path):
    with pytest.raises(FileNotFoundError):
        ckptstore.load(tmp_path / "none")


SPAWN_SCRIPT = r"""
import sys, torch, torch.multiprocessing as mp

def run(rank, d):
    import ckptstore
    ckptstore.save({"x": torch.ones(3)}, f"{d}/r{rank}").wait()

if __name__ == "__main__":
    mp.spawn(run, args=(sys.argv[1],), nprocs=1)
    print("JOINED")
"""


def test_spawned_child_that_saved_exits(tmp_path):
    """A torch.multiprocessing child exits via os._exit after joining its children;
    the engine must stop its writers before that join or the child never exits."""
    script = tmp_path / "spawn_save.py"
    script.write_text(SPAWN_SCRIPT)
    out = subprocess.run([sys.executable, str(script), str(tmp_path)], capture_output=True,
                         text=True, timeout=120)
    assert "JOINED" in out.stdout, out.stderr
    assert (tmp_path / "r0" / "manifest.json").exists()


def test_mapped_load_is_private_and_outlives_the_files(tmp_path):
    """Uncompressed local tensors load as copy-on-write maps of their shard: writing to
    them never reaches the checkpoint, and deleting the checkpoint does not hurt them."""
    state = {"w": torch.randn(256, 64), "b": torch.arange(7, dtype=torch.int16)}
    ckptstore.save(state, tmp_path / "c", compression="none").wait()
    back = ckptstore.load(tmp_path / "c")
    back["w"].add_(1.0)
    assert ckptstore.fsck(tmp_path / "c").ok  # the file did not change
    assert torch.equal(ckptstore.load(tmp_path / "c")["w"], state["w"])
    for p in (tmp_path / "c").iterdir():
        p.unlink()
    assert torch.equal(back["w"], state["w"] + 1.0) and torch.equal(back["b"], state["b"])


def test_truncated_shard_without_verification_raises_not_crashes(tmp_path):
    ckptstore.save({"w": torch.randn(4096)}, tmp_path / "c", compression="none").wait()
    shard = next(p for p in (tmp_path / "c").iterdir() if p.suffix == ".safetensors")
    os.truncate(shard, shard.stat().st_size // 2)  # a map of it would SIGBUS on access
    with pytest.raises(ckptstore.CorruptCheckpointError):
        ckptstore.load(tmp_path / "c", verify=False)


@pytest.mark.parametrize("env,expect", [(None, 10), ("0", 0), ("5", 5), ("40", 19)])
def test_writer_processes_run_at_the_configured_lower_priority(tmp_path, monkeypatch, env, expect):
    from ckptstore.pipeline import engine as saver
    ckptstore.shutdown()
    if env is None:
        monkeypatch.delenv("CKPTSTORE_WRITER_NICE", raising=False)
    else:
        monkeypatch.setenv("CKPTSTORE_WRITER_NICE", env)
    try:
        ckptstore.save({"x": torch.ones(4)}, tmp_path / "c").wait()
        want = min(os.getpriority(os.PRIO_PROCESS, 0) + expect, 19)
        pids = saver.engine().writers.pids()
        deadline = time.monotonic() + 30  # a writer sets its priority once it has started
        while time.monotonic() < deadline:
            seen = [os.getpriority(os.PRIO_PROCESS, pid) for pid in pids]  # main threads
            if seen == [want] * len(pids):
                break
            time.sleep(0.1)
        assert seen == [want] * len(pids)
    finally:
        ckptstore.shutdown()


def test_a_malformed_writer_nice_is_a_clear_error(monkeypatch):
    from ckptstore.pipeline.writer import writer_nice
    monkeypatch.setenv("CKPTSTORE_WRITER_NICE", "low")
    with pytest.raises(ValueError, match="CKPTSTORE_WRITER_NICE"):
        writer_nice()


def test_a_writer_that_died_while_idle_costs_no_save(tmp_path):
    """The OOM killer or an operator killed an idle writer: the next save must not
    fail (it used to raise WriterDiedError although nothing of it was lost)."""
    from ckptstore.pipeline import engine as saver
    ckptstore.shutdown()
    try:
        ckptstore.save({"x": torch.ones(4)}, tmp_path / "a").wait()
        pool = saver.engine().writers.get()
        os.kill(saver.engine().writers.pids()[0], signal.SIGKILL)
        deadline = time.monotonic() + 30
        while not pool._broken and time.monotonic() < deadline:  # the executor noticed
            time.sleep(0.05)
        assert pool._broken
        x = torch.arange(1000.0)
        ckptstore.save({"x": x}, tmp_path / "b").wait()
        assert torch.equal(ckptstore.load(tmp_path / "b")["x"], x)
    finally:
        ckptstore.shutdown()


MMAP_SCRIPT = r"""
import os, sys, torch, ckptstore
d, how = sys.argv[1], sys.argv[2]
x = torch.arange(1 << 20, dtype=torch.float32)
if how == "checkpointer":
    ck = ckptstore.Checkpointer(d, compression="none")
    ck.save(1, {"x": x}).wait()
    y = ck.load("latest")["x"]
    d = os.path.join(d, "step-000000000001")
else:
    ckptstore.save({"x": x}, d, compression="none").wait()
    y = ckptstore.load(d, mmap=False)["x"]
for f in os.listdir(d):
    if f.startswith("shard-"):
        os.truncate(os.path.join(d, f), 0)  # what retention or gc may do to a run's file
print(bool(torch.equal(y, x)), flush=True)
"""


@pytest.mark.parametrize("how", ["mmap=False", "checkpointer"])
def test_a_copying_load_survives_its_file_being_truncated(tmp_path, how):
    p = subprocess.run([sys.executable, "-c", MMAP_SCRIPT, str(tmp_path / "c"), how],
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, (p.returncode, p.stderr[-2000:])  # -7 would be SIGBUS
    assert p.stdout.strip().splitlines()[-1] == "True"


def test_staging_falls_back_cleanly_where_memfd_create_is_refused(tmp_path, monkeypatch):
    import errno as errno_mod

    def refused(*a, **k):
        raise OSError(errno_mod.ENOSYS, "Function not implemented")
    shm = "/dev/shm" if os.path.isdir("/dev/shm") else None
    before = set(os.listdir(shm)) if shm else set()
    ckptstore.shutdown()
    monkeypatch.setattr(os, "memfd_create", refused)
    try:
        x = torch.arange(100_000.0)
        ckptstore.save({"x": x}, tmp_path / "c").wait()  # used to raise a raw OSError
        assert torch.equal(ckptstore.load(tmp_path / "c")["x"], x)
        if shm:  # the fallback file is unlinked at once: nothing to leave after a kill
            assert not [f for f in set(os.listdir(shm)) - before if f.startswith("ckptstore-")]
    finally:
        ckptstore.shutdown()
