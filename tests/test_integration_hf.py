"""Hugging Face interop against the real transformers (CPU, tiny models): export a
checkpoint as a folder that ``from_pretrained`` loads, import ``save_pretrained``
folders, and the CLI's exit codes and messages."""
from __future__ import annotations

import json
import os

import pytest
import torch

transformers = pytest.importorskip("transformers")

from conftest import assert_same_tree  # noqa: E402
from safetensors import safe_open  # noqa: E402

import ckptstore  # noqa: E402
from ckptstore.errors import CheckpointExistsError, CheckpointNotFoundError, CorruptCheckpointError  # noqa: E402
from ckptstore.interop import hf as hf_mod  # noqa: E402
from ckptstore.interop.convert import import_checkpoint  # noqa: E402
from ckptstore.interop.hf import export_hf, hf_metadata  # noqa: E402
from ckptstore.interop.select import InteropUsageError  # noqa: E402


def _cli(argv):
    from ckptstore.cli.main import main

    return main(argv)


def _model(arch: str, tied: bool):
    torch.manual_seed(0)
    if arch == "gpt2":
        cfg = transformers.GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=128, n_positions=64,
                                      bos_token_id=0, eos_token_id=0, tie_word_embeddings=tied)
        model = transformers.GPT2LMHeadModel(cfg)
    else:
        cfg = transformers.LlamaConfig(num_hidden_layers=2, hidden_size=32, intermediate_size=64,
                                       num_attention_heads=4, num_key_value_heads=2, vocab_size=128,
                                       max_position_embeddings=64, bos_token_id=0, eos_token_id=0,
                                       tie_word_embeddings=tied)
        model = transformers.LlamaForCausalLM(cfg)
    with torch.no_grad():  # make every parameter distinct (some start as ones/zeros)
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.01)
    return model.eval()


def _weight_names(folder) -> set[str]:
    names: set[str] = set()
    for f in os.listdir(folder):
        if f.endswith(".safetensors"):
            with safe_open(os.path.join(folder, f), "pt") as st:
                names |= set(st.keys())
    return names


def _same_model(a, b) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sorted(sa) == sorted(sb)
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k
    ids = torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(a(ids).logits, b(ids).logits)


@pytest.mark.parametrize("arch,tied,prefixed", [("gpt2", True, True), ("gpt2", True, False),
                                                ("llama", False, True), ("llama", True, False)])
def test_export_hf_loads_bit_equal(tmp_path, arch, tied, prefixed):
    model = _model(arch, tied)
    sd = model.state_dict()
    state = {"model": sd, "optim": {"step": torch.tensor(3.0)}, "step": 3} if prefixed else sd
    ckptstore.save(state, tmp_path / "c", blocking=True, metadata=hf_metadata(model))
    seen = []
    res = export_hf(tmp_path / "c", tmp_path / "out", progress=seen.append)
    assert ("'model'" in res.selection and "optim" in res.selection) == prefixed
    assert res.config_from == "metadata" and res.files == ("model.safetensors",)
    assert sum(seen) == sum(t.numel() * t.element_size() for n, t in sd.items()
                            if n not in dict(res.tied))
    loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    _same_model(model, loaded)
    written = _weight_names(tmp_path / "out")
    head, embed = ("lm_head.weight", "transformer.wte.weight" if arch == "gpt2" else "model.embed_tokens.weight")
    if tied:  # stored once, under the embedding's name; from_pretrained re-tied it
        assert res.tied == ((head, embed),)
        assert written == set(sd) - {head}
        assert loaded.lm_head.weight is loaded.get_input_embeddings().weight
    else:
        assert res.tied == () and written == set(sd)
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["model_type"] == arch and config["architectures"] == [type(model).__name__]
    generation = json.loads((tmp_path / "out" / "generation_config.json").read_text())
    assert generation == model.generation_config.to_dict() | {"transformers_version": generation.get(
        "transformers_version")}
    # the kept name came from the model class (built on the meta device), not from tree order
    assert hf_mod._tied_targets(config) == ({head} if tied else set())


