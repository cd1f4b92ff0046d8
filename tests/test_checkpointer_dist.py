"""A collective ``ckptstore.Checkpointer`` on 2 gloo ranks (spawned, CPU).

Every rank saves its shards; retention runs on rank 0 only; ``latest()`` and ``load()``
are decided together, so a rank whose own view differs still gets rank 0's answer and a
copy that fails on one rank only is skipped by both.
"""
from __future__ import annotations

import json
import os
import uuid
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import ckptstore
from ckptstore.api.checkpointer import CheckpointFallbackWarning, Checkpointer
from ckptstore.runs.layout import step_name

pytestmark = pytest.mark.timeout(300)

WORLD = 2
ROWS, COLS = 64, 32
_mesh = None  # this rank's 1-D device mesh, made once


def _init(rank: int, tmp: str) -> None:
    os.environ["CKPTSTORE_WRITERS"] = "1"  # 2 cores shared by every rank's writers
    os.environ["CKPTSTORE_DIST_TIMEOUT"] = "60"
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{tmp}/store-{os.environ['RUN_ID']}",
                            rank=rank, world_size=WORLD)


def _state(step: int) -> dict:
    """A dim-0 sharded weight (as FSDP2 holds it), a replicated tensor and plain values."""
    from torch.distributed.tensor import Shard, distribute_tensor

    global _mesh
    if _mesh is None:
        from torch.distributed.device_mesh import init_device_mesh

        _mesh = init_device_mesh("cpu", (WORLD,))
    mesh = _mesh
    full = torch.arange(ROWS * COLS, dtype=torch.float32).reshape(ROWS, COLS) + 1000 * step
    return {"w": distribute_tensor(full, mesh, [Shard(0)]), "bias": torch.full((COLS,), step * 1.0),
            "step": step}


def _run(rank: int, tmp: str) -> None:
    _init(rank, tmp)
    calls: list[int] = []
    real_retain = Checkpointer._retain

    def counting_retain(self, tier, protected=frozenset()):
        calls.append(rank)
        return real_retain(self, tier, protected)

    Checkpointer._retain = counting_retain  # this rank's process only
    ck = Checkpointer(f"{tmp}/run", keep_last=2, compression="zstd")
    assert ck.collective and ck.coordinator == (rank == 0)
    for step in range(1, 5):
        ck.save(step, _state(step))
    ck.wait()
    out: dict = {"retain_calls": len(calls), "steps": ck.steps(), "latest": ck.latest()}

    # a rank whose own look at the directory disagrees still gets rank 0's answer
    if rank == 1:
        ck._latest_here = lambda: -1
    out["latest_skewed"] = ck.latest()

    # step 4's copy is damaged in a file only rank 1 reads: both ranks fall back to 3
    if rank == 0:
        victim = next(p for p in (Path(tmp) / "run" / step_name(4)).iterdir()
                      if p.name.endswith("-r1.chunks"))
        data = bytearray(victim.read_bytes())
        data[len(data) // 2] ^= 0xFF
        victim.write_bytes(bytes(data))
    dist.barrier()
    target = _state(0)
    import warnings
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ck.load("latest", into=target)
    out["loaded_step"] = ck.loaded_step
    out["fallback_warnings"] = sum(issubclass(w.category, CheckpointFallbackWarning)
                                   for w in caught)
    expect = _state(3)
    out["w_ok"] = torch.equal(target["w"].to_local(), expect["w"].to_local())
    out["bias_ok"] = torch.equal(target["bias"], expect["bias"])
    out["step_loaded"] = target["step"]
    ck.close()
    Path(tmp, f"out-{rank}.json").write_text(json.dumps(out))
    dist.barrier()
    dist.destroy_process_group()


def _rank_main(rank: int, tmp: str) -> None:
    try:
        _run(rank, tmp)
    finally:
        # spawned children skip atexit: stop this rank's writer processes ourselves
        ckptstore.shutdown()


def test_collective_checkpointer_two_ranks(tmp_path):
    os.environ["RUN_ID"] = uuid.uuid4().hex[:8]
    mp.spawn(_rank_main, args=(str(tmp_path),), nprocs=WORLD, join=True)
    outs = [json.loads((tmp_path / f"out-{r}.json").read_text()) for r in range(WORLD)]
    # retention ran once per save, on rank 0 only, and kept the last 2 steps
    assert [o["retain_calls"] for o in outs] == [4, 0]
    assert all(o["steps"] == [3, 4] for o in outs)
    assert [o["latest"] for o in outs] == [4, 4]
    assert [o["latest_skewed"] for o in outs] == [4, 4]
    # the damaged copy failed on rank 1 only, yet both ranks loaded step 3
    assert [o["loaded_step"] for o in outs] == [3, 3]
    assert outs[0]["fallback_warnings"] >= 1 and outs[1]["fallback_warnings"] == 0
    assert all(o["w_ok"] and o["bias_ok"] and o["step_loaded"] == 3 for o in outs)
    # what was written is one sharded checkpoint: each rank wrote its own file
    names = sorted(p.name for p in (tmp_path / "run" / step_name(3)).iterdir())
    assert any(n.endswith("-r0.chunks") for n in names) and any(n.endswith("-r1.chunks") for n in names)
    whole = ckptstore.load(tmp_path / "run" / step_name(3))  # resharded to one process
    assert torch.equal(whole["w"], _state_full(3)) and whole["step"] == 3


def _state_full(step: int) -> torch.Tensor:
    return torch.arange(ROWS * COLS, dtype=torch.float32).reshape(ROWS, COLS) + 1000 * step
