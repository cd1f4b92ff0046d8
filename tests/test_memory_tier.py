"""The memory tier of the Checkpointer: saves commit in (tmpfs) memory first and are
promoted in the background; a restarted process resumes from memory; damage falls
back to local disk; eviction never drops the only copy; ``close()`` leaves nothing;
``ckptstore gc --memory``; the peer replica (against an in-process fake keeper)."""
from __future__ import annotations

import io
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import threading
import time
import types
from contextlib import redirect_stdout
from pathlib import Path

import pytest
from conftest import assert_same_tree, step_state

import ckptstore
from ckptstore.api.checkpointer import Checkpointer, CheckpointFallbackWarning
from ckptstore.runs import memory as mem
from ckptstore.runs.layout import committed_steps, step_name
from ckptstore.runs.promote import promote_step
from ckptstore.runs.replica import Replicator
from ckptstore.storage import open_storage

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(autouse=True)
def memdir(tmp_path, monkeypatch) -> Path:
    """Every memory tier of a test below its own directory (never /dev/shm)."""
    d = tmp_path / "shm"
    monkeypatch.setenv(mem.MEMORY_ENV, str(d))
    return d


def _steps(path) -> list[int]:
    return committed_steps(open_storage(str(path)))


def _flip(step_dir: Path) -> None:
    shard = sorted(p for p in step_dir.iterdir() if p.name.startswith("shard"))[0]
    raw = bytearray(shard.read_bytes())
    raw[len(raw) // 2] ^= 0x10
    shard.write_bytes(bytes(raw))


def test_save_and_load_through_memory_is_bit_exact(tmp_path, memdir, frozen):
    local = tmp_path / "run"
    with Checkpointer(local, memory=True, keep_last=5) as ck:
        assert ck.memory_path == memdir / mem.run_key(local, None)
        for s in (1, 2):
            ck.save(s, step_state(s, frozen)).wait()
            assert s in _steps(ck.memory_path)  # committed in memory when the handle is done
        ck.wait()
        assert _steps(local) == [1, 2]  # promoted to local disk in the background
        assert_same_tree(ck.load("latest"), step_state(2, frozen))
        assert (ck.loaded_step, ck.loaded_from) == (2, "memory")
        assert [(t, o) for t, _, o in ck.load_timings] == [("memory", "ok")]
        assert_same_tree(ck.load(1), step_state(1, frozen))  # evicted from memory: local
        assert ck.loaded_from == "local"


CHILD = textwrap.dedent("""
    import sys, time, torch
    sys.path.insert(0, {tests!r})
    import ckptstore
    from conftest import step_state
    frozen = torch.randn(256, 64, generator=torch.Generator().manual_seed(99))
    ck = ckptstore.Checkpointer({local!r}, memory=True, keep_last=5)
    for s in (1, 2, 3):
        ck.save(s, step_state(s, frozen)).wait()
    ck.wait()
    print("saved", flush=True)
    time.sleep(600)
""")


def _run_and_kill(local: Path) -> None:
    """A trainer-like child saves steps 1..3 through the memory tier, then is SIGKILLed."""
    code = CHILD.format(tests=str(REPO / "tests"), local=str(local))
    proc = subprocess.Popen([sys.executable, "-c", code], cwd=REPO, stdout=subprocess.PIPE,
                            text=True, env=dict(os.environ, PYTHONPATH=str(REPO)))
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "saved"
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()  # reaped: its owner record is dead now


def test_loads_from_memory_map_its_pages_and_outlive_the_tier(tmp_path, frozen):
    """A restore from memory maps the tmpfs files (no copy, hashes checked); the tensors
    stay valid and private after close() removed the files, and writing to them never
    reaches a file."""
    import torch

    local = tmp_path / "run"
    ck = Checkpointer(local, memory=True, compression="none")
    ck.save(1, {"w": torch.arange(1 << 16, dtype=torch.float32)}).wait()
    ck.wait()
    shard = next(p for p in ck.memory_path.glob("step-*/shard-*"))
    got = ck.load("latest")["w"]
    assert ck.loaded_from == "memory"
    maps = open("/proc/self/maps").read()
    assert str(shard) in maps  # mapped, not read into fresh memory
    before = shard.read_bytes()
    got[0] = 123.0  # copy-on-write: the memory copy is unchanged
    assert shard.read_bytes() == before
    ck.close()
    assert not ck.memory_path.exists()
    assert got[0] == 123.0 and torch.equal(got[1:], torch.arange(1, 1 << 16, dtype=torch.float32))


def test_sigkilled_process_resumes_from_memory_and_damage_falls_back_to_disk(tmp_path, frozen):
    local = tmp_path / "run"
    _run_and_kill(local)
    where = mem.memory_dir(True, local, None)
    assert _steps(where) == [3] and mem.owner_alive(where) is False  # the tier outlived it
    with Checkpointer(local, memory=True, keep_last=5) as ck:
        assert_same_tree(ck.load("latest"), step_state(3, frozen))
        assert (ck.loaded_step, ck.loaded_from) == (3, "memory")
        _flip(where / step_name(3))
        with pytest.warns(CheckpointFallbackWarning, match="memory copy of step 3"):
            got = ck.load("latest")
        assert_same_tree(got, step_state(3, frozen))
        assert (ck.loaded_step, ck.loaded_from) == (3, "local")
        assert [(t, o.split(":")[0]) for t, _, o in ck.load_timings] == [
            ("memory", "fallback"), ("local", "ok")]
        # the damaged memory copy was dropped (local holds the step): not tried again
        assert _steps(where) == [] and not (where / step_name(3)).exists()
        assert_same_tree(ck.load("latest"), step_state(3, frozen))
        assert [t for t, _, _ in ck.load_timings] == ["local"]


def test_a_damaged_only_copy_in_memory_is_kept(tmp_path, frozen, monkeypatch):
    """A memory step that is on no other tier is never dropped for damage (it may be
    salvaged): the load falls back to an older step, the copy stays, and close()
    refuses to promote it and keeps the tier."""
    from ckptstore.errors import CorruptCheckpointError

    local = tmp_path / "run"
    ck = Checkpointer(local, memory=True, memory_keep=2, keep_last=5)
    ck.save(1, step_state(1, frozen)).wait()
    ck.wait()
    monkeypatch.setattr(Checkpointer, "_promote_down", lambda self: None)  # next tier lags
    ck.save(2, step_state(2, frozen)).wait()
    ck.wait()
    assert _steps(ck.memory_path) == [1, 2] and _steps(local) == [1]
    _flip(ck.memory_path / step_name(2))  # type: ignore[operator]
    with pytest.warns(CheckpointFallbackWarning, match="memory copy of step 2"):
        assert_same_tree(ck.load("latest"), step_state(1, frozen))
    assert _steps(ck.memory_path) == [1, 2]
    monkeypatch.undo()
    with pytest.raises(CorruptCheckpointError, match="never promoted"):
        ck.close()
    assert _steps(ck.memory_path) == [1, 2]


@pytest.mark.parametrize("nproc", [1, 2])
def test_sigkilled_trainer_resumes_from_memory(tmp_path, nproc):
    """The trainer, on one process or two FSDP ranks sharing the node's memory tier."""
    from trainer.launch import run, signal_at_step, start

    args = ["--preset", "tiny", "--steps", "8", "--warmup-steps", "2", "--batch-size", "4",
            "--out-dir", str(tmp_path / "t"),
            "--ckpt-every-steps", "2", "--val-every", "0", "--log-every", "1", "--step-delay", "0.2",
            "--memory"]
    proc = start(args, nproc)
    seen, _ = signal_at_step(proc, 5, signal.SIGKILL, whole_group=True)
    assert seen is not None
    rc, out = run([*args, "--resume", "auto"], nproc)
    assert rc == 0, out[-3000:]
    assert "resume source: memory" in out, out[-3000:]
    assert list((tmp_path / "shm").iterdir()) == []  # the resumed run ended cleanly


def test_the_memory_demo_compares_its_restore_with_a_cold_local_disk(tmp_path):
    """``trainer demo --memory``, shrunk: killed, the same step restored from the local
    disk with its page cache dropped (a probe run), then resumed from memory."""
    out_dir = tmp_path / "demo"
    proc = subprocess.run(
        [sys.executable, "-m", "trainer", "demo", "--memory", "--nproc", "1", "--kill-at", "7",
         "--out-dir", str(out_dir), "--width", "64", "--depth", "2", "--heads", "4",
         "--steps", "10", "--ckpt-every-steps", "2", "--step-delay", "0.3"],
        cwd=Path(__file__).resolve().parent.parent, capture_output=True, text=True, timeout=600)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-3000:]
    import re

    found = re.search(r"restore from memory: ([0-9.]+) s; step (\d+) from the local disk with a "
                      r"cold page cache: ([0-9.]+) s", out)
    assert found, out[-3000:]
    assert float(found[1]) > 0 and float(found[3]) > 0 and int(found[2]) in (2, 4, 6)
    assert "resume source: local" not in out.split("== 2. resume")[1]  # the resume: from memory
    assert " OK — " in out, out[-2000:]
    # the probe run kept its log apart and left the run's checkpoints as they were
    assert (out_dir / "cold-disk-restore" / "checkpoints").is_symlink()
    assert committed_steps(ckptstore.storage.LocalStorage(out_dir / "checkpoints")) == [8, 10]


