"""The memory tier of a collective Checkpointer: 2 gloo ranks (spawned, CPU) on one node.

The ranks share the node's memory tier (rank 0 claims it); every rank writes its own
shards there. Processes restarted after a crash resume from memory on every rank; a
copy damaged in a file only rank 1 reads falls back to disk on both ranks; after the
node's memory is lost, rank 0 fetches the step from the buddy keeper and both ranks
load it; ranks that see different memory directories ("two nodes") are refused on
every rank before anything is saved; a clean close leaves nothing in memory.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import uuid
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import ckptstore
from ckptstore.api.checkpointer import CheckpointFallbackWarning, Checkpointer
from ckptstore.errors import UnsupportedOperationError
from ckptstore.runs import memory as mem
from ckptstore.runs.layout import committed_steps, step_name
from ckptstore.storage import open_storage

pytestmark = pytest.mark.timeout(300)

WORLD = 2
ROWS, COLS = 64, 32


def _init(rank: int, tmp: str, run_id: str) -> None:
    os.environ["CKPTSTORE_WRITERS"] = "1"
    os.environ["CKPTSTORE_DIST_TIMEOUT"] = "60"
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{tmp}/store-{run_id}", rank=rank,
                            world_size=WORLD)


def _state(step: int) -> dict:
    """A dim-0 sharded weight (as FSDP2 holds it), a replicated tensor and a value."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    mesh = init_device_mesh("cpu", (WORLD,))
    full = torch.arange(ROWS * COLS, dtype=torch.float32).reshape(ROWS, COLS) + 1000 * step
    return {"w": distribute_tensor(full, mesh, [Shard(0)]), "bias": torch.full((COLS,), step * 1.0),
            "step": step}


def _loaded(ck: Checkpointer) -> dict:
    """``load("latest")`` into a fresh state: what came back, from where, any warnings."""
    import warnings

    target = _state(0)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ck.load("latest", into=target)
    step = ck.loaded_step
    assert step is not None
    expect = _state(step)
    return {"step": step, "from": ck.loaded_from, "tries": [[t, o] for t, _, o in ck.load_timings],
            "ok": torch.equal(target["w"].to_local(), expect["w"].to_local())
            and torch.equal(target["bias"], expect["bias"]) and target["step"] == step,
            "warned": sum(issubclass(w.category, CheckpointFallbackWarning) for w in caught)}


