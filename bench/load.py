"""``load`` mode: ckptstore.load cold and warm, verify on and off, against disk reads.

Cold means the checkpoint's pages were dropped from the page cache first (see
``CacheDropper`` for how); warm means every file was then read into the page cache
with buffered reads (``_warm_cache``), for every loader alike. Peer:
``safetensors.torch.load_file`` with every page touched (it maps lazily).
"""
from __future__ import annotations

import gc
import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from bench import engine
from bench.common import Options, Series, fresh, paired_ratio, rotated, sampled
from bench.limits import (
    CacheDropper,
    DiskRead,
    MemcpyLimit,
    disk_write,
    read_fresh,
    resident_fraction,
    scratch_buffer,
)
from bench.state import BenchState, describe, load_state
from bench.timing import timed

log = logging.getLogger("bench")


def _touch_all(tensors: dict[str, torch.Tensor]) -> None:
    """Fault in every page of lazily mapped tensors (one byte per 4 KiB page)."""
    for t in tensors.values():
        b = t.reshape(-1).view(torch.uint8)
        if b.numel():
            b[::4096].sum()


def _warm_cache(path: Path) -> None:
    """Bring every file under ``path`` into the page cache with buffered reads, so
    that "warm" means cached for every loader alike (a loader that reads with
    O_DIRECT leaves nothing cached behind it)."""
    for f in ([path] if path.is_file() else sorted(q for q in path.rglob("*") if q.is_file())):
        with open(f, "rb", buffering=0) as fh:
            while fh.read(64 << 20):
                pass


def _cold_warm(dropper: CacheDropper, path: Path, fn: Callable[[], float]) -> dict[str, float]:
    dropper.drop(path)
    resident = resident_fraction(path)
    cold = fn()
    _warm_cache(path)
    warm = fn()
    return {"cold": cold, "warm": warm, "resident_after_drop": resident if resident is not None else -1.0}


def _engine_load(path: Path, verify: bool) -> float:
    def go() -> Any:
        _, out = engine.load(path, verify)
        # every page touched, as for the peer: a mapped tensor is only read when used
        _touch_all({k: v for k, v in engine.flatten(out).items() if isinstance(v, torch.Tensor)})
        return out
    t, out = timed(go)
    del out
    gc.collect()
    return t


def _st_load(path: Path) -> float:
    def go() -> None:
        _touch_all(load_file(str(path)))
    t, _ = timed(go)
    gc.collect()
    return t


def run_one(st: BenchState, opt: Options, dropper: CacheDropper) -> dict[str, Any]:
    """All load measurements for one state."""
    nbytes = st.nbytes
    work = Path(opt.dir) / f"load-{os.getpid()}"
    work.mkdir(parents=True, exist_ok=True)
    scratch = scratch_buffer(nbytes)
    memcpy = MemcpyLimit(list(st.flat.values()), scratch)
    reader = DiskRead(scratch)
    disk_path = work / "disk.bin"
    disk_write(disk_path, [memoryview(scratch.numpy())])
    st_path = work / "peer.safetensors"
    save_file({k.replace("/", "."): v for k, v in st.flat.items()}, str(st_path))

    ops: list[tuple[str, str, Callable[[], dict[str, float]]]] = [
        ("memcpy", "limit", lambda: {"warm": memcpy.run()}),
        ("disk read", "limit", lambda: _cold_warm(dropper, disk_path, lambda: reader.run(disk_path))),
        ("disk read into fresh memory", "limit",
         lambda: _cold_warm(dropper, disk_path, lambda: read_fresh(disk_path))),
        ("safetensors load_file", "peer", lambda: _cold_warm(dropper, st_path, lambda: _st_load(st_path))),
    ]
    why = engine.engine_available()
    roundtrip: dict[str, bool] = {}
    if why is None:
        tree = st.tree()
        for m in engine.parse_modes(opt.modes):
            dest = fresh(work / f"ckpt-{m.name}")
            engine.save(tree, dest, m, opt.staging_budget)
            _, loaded = engine.load(dest, verify=True)
            roundtrip[m.name] = engine.same_tensors(tree, loaded)
            del loaded
            for verify in (True, False):
                ops.append((f"ckptstore {m.name} verify={'on' if verify else 'off'}", "ckptstore",
                            lambda dest=dest, verify=verify: _cold_warm(
                                dropper, dest, lambda: _engine_load(dest, verify))))
    series = {name: Series(kind, nbytes) for name, kind, _ in ops}
    for r in range(opt.repeat):
        for name, _, fn in rotated(ops, r):
            rec = fn()
            series[name].add(rec)
            log.info("load %d %s r%d %s: %s", nbytes, st.dtype, r, name,
                     {k: round(v, 4) for k, v in rec.items() if isinstance(v, float)})
    for name, kind, fn in ops:  # memory from one extra untimed run (see write.py)
        if kind != "limit":
            series[name].meta["memory"] = sampled(fn)
    fresh(work)
    out = {"size": nbytes, "dtype": st.dtype, "state": describe(st), "n_tensors": len(st.flat),
           "engine_unavailable": why, "roundtrip_identical": roundtrip,
           "measurements": {k: _summary(s) for k, s in series.items()}}
    out["ratios"] = ratios(series)
    return out


def _summary(s: Series) -> dict[str, Any]:
    out = s.summary()
    for f in ("cold", "warm"):
        vals = s.field(f)
        if vals:
            from bench.timing import gbps
            out[f"{f}_gbps"] = gbps(s.nbytes, vals).to_dict()
    return out


def ratios(series: dict[str, Series]) -> dict[str, Any]:
    """Load throughput over disk read (cold) and over warm read / memcpy (warm)."""
    disk, cp = series["disk read"], series["memcpy"]
    fresh_mem = series.get("disk read into fresh memory")
    out: dict[str, Any] = {}
    for name, s in series.items():
        if s.kind == "limit":
            continue
        out[name] = {
            "cold/disk_cold_read": paired_ratio(disk.field("cold"), s.field("cold")),
            "cold/disk_cold_read_fresh": (paired_ratio(fresh_mem.field("cold"), s.field("cold"))
                                          if fresh_mem else None),
            "warm/disk_warm_read": paired_ratio(disk.field("warm"), s.field("warm")),
            "warm/memcpy": paired_ratio(cp.field("warm"), s.field("warm")),
        }
    return out


def run(opt: Options, dropper: CacheDropper) -> list[dict[str, Any]]:
    """The sweep: every dtype x size."""
    results = []
    for dtype in opt.dtypes:
        for size in opt.sizes:
            st = load_state(size, dtype)
            log.info("load: %s", describe(st))
            results.append({"requested_size": size, **run_one(st, opt, dropper)})
            del st
    return results
