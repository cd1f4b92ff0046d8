"""Stateful objects in collective saves (FSDP2 on gloo, CPU): ModelState, OptimizerState
(a fresh optimizer), a scheduler and per-rank RNG resume bit-exactly on 2 ranks, and the
same checkpoint restores the whole model in a single process."""
from __future__ import annotations

import os
import uuid

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import ckptstore

pytestmark = pytest.mark.timeout(300)


def _parts(seed: int):
    from torch.distributed.fsdp import fully_shard

    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.Dropout(0.2), torch.nn.ReLU(),
                                torch.nn.Linear(32, 4))
    if dist.is_initialized():
        for layer in (model[0], model[3]):
            fully_shard(layer)
        fully_shard(model)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.9)
    return model, opt, sched


def _state(model, opt, sched):
    return {"model": ckptstore.ModelState(model), "optim": ckptstore.OptimizerState(model, opt),
            "sched": sched, "rng": ckptstore.RNGState(per_rank=True), "step": 2}


def _train(model, opt, sched, steps: int) -> list[float]:
    losses = []
    for _ in range(steps):
        loss = model(torch.randn(4, 16)).pow(2).mean()
        loss.backward()
        opt.step()
        opt.zero_grad()
        sched.step()
        losses.append(loss.item())
    return losses


def _full(model) -> dict:
    return ckptstore.ModelState(model, full=True).state_dict()


def _run(rank: int, world: int, tmp: str) -> None:
    os.environ["CKPTSTORE_WRITERS"] = "1"
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{tmp}/store-{os.environ['RUN_ID']}",
                            rank=rank, world_size=world)
    try:
        model, opt, sched = _parts(seed=1)  # the same weights on every rank
        torch.manual_seed(10 + rank)  # each rank draws its own data and dropout masks
        _train(model, opt, sched, 2)
        ckptstore.save(_state(model, opt, sched), f"{tmp}/ckpt", distributed=True).wait()
        expected = _train(model, opt, sched, 3)
        final = _full(model)

        torch.manual_seed(99)
        model2, opt2, sched2 = _parts(seed=5)  # other weights, no optimizer state yet
        target = _state(model2, opt2, sched2)
        target["step"] = 0
        report = ckptstore.load(f"{tmp}/ckpt", into=target)
        assert report.ok, report.summary()
        assert target["step"] == 2  # a plain value beside DTensor-holding objects lands in *this* dict
        assert sched2.last_epoch == 2
        got = _train(model2, opt2, sched2, 3)
        assert got == expected, (got, expected)
        for k, v in _full(model2).items():
            assert torch.equal(v, final[k]), k
        dist.barrier()
    finally:
        from ckptstore.pipeline import engine as saver

        saver.shutdown()
        dist.destroy_process_group()


def test_fsdp2_stateful_resume_is_bit_exact(tmp_path):
    os.environ["RUN_ID"] = uuid.uuid4().hex[:8]
    mp.spawn(_run, args=(2, str(tmp_path)), nprocs=2, join=True)
    # the sharded checkpoint restores a plain model in one process, through the same objects
    model, opt, sched = _parts(seed=3)
    saved = ckptstore.load(tmp_path / "ckpt")
    assert set(saved) == {"model", "optim", "sched", "rng", "step"}
    ranks = saved["rng"]["ranks"]  # gathered without pickle: tensors and arrays come back typed
    assert len(ranks) == 2 and not torch.equal(ranks[0]["torch"], ranks[1]["torch"])
    assert isinstance(ranks[1]["numpy"]["keys"], np.ndarray) and ranks[1]["python"]["version"] == 3
    report = ckptstore.load(tmp_path / "ckpt", into={"model": ckptstore.ModelState(model),
                                                     "optim": ckptstore.OptimizerState(model, opt)},
                            strict=False)
    assert set(report.loaded) == {"model", "optim"}
    assert opt.state and sched.last_epoch == 0
    for k, v in saved["model"].items():
        assert torch.equal(model.state_dict()[k], v), k