def test_eviction_by_count_and_bytes(tmp_path, frozen):
    local = tmp_path / "run"
    with Checkpointer(local, memory=True, memory_keep=2, keep_last=10) as ck:
        for s in (1, 2, 3, 4):
            ck.save(s, step_state(s, frozen)).wait()
            ck.wait()
        assert _steps(ck.memory_path) == [3, 4] and _steps(local) == [1, 2, 3, 4]
        one = mem.step_bytes(ck.memory.root, 4)  # type: ignore[union-attr]
        ck.memory_keep, ck.memory_bytes = 10, one + one // 2  # room for one step only
        ck.save(5, step_state(5, frozen)).wait()
        ck.wait()
        assert _steps(ck.memory_path) == [5]


def test_eviction_never_drops_the_only_copy(tmp_path, frozen, monkeypatch):
    local = tmp_path / "run"
    monkeypatch.setattr(Checkpointer, "_promote_down", lambda self: None)  # next tier lags
    ck = Checkpointer(local, memory=True, memory_keep=1, memory_bytes=0)
    for s in (1, 2, 3):
        ck.save(s, step_state(s, frozen)).wait()
        ck.wait()
    assert _steps(ck.memory_path) == [1, 2, 3] and _steps(local) == []
    ck.close()  # the only copies: the memory tier stays
    assert _steps(ck.memory_path) == [1, 2, 3]
    assert mem.select_evictions({1: 10, 2: 10, 3: 10}, 1, 0, pending=set()) == [1, 2]
    assert mem.select_evictions({1: 10, 2: 10, 3: 10}, 1, None, pending={1, 3}) == [2]


