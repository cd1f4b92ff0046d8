"""``train`` mode: mean step time with and without ckptstore.save every N steps.

Segments without and with checkpointing alternate (interleaved, like every other
measurement); the overhead is the median of per-repeat paired ratios minus one.
The previous save is waited for right before the next one, as a trainer would.
"""
from __future__ import annotations

import logging
import os
import statistics
import time
from pathlib import Path
from typing import Any

import torch

from bench import engine
from bench.common import Options, fresh, paired_ratio
from bench.model import GPT, GPTConfig, batches, corpus, make_optimizer
from bench.state import DTYPES
from bench.timing import Stat

log = logging.getLogger("bench")


def config_for(nbytes: int, dtype: str) -> GPTConfig:
    """A byte-level GPT whose weights + AdamW moments are about ``nbytes``."""
    params = nbytes // (3 * DTYPES[dtype].itemsize)
    d = 64
    for cand in (128, 256, 512, 1024):
        if 40 * cand * cand <= params:
            d = cand
    n_layer = max(1, (params - 1280 * d) // (12 * d * d))
    return GPTConfig(n_layer=n_layer, n_head=max(1, d // 64), n_embd=d, block_size=64, vocab_size=256)


class Trainer:
    """A tiny training loop whose state ckptstore snapshots."""

    def __init__(self, cfg: GPTConfig, dtype: str, device: str, batch: int = 4) -> None:
        torch.manual_seed(0)
        self.model = GPT(cfg).to(device=device, dtype=DTYPES[dtype])
        self.opt = make_optimizer(self.model)
        self.data = batches(corpus(1 << 20).to(device), batch, cfg.block_size, torch.Generator().manual_seed(0))
        self.device = device
        self.step = 0

    def train_step(self) -> float:
        t0 = time.perf_counter()
        x, y = next(self.data)
        loss = self.model(x, y)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()
        if self.device != "cpu":
            torch.cuda.synchronize()
        self.step += 1
        return time.perf_counter() - t0

    def state(self) -> dict[str, Any]:
        return {"model": self.model.state_dict(), "optim": self.opt.state_dict(), "step": self.step}

    def nbytes(self) -> int:
        n = sum(p.numel() * p.element_size() for p in self.model.parameters())
        return n + sum(t.numel() * t.element_size() for s in self.opt.state.values()
                       for t in s.values() if isinstance(t, torch.Tensor))


def segment(tr: Trainer, steps: int, every: int, work: Path | None, mode: engine.Mode) -> dict[str, Any]:
    """Run ``steps`` steps; with ``work`` set, save every ``every`` steps."""
    times: list[float] = []
    stalls: list[float] = []
    waits: list[float] = []
    handle = None
    k = 0
    for i in range(steps):
        extra = 0.0
        if work is not None and i % every == every - 1:
            t0 = time.perf_counter()
            if handle is not None:
                handle.wait()
            waits.append(time.perf_counter() - t0)
            import ckptstore
            dest = fresh(work / f"step-{k % 2}")
            k += 1
            if mode.writer_nice is not None:
                engine.set_writer_nice(mode.writer_nice)
            t1 = time.perf_counter()
            handle = ckptstore.save(tr.state(), str(dest), **mode.kwargs())
            stalls.append(time.perf_counter() - t1)
            extra = time.perf_counter() - t0
        times.append(tr.train_step() + extra)
    tail = 0.0
    if handle is not None:
        t0 = time.perf_counter()
        handle.wait()
        tail = time.perf_counter() - t0
    return {"mean_step": statistics.fmean(times), "saves": len(stalls),
            "stall": Stat.of(stalls).to_dict() if stalls else None,
            "wait_before_save": Stat.of(waits).to_dict() if waits else None, "final_wait": tail}


def run(opt: Options) -> list[dict[str, Any]]:
    """Every dtype x size: a baseline and a checkpointed segment per mode, interleaved
    (rotated order per repeat), so every mode meets the same noise."""
    device = "cuda" if opt.gpu else "cpu"
    modes = engine.parse_modes(opt.modes) if opt.modes != "all" else [engine.MODES["none"]]
    why = engine.engine_available()
    results = []
    for dtype in opt.dtypes:
        for size in opt.sizes:
            cfg = config_for(size, dtype)
            tr = Trainer(cfg, dtype, device)
            for _ in range(3):  # optimizer state exists, allocator warm
                tr.train_step()
            work = Path(opt.dir) / f"train-{os.getpid()}"
            work.mkdir(parents=True, exist_ok=True)
            if why is None:  # warm-up save: staging buffers allocated once
                for mode in modes:
                    segment(tr, opt.every, opt.every, work, mode)
            names = ["base"] + ([m.name for m in modes] if why is None else [])
            by_name = {m.name: m for m in modes}
            means: dict[str, list[float]] = {n: [] for n in names}
            segs: dict[str, list[dict[str, Any]]] = {n: [] for n in names}
            for r in range(opt.repeat):
                k = r % len(names)
                for which in names[k:] + names[:k]:
                    mode = by_name.get(which, modes[0])
                    seg = segment(tr, opt.steps, opt.every, None if which == "base" else work, mode)
                    seg["which"] = "base" if which == "base" else "ckpt"
                    seg["mode"] = None if which == "base" else which
                    segs[which].append(seg)
                    means[which].append(seg["mean_step"])
                    log.info("train %s r%d %s mean step %.4f s", dtype, r, which, seg["mean_step"])
            fresh(work)
            for mode in modes:
                ckpt = means.get(mode.name)
                res: dict[str, Any] = {
                    "size": tr.nbytes(), "requested_size": size, "dtype": dtype, "device": device,
                    "config": repr(cfg), "steps": opt.steps, "every": opt.every, "mode": mode.name,
                    "engine_unavailable": why, "segments": segs["base"] + segs.get(mode.name, []),
                    "mean_step_base": Stat.of(means["base"]).to_dict(),
                    "mean_step_ckpt": Stat.of(ckpt).to_dict() if ckpt else None,
                }
                ratio = paired_ratio(ckpt, means["base"]) if ckpt else None
                res["overhead"] = ({k: (v - 1.0 if k != "n" else v) for k, v in ratio.items()}
                                   if ratio else None)
                results.append(res)
    return results
