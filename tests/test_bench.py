"""Smoke test of ``python -m bench``: every mode at a tiny size, fields and arithmetic only.

No timing is asserted: targets are reported by the benchmark, never tested.
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch

import bench.state
from bench import cli, report
from bench.common import paired_ratio
from bench.timing import Stat, parse_size, parse_sizes

SIZE = "2M"


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Private cache dir and a 10-step training run, so the test stays fast."""
    root = tmp_path_factory.mktemp("bench")
    mp = pytest.MonkeyPatch()
    mp.setenv("CKPTSTORE_BENCH_CACHE", str(root / "cache"))
    mp.setattr(bench.state, "TRAIN_STEPS", 10)
    yield root
    mp.undo()


def _run(env: Path, *args: str) -> dict[str, Any]:
    out = env / f"{args[0]}.json"
    rep = cli.run([*args, "--size", SIZE, "--repeat", "1", "--dir", str(env / "work"), "--json", str(out)])
    on_disk = json.loads(out.read_text())
    assert on_disk["mode"] == args[0] and on_disk["results"]
    assert on_disk["machine"]["cores"] >= 1 and on_disk["command"].startswith("python -m bench")
    return rep


def _close(a: float, b: float) -> bool:
    return math.isclose(a, b, rel_tol=1e-9)


def _check_targets(rep: dict[str, Any]) -> None:
    assert rep["targets"]
    for t in rep["targets"]:
        assert {"target", "where", "value", "threshold", "pass", "margin"} <= t.keys()
        if t["pass"] is not None:
            assert t["pass"] == (t["value"] <= t["threshold"] if t["op"] == "<=" else t["value"] >= t["threshold"])


def test_parse_and_stats() -> None:
    assert parse_size("64M") == 64 << 20 and parse_size("1G") == 1 << 30 and parse_size("4096") == 4096
    assert parse_sizes("64M,256M") == [64 << 20, 256 << 20]
    with pytest.raises(ValueError):
        parse_size("lots")
    s = Stat.of([3.0, 1.0, 2.0])
    assert (s.median, s.min, s.max, s.n) == (2.0, 1.0, 3.0, 3)
    r = paired_ratio([2.0, 6.0, 3.0], [1.0, 2.0, 3.0])
    assert r == {"median": 2.0, "min": 1.0, "max": 3.0, "n": 3}


def test_state_is_trained_and_sized(env: Path) -> None:
    st = bench.state.load_state(parse_size(SIZE), "bf16")
    assert abs(st.nbytes - parse_size(SIZE)) / parse_size(SIZE) < 0.05
    assert all(t.dtype == torch.bfloat16 for k, t in st.flat.items() if not k.endswith("/step"))
    tree = st.tree()
    assert set(tree) == {"model", "optim", "step"} and tree["optim"]["param_groups"][0]["params"]
    assert all(t.float().pow(2).mean() > 0 for t in st.flat.values())


def test_write(env: Path) -> None:
    png = env / "write.png"
    rep = _run(env, "write", "--modes", "none,zstd-1+bg", "--plot", str(png))
    res = rep["results"][0]
    ms, n = res["measurements"], res["size"]
    assert res["engine_unavailable"] is None
    assert {"memcpy", "disk", "torch.save", "safetensors", "dcp.save", "dcp.async_save",
            "ckptstore none", "ckptstore zstd-1+bg"} <= ms.keys()
    for name, m in ms.items():
        assert m["total"]["median"] > 0, name
        assert _close(m["gbps"]["median"], n / 1e9 / m["total"]["median"])
    assert ms["disk"]["read_cold"]["median"] > 0 and ms["disk"]["read_warm"]["median"] > 0
    none, z = ms["ckptstore none"], ms["ckptstore zstd-1+bg"]
    assert 0 < none["stall"]["median"] <= none["total"]["median"]
    assert 0.9 < none["ratio_stored"] < 1.2 and 0 < z["ratio_stored"] < none["ratio_stored"]
    assert none["memory"]["peak_tree_pss"] > 0
    r = res["ratios"]["ckptstore none"]
    assert _close(r["durable/disk_write"]["median"], ms["disk"]["total"]["median"] / none["total"]["median"])
    assert _close(r["stall/memcpy"]["median"], none["stall"]["median"] / ms["memcpy"]["total"]["median"])
    assert _close(r["vs safetensors"]["median"], ms["safetensors"]["total"]["median"] / none["total"]["median"])
    _check_targets(rep)
    assert png.stat().st_size > 1000


def test_load(env: Path) -> None:
    rep = _run(env, "load", "--modes", "none", "--peers", "none")
    res = rep["results"][0]
    assert res["roundtrip_identical"] == {"none": True}
    ms = res["measurements"]
    for name in ("disk read", "safetensors load_file", "ckptstore none verify=on", "ckptstore none verify=off"):
        assert ms[name]["cold"]["median"] > 0 and ms[name]["warm"]["median"] > 0, name
    r = res["ratios"]["ckptstore none verify=on"]
    assert _close(r["cold/disk_cold_read"]["median"],
                  ms["disk read"]["cold"]["median"] / ms["ckptstore none verify=on"]["cold"]["median"])
    _check_targets(rep)


def test_compress(env: Path) -> None:
    rep = _run(env, "compress", "--dtype", "fp32,bf16")
    for res in rep["results"]:
        assert set(res["kinds"]) == {"weights", "exp_avg", "exp_avg_sq"}
        for k in res["kinds"].values():
            for codec in ("zstd-1", "zstd-3", "lz4"):
                assert 0 < k[codec]["grouped"] <= 1.0 and 0 < k[codec]["plain"] <= 1.0
            # trained floats: only the sign/exponent plane compresses, so grouping helps
            assert k["zstd-1"]["grouped"] < k["zstd-1"]["plain"]
            assert k["zstd-1"]["per_plane"][-1] < 0.8
    _check_targets(rep)


def test_train(env: Path) -> None:
    rep = cli.run(["train", "--size", SIZE, "--repeat", "1", "--steps", "4", "--every", "2",
                   "--dir", str(env / "work")])
    res = rep["results"][0]
    assert res["mean_step_base"]["median"] > 0 and res["mean_step_ckpt"]["median"] > 0
    assert _close(res["overhead"]["median"], res["mean_step_ckpt"]["median"] / res["mean_step_base"]["median"] - 1)
    assert any(s["saves"] == 2 for s in res["segments"] if s["which"] == "ckpt")
    _check_targets(rep)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message shown without CUDA")
def test_gpu_without_cuda_fails_clearly(env: Path) -> None:
    with pytest.raises(SystemExit, match="CUDA"):
        cli.run(["write", "--gpu", "--size", SIZE, "--dir", str(env / "work")])


def test_meta(env: Path) -> None:
    """The metadata benchmark runs the real commit and reads at two world sizes."""
    rep = cli.run(["meta", "--ranks", "2,6", "--tensors", "12", "--dir", str(env / "work")])
    rows = {r["ranks"]: r for r in rep["results"]}
    assert sorted(rows) == [2, 6]
    for r in rows.values():
        assert r["commit_s"] > 0 and r["manifest_bytes"] > 0 and r["dcp_bytes"] > 0
        assert r["all_indexes_s"] > 0 and r["own_boxes_s"] > 0 and r["train_overhead"] > 0
    assert rows[6]["gathered_bytes"] > rows[2]["gathered_bytes"]
    assert {t["target"] for t in rep["targets"]} >= {"rank-0 commit s", "manifest MB"}
    assert "rank-0 commit s" in report.render(rep)
