"""Hugging Face Accelerate: save_state/load_state as ckptstore checkpoints (CPU, tiny model)."""
from __future__ import annotations

import os
import pickle
import uuid
from types import SimpleNamespace

import pytest
import torch
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import ckptstore
from ckptstore.errors import (
    CheckpointExistsError,
    DistributedSaveError,
    StrictLoadError,
    UnsupportedOperationError,
)
from ckptstore.manifest.io import read_manifest
from ckptstore.storage import open_storage

accelerate = pytest.importorskip("accelerate")
from accelerate import Accelerator  # noqa: E402
from accelerate.state import AcceleratorState, GradientState  # noqa: E402
from accelerate.utils import DataLoaderConfiguration, DistributedType, ProjectConfiguration  # noqa: E402

from ckptstore.integrations.accelerate import load_state, save_state  # noqa: E402

BATCHES = 7  # per epoch (one process): odd, so the end of an epoch resets the accumulation counter
SAVE_AT = 9  # micro-steps: in epoch 1, right after an optimizer step
TOTAL = 19  # into epoch 2


class Progress:
    """A user object registered for checkpointing: where training is, what it saw."""

    def __init__(self) -> None:
        self.micro = 0
        self.losses: list[float] = []

    def state_dict(self) -> dict:
        return {"micro": self.micro, "losses": torch.tensor(self.losses, dtype=torch.float64)}

    def load_state_dict(self, state: dict) -> None:
        self.micro = int(state["micro"])
        self.losses = state["losses"].tolist()


def _reset() -> None:
    AcceleratorState._reset_state(True)
    GradientState._reset_state()


def _fresh(seed: int, **kwargs) -> SimpleNamespace:
    """Accelerator, model with dropout, AdamW, LambdaLR, shuffled loader, Progress."""
    _reset()
    torch.manual_seed(seed)  # model init and the seedable sampler's seed: differ between runs
    acc = Accelerator(cpu=True, gradient_accumulation_steps=2,
                      dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True), **kwargs)
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(4 * BATCHES, 4, generator=g), torch.randn(4 * BATCHES, 1, generator=g)
    model = nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Dropout(0.3), nn.Linear(16, 1))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.9 ** s)
    # a generator of its own: a DataLoader without one draws from the global RNG whenever an
    # iterator starts, and a resumed run starts one more than the run that never stopped
    dl = DataLoader(TensorDataset(x, y), batch_size=4, shuffle=True, generator=torch.Generator())
    model, opt, dl, sched = acc.prepare(model, opt, dl, sched)
    prog = Progress()
    acc.register_for_checkpointing(prog)
    return SimpleNamespace(acc=acc, model=model, opt=opt, sched=sched, dl=dl, prog=prog)


def _train(run: SimpleNamespace, until: int, save_at: int | None = None, path=None) -> None:
    acc, prog = run.acc, run.prog
    while prog.micro < until:
        epoch, skip = divmod(prog.micro, len(run.dl))
        if skip:  # resuming inside an epoch
            loader = acc.skip_first_batches(run.dl, skip)
        else:  # a skipped loader counted its own epoch: say which one this is
            run.dl.set_epoch(epoch)
            loader = run.dl
        for xb, yb in loader:
            with acc.accumulate(run.model):
                loss = F.mse_loss(run.model(xb), yb)
                acc.backward(loss)
                run.opt.step()
                run.sched.step()
                run.opt.zero_grad()
            prog.losses.append(loss.item())
            prog.micro += 1
            if prog.micro == save_at:
                save_state(acc, path)
            if prog.micro == until:
                return


def _params(run: SimpleNamespace) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in run.acc.unwrap_model(run.model).state_dict().items()}


def _no_pickle(monkeypatch) -> None:
    def refuse(*_a, **_k):
        raise AssertionError("pickle used on a load path")

    for mod, name in ((pickle, "load"), (pickle, "loads"), (torch, "load")):
        monkeypatch.setattr(mod, name, refuse)


