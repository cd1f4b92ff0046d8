"""Round-trip: every dtype, shape, container and leaf type, for every compression."""
from __future__ import annotations

import random
from collections import OrderedDict

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import ckptstore
from conftest import assert_same_tree

ALL_DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.float8_e4m3fn,
              torch.float8_e5m2, torch.float8_e4m3fnuz, torch.float8_e5m2fnuz, torch.float8_e8m0fnu,
              torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8, torch.uint16,
              torch.uint32, torch.uint64, torch.bool, torch.complex64, torch.complex128,
              torch.complex32]
MODES = ["none", "zstd", "lz4"]


def random_tensor(dtype: torch.dtype, shape: tuple, seed: int) -> torch.Tensor:
    """Random bytes of any dtype (bool kept to 0/1 so comparisons stay meaningful)."""
    g = torch.Generator().manual_seed(seed)
    out = torch.empty(shape, dtype=dtype)
    n = out.numel() * out.element_size()
    if n:
        raw = torch.randint(0, 2 if dtype == torch.bool else 256, (n,), dtype=torch.uint8, generator=g)
        torch.empty(0, dtype=torch.uint8).set_(out.untyped_storage(), 0, (n,), (1,)).copy_(raw)
    return out


shapes = st.lists(st.integers(0, 5), min_size=0, max_size=3).map(tuple)


@st.composite
def tensors(draw):
    dtype = draw(st.sampled_from(ALL_DTYPES))
    t = random_tensor(dtype, draw(shapes), draw(st.integers(0, 2**31)))
    if t.dim() >= 2 and draw(st.booleans()):
        t = t.transpose(0, 1)  # non-contiguous
    if t.numel() > 2 and draw(st.booleans()):
        t = t.reshape(-1)[1::2]  # strided view into a larger storage
    return t


leaf = st.one_of(
    tensors(), st.none(), st.booleans(), st.integers(-2**70, 2**70),
    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=8), st.binary(max_size=8),
    st.builds(lambda s: np.arange(s, dtype=np.int32).reshape(-1), st.integers(0, 5)),
    st.sampled_from([np.float64(1.5), np.int64(-3), torch.bfloat16]))
keys = st.one_of(st.text(max_size=6), st.integers(-3, 100))
trees = st.recursive(leaf, lambda kids: st.one_of(
    st.lists(kids, max_size=4), st.lists(kids, max_size=3).map(tuple),
    st.dictionaries(keys, kids, max_size=4),
    st.dictionaries(st.text(max_size=4), kids, max_size=3).map(OrderedDict)), max_leaves=12)


@pytest.mark.parametrize("mode", MODES)
@settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck))
@given(tree=trees)
def test_random_trees_roundtrip(tmp_path_factory, mode, tree):
    path = tmp_path_factory.mktemp("rt") / "ckpt"
    ckptstore.save({"t": tree}, path, compression=mode).wait()
    assert_same_tree({"t": tree}, ckptstore.load(path))


@pytest.mark.parametrize("mode", MODES)
def test_every_dtype_and_shape(tmp_path, mode):
    state = {}
    for i, dt in enumerate(ALL_DTYPES):
        for shape in [(), (0,), (3, 0), (7,), (5, 33), (2, 3, 4)]:
            state[f"{dt}-{shape}"] = random_tensor(dt, shape, i)
    ckptstore.save(state, tmp_path / "c", compression=mode).wait()
    assert_same_tree(state, ckptstore.load(tmp_path / "c"))


@pytest.mark.parametrize("mode", MODES)
def test_training_state_roundtrip(tmp_path, mode, small_state):
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    sched = torch.optim.lr_scheduler.StepLR(torch.optim.SGD([torch.zeros(1, requires_grad=True)], 0.1), 3)
    random.seed(3)
    np.random.seed(3)
    state = dict(small_state, scaler=scaler.state_dict(), sched=sched.state_dict(),
                 py_rng=random.getstate(), np_rng=np.random.get_state(),
                 config={"lr": 3e-4, "layers": [1, 2], "name": "gpt", "dtype": torch.bfloat16})
    ckptstore.save(state, tmp_path / "c", compression=mode, metadata={"run": "x"}).wait()
    back = ckptstore.load(tmp_path / "c")
    assert_same_tree(state, back)
    random.setstate(back["py_rng"])  # the restored RNG states are usable as such
    np.random.set_state(back["np_rng"])
    torch.set_rng_state(back["rng"])


def test_large_tensor_split_across_shards_and_chunks(tmp_path):
    big = torch.randn(300_000)  # 1.2 MB, with 64 KiB chunks and 256 KiB shards
    state = {"a": torch.arange(10), "big": big, "after": torch.ones(3)}
    for mode in MODES:
        ckptstore.save(state, tmp_path / mode, compression=mode, chunk_size=64 << 10,
                       shard_size=256 << 10).wait()
        assert_same_tree(state, ckptstore.load(tmp_path / mode))
    shards = [p for p in (tmp_path / "none").iterdir() if p.suffix == ".safetensors"]
    assert len(shards) >= 5


def test_shared_views_load_as_one_tensor(tmp_path):
    base = torch.randn(10)
    state = {"a": base, "b": base, "view": base[2:5]}
    ckptstore.save(state, tmp_path / "c").wait()
    back = ckptstore.load(tmp_path / "c")
    assert back["a"] is back["b"]
    assert torch.equal(back["view"], base[2:5])


def test_uncompressed_shards_are_safetensors(tmp_path, small_state):
    from safetensors import safe_open

    ckptstore.save(small_state, tmp_path / "c", compression="none").wait()
    seen = {}
    for p in (tmp_path / "c").glob("*.safetensors"):
        with safe_open(str(p), "pt") as f:
            for k in f.keys():
                seen[k] = f.get_tensor(k)
    assert torch.equal(seen["model.0.weight"], small_state["model"]["0.weight"])
    assert torch.equal(seen["bf16"], small_state["bf16"])
    assert torch.equal(seen["optim.state.0.exp_avg"], small_state["optim"]["state"][0]["exp_avg"])


def test_unsupported_leaf_is_refused_before_writing(tmp_path):
    with pytest.raises(ckptstore.UnsupportedTypeError):
        ckptstore.save({"fn": object()}, tmp_path / "c")
    assert not (tmp_path / "c").exists()
    with pytest.raises(TypeError):  # the builtin it resembles
        ckptstore.save({"arr": np.array([object()])}, tmp_path / "c")


def test_repeated_saves_of_one_structure_get_their_own_ids(tmp_path, small_state):
    """The layout of an unchanged tree is reused between saves; names and safetensors
    headers must still carry each save's own id."""
    import json as _json

    from safetensors import safe_open

    from ckptstore import manifest as fmt

    ids = []
    for i in range(3):
        small_state["step"] = i
        ckptstore.save(small_state, tmp_path / f"s{i}", compression="none").wait()
        m = fmt.decode((tmp_path / f"s{i}" / "manifest.json").read_bytes())
        ids.append(m.save_id)
        for f in m.files:
            assert m.save_id in f.name
            with safe_open(str(tmp_path / f"s{i}" / f.name), "pt") as sf:
                assert sf.metadata()["save_id"] == m.save_id
        assert_same_tree(small_state, ckptstore.load(tmp_path / f"s{i}"))
        assert _json.loads((tmp_path / f"s{i}" / "manifest.json").read_bytes())["save_id"] == m.save_id
    assert len(set(ids)) == 3
