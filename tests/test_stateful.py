"""Stateful objects in save/load: modules, optimizers, schedulers, GradScaler, RNGState
and user objects are saved through state_dict() and restored through load_state_dict();
copies of their state dicts given as targets are refused; reports claim only what was
applied; tied parameters need to be stored once."""
from __future__ import annotations

import random

import numpy as np
import pytest
import torch

import ckptstore
from ckptstore.errors import StrictLoadError, UnsupportedTypeError


def _parts(seed: int = 0):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.Dropout(0.3), torch.nn.ReLU(),
                                torch.nn.Linear(16, 1))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, betas=(0.8, 0.95))
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
    scaler = torch.amp.GradScaler("cpu", init_scale=128.0)
    return model, opt, sched, scaler


class Counter:
    """A user object with state: the data position of a training loop."""

    def __init__(self) -> None:
        self.seen = 0
        self.order = [0, 1, 2]

    def state_dict(self):
        return {"seen": self.seen, "order": list(self.order)}

    def load_state_dict(self, sd):
        self.seen, self.order = sd["seen"], list(sd["order"])


def _step(model, opt, sched, counter) -> float:
    # every generator the run uses: torch (data, dropout), numpy and Python's random
    x = torch.randn(8, 6) + float(np.random.rand()) + random.random()
    loss = model(x).pow(2).mean()
    opt.zero_grad()
    loss.backward()
    opt.step()
    sched.step()
    counter.seen += 8
    return loss.item()


def _objects(model, opt, sched, scaler, counter):
    return {"model": model, "optim": opt, "sched": sched, "scaler": scaler, "data": counter,
            "rng": ckptstore.RNGState(), "step": 3}


def test_resume_from_fresh_objects_is_bit_exact(tmp_path):
    model, opt, sched, scaler = _parts()
    counter = Counter()
    random.seed(1)
    np.random.seed(1)
    for _ in range(3):
        _step(model, opt, sched, counter)
    ckptstore.save(_objects(model, opt, sched, scaler, counter), tmp_path / "c", blocking=True)
    expected = [_step(model, opt, sched, counter) for _ in range(4)]
    final = [p.detach().clone() for p in model.parameters()]

    # a new process would build everything fresh: other seeds, an optimizer with no state
    model2, opt2, sched2, scaler2 = _parts(seed=7)
    scaler2 = torch.amp.GradScaler("cpu", init_scale=2.0)
    counter2 = Counter()
    random.seed(99)
    np.random.seed(99)
    assert not opt2.state
    report = ckptstore.load(tmp_path / "c", into=_objects(model2, opt2, sched2, scaler2, counter2))
    assert report.ok, report.summary()
    assert {"optim", "sched", "scaler", "data", "rng"} <= set(report.loaded)
    assert sched2.last_epoch == 3 and counter2.seen == 24
    assert scaler2.get_scale() == 128.0
    assert opt2.param_groups[0]["betas"] == (0.8, 0.95)
    got = [_step(model2, opt2, sched2, counter2) for _ in range(4)]
    assert got == expected
    for a, b in zip(final, model2.parameters()):
        assert torch.equal(a, b)


def test_plain_load_returns_the_state_dicts(tmp_path):
    model, opt, sched, _ = _parts()
    _step(model, opt, sched, Counter())
    ckptstore.save({"model": model, "optim": opt, "sched": sched}, tmp_path / "c", blocking=True)
    out = ckptstore.load(tmp_path / "c")
    assert set(out["model"]) == set(model.state_dict())
    assert torch.equal(out["model"]["0.weight"], model[0].weight)
    assert out["optim"]["param_groups"][0]["lr"] == opt.param_groups[0]["lr"]
    assert torch.equal(out["optim"]["state"][0]["exp_avg"], opt.state[model[0].weight]["exp_avg"])
    assert out["sched"]["last_epoch"] == 1


def test_optimizer_state_dict_copy_as_target_is_refused(tmp_path):
    model = torch.nn.Linear(3, 2)
    ckptstore.save({"optim": torch.optim.SGD(model.parameters(), lr=0.5).state_dict()}, tmp_path / "c",
                   blocking=True)
    live = torch.optim.SGD(model.parameters(), lr=0.1)
    for strict in (True, False):
        with pytest.raises(UnsupportedTypeError, match=r"into\['optim'\].*optimizer.*pass the object"):
            ckptstore.load(tmp_path / "c", into={"optim": live.state_dict()}, strict=strict)
    assert live.param_groups[0]["lr"] == 0.1
    report = ckptstore.load(tmp_path / "c", into={"optim": live})
    assert report.ok and report.loaded == ("optim",)
    assert live.param_groups[0]["lr"] == 0.5


def test_scheduler_and_scaler_state_dict_copies_are_refused(tmp_path):
    model, opt, sched, scaler = _parts()
    ckptstore.save({"sched": sched, "scaler": scaler}, tmp_path / "c", blocking=True)
    with pytest.raises(UnsupportedTypeError, match="LR scheduler"):
        ckptstore.load(tmp_path / "c", into={"sched": sched.state_dict()})
    with pytest.raises(UnsupportedTypeError, match="GradScaler"):
        ckptstore.load(tmp_path / "c", into={"scaler": scaler.state_dict()})