def test_export_hf_sharded_and_config_flag(tmp_path):
    model = _model("llama", False)
    ckptstore.save({"model": model.state_dict()}, tmp_path / "c", blocking=True)  # no metadata
    with pytest.raises(InteropUsageError, match="--config"):
        export_hf(tmp_path / "c", tmp_path / "x")
    model.config.save_pretrained(tmp_path / "cfg")
    res = export_hf(tmp_path / "c", tmp_path / "out", config=tmp_path / "cfg" / "config.json",
                    max_shard_size="20KB")
    assert res.config_from == "--config" and len(res.files) > 2
    index = json.loads((tmp_path / "out" / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(model.state_dict())
    assert sorted(set(index["weight_map"].values())) == sorted(res.files)
    assert all((tmp_path / "out" / f).stat().st_size < 20_000 + 2_000 for f in res.files)
    assert not (tmp_path / "out" / "model.safetensors").exists()
    _same_model(model, transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out"))


def test_export_hf_writes_an_untied_alias_as_a_copy(tmp_path):
    """An alias the model does not tie (tie_word_embeddings=False) is written under
    both names, or from_pretrained would initialise the missing one at random."""
    model = _model("llama", False)
    sd = model.state_dict()
    sd["lm_head.weight"] = sd["model.embed_tokens.weight"]
    ckptstore.save(sd, tmp_path / "c", blocking=True, metadata=hf_metadata(model))
    res = export_hf(tmp_path / "c", tmp_path / "out")
    assert res.tied == () and "lm_head.weight" in _weight_names(tmp_path / "out")
    loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    assert torch.equal(loaded.lm_head.weight, sd["model.embed_tokens.weight"])
    assert loaded.lm_head.weight is not loaded.model.embed_tokens.weight


def test_export_hf_is_atomic(tmp_path, monkeypatch):
    model = _model("gpt2", True)
    ckptstore.save(model.state_dict(), tmp_path / "c", blocking=True, metadata=hf_metadata(model))
    calls = []
    real = hf_mod.atomic_write

    def crash_on_second(storage, name, chunks, **kw):
        calls.append(name)
        if len(calls) == 2:
            raise OSError("disk full")
        return real(storage, name, chunks, **kw)

    monkeypatch.setattr(hf_mod, "atomic_write", crash_on_second)
    with pytest.raises(OSError, match="disk full"):
        export_hf(tmp_path / "c", tmp_path / "out", max_shard_size="20KB")
    assert sorted(os.listdir(tmp_path)) == ["c"]  # no OUT, no temporary sibling left
    monkeypatch.setattr(hf_mod, "atomic_write", real)
    export_hf(tmp_path / "c", tmp_path / "out")
    with pytest.raises(CheckpointExistsError):
        export_hf(tmp_path / "c", tmp_path / "out")
    export_hf(tmp_path / "c", tmp_path / "out", max_shard_size="20KB", overwrite=True)
    assert sorted(os.listdir(tmp_path)) == ["c", "out"]
    assert (tmp_path / "out" / "model.safetensors.index.json").exists()
    assert not (tmp_path / "out" / "model.safetensors").exists()


def test_export_hf_to_an_object_store(tmp_path):
    """No rename on object stores: every file is written whole, config.json last;
    an overwrite removes the weight files of the export it replaces."""
    import fsspec

    ckptstore.save({"a.weight": torch.randn(30, 30), "b.weight": torch.randn(30, 30)},
                   tmp_path / "c", blocking=True)
    url = f"memory://hf-export-{os.getpid()}/out"
    export_hf(tmp_path / "c", url, config={"model_type": "gpt2"}, max_shard_size="4KB")
    fs = fsspec.filesystem("memory")
    names = sorted(p.rsplit("/", 1)[1] for p in fs.ls(url.removeprefix("memory://"), detail=False))
    assert names == ["config.json", "model-00001-of-00002.safetensors",
                     "model-00002-of-00002.safetensors", "model.safetensors.index.json"]
    with pytest.raises(CheckpointExistsError):
        export_hf(tmp_path / "c", url, config={"model_type": "gpt2"})
    export_hf(tmp_path / "c", url, config={"model_type": "gpt2"}, overwrite=True)
    names = sorted(p.rsplit("/", 1)[1] for p in fs.ls(url.removeprefix("memory://"), detail=False))
    assert names == ["config.json", "model.safetensors"]
    fs.rm(url.removeprefix("memory://"), recursive=True)


@pytest.mark.parametrize("how", ["single", "sharded", "index_path"])
def test_import_save_pretrained(tmp_path, how, monkeypatch):
    from ckptstore.interop import convert

    monkeypatch.setattr(convert, "IMPORT_STAGING", 16 << 10)  # stream through a small staging ring
    model = _model("gpt2", True)
    src = tmp_path / "pretrained"
    model.save_pretrained(src, max_shard_size="20KB" if how != "single" else "5GB")
    assert (src / "model.safetensors.index.json").exists() == (how != "single")
    arg = src / "model.safetensors.index.json" if how == "index_path" else src
    seen = []
    res = import_checkpoint(arg, tmp_path / "ck", progress=seen.append)
    assert res.format == "hf" and sum(seen) > res.nbytes > 0
    sd = {k: v for k, v in model.state_dict().items() if k != "lm_head.weight"}  # tied: saved once
    loaded = ckptstore.load(tmp_path / "ck")
    assert sorted(loaded) == sorted(sd)
    assert_same_tree(sd, {k: loaded[k] for k in sd})
    meta = ckptstore.open(tmp_path / "ck").metadata
    assert meta["hf_config"] == json.loads((src / "config.json").read_text())
    assert meta["hf_generation_config"] == json.loads((src / "generation_config.json").read_text())
    # and back: an equivalent folder
    export_hf(tmp_path / "ck", tmp_path / "back")
    assert json.loads((tmp_path / "back" / "config.json").read_text()) == meta["hf_config"]
    assert _weight_names(tmp_path / "back") == _weight_names(src)
    _same_model(model, transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "back"))


def test_import_names_what_it_looked_for(tmp_path, capsys):
    """A JSON file used to reach torch.load and be refused as 'needing arbitrary
    unpickling'; a folder without weights named only DCP's .metadata."""
    (tmp_path / "config.json").write_text('{"model_type": "gpt2"}')
    (tmp_path / "empty").mkdir()
    for src in (tmp_path / "config.json", tmp_path / "empty"):
        with pytest.raises(CheckpointNotFoundError) as err:
            import_checkpoint(src, tmp_path / "dest")
        assert "model.safetensors.index.json" in str(err.value) and "unpickl" not in str(err.value)
        assert _cli(["import", str(src), str(tmp_path / "dest")]) == 2
        assert "model.safetensors" in capsys.readouterr().err
    assert not (tmp_path / "dest").exists()


def test_cli_export_hf_exit_codes_and_json(tmp_path, capsys):
    model = _model("gpt2", True)
    sd = model.state_dict()
    ckptstore.save({"model": sd, "ema": sd, "optim": {"x": torch.ones(2)}}, tmp_path / "c",
                   blocking=True, metadata=hf_metadata(model))
    out = str(tmp_path / "out")
    for argv in (["--keys", "nope."], ["--keys", "nope.", "--format", "safetensors"], []):
        assert _cli(["export", str(tmp_path / "c"), out, "--format", "hf", *argv]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "--keys model." in err, err
    assert not os.path.exists(out)
    assert _cli(["export", str(tmp_path / "c"), out, "--format", "hf", "--keys", "ema.",
                 "--strip-prefix", "ema.", "--json"]) == 0
    payload = json.loads(capsys.readouterr().out)
    assert payload["format"] == "hf" and payload["files"] == ["model.safetensors"]
    assert payload["tied"] == {"lm_head.weight": "transformer.wte.weight"}
    assert sorted(payload["tensors"]) == sorted(set(sd) - {"lm_head.weight"})
    _same_model(model, transformers.AutoModelForCausalLM.from_pretrained(out))
    assert _cli(["import", out, str(tmp_path / "back"), "--json"]) == 0
    payload = json.loads(capsys.readouterr().out)
    assert payload["format"] == "hf" and payload["metadata_keys"] == ["hf_config", "hf_generation_config"]
    assert payload["tensors"] == len(sd) - 1


def test_cli_diff_says_how_it_compares(tmp_path, capsys):
    sd = {"w": torch.randn(4, 4), "b": torch.zeros(4)}
    ckptstore.save(sd, tmp_path / "a", blocking=True)
    sd["b"] = sd["b"] + 1
    ckptstore.save(sd, tmp_path / "b", blocking=True)
    assert _cli(["diff", str(tmp_path / "a"), str(tmp_path / "b")]) == 1
    text = capsys.readouterr().out
    assert "~ b: content differs" in text and "content hashes in the two manifests" in text
    assert "--deep reads and compares the data" in text
    assert _cli(["diff", str(tmp_path / "a"), str(tmp_path / "b"), "--deep", "--json"]) == 1
    report = json.loads(capsys.readouterr().out)
    assert report["compared_by"] == "data" and report["tensors_read"] == 2
    assert [c["name"] for c in report["changed"]] == ["b"]
    assert _cli(["diff", str(tmp_path / "a"), str(tmp_path / "a"), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["compared_by"] == "manifest content hashes" and report["tensors_read"] == 0


@pytest.mark.parametrize("tree,chosen", [
    ({"w.weight": 1, "rng": "r", "step": 3}, ""),
    ({"model": {"w.weight": 1}, "optim": {"state": {0: {"m": 2}}}, "rng": "r"}, "model"),
    ({"state_dict": {"w.weight": 1}, "optimizer_states": [{"m": 2}], "lr_schedulers": [{"x": 2}]},
     "state_dict"),
    ({"model": {"w.weight": 1}, "ema": {"w.weight": 2}}, None),
    ({"model": {"w.weight": 1}, "extra": 2}, None),
])
def test_model_subtree_is_chosen_or_refused(tmp_path, tree, chosen):
    from ckptstore.interop.select import select

    tensors = {1: torch.ones(2), 2: torch.zeros(3)}

    def build(node):
        if isinstance(node, dict):
            return {k: build(v) for k, v in node.items()}
        if isinstance(node, list):
            return [build(v) for v in node]
        return torch.get_rng_state() if node == "r" else tensors.get(node, node) if isinstance(node, int) else node

    ckptstore.save(build(tree), tmp_path / "c", blocking=True)
    ckpt = ckptstore.open(tmp_path / "c")
    if chosen is None:
        with pytest.raises(InteropUsageError, match=r"pass --keys \w+\. --strip-prefix \w+\. or --keys"):
            select(ckpt, auto=True)
        return
    sel = select(ckpt, auto=True)
    assert sel.prefix == chosen and [e.out for e in sel.entries] == ["w.weight"]


def test_import_pytorch_model_bin_folder(tmp_path):
    """Older folders (pytorch_model.bin) are read with torch.load(weights_only=True)."""
    model = _model("llama", False)
    sd = model.state_dict()
    (tmp_path / "old").mkdir()
    torch.save(sd, tmp_path / "old" / "pytorch_model.bin")
    model.config.save_pretrained(tmp_path / "old")
    res = import_checkpoint(tmp_path / "old", tmp_path / "ck")
    assert res.format == "hf" and res.metadata_keys == ("hf_config",)
    loaded = ckptstore.load(tmp_path / "ck")
    assert_same_tree(dict(sd), {k: loaded[k] for k in sd})
    export_hf(tmp_path / "ck", tmp_path / "new")
    _same_model(model, transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "new"))
    torch.save({"w": torch.ones(1), "bad": Exception("not a tensor")}, tmp_path / "old" / "pytorch_model.bin")
    with pytest.raises(CorruptCheckpointError, match="weights_only|state dict"):
        import_checkpoint(tmp_path / "old", tmp_path / "ck2")
