"""The trainer's checkpoints at world size 2 are sharded: each rank writes about half of the
model and optimizer bytes, the manifest records the shards, and the checkpoint loads at world
size 1 (resharded by ckptstore.load, or resumed by a one-process trainer) to exactly the values a
full gather gives. Runs 2 spawned gloo ranks on CPU through trainer.train's own setup.
"""
from __future__ import annotations

import json
import os
import socket
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

import ckptstore
from ckptstore import manifest as fmt
from ckptstore.runs.layout import step_name
from ckptstore.storage import open_storage
from trainer.checkpointing import TrainCheckpointer
from trainer.config import TrainConfig
from trainer.train import DistContext, build_parts, setup, teardown, train_step

pytestmark = pytest.mark.timeout(300)

WORLD = 2
STEP = 2


def _cfg(out_dir: str, **over) -> TrainConfig:
    base = dict(preset="tiny", steps=4, batch_size=4, lr=1e-2, min_lr=1e-3, warmup_steps=1,
                out_dir=out_dir, compression="none", keep_last=3)
    base.update(over)
    return TrainConfig(**base)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_main(rank: int, tmp: str, port: int) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(WORLD),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), CKPTSTORE_WRITERS="1",
                      CKPTSTORE_DIST_TIMEOUT="60")
    torch.set_num_threads(1)
    try:
        _save_and_restore(rank, tmp)
    finally:
        ckptstore.shutdown()  # spawned children skip atexit


def _save_and_restore(rank: int, tmp: str) -> None:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

    cfg = _cfg(f"{tmp}/run")
    ctx = setup(cfg)
    try:
        parts = build_parts(cfg, ctx)
        ckpt = TrainCheckpointer(parts)
        for _ in range(STEP):
            train_step(parts, ctx)
        ckpt.save(STEP)
        ckpt.wait()
        full = StateDictOptions(full_state_dict=True, cpu_offload=True)
        msd, osd = get_state_dict(parts.model, parts.optimizer, options=full)  # collective
        if rank == 0:  # the reference: a plain one-process save of the gathered state
            ckptstore.save({"model": msd, "optim": osd}, f"{tmp}/ref", blocking=True)
        ckpt.close()

        # a fresh model on every rank resumes from the sharded checkpoint
        parts2 = build_parts(_cfg(f"{tmp}/run", resume="auto"), ctx)
        ckpt2 = TrainCheckpointer(parts2)
        resumed = ckpt2.maybe_resume()
        msd2, osd2 = get_state_dict(parts2.model, parts2.optimizer, options=full)
        ckpt2.close()
        if rank == 0:
            ckptstore.save({"model": msd2, "optim": osd2}, f"{tmp}/resumed", blocking=True)
        Path(tmp, f"rank{rank}.json").write_text(json.dumps(
            {"resumed": resumed, "consumed": parts2.data.consumed, "sched": parts2.scheduler.last_epoch}))
    finally:
        teardown(ctx)


def _assert_same(a: dict, b: dict) -> None:
    assert a["model"].keys() == b["model"].keys()
    for k, v in b["model"].items():
        assert torch.equal(a["model"][k], v), k
    assert a["optim"]["state"].keys() == b["optim"]["state"].keys()
    for fqn, slots in b["optim"]["state"].items():
        for name, v in slots.items():
            assert torch.equal(a["optim"]["state"][fqn][name], v), (fqn, name)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("sharded")
    mp.spawn(_rank_main, args=(str(tmp), _free_port()), nprocs=WORLD, join=True)
    return tmp


def test_two_rank_checkpoint_is_sharded(saved):
    where = saved / "run" / "checkpoints" / step_name(STEP)
    manifest = fmt.read_manifest(open_storage(where))  # with the ranks' indexes
    big = [t for t in manifest.tensors
           if t.name.startswith(("model.", "optim.state.")) and len(t.shape) == 2]
    assert big and all(len(t.shards) == WORLD for t in big), \
        [t.name for t in big if len(t.shards) != WORLD]
    sharded_bytes = sum(t.nbytes for t in manifest.tensors if t.shards)
    per_rank = {r: sum(p.stat().st_size for p in where.iterdir() if f"-r{r}." in p.name)
                for r in range(WORLD)}
    for r, size in per_rank.items():  # about half each: nobody writes the whole model
        assert 0.4 * sharded_bytes < size < 0.65 * sharded_bytes, (r, size, sharded_bytes)


def test_sharded_checkpoint_loads_at_world_size_one_like_a_full_gather(saved):
    ref = ckptstore.load(saved / "ref")
    whole = ckptstore.load(saved / "run" / "checkpoints" / step_name(STEP))  # resharded 2 -> 1
    _assert_same(whole, ref)
    assert whole["step"] == STEP and len(whole["rng"]["ranks"]) == WORLD
    assert whole["data"]["consumed"] == STEP and whole["meta"]["world_size"] == WORLD


def test_two_ranks_resume_from_their_shards(saved):
    _assert_same(ckptstore.load(saved / "resumed"), ckptstore.load(saved / "ref"))
    for r in range(WORLD):
        info = json.loads((saved / f"rank{r}.json").read_text())
        assert info == {"resumed": STEP, "consumed": STEP, "sched": STEP}


def test_one_process_resumes_from_a_two_rank_checkpoint(saved, tmp_path):
    cfg = _cfg(str(saved / "run"), resume="auto")
    parts = build_parts(cfg, DistContext(0, 1, torch.device("cpu")))
    ckpt = TrainCheckpointer(parts, backend_factory=lambda c: ckptstore.Checkpointer(
        c.ckpt_dir, keep_last=None))
    try:
        assert ckpt.maybe_resume() == STEP
    finally:
        ckpt.close()
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

    msd, osd = get_state_dict(parts.model, parts.optimizer,
                              options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    _assert_same({"model": msd, "optim": osd}, ckptstore.load(saved / "ref"))