def test_missing_stateful_key_is_reported_and_strict_modifies_nothing(tmp_path):
    model, opt, _, _ = _parts()
    ckptstore.save({"model": model}, tmp_path / "c", blocking=True)
    model2, opt2, _, _ = _parts(seed=3)
    before = [p.detach().clone() for p in model2.parameters()]
    with pytest.raises(StrictLoadError) as e:
        ckptstore.load(tmp_path / "c", into={"model": model2, "optim": opt2})
    assert e.value.report.missing == ("optim",)
    for a, b in zip(before, model2.parameters()):
        assert torch.equal(a, b)
    report = ckptstore.load(tmp_path / "c", into={"model": model2, "optim": opt2}, strict=False)
    assert report.missing == ("optim",) and "optim" not in report.loaded and not opt2.state


def test_refused_state_is_a_typed_error_before_any_tensor_is_written(tmp_path):
    model, opt, _, _ = _parts()
    _step(model, opt, torch.optim.lr_scheduler.StepLR(opt, 1), Counter())
    ckptstore.save({"model": model, "optim": opt}, tmp_path / "c", blocking=True)
    other = torch.nn.Linear(6, 16)  # one parameter group of another size
    model2, _, _, _ = _parts(seed=5)
    before = [p.detach().clone() for p in model2.parameters()]
    wrong = torch.optim.AdamW([other.weight], lr=1.0)
    with pytest.raises(StrictLoadError, match="optim.*load_state_dict refused"):
        ckptstore.load(tmp_path / "c", into={"model": model2, "optim": wrong})
    for a, b in zip(before, model2.parameters()):
        assert torch.equal(a, b)
    report = ckptstore.load(tmp_path / "c", into={"model": model2, "optim": wrong}, strict=False)
    assert not report.ok and [k for k, _ in report.mismatched] == ["optim"]
    assert "optim" not in report.loaded and "0.weight" not in report.loaded
    assert "model.0.weight" in report.loaded


def test_whole_target_may_be_one_stateful_object(tmp_path):
    model, opt, sched, _ = _parts()
    _step(model, opt, sched, Counter())
    ckptstore.save(opt, tmp_path / "c", blocking=True)
    _, opt2, _, _ = _parts(seed=2)
    report = ckptstore.load(tmp_path / "c", into=opt2)
    assert report.ok and report.loaded == ("<root>",)
    assert torch.equal(opt2.state_dict()["state"][0]["exp_avg"], opt.state_dict()["state"][0]["exp_avg"])


def test_rng_state_restores_every_generator(tmp_path):
    random.seed(3)
    np.random.seed(3)
    torch.manual_seed(3)
    ckptstore.save({"rng": ckptstore.RNGState()}, tmp_path / "c", blocking=True)
    expected = (random.random(), np.random.rand(), torch.rand(3), random.gauss(0, 1))
    random.seed(4)
    np.random.seed(4)
    torch.manual_seed(4)
    ckptstore.load(tmp_path / "c", into={"rng": ckptstore.RNGState()})
    got = (random.random(), np.random.rand(), torch.rand(3), random.gauss(0, 1))
    assert got[0] == expected[0] and got[1] == expected[1] and got[3] == expected[3]
    assert torch.equal(got[2], expected[2])


def test_tied_parameters_stored_once_load_into_the_model(tmp_path):
    class Tied(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = torch.nn.Embedding(10, 4)
            self.head = torch.nn.Linear(4, 10, bias=False)
            self.head.weight = self.embed.weight

    src = Tied()
    ckptstore.save({"embed.weight": src.embed.weight.detach()}, tmp_path / "c", blocking=True)
    dst = Tied()
    report = ckptstore.load(tmp_path / "c", into=dst)
    assert report.ok and set(report.loaded) == {"embed.weight", "head.weight"}
    assert torch.equal(dst.head.weight, src.embed.weight)
    untied = torch.nn.Module()
    untied.embed = torch.nn.Embedding(10, 4)
    untied.head = torch.nn.Linear(4, 10, bias=False)
    with pytest.raises(StrictLoadError, match="head.weight"):  # not the same memory: missing
        ckptstore.load(tmp_path / "c", into=untied)


def test_check_names_every_unsupported_value():
    model, opt, sched, _ = _parts()
    report = ckptstore.check({"model": model, "optim": opt, "sched": sched}, raise_error=False)
    assert report.ok and report.arrays == 4
    assert report.nbytes == sum(p.numel() * 4 for p in model.parameters())
    bad = {"ok": torch.zeros(2), "fn": lambda: 1, "nested": [{"obj": object()}], "file": open}
    report = ckptstore.check(bad, raise_error=False)
    assert [name for name, _ in report.problems] == ["fn", "nested.0.obj", "file"]
    with pytest.raises(UnsupportedTypeError, match="3 cannot be saved.*nested.0.obj"):
        ckptstore.check(bad)


def test_partial_load_reaches_stateful_objects_by_name(tmp_path):
    model, opt, sched, _ = _parts()
    _step(model, opt, sched, Counter())
    ckptstore.save({"model": model, "optim": opt, "sched": sched}, tmp_path / "c", blocking=True)
    model2, opt2, sched2, _ = _parts(seed=4)
    # only the optimizer: the model and scheduler are neither loaded nor reported missing
    report = ckptstore.load(tmp_path / "c", into={"model": model2, "optim": opt2, "sched": sched2},
                            keys=["optim."])
    assert report.ok and report.loaded == ("optim",)
    assert torch.equal(opt2.state_dict()["state"][0]["exp_avg"], opt.state_dict()["state"][0]["exp_avg"])
    assert sched2.last_epoch == 0 and not torch.equal(model2[0].weight, model[0].weight)
