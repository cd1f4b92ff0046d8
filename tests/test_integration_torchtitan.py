"""torchtitan's own CheckpointManager with ckptstore as its DCP storage.

torchtitan cannot share the main test venv (it pulls ``datasets``, which pins fsspec
below what s3fs/gcsfs need); ``.ci/torchtitan`` runs this file in its own venv, and
the main suite skips it. torchtitan's Trainer itself cannot be imported with a
CPU-only torch (torchtitan 0.3 imports triton through its MoE kernels), so the test
drives the pieces the Trainer builds: the checkpoint config (selected through
torchtitan's override mechanism, as ``--override.imports`` does, or directly), and
the manager it builds with a tiny model, torchtitan's optimizer and LR scheduler
containers and a train state, on CPU (gloo, world size 1): saves at steps 2 and 4, a
fresh manager resumes from step 4 by itself, the state matches bit for bit, the next
training step matches the uninterrupted run, and every step passes ``ckptstore.fsck``.
"""
from __future__ import annotations

import copy
import os
from dataclasses import dataclass, field

import pytest
import torch

torchtitan = pytest.importorskip("torchtitan")

import torch.distributed as dist  # noqa: E402
from torch.distributed.checkpoint.stateful import Stateful  # noqa: E402
from torchtitan.components.checkpointer import BaseCheckpointManager, CheckpointManager  # noqa: E402
from torchtitan.components.optimizer import LRSchedulersContainer  # noqa: E402
from torchtitan.components.optimizer.optimizer import default_adamw  # noqa: E402
from torchtitan.config import Configurable, OverrideConfig, apply_overrides  # noqa: E402

import ckptstore  # noqa: E402
from ckptstore.integrations.torchtitan import CkptStoreCheckpointManager, latest_step  # noqa: E402

pytestmark = pytest.mark.timeout(300)


class TrainState(Stateful):
    """What torchtitan's Trainer saves as ``train_state``."""

    def __init__(self) -> None:
        self.step = 0
        self.ntokens_seen = 0

    def state_dict(self) -> dict:
        return {"step": self.step, "ntokens_seen": self.ntokens_seen}

    def load_state_dict(self, sd: dict) -> None:
        self.step, self.ntokens_seen = sd["step"], sd["ntokens_seen"]


@dataclass(kw_only=True, slots=True)
class TrainerConfig(Configurable.Config):
    """The part of torchtitan's ``Trainer.Config`` that overrides act on: its
    ``checkpoint`` field (the Trainer itself cannot be imported on a CPU-only torch:
    torchtitan 0.3 imports triton through its MoE kernels)."""

    checkpoint: BaseCheckpointManager.Config = field(default_factory=CheckpointManager.Config)


def checkpoint_config(via: str, **ckpt) -> BaseCheckpointManager.Config:
    """The checkpoint config a user gets either way: torchtitan's override mechanism
    (``--override.imports ...use_ckptstore``) or the Config class in a registry function."""
    settings = dict(enable=True, folder="ckpt", interval=2, keep_latest_k=0, **ckpt)
    if via == "config":
        return CkptStoreCheckpointManager.Config(**settings)
    root = TrainerConfig(checkpoint=CheckpointManager.Config(**settings))
    done = apply_overrides(OverrideConfig(imports=["ckptstore.integrations.torchtitan.use_ckptstore"]), root)
    assert len(done) == 1 and type(root.checkpoint) is CkptStoreCheckpointManager.Config, done
    assert root.checkpoint.interval == 2 and root.checkpoint.folder == "ckpt"  # settings kept
    return root.checkpoint


