"""``write`` mode: stall and time-to-durable of ckptstore against limits and peers.

Per size and dtype, every repeat runs each measurement once, in a rotated order
(limits, peers, ckptstore modes interleaved), so slow phases of a noisy shared
machine hit all of them alike. Ratios are medians of per-repeat paired ratios.
"""
from __future__ import annotations

import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench import engine
from bench.common import Options, Series, fresh, paired_ratio, rotated, sampled
from bench.limits import (
    CacheDropper,
    DiskRead,
    MemcpyLimit,
    dir_bytes,
    disk_write,
    disk_write_direct,
    resident_fraction,
    scratch_buffer,
)
from bench.peers import PEERS
from bench.state import BenchState, describe, load_state, small_state

log = logging.getLogger("bench")

Op = tuple[str, str, Callable[[], dict[str, float]]]


def select_peers(spec: str) -> dict[str, Any]:
    """``all``, ``none`` or a comma list of peer names."""
    if spec == "all":
        return dict(PEERS)
    if spec in ("", "none"):
        return {}
    names = [p.strip() for p in spec.split(",") if p.strip()]
    bad = [n for n in names if n not in PEERS]
    if bad:
        raise ValueError(f"unknown peers {bad}; choose from {', '.join(PEERS)}")
    return {n: PEERS[n] for n in names}


def disk_op(views_src: DiskRead, scratch_views: list[memoryview], path: Path,
            dropper: CacheDropper) -> dict[str, float]:
    """fsync'd sequential write, then cold read (cache dropped) and warm read."""
    fresh(path)
    w = disk_write(path, scratch_views)
    dropper.drop(path)
    resident = resident_fraction(path)
    cold = views_src.run(path)
    warm = views_src.run(path)
    fresh(path)
    return {"total": w, "read_cold": cold, "read_warm": warm,
            "resident_after_drop": resident if resident is not None else -1.0}


def direct_op(view: memoryview, path: Path) -> dict[str, float]:
    """The O_DIRECT write limit (several requests in flight), or nothing where refused."""
    fresh(path)
    t = disk_write_direct(path, view)
    fresh(path)
    return {} if t is None else {"total": t}


def run_one(st: BenchState, opt: Options, dropper: CacheDropper) -> dict[str, Any]:
    """All write measurements for one state."""
    nbytes = st.nbytes
    tensors = list(st.flat.values())
    tree = st.tree()
    work = Path(opt.dir) / f"write-{os.getpid()}"
    work.mkdir(parents=True, exist_ok=True)
    scratch = scratch_buffer(nbytes, pinned=opt.gpu)
    memcpy = MemcpyLimit(tensors, scratch)
    reader = DiskRead(scratch)
    scratch_views = [memoryview(scratch.numpy())]

    ops: list[Op] = [
        ("memcpy" if not opt.gpu else "pinned D2H", "limit", memcpy.measure),
        ("disk", "limit", lambda: disk_op(reader, scratch_views, work / "disk.bin", dropper)),
        ("disk O_DIRECT", "limit", lambda: direct_op(scratch_views[0], work / "direct.bin")),
    ]
    for name, fn in select_peers(opt.peers).items():
        dest = work / name.replace("(", "_").replace(")", "").replace("=", "")
        ops.append((name, "peer", lambda fn=fn, dest=dest: fn(st, fresh(dest))))

    series: dict[str, Series] = {}
    why = engine.engine_available()
    modes = engine.parse_modes(opt.modes) if why is None else []
    for m in modes:
        dest = work / f"ckpt-{m.name}"
        ops.append((f"ckptstore {m.name}", "ckptstore",
                    lambda m=m, dest=dest: _engine_save(tree, dest, m, opt)))
    first_save_memory = None
    if modes:
        # warm-up: staging buffers allocated and touched, writer processes started.
        # The first save is sampled: what it adds to the process tree is staging,
        # writers and transients, i.e. the engine's whole memory cost.
        first_save_memory = sampled(lambda: _engine_save(tree, work / f"ckpt-{modes[0].name}", modes[0], opt))
        for m in modes[1:]:
            _engine_save(tree, work / f"ckpt-{m.name}", m, opt)
            log.info("warm-up save %s done", m.name)

    for name, kind, _ in ops:
        series[name] = Series(kind, nbytes)
    for r in range(opt.repeat):
        for name, kind, fn in rotated(ops, r):
            rec = fn()
            series[name].add(rec)
            log.info("size %d %s r%d %s: %s", nbytes, st.dtype, r, name,
                     {k: round(v, 4) for k, v in rec.items() if isinstance(v, float)})
    # Memory is sampled in one extra, untimed run per writer: the sampler thread
    # reads /proc and holds the GIL, which would inflate the timed figures.
    for name, kind, fn in ops:
        if kind != "limit":
            series[name].meta["memory"] = sampled(fn)
    fresh(work)
    out = {"size": nbytes, "dtype": st.dtype, "state": describe(st), "state_info": st.info,
           "n_tensors": len(st.flat), "engine_unavailable": why, "first_save_memory": first_save_memory,
           "measurements": {k: s.summary() for k, s in series.items()}}
    out["ratios"] = ratios(series, opt)
    return out


def _engine_save(tree: dict[str, Any], dest: Path, mode: engine.Mode, opt: Options) -> dict[str, float]:
    fresh(dest)
    rec = engine.save(tree, dest, mode, opt.staging_budget)
    rec["physical_bytes"] = float(dir_bytes(dest))
    fresh(dest)
    return rec


def ratios(series: dict[str, Series], opt: Options) -> dict[str, Any]:
    """Paired per-repeat ratios against limits and peers."""
    out: dict[str, Any] = {}
    cp = series.get("pinned D2H" if opt.gpu else "memcpy")
    disk = series.get("disk")
    direct = series.get("disk O_DIRECT")
    peers = {k: s for k, s in series.items() if s.kind == "peer"}
    for name, s in series.items():
        if s.kind != "ckptstore":
            continue
        r: dict[str, Any] = {}
        if cp:
            r["stall/memcpy"] = paired_ratio(s.field("stall"), cp.field("total"))
            if s.field("copied"):
                r["copied/memcpy"] = paired_ratio(s.field("copied"), cp.field("total"))
        if disk:  # throughput ratio = time ratio inverted
            r["durable/disk_write"] = paired_ratio(disk.field("total"), s.field("total"))
        if direct and direct.field("total"):
            r["durable/disk_direct"] = paired_ratio(direct.field("total"), s.field("total"))
        for pn, ps in peers.items():
            r[f"vs {pn}"] = paired_ratio(ps.field("total"), s.field("total"))
            r[f"stall vs {pn}"] = paired_ratio(ps.field("stall"), s.field("stall"))
        out[name] = r
    for pn, ps in peers.items():
        if disk:
            out.setdefault(pn, {})["durable/disk_write"] = paired_ratio(disk.field("total"), ps.field("total"))
    return out


def run(opt: Options, dropper: CacheDropper) -> list[dict[str, Any]]:
    """The sweep: every dtype x size."""
    results = []
    for dtype in opt.dtypes:
        for size in opt.sizes:
            n = opt.extra.get("tensors")
            st = small_state(size, dtype, n) if n else load_state(size, dtype)
            if opt.gpu:
                st = st.to("cuda")
            log.info("write: %s", describe(st))
            results.append({"requested_size": size, **run_one(st, opt, dropper)})
            del st
    return results
