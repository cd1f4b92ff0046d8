"""Export to safetensors, import from safetensors / torch.save / DCP, diff by hash, CLI."""
from __future__ import annotations

import json
import pickle
import warnings

import pytest
import torch
from safetensors.torch import load_file, save_file

import ckptstore
from ckptstore.cli.main import main
from ckptstore.errors import UnsafeCheckpointError
from ckptstore.interop.convert import diff, export_safetensors, import_checkpoint
from conftest import assert_same_tree


class Evil:
    """Unpickling this runs code: it creates the file named ``marker``."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (exec, (f"open({self.marker!r}, 'w').write('pwned')",))


def _weights():
    torch.manual_seed(0)
    w = torch.randn(8, 4)
    return {"model": {"l1.weight": w, "l1.bias": torch.randn(8),
                      "out.weight": torch.randn(3, 8).to(torch.bfloat16)},
            "optim": {"state": {0: {"exp_avg": torch.randn(8, 4)}}, "lr": 0.1},
            "step": 4, "tied": w}


@pytest.fixture
def ckpt(tmp_path):
    path = tmp_path / "c"
    ckptstore.save(_weights(), path, blocking=True)
    return path


def test_export_equals_weights(ckpt, tmp_path):
    out = tmp_path / "w.safetensors"
    names = export_safetensors(ckpt, out)
    loaded = load_file(out)
    state = _weights()
    expected = {"model.l1.weight": state["model"]["l1.weight"], "model.l1.bias": state["model"]["l1.bias"],
                "model.out.weight": state["model"]["out.weight"],
                "optim.state.0.exp_avg": state["optim"]["state"][0]["exp_avg"], "tied": state["tied"]}
    assert sorted(names) == sorted(expected) and sorted(loaded) == sorted(expected)
    assert_same_tree(expected, {k: loaded[k] for k in expected})


def test_export_model_only_strip_prefix(ckpt, tmp_path):
    out = tmp_path / "m.safetensors"
    export_safetensors(ckpt, out, keys="model.", strip_prefix="model.")
    loaded = load_file(out)
    assert sorted(loaded) == ["l1.bias", "l1.weight", "out.weight"]
    assert_same_tree(_weights()["model"], {k: loaded[k] for k in _weights()["model"]})


@pytest.mark.parametrize("kind", ["safetensors", "torch_save", "torch_save_legacy"])
def test_import_roundtrip(tmp_path, kind):
    state = _weights()
    src = tmp_path / "src.bin"
    if kind == "safetensors":
        flat = {"a.weight": torch.randn(3, 5), "b": torch.arange(6, dtype=torch.int32)}
        save_file(flat, src)
        expected = flat
    else:
        expected = {k: v for k, v in state.items() if k != "tied"}
        torch.save(expected, src, _use_new_zipfile_serialization=(kind == "torch_save"))
    import_checkpoint(src, tmp_path / "dest")
    assert_same_tree(expected, ckptstore.load(tmp_path / "dest"))


@pytest.mark.parametrize("how", ["torch_save", "raw_pickle"])
def test_import_refuses_code_running_pickle(tmp_path, how):
    marker = tmp_path / "marker"
    src = tmp_path / "evil.pt"
    payload = {"weight": torch.zeros(2), "x": Evil(str(marker))}
    if how == "torch_save":
        torch.save(payload, src)
    else:
        src.write_bytes(pickle.dumps(payload))
    with pytest.raises(UnsafeCheckpointError, match="weights_only"):
        import_checkpoint(src, tmp_path / "dest")
    assert not marker.exists()  # the payload never ran
    assert not (tmp_path / "dest" / "manifest.json").exists()
    assert main(["import", str(src), str(tmp_path / "dest2")]) == 1
    assert not marker.exists()


def _dcp_save(state, where):
    import torch.distributed.checkpoint as dcp

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "no process group": a single-process save
        dcp.save(state, checkpoint_id=str(where))


def test_import_dcp(tmp_path):
    state = {"model": {"w": torch.randn(4, 3), "b": torch.zeros(2, dtype=torch.bfloat16)},
             "step": 11, "name": "run"}
    _dcp_save(state, tmp_path / "dcp")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import_checkpoint(tmp_path / "dcp", tmp_path / "dest", compression="none")
    assert_same_tree(state, ckptstore.load(tmp_path / "dest"))


def test_import_dcp_refuses_evil_metadata_and_items(tmp_path):
    marker = tmp_path / "marker"
    _dcp_save({"w": torch.ones(2)}, tmp_path / "dcp")
    (tmp_path / "dcp" / ".metadata").write_bytes(pickle.dumps(Evil(str(marker))))
    with pytest.raises(UnsafeCheckpointError, match="builtins.exec"):
        import_checkpoint(tmp_path / "dcp", tmp_path / "dest")
    assert not marker.exists()
    _dcp_save({"w": torch.ones(2), "obj": Evil(str(marker))}, tmp_path / "dcp2")
    with pytest.raises(UnsafeCheckpointError, match="obj"):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            import_checkpoint(tmp_path / "dcp2", tmp_path / "dest2")
    assert not marker.exists()


def test_diff_by_hash(tmp_path):
    a, b, c = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    state = _weights()
    ckptstore.save(state, a, blocking=True)
    state2 = _weights()
    state2["model"]["l1.bias"][0] += 1  # changed content
    del state2["model"]["out.weight"]  # removed
    state2["model"]["extra"] = torch.ones(2)  # added
    state2["optim"]["state"][0]["exp_avg"] = state2["optim"]["state"][0]["exp_avg"].double()
    state2["step"] = 5
    ckptstore.save(state2, b, blocking=True)
    r = diff(a, b)
    assert r.added == ("model.extra",) and r.removed == ("model.out.weight",)
    changed = dict(r.changed)
    assert set(changed) == {"model.l1.bias", "optim.state.0.exp_avg", "step"}
    assert "dtype" in changed["optim.state.0.exp_avg"] and "content" in changed["model.l1.bias"]
    assert r.same == 3 and not r.identical  # model.l1.weight, optim.lr, tied
    # same content, different chunking and compression: digests differ, content does not
    ckptstore.save(state, c, blocking=True, chunk_size=64, compression="none")
    assert diff(a, c).identical
    assert main(["diff", str(a), str(c)]) == 0
    assert main(["diff", str(a), str(b)]) == 1


def test_cli_export_import_diff_json(ckpt, tmp_path, capsys):
    out = tmp_path / "w.safetensors"
    assert main(["export", str(ckpt), str(out), "--keys", "model.", "--strip-prefix", "model.",
                 "--json"]) == 0
    payload = json.loads(capsys.readouterr().out)
    assert sorted(payload["tensors"]) == ["l1.bias", "l1.weight", "out.weight"]
    assert main(["import", str(out), str(tmp_path / "back")]) == 0
    assert_same_tree(load_file(out), ckptstore.load(tmp_path / "back"))
    capsys.readouterr()
    assert main(["diff", str(ckpt), str(tmp_path / "back"), "--json"]) == 1
    report = json.loads(capsys.readouterr().out)
    assert "l1.weight" in report["added"] and "model.l1.weight" in report["removed"]
    assert main(["diff", str(ckpt), str(tmp_path / "nothing")]) == 2