def test_a_step_the_disk_retention_dropped_is_evicted_not_promoted_again(tmp_path, frozen,
                                                                         monkeypatch):
    """The memory tier keeps more steps than the disk (memory_keep 3, keep_last 1): a
    step the disk's retention dropped is not the only copy of anything the run wants.
    It was copied back to the disk after every save (and deleted again), never evicted,
    and it kept the tier alive after close()."""
    promoted: list[int] = []
    real = Checkpointer._promote
    monkeypatch.setattr(Checkpointer, "_promote",
                        lambda self, src, dst, s: promoted.append(s) or real(self, src, dst, s))
    local = tmp_path / "run"
    ck = Checkpointer(local, memory=True, memory_keep=3, keep_last=1)
    for s in range(1, 7):
        ck.save(s, step_state(s, frozen)).wait()
        ck.wait()
        assert _steps(local) == [s]
        assert _steps(ck.memory_path) == list(range(max(1, s - 2), s + 1))
    assert promoted == [1, 2, 3, 4, 5, 6]
    ck.close()
    assert promoted == [1, 2, 3, 4, 5, 6] and _steps(local) == [6]
    assert not ck.memory_path.exists()  # type: ignore[union-attr]


def test_close_leaves_nothing_in_the_memory_dir(tmp_path, memdir, frozen):
    ck = Checkpointer(tmp_path / "run", memory=True)
    ck.save(1, step_state(1, frozen))
    ck.close()
    assert not ck.memory_path.exists()  # type: ignore[union-attr]
    assert list(memdir.iterdir()) == []
    assert _steps(tmp_path / "run") == [1]


def _gc_memory(*extra: str) -> dict:
    from ckptstore.cli.main import main

    out = io.StringIO()
    with redirect_stdout(out):
        assert main(["gc", "--memory", "--json", *extra]) == 0
    return json.loads(out.getvalue())


