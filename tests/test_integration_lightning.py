"""The Lightning CheckpointIO plug-in: ModelCheckpoint, resume, load_from_checkpoint,
asynchronous saves and their errors (CPU, tiny model, a few steps)."""
from __future__ import annotations

import os
import sys
import threading
from pathlib import Path

import pytest
import torch

L = pytest.importorskip("lightning")

from lightning.pytorch.callbacks import ModelCheckpoint  # noqa: E402
from torch.utils.data import DataLoader, TensorDataset  # noqa: E402

import ckptstore  # noqa: E402
import ckptstore.api.save as save_module  # noqa: E402
from ckptstore.integrations import lightning as ckl  # noqa: E402
from ckptstore.manifest import MANIFEST_NAME  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::DeprecationWarning")


class Tiny(L.LightningModule):
    def __init__(self, lr: float = 0.05, data_dir: Path | None = None) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = torch.nn.functional.mse_loss(self.net(x), y)
        self.log("train_loss", loss)
        return loss

    def configure_optimizers(self):
        opt = torch.optim.Adam(self.parameters(), lr=self.hparams.lr)
        return [opt], [torch.optim.lr_scheduler.StepLR(opt, step_size=3, gamma=0.5)]


def loader() -> DataLoader:
    g = torch.Generator().manual_seed(0)
    ds = TensorDataset(torch.randn(24, 4, generator=g), torch.randn(24, 1, generator=g))
    return DataLoader(ds, batch_size=4, shuffle=False)  # 6 steps per epoch


def trainer(io=None, callbacks=(), **kw) -> L.Trainer:
    return L.Trainer(accelerator="cpu", devices=1, plugins=[io or ckl.CkptstoreCheckpointIO()],
                     callbacks=list(callbacks), enable_progress_bar=False, logger=False,
                     enable_model_summary=False, deterministic=True, num_sanity_val_steps=0, **kw)


class Recording(ckl.CkptstoreCheckpointIO):
    """Counts what Lightning asked the plug-in to save and remove."""

    def __init__(self, **kw) -> None:
        super().__init__(**kw)
        self.saved: list[str] = []
        self.removed: list[str] = []

    def save_checkpoint(self, checkpoint, path, storage_options=None) -> None:
        super().save_checkpoint(checkpoint, path, storage_options)
        self.saved.append(str(path))

    def remove_checkpoint(self, path) -> None:
        super().remove_checkpoint(path)
        self.removed.append(str(path))


@pytest.fixture
def gate(monkeypatch):
    """Hold every manifest commit until the test opens the gate."""
    opened = threading.Event()
    real = save_module.commit_manifest

    def gated(*a, **kw):
        if not opened.wait(60):
            raise TimeoutError("the test never opened the commit gate")
        return real(*a, **kw)

    monkeypatch.setattr(save_module, "commit_manifest", gated)
    yield opened
    opened.set()


class InjectedFault(RuntimeError):
    pass


REAL_COMMIT = save_module.commit_manifest


def in_thread(fn, *args) -> threading.Thread:
    t = threading.Thread(target=fn, args=args, daemon=True)
    t.start()
    return t


def small_checkpoint(step: int) -> dict:
    return {"state_dict": {"w": torch.full((64,), float(step))}, "epoch": 0, "global_step": step}


# -- ModelCheckpoint ------------------------------------------------------------
def test_model_checkpoint_topk_last_every_n(tmp_path):
    L.seed_everything(0)
    io = Recording()
    cb = ModelCheckpoint(dirpath=tmp_path, monitor="train_loss", mode="min", save_top_k=2, save_last=True,
                         every_n_train_steps=2)
    tr = trainer(io, [cb], max_epochs=2)
    model = Tiny()
    tr.fit(model, loader())

    kept = {Path(p).name for p in cb.best_k_models} | {"last.ckpt"}
    assert len(cb.best_k_models) == 2
    assert set(os.listdir(tmp_path)) == kept
    removed = set(io.removed)
    assert removed and not removed & set(cb.best_k_models)  # Lightning dropped some
    assert all(not os.path.exists(p) for p in removed)
    assert io.saved.count(str(tmp_path / "last.ckpt")) == 6  # every 2 of 12 steps, same path
    for name in kept:
        d = tmp_path / name
        assert d.is_dir() and (d / MANIFEST_NAME).is_file()
        report = ckptstore.fsck(d)
        assert report.ok and report.tensors > 0, report
    last = ckptstore.load(tmp_path / "last.ckpt")
    assert last["global_step"] == tr.global_step == 12
    for k, v in model.state_dict().items():
        assert torch.equal(last["state_dict"][k], v), k
    assert isinstance(last["optimizer_states"][0]["state"][0]["exp_avg"], torch.Tensor)
    assert last["lr_schedulers"][0]["last_epoch"] == 2  # stepped once per epoch
    best = ckptstore.load(cb.best_model_path)
    assert best["callbacks"] and best["loops"]["fit_loop"]["epoch_progress"]