@pytest.fixture(autouse=True)
def _clean_state():
    yield
    _reset()


def test_resume_is_bit_exact_and_pickle_free(tmp_path, monkeypatch):
    path = tmp_path / "ckpt"
    a = _fresh(seed=0)
    _train(a, TOTAL, save_at=SAVE_AT, path=path)
    assert a.acc.save_iteration == 1
    want, want_opt = _params(a), a.opt.state_dict()

    names = sorted(os.listdir(path))
    assert "manifest.json" in names
    assert all(n == "manifest.json" or (n.startswith("shard-") and n.endswith(".safetensors"))
               for n in names), names
    report = ckptstore.fsck(path)
    assert report.ok and report.tensors > 0

    b = _fresh(seed=123)
    assert not torch.equal(_params(b)["0.weight"], want["0.weight"])  # the load must restore it
    _no_pickle(monkeypatch)
    rep = load_state(b.acc, path)
    monkeypatch.undo()
    assert rep.ok and not rep.missing and not rep.unexpected
    assert b.prog.micro == SAVE_AT and len(b.prog.losses) == SAVE_AT
    assert b.acc.step == 2 and b.acc.save_iteration == 1
    assert b.dl.iteration == 1
    _train(b, TOTAL)

    assert b.prog.losses == a.prog.losses
    got = _params(b)
    assert set(got) == set(want)
    for k in want:
        assert torch.equal(got[k], want[k]), k
    got_opt = b.opt.state_dict()
    for i, s in want_opt["state"].items():
        for k, v in s.items():
            assert torch.equal(got_opt["state"][i][k], v), (i, k)
    assert b.sched.state_dict()["last_epoch"] == a.sched.state_dict()["last_epoch"]


def test_checkpoint_holds_every_part(tmp_path):
    run = _fresh(seed=0)
    _train(run, 3)
    run.acc.step = 5
    save_state(run.acc, tmp_path / "c")
    state = ckptstore.load(tmp_path / "c")
    assert sorted(state) == ["accelerator", "custom", "dataloaders", "models", "optimizers", "rng",
                             "schedulers"]
    assert state["accelerator"] == {"step": 5, "iteration": 0}
    assert state["custom"][0]["micro"] == 3
    assert state["dataloaders"][0]["sampler"] == {"initial_seed": 0, "epoch": 0}
    assert sorted(state["models"][0]) == ["0.bias", "0.weight", "3.bias", "3.weight"]  # unwrapped
    assert state["optimizers"][0]["param_groups"][0]["lr"] == run.opt.param_groups[0]["lr"]
    assert torch.equal(state["rng"]["torch"], torch.get_rng_state())
    meta = read_manifest(open_storage(tmp_path / "c")).metadata
    assert meta["framework"] == "accelerate"
    assert meta["accelerate"]["custom_objects"] == 1 and meta["accelerate"]["models"] == 1


def test_other_registered_objects_refused_before_loading(tmp_path):
    a = _fresh(seed=0)
    _train(a, 2)
    save_state(a.acc, tmp_path / "c")
    b = _fresh(seed=1)
    b.acc.register_for_checkpointing(Progress())
    before = _params(b)
    with pytest.raises(StrictLoadError, match="register_for_checkpointing"):
        load_state(b.acc, tmp_path / "c")
    assert all(torch.equal(before[k], v) for k, v in _params(b).items())
    assert b.prog.micro == 0
    rep = load_state(b.acc, tmp_path / "c", strict=False)  # what matches; the report says the rest
    assert rep.missing == ("custom.1",) and not rep.ok
    assert b.prog.micro == 2
    assert all(torch.equal(a_, b_) for a_, b_ in zip(_params(a).values(), _params(b).values()))