class Run:
    """Model, optimizers, schedulers, train state and the checkpoint manager."""

    def __init__(self, tmp, seed: int, via: str = "config", **ckpt) -> None:
        torch.manual_seed(seed)
        self.model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4))
        cfg = default_adamw(lr=1e-2)
        cfg.implementation = "for-loop"  # fused AdamW is CUDA-only
        self.optimizers = cfg.build(model_parts=[self.model])
        self.schedulers = LRSchedulersContainer.Config(warmup_steps=3).build(
            optimizers=self.optimizers, training_steps=10)
        self.state = TrainState()
        self.manager = checkpoint_config(via, **ckpt).build(
            dataloader=None, model_parts=[self.model], optimizers=self.optimizers,
            lr_schedulers=self.schedulers, states={"train_state": self.state},
            sd_adapter=None, base_folder=str(tmp))

    def train_step(self) -> None:
        self.state.step += 1
        g = torch.Generator().manual_seed(self.state.step)  # the data of each step is fixed
        x = torch.randn(4, 8, generator=g)
        self.model(x).pow(2).mean().backward()
        self.optimizers.step()
        self.optimizers.zero_grad()
        self.schedulers.step()
        self.state.ntokens_seen += x.numel()
        self.manager.save(self.state.step)

    def snapshot(self) -> dict:
        return copy.deepcopy({"model": self.model.state_dict(), "optim": self.optimizers.state_dict(),
                              "lr": self.schedulers.state_dict(), "train": self.state.state_dict()})


def assert_same(a, b, where="") -> None:
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert set(a) == set(b), where
        for k in a:
            assert_same(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (list, tuple)):
        assert type(a) is type(b) and len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, f"{where}.{i}")
    else:
        assert a == b, f"{where}: {a!r} != {b!r}"


@pytest.fixture
def gloo(tmp_path):
    os.environ.setdefault("CKPTSTORE_WRITERS", "1")
    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/pg", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


@pytest.mark.parametrize("via,async_mode", [("override", "disabled"), ("config", "async")])
def test_resume_finds_latest_step_bit_exact(gloo, tmp_path, via, async_mode):
    run = Run(tmp_path, seed=0, via=via, async_mode=async_mode)
    assert run.manager.load() is False  # a fresh start: nothing to resume
    snaps = {}
    for _ in range(5):
        run.train_step()
        run.manager.maybe_wait_for_saving()
        snaps[run.state.step] = run.snapshot()
    run.manager.close()
    folder = tmp_path / "ckpt"
    assert sorted(os.listdir(folder)) == ["step-2", "step-4"]
    (folder / "step-9").mkdir()  # a save that crashed before its commit: no manifest
    (folder / "step-9" / "shard-00000.bin").write_bytes(b"partial")
    assert latest_step(folder) == 4
    # torchtitan's own search looks for DCP's .metadata only: it would start at step 0
    assert CheckpointManager._find_load_step(run.manager) == -1
    for step in (2, 4):
        report = ckptstore.fsck(str(folder / f"step-{step}"))
        assert report.ok, report
    # the checkpoint is a plain nested ckptstore tree (train state as typed JSON)
    saved = ckptstore.load(folder / "step-4")
    assert saved["train_state"] == {"step": 4, "ntokens_seen": 128}
    assert_same(saved["lr_scheduler"], snaps[4]["lr"], "lr_scheduler")
    assert_same(saved["2.weight"], snaps[4]["model"]["2.weight"], "2.weight")

    fresh = Run(tmp_path, seed=123, via=via)  # other weights, other optimizer state
    assert not torch.equal(fresh.model[0].weight, snaps[4]["model"]["0.weight"])
    assert fresh.manager.load() is True
    assert_same(fresh.snapshot(), snaps[4])
    fresh.manager.save = lambda *a, **k: False  # type: ignore[method-assign]
    fresh.train_step()  # the resumed run continues exactly like the uninterrupted one
    assert_same(fresh.snapshot(), snaps[5])
    fresh.manager.close()


def test_explicit_load_step_and_missing_step(gloo, tmp_path):
    run = Run(tmp_path, seed=0)
    snaps = {}
    for _ in range(4):
        run.train_step()
        snaps[run.state.step] = run.snapshot()
    run.manager.close()
    fresh = Run(tmp_path, seed=7)
    assert fresh.manager.load(step=2) is True  # torchtitan's --checkpoint.load_step
    assert_same(fresh.snapshot(), snaps[2])
    with pytest.raises(FileNotFoundError):
        fresh.manager.load(step=3)
    fresh.manager.close()