# -- resume ----------------------------------------------------------------------
def test_resume_is_bit_exact(tmp_path):
    L.seed_everything(1)
    straight = Tiny()
    trainer(max_epochs=4, enable_checkpointing=False).fit(straight, loader())

    L.seed_everything(1)
    first = Tiny()
    cb = ModelCheckpoint(dirpath=tmp_path, save_last=True)
    trainer(callbacks=[cb], max_epochs=2).fit(first, loader())
    stopped = tmp_path / "epoch=1-step=12.ckpt"
    assert stopped.is_dir()

    L.seed_everything(2)  # different initial weights: everything must come from the checkpoint
    resumed = Tiny()
    tr = trainer(callbacks=[ModelCheckpoint(dirpath=tmp_path / "b")], max_epochs=4)
    tr.fit(resumed, loader(), ckpt_path=str(stopped))
    assert tr.global_step == 24
    for (k, a), b in zip(straight.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), k
    # and not trivially: the stop point differs from the end
    assert not torch.equal(ckptstore.load(stopped)["state_dict"]["net.0.weight"],
                           straight.state_dict()["net.0.weight"])


def test_ckpt_path_last(tmp_path):
    L.seed_everything(3)
    cb = ModelCheckpoint(dirpath=tmp_path, save_last=True, every_n_train_steps=4)
    trainer(callbacks=[cb], max_epochs=1).fit(Tiny(), loader())
    assert ckptstore.load(tmp_path / "last.ckpt")["global_step"] == 4  # saved at step 4 only

    starts = []

    class Start(L.Callback):
        def on_train_start(self, trainer, module):
            starts.append(trainer.global_step)

    tr = trainer(callbacks=[ModelCheckpoint(dirpath=tmp_path, save_last=True), Start()], max_epochs=2)
    tr.fit(Tiny(), loader(), ckpt_path="last")
    assert Path(tr.ckpt_path) == tmp_path / "last.ckpt"
    assert starts == [4] and tr.global_step == 12  # resumed from last.ckpt at step 4
    # a new ModelCheckpoint does not overwrite another run's last.ckpt (Lightning's version counter)
    assert {"last.ckpt", "last-v1.ckpt"} <= set(os.listdir(tmp_path))
    assert ckptstore.load(tmp_path / "last-v1.ckpt")["global_step"] == 12
    assert ckptstore.fsck(tmp_path / "last-v1.ckpt").ok and ckptstore.fsck(tmp_path / "last.ckpt").ok
    # "last" is the newest of them (directory mtimes move with each atomic overwrite)
    tr = trainer(callbacks=[ModelCheckpoint(dirpath=tmp_path, save_last=True), Start()], max_epochs=2)
    tr.fit(Tiny(), loader(), ckpt_path="last")
    assert Path(tr.ckpt_path) == tmp_path / "last-v1.ckpt" and tr.global_step == 12


# -- load_from_checkpoint -----------------------------------------------------------
def test_load_from_checkpoint_with_path_hparam(tmp_path, gate):
    L.seed_everything(4)
    model = Tiny(lr=0.02, data_dir=tmp_path / "data")
    tr = trainer(max_epochs=1, enable_checkpointing=False)
    gate.set()
    tr.fit(model, loader())
    gate.clear()
    tr.save_checkpoint(tmp_path / "model.ckpt")  # in flight: its manifest does not exist yet
    assert not (tmp_path / "model.ckpt" / MANIFEST_NAME).exists()
    out: list = []
    t = in_thread(lambda: out.append(Tiny.load_from_checkpoint(tmp_path / "model.ckpt")))
    t.join(0.5)
    assert t.is_alive(), "load_from_checkpoint did not wait for the save in flight"
    gate.set()
    t.join(60)
    (loaded,) = out
    assert loaded.hparams.lr == 0.02
    assert type(loaded.hparams.data_dir) is type(tmp_path) and loaded.hparams.data_dir == tmp_path / "data"
    for k, v in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v), k
    # the loader Lightning calls honours map_location
    import lightning.pytorch.core.saving as saving

    raw = saving.pl_load(str(tmp_path / "model.ckpt"), map_location="meta")
    assert raw["state_dict"]["net.0.weight"].is_meta and raw["hyper_parameters"]["lr"] == 0.02