def test_gc_memory_removes_a_dead_owners_tier_and_keeps_a_live_one(tmp_path, memdir, frozen):
    dead = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    start = mem.process_start(dead.pid)
    dead.kill()
    dead.wait()
    crashed = memdir / "crashed-0123456789abcdef"
    (crashed / "step-000000000001").mkdir(parents=True)
    (crashed / "step-000000000001" / "shard-00000-ab.chunks").write_bytes(b"x" * 1000)
    (crashed / mem.OWNER_NAME).write_text(json.dumps({"pid": dead.pid, "start": start}))
    (memdir / "not-ours").mkdir()  # no owner file: never touched
    with Checkpointer(tmp_path / "run", memory=True) as live:
        live.save(1, step_state(1, frozen)).wait()
        report = _gc_memory("--dry-run")
        assert [t["path"] for t in report["removed"]] == [str(crashed)]
        assert report["removed"][0]["bytes"] >= 1000 and crashed.exists()
        report = _gc_memory()
        assert [t["path"] for t in report["removed"]] == [str(crashed)] and not crashed.exists()
        assert [t["path"] for t in report["kept"]] == [str(live.memory_path)]
        assert live.memory_path.exists()  # type: ignore[union-attr]
    assert (memdir / "not-ours").exists()


# -- peer replica, against a fake keeper with the interface of ckptstore.peer ---


class FakeKeeper:
    """A keeper holding runs in a directory; promote's protocol to copy steps."""

    def __init__(self, root: Path, port: int) -> None:
        self.root, self.address = root, f"127.0.0.1:{port}"

    def stop(self) -> None:
        pass


class FakeClient:
    """``ckptstore.peer.PeerClient``'s interface: ``push`` takes a step directory,
    ``fetch`` writes one."""

    keepers: dict[str, FakeKeeper] = {}
    gate: threading.Event | None = None  # set by a test to hold pushes
    fail: Exception | None = None

    def __init__(self, address: str, timeout: float = 30.0) -> None:
        if address not in self.keepers:
            raise ConnectionRefusedError(f"no keeper at {address}")
        self.run_root = lambda run: open_storage(str(self.keepers[address].root / run))

    def push(self, src, run: str, step: int) -> int:
        if FakeClient.gate is not None:
            FakeClient.gate.wait(30)
        if FakeClient.fail is not None:
            raise FakeClient.fail
        return promote_step(src.parent(), self.run_root(run), step_name(step)).uploaded_bytes

    def steps(self, run: str) -> list[int]:
        root = self.run_root(run)
        return committed_steps(root) if root.isdir("") else []

    def fetch(self, run: str, step: int, dst) -> int:
        return promote_step(self.run_root(run), dst.parent(), step_name(step)).uploaded_bytes

    def drop(self, run: str, step: int) -> None:
        self.run_root(run).rmtree(step_name(step))

    def close(self) -> None:
        pass


@pytest.fixture
def keeper(tmp_path, monkeypatch):
    fake = types.ModuleType("ckptstore.peer")

    def start_keeper(root, host="127.0.0.1", port=0):
        k = FakeKeeper(Path(root), 40000 + len(FakeClient.keepers))
        FakeClient.keepers[k.address] = k
        return k

    fake.start_keeper, fake.PeerClient = start_keeper, FakeClient  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "ckptstore.peer", fake)
    monkeypatch.setattr(FakeClient, "keepers", {})
    monkeypatch.setattr(FakeClient, "gate", None)
    monkeypatch.setattr(FakeClient, "fail", None)
    return start_keeper(tmp_path / "buddy")


def test_peer_gets_each_step_and_restores_a_lost_memory(tmp_path, keeper, frozen):
    local = tmp_path / "run"
    ck = Checkpointer(local, memory=True, peer=keeper.address, keep_last=5)
    for s in (1, 2):
        ck.save(s, step_state(s, frozen)).wait()
        ck.wait()
    ck._replica.drain(30)  # type: ignore[union-attr]
    run = ck.memory_path.name  # type: ignore[union-attr]
    assert 2 in _steps(keeper.root / run)
    ck._stop()  # the node is lost: no clean close, its memory gone
    mem.release(ck.memory_path)  # type: ignore[arg-type]
    with Checkpointer(local, memory=True, peer=keeper.address, keep_last=5) as again:
        assert again.latest() == 2
        assert_same_tree(again.load("latest"), step_state(2, frozen))
        assert (again.loaded_step, again.loaded_from) == (2, "peer")
        assert _steps(again.memory_path) == [2]  # fetched into the own memory tier
    assert _steps(keeper.root / run) == []  # a clean close drops the peer's copies


