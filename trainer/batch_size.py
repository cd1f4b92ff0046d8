"""``--find-batch-size``: the largest per-GPU micro-batch whose training step fits in memory."""

from __future__ import annotations

import logging

import torch

from .config import TrainConfig
from .train import DistContext, autocast, build_parts

log = logging.getLogger(__name__)


def _step_fits(parts, ctx: DistContext, batch: int) -> tuple[bool, float]:
    """Run one full step (forward, backward, optimizer) at ``batch``; report fit and peak GiB."""
    cfg, model = parts.cfg, parts.model
    seq, vocab = cfg.model_dims()["seq_len"], cfg.model_dims()["vocab_size"]
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(ctx.device)
    try:
        x = torch.randint(0, vocab, (batch, seq), device=ctx.device)
        with autocast(cfg, ctx.device):
            _, loss = model(x, x)
        parts.scaler.scale(loss).backward()
        parts.scaler.step(parts.optimizer)  # allocates the optimizer state on the first try
        parts.scaler.update()
        ok = True
    except torch.OutOfMemoryError:
        ok = False
    parts.optimizer.zero_grad(set_to_none=True)
    peak = torch.cuda.max_memory_allocated(ctx.device) / 2**30
    torch.cuda.empty_cache()
    return ok, peak


def find_batch_size(cfg: TrainConfig, ctx: DistContext, limit: int = 1 << 14) -> int:
    """Double the batch until a step runs out of memory, then bisect; return the largest fit."""
    if ctx.device.type != "cuda":
        raise RuntimeError("--find-batch-size needs a GPU: on CPU memory is not a hard limit "
                           "(the step swaps or the OOM killer ends the process); run it on a CUDA machine")
    parts = build_parts(cfg, ctx)
    good, bad = 0, None
    batch = 1
    while batch <= limit:
        ok, peak = _step_fits(parts, ctx, batch)
        print(f"batch {batch:>6}: {'fits' if ok else 'OOM '} (peak {peak:.2f} GiB)", flush=True)
        if not ok:
            bad = batch
            break
        good, batch = batch, batch * 2
    while bad is not None and bad - good > 1:
        mid = (good + bad) // 2
        ok, peak = _step_fits(parts, ctx, mid)
        print(f"batch {mid:>6}: {'fits' if ok else 'OOM '} (peak {peak:.2f} GiB)", flush=True)
        good, bad = (mid, bad) if ok else (good, mid)
    if good == 0:
        raise RuntimeError("even batch 1 does not fit; try --remat full, --amp bf16 or more ranks")
    return good