def test_load_from_checkpoint_other_paths_unchanged(tmp_path):
    import lightning.fabric.utilities.cloud_io as cloud_io
    import lightning.pytorch.core.saving as saving

    ckl.install_loader()  # idempotent
    assert saving.pl_load.__wrapped__ is cloud_io._load
    assert getattr(saving.pl_load, ckl._MARK) is cloud_io._load
    L.seed_everything(5)
    model = Tiny()
    plain = tmp_path / "plain.ckpt"
    tr = L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False,
                   max_steps=2, enable_checkpointing=False)
    tr.fit(model, loader())
    tr.save_checkpoint(plain)  # Lightning's own torch.save file
    assert plain.is_file()
    loaded = Tiny.load_from_checkpoint(plain)
    for k, v in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v), k
    # the plug-in resumes from such a file too (Lightning's TorchCheckpointIO reads it)
    assert ckl.CkptstoreCheckpointIO().load_checkpoint(plain)["global_step"] == 2
    tr = trainer(max_steps=4, callbacks=[ModelCheckpoint(dirpath=tmp_path / "new")])
    tr.fit(Tiny(), loader(), ckpt_path=plain)
    assert Path(tr.ckpt_path) == plain and tr.global_step == 4
    (written,) = (tmp_path / "new").iterdir()  # the checkpoints written from then on are ckptstore's
    assert ckptstore.load(written)["global_step"] == 4
    ckl.uninstall_loader()
    try:
        assert saving.pl_load is cloud_io._load
    finally:
        ckl.install_loader()


def test_place_honours_map_location():
    state = {"a": torch.ones(2), "n": [torch.zeros(1)], "s": "x"}
    assert ckl.place(state, None)["a"].device.type == "cpu"
    assert ckl.place(state, "meta")["n"][0].device.type == "meta"
    assert ckl.place(state, torch.device("meta"))["a"].device.type == "meta"
    assert ckl.place(state, {"cpu": "meta"})["a"].device.type == "meta"
    assert ckl.place(state, {"cuda:1": "meta"})["a"].device.type == "cpu"
    assert ckl.place(state, lambda storage, loc: storage)["a"].device.type == "cpu"
    assert ckl.place(state, lambda storage, loc: None)["a"].device.type == "cpu"
    assert ckl.place(state, lambda s, loc: torch.UntypedStorage(0, device="meta"))["a"].is_meta
    assert ckl.place(state, "meta")["s"] == "x"


# -- asynchronous saves -------------------------------------------------------------
def test_save_returns_before_commit_and_teardown_waits(tmp_path, gate):
    io = ckl.CkptstoreCheckpointIO()
    path = tmp_path / "a.ckpt"
    t = in_thread(io.save_checkpoint, small_checkpoint(1), path)
    t.join(60)
    assert not t.is_alive(), "save_checkpoint waited for the commit"
    handle = io.pending()
    assert handle is not None and not handle.done()
    assert not (path / MANIFEST_NAME).exists()  # staged, not committed

    # removing another checkpoint does not wait for this save
    other = tmp_path / "other.ckpt"
    other.mkdir()
    (other / "x").write_bytes(b"x")
    t = in_thread(io.remove_checkpoint, other)
    t.join(60)
    assert not t.is_alive() and not handle.done() and not other.exists()

    t = in_thread(io.teardown)
    t.join(0.5)
    assert t.is_alive(), "teardown returned before the save committed"
    gate.set()
    t.join(60)
    assert not t.is_alive() and handle.done() and io.pending() is None
    assert (path / MANIFEST_NAME).is_file() and ckptstore.fsck(path).ok
    assert torch.equal(io.load_checkpoint(path)["state_dict"]["w"], torch.full((64,), 1.0))


def test_remove_waits_for_a_save_of_that_path(tmp_path, gate):
    io = ckl.CkptstoreCheckpointIO()
    path = tmp_path / "a.ckpt"
    io.save_checkpoint(small_checkpoint(1), path)
    handle = io.pending()
    t = in_thread(io.remove_checkpoint, str(path))
    t.join(0.5)
    assert t.is_alive(), "remove_checkpoint did not wait for the save of its path"
    gate.set()
    t.join(60)
    assert not t.is_alive() and handle.done() and handle.exception() is None
    assert not path.exists()