def test_an_unreachable_peer_is_passed_over(tmp_path, keeper, frozen):
    with Checkpointer(tmp_path / "run", memory=True, peer="127.0.0.1:9") as ck:  # nobody there
        ck.save(1, step_state(1, frozen)).wait()
        ck.wait()
        ck._replica.drain(30)  # type: ignore[union-attr]
        mem.release(ck.memory_path)  # type: ignore[arg-type]
        assert ck.latest() == 1
        assert_same_tree(ck.load("latest"), step_state(1, frozen))
        assert ck.loaded_from == "local" and isinstance(ck.peer_error, ConnectionRefusedError)


def test_peer_push_failure_never_fails_saves(tmp_path, keeper, frozen):
    FakeClient.fail = ConnectionResetError("buddy went away")
    with Checkpointer(tmp_path / "run", memory=True, peer=keeper.address) as ck:
        for s in (1, 2):
            ck.save(s, step_state(s, frozen)).wait()
            ck.wait()  # no error raised for the peer
        ck._replica.drain(30)  # type: ignore[union-attr]
        assert isinstance(ck.peer_error, ConnectionResetError)
        assert _steps(tmp_path / "run") == [1, 2]


def test_a_newer_step_replaces_a_waiting_push(tmp_path, keeper, frozen):
    FakeClient.gate = threading.Event()
    with Checkpointer(tmp_path / "src", memory=True, memory_keep=3) as ck:
        for s in (1, 2, 3):
            ck.save(s, step_state(s, frozen)).wait()
        ck.wait()
        rep = Replicator(keeper.address, "r", ck.memory.root, lambda e: None)  # type: ignore[union-attr]
        rep.offer(3)  # held by the gate while it runs
        while rep._busy != 3:
            time.sleep(0.01)
        rep.offer(1)
        rep.offer(2)  # replaces 1, which never started
        FakeClient.gate.set()
        rep.close(30)
        assert rep.pushed == [3, 2] and rep.skipped == [1]


def test_memory_options_are_checked(tmp_path):
    with pytest.raises(ValueError, match="memory_keep"):
        Checkpointer(tmp_path, memory=True, memory_keep=0)
    with pytest.raises(ValueError, match="memory=True"):
        Checkpointer(tmp_path, peer="127.0.0.1:1")
    assert ckptstore.Checkpointer is Checkpointer


def test_real_keeper_restores_a_lost_node(tmp_path, frozen):
    """The same flow over TCP with ckptstore.peer's keeper (when it is in the tree):
    the node's memory and disk are gone, the peer's copy comes back."""
    peer = pytest.importorskip("ckptstore.peer")
    if not hasattr(peer, "start_keeper"):
        pytest.skip("ckptstore.peer has no keeper yet")
    k = peer.start_keeper(tmp_path / "buddy")
    try:
        ck = Checkpointer(tmp_path / "run", memory=True, peer=k.address)
        for s in (1, 2):
            ck.save(s, step_state(s, frozen)).wait()
            ck.wait()
        ck._replica.drain(60)  # type: ignore[union-attr]
        assert ck.peer_error is None and 2 in ck._replica.pushed  # type: ignore[union-attr]
        ck._stop()
        mem.release(ck.memory_path)  # type: ignore[arg-type]
        shutil.rmtree(tmp_path / "run")
        with Checkpointer(tmp_path / "run", memory=True, peer=k.address) as again:
            assert_same_tree(again.load("latest"), step_state(2, frozen))
            assert (again.loaded_step, again.loaded_from) == (2, "peer")
    finally:
        k.stop()


def test_a_peer_copy_is_hashed_once_on_arrival_not_again_by_the_load(tmp_path, frozen, monkeypatch):
    """The fetch verifies every chunk before it commits the copy; the load from it then
    skips a second pass over the same bytes (other tiers' loads still verify)."""
    peer = pytest.importorskip("ckptstore.peer")
    import ckptstore.api.load as api_load

    k = peer.start_keeper(tmp_path / "buddy")
    try:
        ck = Checkpointer(tmp_path / "run", memory=True, peer=k.address)
        ck.save(1, step_state(1, frozen)).wait()
        ck.wait()
        ck._replica.drain(60)  # type: ignore[union-attr]
        ck._stop()
        mem.release(ck.memory_path)  # type: ignore[arg-type]
        real, seen = api_load.load, []

        def spy(where, **kw):
            seen.append((str(where.url), kw["verify"]))
            return real(where, **kw)

        monkeypatch.setattr(api_load, "load", spy)
        with Checkpointer(tmp_path / "run", memory=True, peer=k.address) as again:
            assert_same_tree(again.load("latest"), step_state(1, frozen))
            assert again.loaded_from == "peer" and [v for _, v in seen] == [False]
            again.load(1)  # now an ordinary memory copy: verified
            assert again.loaded_from == "memory" and seen[-1][1] is True
    finally:
        k.stop()