def _phase(rank: int, tmp: str, run_id: str, phase: str, peer: str | None) -> None:
    _init(rank, tmp, run_id)
    out: dict = {}
    try:
        if phase == "two-nodes":  # each rank its own memory directory: refused on both
            os.environ[mem.MEMORY_ENV] = f"{tmp}/shm-node{rank}"
            try:
                Checkpointer(f"{tmp}/run", memory=True, compression="none")
            except UnsupportedOperationError as e:
                out["refused"] = str(e)
            out["saved"] = os.path.exists(f"{tmp}/run/{step_name(1)}")
            return
        ck = Checkpointer(f"{tmp}/run", memory=True, keep_last=5, compression="none", peer=peer)
        out["memory_path"] = str(ck.memory_path)
        if phase == "killed":  # steps 1, 2; then the job dies inside step 3's memory commit
            for step in (1, 2):
                ck.save(step, _state(step)).wait()
            ck.wait()
            pids = [None] * WORLD
            dist.all_gather_object(pids, os.getpid())
            if rank == 0:  # rank 1 has voted; rank 0 is about to write the manifest
                from ckptstore.distributed import dcommit

                def die(*_a, **_k):
                    Path(tmp, f"out-{phase}-{rank}.json").write_text(json.dumps(out))
                    os.kill(pids[1], signal.SIGKILL)
                    os.kill(os.getpid(), signal.SIGKILL)

                dcommit.commit_manifest = die
            Path(tmp, f"out-{phase}-{rank}.json").write_text(json.dumps(out))
            ck.save(3, _state(3)).wait()
            raise AssertionError("step 3's commit should have killed the job")
        if phase == "save":  # steps 1..3, then a crash: no close()
            for step in (1, 2, 3):
                ck.save(step, _state(step)).wait()
                out.setdefault("in_memory_after_handle", []).append(
                    committed_steps(open_storage(str(ck.memory_path))))
            ck.wait()
            if rank == 0 and ck._replica is not None:
                ck._replica.drain()
            return
        out["resume"] = _loaded(ck)
        if phase == "damage":
            dist.barrier()
            if rank == 0:  # a file only rank 1 reads, in the memory copy of step 3
                victim = next(p for p in (Path(ck.memory_path) / step_name(3)).iterdir()
                              if p.name.endswith("-r1.chunks") or "-r1" in p.name
                              and p.name.endswith(".safetensors"))
                data = bytearray(victim.read_bytes())
                data[len(data) // 2] ^= 0xFF
                victim.write_bytes(bytes(data))
            dist.barrier()
            out["after_damage"] = _loaded(ck)
        if phase == "close":
            ck.save(4, _state(4)).wait()
            ck.close()
            out["memory_left"] = Path(out["memory_path"]).exists()
            out["local_steps"] = committed_steps(open_storage(f"{tmp}/run"))
    finally:
        Path(tmp, f"out-{phase}-{rank}.json").write_text(json.dumps(out))
        dist.barrier()
        if phase == "save":  # a crash: no close(), no clean exit; the memory tier stays
            os._exit(0)
        dist.destroy_process_group()
        ckptstore.shutdown()


def _spawn(tmp: Path, phase: str, peer: str | None = None) -> list[dict]:
    mp.spawn(_phase, args=(str(tmp), uuid.uuid4().hex[:8], phase, peer), nprocs=WORLD, join=True)
    return [json.loads((tmp / f"out-{phase}-{r}.json").read_text()) for r in range(WORLD)]


@pytest.fixture()
def node(tmp_path, monkeypatch) -> Path:
    """The node's memory parent directory, below the test's own directory."""
    monkeypatch.setenv(mem.MEMORY_ENV, str(tmp_path / "shm"))
    return tmp_path / "shm"


def test_ranks_share_the_nodes_memory_tier_and_resume_from_it(tmp_path, node):
    saved = _spawn(tmp_path, "save")
    assert saved[0]["memory_path"] == saved[1]["memory_path"]  # one tier per node
    # each handle completes once the step is committed in memory, on both ranks
    assert all(o["in_memory_after_handle"][-1][-1] == 3 for o in saved)
    names = [p.name for p in (Path(saved[0]["memory_path"]) / step_name(3)).iterdir()]
    assert any("-r0" in n for n in names) and any("-r1" in n for n in names)

    resumed = _spawn(tmp_path, "damage")
    for o in resumed:  # the restarted ranks resume from memory, bit-exact
        assert o["resume"]["from"] == "memory" and o["resume"]["step"] == 3 and o["resume"]["ok"]
        # rank 1's file of the memory copy is damaged: both ranks take step 3 from disk
        assert o["after_damage"]["step"] == 3 and o["after_damage"]["from"] == "local"
        assert o["after_damage"]["ok"]
        assert [t for t, _ in o["after_damage"]["tries"]] == ["memory", "local"]
    assert resumed[0]["after_damage"]["warned"] >= 1

    closed = _spawn(tmp_path, "close")
    assert all(not o["memory_left"] for o in closed)  # promoted, then removed
    assert closed[0]["local_steps"][-1] == 4


def test_after_the_node_memory_is_lost_both_ranks_restore_from_the_peer(tmp_path, node):
    from ckptstore.peer import start_keeper

    keeper = start_keeper(tmp_path / "buddy")
    try:
        saved = _spawn(tmp_path, "save", keeper.address)
        shutil.rmtree(saved[0]["memory_path"])  # the node was lost: its tmpfs is gone
        resumed = _spawn(tmp_path, "resume", keeper.address)
    finally:
        keeper.stop()
    for o in resumed:
        assert o["resume"]["from"] == "peer" and o["resume"]["step"] == 3 and o["resume"]["ok"]
    # rank 0 fetched it into the node's memory tier once; rank 1 loaded it from there
    assert committed_steps(open_storage(resumed[0]["memory_path"])) == [3]


def test_a_job_killed_inside_a_memory_commit_resumes_from_the_previous_step(tmp_path, node):
    """Both ranks SIGKILLed after rank 1's vote, before rank 0's manifest: the torn
    step 3 is never loaded; the restart resumes step 2 from memory on both ranks, and
    rank 0's claim removes what the torn commit left in the node's memory tier."""
    with pytest.raises(mp.ProcessExitedException, match="SIGKILL|signal"):
        _spawn(tmp_path, "killed")
    tier = Path(json.loads((tmp_path / "out-killed-0.json").read_text())["memory_path"])
    assert (tier / step_name(3)).is_dir()  # the torn step: rank files, no manifest
    assert not (tier / step_name(3) / "manifest.json").exists()
    resumed = _spawn(tmp_path, "resume")
    for o in resumed:
        assert o["resume"] == {**o["resume"], "from": "memory", "step": 2, "ok": True}
        assert [t for t, _ in o["resume"]["tries"]] == ["memory"]
    assert not (tier / step_name(3)).exists()
    assert committed_steps(open_storage(str(tier))) == [2]  # step 1 was evicted (memory_keep=1)


def test_ranks_on_different_nodes_are_refused_before_anything_is_saved(tmp_path, node):
    outs = _spawn(tmp_path, "two-nodes")
    for o in outs:
        assert "not supported yet" in o["refused"] and "rank(s) [1]" in o["refused"]
        assert not o["saved"]
