"""In-process tests of the trainer: config, data, model/remat, resume logic (with an in-memory
fake of ckptstore.Checkpointer), every AMP and remat mode, metrics and plotting.

Subprocess tests with the real engine, SIGKILL and SIGTERM are in test_trainer_resume.py.
"""

from __future__ import annotations

import copy
import json
from typing import Any

import numpy as np
import pytest
import torch

import trainer.train as train_mod
from ckptstore.plan.stateful import resolve_stateful
from ckptstore.read.into import apply_into
from trainer.config import ConfigError, TrainConfig, parse_config
from trainer.data import TokenStream
from trainer.metrics import read_metrics
from trainer.model import GPT, GPTConfig
from trainer.plot import plot_run, split_segments
from trainer.train import StopFlag, lr_lambda, train


@pytest.fixture(autouse=True)
def _keep_torch_global_flags():
    """train() turns on deterministic algorithms; leave the process as we found it."""
    det = torch.are_deterministic_algorithms_enabled()
    yield
    torch.use_deterministic_algorithms(det)


class MemoryCheckpointer:
    """In-memory stand-in for ckptstore.Checkpointer: deep-copies each saved tree."""

    def __init__(self, store: dict[int, Any]) -> None:
        self.store = store
        self.metrics: dict[int, Any] = {}

    def __call__(self, cfg: TrainConfig) -> "MemoryCheckpointer":  # backend_factory protocol
        return self

    def save(self, step: int, state: Any, metrics: dict | None = None) -> None:
        self.store[step] = copy.deepcopy(resolve_stateful(state))  # as a save: the objects' state now
        self.metrics[step] = metrics

    def latest(self) -> int | None:
        return max(self.store) if self.store else None

    def load(self, step: int | str = "latest", *, into: Any = None, strict: bool = True) -> Any:
        state = copy.deepcopy(self.store[self.latest() if step == "latest" else step])
        return state if into is None else apply_into(state, into, strict=strict)

    def wait(self) -> None:
        pass

    def close(self) -> None:
        pass


def tiny(tmp_path, name: str = "run", **over: Any) -> TrainConfig:
    base = dict(preset="tiny", steps=8, batch_size=4, lr=1e-2, min_lr=1e-3, warmup_steps=1,
                out_dir=str(tmp_path / name), ckpt_every_steps=3, val_every=4, log_every=100)
    base.update(over)
    return TrainConfig(**base)


def losses(records: list[dict]) -> list[float]:
    return [r["loss"] for r in records]