def test_automatic_naming_total_limit_and_latest(tmp_path):
    config = ProjectConfiguration(project_dir=str(tmp_path), automatic_checkpoint_naming=True, total_limit=2)
    a = _fresh(seed=0, project_config=config)
    for _ in range(3):
        _train(a, a.prog.micro + 1)
        save_state(a.acc)
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["checkpoint_1", "checkpoint_2"]
    assert a.acc.save_iteration == 3

    b = _fresh(seed=1, project_config=ProjectConfiguration(project_dir=str(tmp_path),
                                                           automatic_checkpoint_naming=True, total_limit=2))
    load_state(b.acc)  # the newest committed one
    assert b.prog.micro == 3 and b.acc.save_iteration == 3
    save_state(b.acc)  # named after the last save of the first run, not checkpoint_0
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["checkpoint_2", "checkpoint_3"]


def test_grad_scaler_round_trip(tmp_path):
    a = _fresh(seed=0)
    a.acc.scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    a.acc.scaler.scale(torch.ones(()))  # creates the scale tensor
    a.acc.scaler.update(new_scale=256.0)
    handle = save_state(a.acc, tmp_path / "c", blocking=False)
    assert handle is not None
    handle.wait()
    b = _fresh(seed=0)
    b.acc.scaler = torch.amp.GradScaler("cpu")
    load_state(b.acc, tmp_path / "c")
    assert b.acc.scaler.get_scale() == 256.0
    c = _fresh(seed=0)  # no scaler here: the checkpoint holds one
    with pytest.raises(StrictLoadError, match="scaler"):
        load_state(c.acc, tmp_path / "c")


def test_sharded_plugins_refused(tmp_path, monkeypatch):
    run = _fresh(seed=0)
    monkeypatch.setattr(Accelerator, "distributed_type", property(lambda self: DistributedType.DEEPSPEED))
    with pytest.raises(UnsupportedOperationError, match="accelerator.save_state"):
        save_state(run.acc, tmp_path / "c")
    assert not (tmp_path / "c").exists()


# -- DDP on gloo, two CPU processes ------------------------------------------------------
def _ddp_run(rank: int, world: int, tmp: str, port: int) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      LOCAL_RANK=str(rank), WORLD_SIZE=str(world))
    try:
        a = _fresh(seed=0)
        assert a.acc.distributed_type == DistributedType.MULTI_CPU and a.acc.num_processes == world
        torch.manual_seed(100 + rank)  # dropout masks differ per rank: per-rank RNG must be restored
        assert len(a.dl) == 4  # batches per rank and epoch
        _train(a, 15, save_at=10, path=f"{tmp}/ckpt")  # 10: right after an optimizer step
        want = _params(a)
        b = _fresh(seed=7)
        load_state(b.acc, f"{tmp}/ckpt")
        assert b.prog.micro == 10 and b.acc.step == 2
        _train(b, 15)
        got = _params(b)
        # registered objects are saved by the main process (as Accelerate does): its history
        assert b.prog.losses[10:] == a.prog.losses[10:], rank
        assert all(torch.equal(got[k], want[k]) for k in want), rank
        if rank == 0:
            assert ckptstore.fsck(f"{tmp}/ckpt").ok
            state = ckptstore.load(f"{tmp}/ckpt")
            assert len(state["rng"]["ranks"]) == world
        # the writer fails (a checkpoint is there): it raises its error, the other rank is told
        with pytest.raises(CheckpointExistsError if rank == 0 else DistributedSaveError):
            save_state(b.acc, f"{tmp}/ckpt")
        assert b.acc.save_iteration == 1
        b.acc.wait_for_everyone()  # no rank tears its gloo pairs down while the other still talks
        b.acc.end_training()
    finally:
        from ckptstore.pipeline import engine as saver

        saver.shutdown()


# Once in a full CI run, rank 1 died with SIGABRT ("terminate called without an active
# exception": a C++ thread destroyed while joinable, no Python error); not reproduced in
# isolation or in 8 reruns of the file. One rerun keeps it from failing CI; a real
# failure fails both runs.
@pytest.mark.flaky(reruns=1)
def test_ddp_gloo_resume(tmp_path):
    port = 20000 + int(uuid.uuid4().int % 20000)
    mp.spawn(_ddp_run, args=(2, str(tmp_path), port), nprocs=2, join=True)
