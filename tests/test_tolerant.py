"""Tolerant loads: rename rules, strict/non-strict reports, casts, shape mismatches."""
from __future__ import annotations

import logging

import pytest
import torch
from torch import nn

import ckptstore
from ckptstore.errors import StrictLoadError
from ckptstore.plan.keymap import compile_rename, rename_names


class Old(nn.Module):
    """The model as it was when the checkpoint was saved."""

    def __init__(self) -> None:
        super().__init__()
        self.encoder = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 16))
        self.head = nn.Linear(16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(x))


class New(nn.Module):
    """The code later: encoder renamed to backbone, a layer added, the head replaced."""

    def __init__(self) -> None:
        super().__init__()
        self.backbone = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 16))
        self.extra = nn.Linear(16, 16)
        self.head = nn.Linear(16, 6)


@pytest.fixture
def trained(tmp_path):
    torch.manual_seed(0)
    model = Old()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(5):
        x = torch.randn(16, 8)
        loss = (model(x) - x[:, :4]).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    path = tmp_path / "ckpt"
    ckptstore.save({"model": model.state_dict(), "optim": opt.state_dict(), "step": 5},
                   path, blocking=True)
    return path, {k: v.clone() for k, v in model.state_dict().items()}


def _params(m: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in m.state_dict().items()}


RULES = {
    "prefix": {"model.encoder.": "model.backbone."},
    "regex": [(r"^model\.encoder\.(\d+)\.", r"model.backbone.\1.")],
    "callable": lambda n: n.replace("model.encoder.", "model.backbone.", 1),
}


@pytest.mark.parametrize("kind", sorted(RULES))
def test_renamed_added_replaced_non_strict(trained, kind, caplog):
    path, saved = trained
    torch.manual_seed(1)
    new = New()
    before = _params(new)
    with caplog.at_level(logging.WARNING, logger="ckptstore"):
        report = ckptstore.load(path, into={"model": new}, rename=RULES[kind], keys="model.",
                                strict=False)
    assert sorted(report.loaded) == ["model.backbone.0.bias", "model.backbone.0.weight",
                                     "model.backbone.2.bias", "model.backbone.2.weight"]
    assert sorted(report.missing) == ["model.extra.bias", "model.extra.weight"]
    assert sorted(k for k, _ in report.mismatched) == ["model.head.bias", "model.head.weight"]
    assert all("shape" in why for _, why in report.mismatched)
    assert report.unexpected == ()  # keys= kept the optimizer out of this load
    assert sorted(report.renamed) == sorted(
        (f"model.encoder.{k}", f"model.backbone.{k}") for k in ("0.weight", "0.bias", "2.weight", "2.bias"))
    after = _params(new)
    for k in ("0.weight", "0.bias", "2.weight", "2.bias"):
        assert torch.equal(after[f"backbone.{k}"], saved[f"encoder.{k}"])
    for k in ("extra.weight", "extra.bias", "head.weight", "head.bias"):
        assert torch.equal(after[k], before[k]), k  # never loaded: added or shape differs
    assert any("model.extra.weight" in r.getMessage() for r in caplog.records)


def test_strict_lists_whole_diff_and_changes_nothing(trained):
    path, _ = trained
    new = New()
    before = _params(new)
    with pytest.raises(StrictLoadError) as exc:
        ckptstore.load(path, into={"model": new}, rename=RULES["prefix"])
    report = exc.value.report
    msg = str(exc.value)
    assert set(report.missing) == {"model.extra.weight", "model.extra.bias"}
    assert {k for k, _ in report.mismatched} == {"model.head.weight", "model.head.bias"}
    assert "step" in report.unexpected and any(k.startswith("optim.") for k in report.unexpected)
    for name in [*report.missing, *report.unexpected, *(k for k, _ in report.mismatched)]:
        assert name in msg  # the whole diff, not a truncated summary
    assert isinstance(exc.value, KeyError)
    for k, v in _params(new).items():
        assert torch.equal(v, before[k]), k


def test_strict_without_rename_fails_and_with_matching_model_passes(trained):
    path, saved = trained
    with pytest.raises(StrictLoadError):
        ckptstore.load(path, into={"model": New()}, keys="model.")
    old = Old()
    report = ckptstore.load(path, into={"model": old}, keys="model.")
    assert report.ok and len(report.loaded) == len(saved)
    for k, v in old.state_dict().items():
        assert torch.equal(v, saved[k])


def test_dtype_needs_cast(trained):
    path, saved = trained
    target = {"model": {k: torch.zeros_like(v, dtype=torch.bfloat16) for k, v in saved.items()}}
    report = ckptstore.load(path, into=target, keys="model.", strict=False)
    assert report.loaded == () and len(report.mismatched) == len(saved)
    assert all("cast=True" in why for _, why in report.mismatched)
    report = ckptstore.load(path, into=target, keys="model.", cast=True)
    assert report.ok
    for k, v in saved.items():
        assert torch.equal(target["model"][k], v.to(torch.bfloat16))


def test_shape_mismatch_never_loaded_even_with_cast(trained):
    path, saved = trained
    target = {"model": {"head.weight": torch.zeros(6, 16)}}
    report = ckptstore.load(path, into=target, keys="model.head.weight", cast=True, strict=False)
    assert report.mismatched[0][0] == "model.head.weight"
    assert torch.count_nonzero(target["model"]["head.weight"]) == 0


def test_rename_without_into(trained):
    path, saved = trained
    state = ckptstore.load(path, rename=RULES["regex"])
    assert sorted(state["model"]) == sorted(k.replace("encoder.", "backbone.") for k in saved)
    assert torch.equal(state["model"]["backbone.0.weight"], saved["encoder.0.weight"])
    assert state["step"] == 5
    dropped = ckptstore.load(path, rename=lambda n: None if n.startswith("optim.state.") else n)
    assert dropped["optim"]["state"] and all(v == {} for v in dropped["optim"]["state"].values())
    assert dropped["optim"]["param_groups"][0]["lr"] == 1e-2
    with pytest.raises(ValueError, match="into="):
        ckptstore.load(path, rename={"model.": "net."})  # would move leaves to another dict


def test_into_module_directly(tmp_path):
    torch.manual_seed(0)
    old = Old()
    ckptstore.save(old.state_dict(), tmp_path / "c", blocking=True)
    new = New()
    report = ckptstore.load(tmp_path / "c", into=new, rename={"encoder.": "backbone."}, strict=False)
    assert len(report.loaded) == 4 and set(report.missing) == {"extra.weight", "extra.bias"}
    assert torch.equal(new.backbone[0].weight, old.encoder[0].weight)


def test_rename_rules_unit():
    fn = compile_rename({"a.": "x.", "a.b.": "y."})
    assert fn("a.b.w") == "y.w" and fn("a.c") == "x.c" and fn("q") == "q"
    fn = compile_rename([(r"^layers\.(\d+)\.", r"blocks.\1."), (r"\.w$", ".weight")])
    assert fn("layers.12.w") == "blocks.12.weight"
    with pytest.raises(ValueError, match="both"):
        rename_names(["a.w", "b.w"], {"a.": "b."})
    with pytest.raises(TypeError):
        compile_rename("a.")
    with pytest.raises(ValueError):
        compile_rename([("(", "x")])
    with pytest.raises(TypeError):
        rename_names(["a"], lambda n: 3)