def assert_same_tensors(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


class Crash(Exception):
    pass


def crash_at(monkeypatch, n: int) -> None:
    """Make the n-th training step (counted in this process) die after its backward pass."""
    real = train_mod.train_step
    calls = {"n": 0}

    def step(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == n:
            raise Crash(f"injected crash in step call {n}")
        return real(*args, **kwargs)

    monkeypatch.setattr(train_mod, "train_step", step)


def run_with_crash_and_resume(tmp_path, monkeypatch, crash_call: int, **over: Any):
    """Uninterrupted run vs crashed+resumed run; returns (ref records, resumed records, stores)."""
    ref_store: dict[int, Any] = {}
    ref = train(tiny(tmp_path, "ref", **over), MemoryCheckpointer(ref_store), stop=StopFlag())
    store: dict[int, Any] = {}
    backend = MemoryCheckpointer(store)
    with monkeypatch.context() as m:
        crash_at(m, crash_call)
        with pytest.raises(Crash):
            train(tiny(tmp_path, "crash", **over), backend, stop=StopFlag())
    resumed = train(tiny(tmp_path, "crash", resume="auto", **over), backend, stop=StopFlag())
    return ref, resumed, ref_store, store


# ---- config ------------------------------------------------------------------------------
def test_config_file_then_flags(tmp_path):
    toml = tmp_path / "c.toml"
    toml.write_text('preset = "tiny"\nsteps = 7\namp = "bf16"\n')
    cfg = parse_config(["--config", str(toml), "--steps", "9", "--deterministic", "false"])
    assert (cfg.preset, cfg.steps, cfg.amp, cfg.deterministic) == ("tiny", 9, "bf16", False)
    js = tmp_path / "c.json"
    js.write_text(json.dumps({"remat": "full", "width": 96}))
    cfg = parse_config(["--config", str(js), "--preset", "tiny"])
    assert cfg.remat == "full" and cfg.model_dims()["width"] == 96 and cfg.model_dims()["depth"] == 2


@pytest.mark.parametrize("fields, word", [
    ({"amp": "fp8"}, "--amp"),
    ({"remat": "some"}, "--remat"),
    ({"preset": "tiny", "width": 65}, "divisible"),
    ({"batch_size": 3}, "world size"),
    ({"resume": "latest"}, "--resume"),
    ({"steps": 5, "warmup_steps": 10}, "--warmup-steps"),
])
def test_config_validation_names_the_problem(fields, word):
    with pytest.raises(ConfigError, match=word):
        TrainConfig(**fields).validate(world_size=2)


def test_cli_rejects_unknown_choices(capsys):
    with pytest.raises(SystemExit):
        parse_config(["--amp", "fp8"])
    assert "invalid choice" in capsys.readouterr().err


def test_config_file_rejects_unknown_keys(tmp_path):
    path = tmp_path / "c.json"
    path.write_text('{"stepz": 3}')
    with pytest.raises(ConfigError, match="stepz"):
        parse_config(["--config", str(path)])


def test_lr_schedule_warmup_then_cosine():
    cfg = TrainConfig(steps=100, warmup_steps=10, lr=1.0, min_lr=0.1)
    f = lr_lambda(cfg)
    warm = [f(s) for s in range(10)]
    assert warm == sorted(warm) and warm[-1] < 1.0
    assert f(10) == pytest.approx(1.0)
    assert f(100) == pytest.approx(0.1)
    decay = [f(s) for s in range(10, 101)]
    assert decay == sorted(decay, reverse=True)


# ---- data --------------------------------------------------------------------------------
def test_data_stream_resumes_and_is_rank_independent():
    full = TokenStream(64, 16, 4, seed=3)
    batches = [full.next_batch()[0] for _ in range(5)]
    again = TokenStream(64, 16, 4, seed=3)
    again.load_state_dict({"seed": 3, "consumed": 3})
    assert torch.equal(again.next_batch()[0], batches[3])
    halves = [TokenStream(64, 16, 4, seed=3, rank=r, world_size=2) for r in (0, 1)]
    for h in halves:
        h.load_state_dict(full.state_dict() | {"consumed": 4})
    assert torch.equal(torch.cat([h.next_batch()[0] for h in halves]), batches[4])
    x, y = TokenStream(64, 16, 4, seed=3).next_batch()
    assert torch.equal(x[:, 1:], y[:, :-1])
    with pytest.raises(ValueError, match="seed"):
        again.load_state_dict({"seed": 4, "consumed": 0})


# ---- model -------------------------------------------------------------------------------
def test_remat_modes_compute_the_same_loss_and_grads():
    x = torch.randint(0, 256, (2, 32))
    results = []
    for remat in ("none", "selective", "full"):
        torch.manual_seed(0)
        model = GPT(GPTConfig(256, 64, 2, 4, 32, remat=remat))
        _, loss = model(x, x)
        loss.backward()
        results.append((loss.detach(), [p.grad.clone() for p in model.parameters()]))
    for loss, grads in results[1:]:
        assert torch.equal(loss, results[0][0])
        assert all(torch.allclose(g, g0, atol=1e-6) for g, g0 in zip(grads, results[0][1]))


# ---- training and resume -----------------------------------------------------------------
def test_crash_and_resume_is_bit_exact(tmp_path, monkeypatch):
    ref, resumed, ref_store, store = run_with_crash_and_resume(tmp_path, monkeypatch, crash_call=6)
    # checkpoint 4 (best val) is snapshotted during step 5; step 6 crashed; resume after step 4
    assert resumed[0]["step"] == 5
    assert losses(ref)[4:] == losses(resumed)
    assert_same_tensors(ref_store[8]["model"], store[8]["model"])
    assert ref_store[8]["optim"]["state"].keys() == store[8]["optim"]["state"].keys()
    for k, v in ref_store[8]["optim"]["state"].items():
        assert_same_tensors(v, store[8]["optim"]["state"][k])
    assert store[8]["data"] == {"seed": 1337, "consumed": 8}


def test_resume_auto_without_a_checkpoint_trains_exactly_like_a_fresh_run(tmp_path):
    """Nothing to resume: the optimizer must stay untouched (creating its state ahead of a
    restore runs a dummy step, which would change Adam's step count and the run)."""
    fresh = train(tiny(tmp_path, "fresh", steps=4), MemoryCheckpointer({}), stop=StopFlag())
    auto = train(tiny(tmp_path, "auto", steps=4, resume="auto"), MemoryCheckpointer({}),
                 stop=StopFlag())
    assert losses(auto) == losses(fresh)


def test_checkpoint_contents_and_policy(tmp_path):
    backend = MemoryCheckpointer({})
    train(tiny(tmp_path, steps=9), backend, stop=StopFlag())
    vals = [r["val_loss"] for r in read_metrics(tmp_path / "run" / "metrics.jsonl") if r.get("event") == "val"]
    best = {4} | ({8} if vals[1] < vals[0] else set())
    assert sorted(backend.store) == sorted({3, 6, 9} | best)  # every 3 steps, best val, final
    assert backend.metrics[4] == {"val_loss": vals[0]} and backend.metrics[3] is None
    state = backend.store[6]
    assert set(state) == {"step", "model", "optim", "sched", "scaler", "rng", "data", "config", "meta"}
    assert state["step"] == 6 and state["sched"]["last_epoch"] == 6
    assert state["data"]["consumed"] == 6  # position as of the end of step 6, not step 7
    assert state["config"]["preset"] == "tiny" and set(state["rng"]) == {"python", "numpy", "torch", "cuda"}
    assert isinstance(state["rng"]["torch"], torch.Tensor)


def test_stop_flag_saves_the_current_step_and_returns(tmp_path, monkeypatch):
    stop = StopFlag()
    real = train_mod.train_step
    calls = {"n": 0}

    def step(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 5:
            stop.signum = 15  # as the SIGTERM handler would, in the middle of step 5
        return real(*args, **kwargs)

    monkeypatch.setattr(train_mod, "train_step", step)
    backend = MemoryCheckpointer({})
    records = train(tiny(tmp_path, steps=20), backend, stop=stop)
    assert records[-1]["step"] == 5 and backend.latest() == 5
    events = [r for r in read_metrics(tmp_path / "run" / "metrics.jsonl") if r.get("event")]
    assert {"event": "emergency", "step": 5, "signal": 15}.items() <= events[-1].items()


@pytest.mark.parametrize("amp, remat", [("none", "none"), ("none", "selective"), ("none", "full"),
                                        ("bf16", "none"), ("fp16", "selective")])
def test_each_amp_and_remat_mode_trains_and_resumes(tmp_path, monkeypatch, amp, remat):
    ref, resumed, ref_store, store = run_with_crash_and_resume(
        tmp_path, monkeypatch, crash_call=5, amp=amp, remat=remat, val_every=0)
    first, last = losses(ref)[:2], losses(ref)[-2:]
    assert sum(last) < sum(first) - 0.05, losses(ref)
    assert resumed[0]["step"] == 4  # checkpoint 3 was snapshotted during step 4, crash in step 5
    assert losses(ref)[3:] == losses(resumed)
    assert_same_tensors(ref_store[8]["model"], store[8]["model"])
    if amp == "fp16":  # the scaler's state is checkpointed and restored
        assert ref_store[8]["scaler"]["scale"] == store[8]["scaler"]["scale"] > 0
        assert all("loss_scale" in r for r in resumed)
    else:
        assert ref_store[8]["scaler"] == {}


def test_fp16_scaler_skips_overflow_and_backs_off(tmp_path, monkeypatch):
    # a huge initial scale makes fp16 gradients overflow: steps are skipped and the scale halves
    monkeypatch.setattr(train_mod, "make_scaler",
                        lambda cfg, ctx: torch.amp.GradScaler("cpu", init_scale=2.0**40))
    backend = MemoryCheckpointer({})
    records = train(tiny(tmp_path, amp="fp16", steps=4, val_every=0), backend, stop=StopFlag())
    scales = [r["loss_scale"] for r in records]
    assert scales[0] < 2.0**40 and scales == sorted(scales, reverse=True), scales
    assert backend.store[4]["scaler"]["scale"] == scales[-1]
    assert all(np.isfinite(r["loss"]) for r in records)
    assert all(torch.isfinite(t).all() for t in backend.store[4]["model"].values())


# ---- metrics and plot --------------------------------------------------------------------
def test_metrics_and_plot(tmp_path):
    train(tiny(tmp_path, steps=6), MemoryCheckpointer({}), stop=StopFlag())
    run = tmp_path / "run"
    (run / "metrics.jsonl").open("a").write('{"event": "resume", "step": 3}\n{"step": 4, "lo')  # torn
    records = read_metrics(run / "metrics.jsonl")
    steps = [r for r in records if "loss" in r and "event" not in r]
    assert [r["step"] for r in steps] == list(range(1, 7))
    assert all(r["peak_mem_mb"] > 0 and r["tok_per_s"] > 0 for r in steps)
    assert len(split_segments(records)) == 1  # the resume has no steps after it yet
    png = plot_run(str(run))
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000


def test_time_trigger_saves_every_m_seconds(tmp_path):
    backend = MemoryCheckpointer({})
    train(tiny(tmp_path, steps=8, ckpt_every_steps=0, val_every=0, ckpt_every_seconds=0.25,
               step_delay=0.1), backend, stop=StopFlag())
    reasons = [r["reason"] for r in read_metrics(tmp_path / "run" / "metrics.jsonl")
               if r.get("event") == "checkpoint"]
    assert reasons.count("seconds") >= 2 and reasons[-1] == "final", reasons
    assert len(backend.store) == len(reasons)


def test_signal_handlers_set_the_stop_flag():
    import os
    import signal

    old = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGUSR1)}
    try:
        stop = StopFlag()
        stop.install()
        os.kill(os.getpid(), signal.SIGUSR1)
        assert stop.signum == signal.SIGUSR1
    finally:
        for s, h in old.items():
            signal.signal(s, h)


def test_find_batch_size_says_it_needs_a_gpu(capsys):
    from trainer.__main__ import main

    assert main(["--find-batch-size", "--preset", "tiny", "--device", "cpu"]) == 2
    assert "needs a GPU" in capsys.readouterr().err


def test_real_checkpointer_with_remote_tier(tmp_path):
    """Default backend (ckptstore.Checkpointer): local retention plus a file:// object tier."""
    ckptstore = pytest.importorskip("ckptstore")
    remote = f"file://{tmp_path / 'remote'}"
    cfg = tiny(tmp_path, steps=6, val_every=0, ckpt_every_steps=2, keep_last=1, remote=remote)
    train(cfg, stop=StopFlag())
    with ckptstore.Checkpointer(cfg.ckpt_dir) as local:
        assert local.steps() == [6]  # keep_last=1 locally
    with ckptstore.Checkpointer(None, remote) as far:
        assert far.steps() == [2, 4, 6]  # every save promoted
        state = far.load(4)
    assert state["step"] == 4 and state["data"] == {"seed": 1337, "consumed": 4}