def test_overwrite_keeps_the_old_checkpoint_until_commit(tmp_path, gate):
    io = ckl.CkptstoreCheckpointIO()
    last = tmp_path / "last.ckpt"
    gate.set()
    io.save_checkpoint(small_checkpoint(1), last)
    io.wait()
    gate.clear()
    io.save_checkpoint(small_checkpoint(2), last)  # in flight over the committed one
    assert not io.pending().done()
    old = ckptstore.load(last)
    assert old["global_step"] == 1 and torch.equal(old["state_dict"]["w"], torch.full((64,), 1.0))
    assert ckptstore.fsck(last).ok
    gate.set()
    io.teardown()
    assert ckptstore.load(last)["global_step"] == 2 and ckptstore.fsck(last).ok


def test_save_last_link(tmp_path):
    L.seed_everything(7)
    cb = ModelCheckpoint(dirpath=tmp_path, monitor="train_loss", save_top_k=1, save_last="link",
                         every_n_train_steps=2)
    trainer(callbacks=[cb], max_epochs=1).fit(Tiny(), loader())
    link = tmp_path / "last.ckpt"
    assert link.is_symlink() and set(os.listdir(tmp_path)) == {"last.ckpt", Path(cb.best_model_path).name}
    assert ckptstore.fsck(link.resolve()).ok
    tr = trainer(callbacks=[ModelCheckpoint(dirpath=tmp_path)], max_epochs=2)
    tr.fit(Tiny(), loader(), ckpt_path="last")
    assert Path(tr.ckpt_path) == link and tr.global_step == 12


def test_remove_symlink_keeps_target(tmp_path):
    io = ckl.CkptstoreCheckpointIO(blocking=True)
    io.save_checkpoint(small_checkpoint(3), tmp_path / "epoch=0-step=3.ckpt")
    link = tmp_path / "last.ckpt"
    os.symlink("epoch=0-step=3.ckpt", link)  # ModelCheckpoint(save_last="link")
    assert io.load_checkpoint(link)["global_step"] == 3
    io.remove_checkpoint(link)
    assert not os.path.lexists(link) and ckptstore.fsck(tmp_path / "epoch=0-step=3.ckpt").ok


# -- errors ---------------------------------------------------------------------------
@pytest.fixture
def failing_commit(monkeypatch):
    calls = []

    def fail(*a, **kw):
        calls.append(1)
        raise InjectedFault("injected commit failure")

    monkeypatch.setattr(save_module, "commit_manifest", fail)
    return calls


def test_background_error_raised_once_by_next_save(tmp_path, failing_commit, monkeypatch):
    io = ckl.CkptstoreCheckpointIO()
    io.save_checkpoint(small_checkpoint(1), tmp_path / "a.ckpt")  # returns: the failure is later
    with pytest.raises(InjectedFault, match="injected commit failure"):
        io.save_checkpoint(small_checkpoint(2), tmp_path / "b.ckpt")
    assert not (tmp_path / "a.ckpt" / MANIFEST_NAME).exists()
    assert not (tmp_path / "b.ckpt").exists()  # the raising call saved nothing
    monkeypatch.setattr(save_module, "commit_manifest", REAL_COMMIT)
    io.save_checkpoint(small_checkpoint(3), tmp_path / "c.ckpt")  # not raised again
    io.teardown()
    assert ckptstore.load(tmp_path / "c.ckpt")["global_step"] == 3


def test_background_error_raised_by_teardown_once(tmp_path, failing_commit):
    io = ckl.CkptstoreCheckpointIO()
    io.save_checkpoint(small_checkpoint(1), tmp_path / "a.ckpt")
    with pytest.raises(InjectedFault):
        io.teardown()
    io.teardown()  # once
    io.wait()


def test_teardown_during_another_error_keeps_that_error(tmp_path, failing_commit, caplog):
    io = ckl.CkptstoreCheckpointIO()
    io.save_checkpoint(small_checkpoint(1), tmp_path / "a.ckpt")
    with pytest.raises(ValueError, match="training failed") as info:
        try:
            raise ValueError("training failed")
        except ValueError:
            io.teardown()
            raise
    if sys.version_info >= (3, 11):
        assert any("InjectedFault: injected commit failure" in n for n in info.value.__notes__)
    assert "injected commit failure" in caplog.text
    io.teardown()  # seen once, not again


def test_fit_raises_background_error_with_its_type(tmp_path, failing_commit):
    L.seed_everything(6)
    cb = ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=2, save_top_k=-1)
    with pytest.raises(InjectedFault):
        trainer(callbacks=[cb], max_epochs=1).fit(Tiny(), loader())
    assert len(failing_commit) == 1  # the second save raised the first one's error and stopped training