def test_tiers_are_listed_in_parallel(tmp_path, frozen, monkeypatch):
    """A restart pays for the slowest tier's listing, not the sum: both listings must be
    in flight at once to pass the barrier (one after the other, it breaks)."""
    from ckptstore.runs.tiers import Tier

    with Checkpointer(tmp_path / "run", memory=True) as ck:
        ck.save(1, step_state(1, frozen)).wait()
        ck.wait()
        both = threading.Barrier(2, timeout=10)
        real = Tier.committed

        def meeting(self):
            both.wait()
            return real(self)

        monkeypatch.setattr(Tier, "committed", meeting)
        assert ck._copies().committed() == {"memory": [1], "local": [1]}
        monkeypatch.undo()


def test_a_silent_peer_delays_a_restart_by_the_query_timeout_only(tmp_path, monkeypatch):
    """A buddy that accepts connections and never answers (blackholed) is asked for its
    steps with the short query timeout, not the transfer timeout, and passed over."""
    import socket

    from ckptstore.runs import replica

    timeouts: list[float] = []
    real = replica.connect

    def spy(address, timeout=30.0):
        timeouts.append(timeout)
        return real(address, timeout)

    monkeypatch.setattr(replica, "connect", spy)
    monkeypatch.setattr(replica, "QUERY_TIMEOUT", 0.3)
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(4)
        address = "127.0.0.1:%d" % silent.getsockname()[1]
        assert replica.peer_steps(address, "run") is None
    assert timeouts == [0.3]


def _child_without_close(local: str, memdir: str) -> None:
    os.environ[mem.MEMORY_ENV] = memdir
    import torch

    ck = Checkpointer(local, memory=True)
    ck.save(1, {"w": torch.arange(10.0)}).wait()
    ck.wait()  # promoted to disk by the promotion pool's process; no close(), no shutdown()


def test_a_process_started_by_multiprocessing_exits_without_close(tmp_path, memdir):
    """mp.spawn-style children exit through os._exit after joining their own children:
    the Checkpointer's promotion pool must be stopped first, or the exit hangs forever."""
    import multiprocessing

    p = multiprocessing.get_context("spawn").Process(
        target=_child_without_close, args=(str(tmp_path / "run"), str(memdir)))
    p.start()
    p.join(120)
    alive = p.is_alive()
    if alive:
        p.kill()
        p.join()
    assert not alive and p.exitcode == 0
    assert _steps(tmp_path / "run") == [1]  # it really promoted (the pool existed)


def test_attempts_say_whether_a_copy_was_damaged_by_error_type_not_message():
    """``retire_damaged`` drops memory copies that failed as damaged: a hash or size
    mismatch (CorruptCheckpointError and its subclasses), never a missing or
    unreachable copy, whatever its message says."""
    import warnings

    from ckptstore.errors import CorruptCheckpointError, StorageError, UnsafeCheckpointError
    from ckptstore.runs.agreement import Agreement
    from ckptstore.runs.recovery import recover

    errors = {3: CorruptCheckpointError("chunk 3 of 'w': hash mismatch"),
              2: StorageError("listing failed after a CorruptCheckpointError elsewhere"),
              1: UnsafeCheckpointError("a pickle opcode in shard-00000")}

    def load_one(where):
        if where.step in errors:
            raise errors[where.step]
        return "state"

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the fallback warnings
        got = recover([(3, "memory"), (2, "memory"), (1, "memory"), (0, "local")],
                      lambda s, t: types.SimpleNamespace(url=f"{t}/{s}", step=s), load_one,
                      Agreement(False), "any step", "here")
    assert (got.step, got.tier, got.value) == (0, "local", "state")
    assert [(a.step, a.damaged) for a in got.attempts] == [(3, True), (2, False), (1, True),
                                                            (0, False)]
