"""The training loop: FSDP2 (or a single process), AMP, remat, AdamW + warmup/cosine,
gradient accumulation and clipping, and the checkpoint policy.

Checkpoint timing: when step k decides to save, the snapshot is taken at once, at the end of
step k (weights, optimizer, RNG and data position all as of that step); ``ckptstore.save``
returns once its copy is staged and writes in the background while training goes on. The last
step and an emergency save (SIGTERM/SIGUSR1) also wait until the checkpoint is durable.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import signal
import time
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.distributed as dist

from .checkpointing import Backend, Parts, TrainCheckpointer
from .config import TrainConfig
from .data import TokenStream
from .metrics import MetricsLog, PeakMemory
from .model import GPT, GPTConfig

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class DistContext:
    """Where this process sits: rank, world size, device, and the FSDP mesh (None = no FSDP)."""

    rank: int
    world_size: int
    device: torch.device
    mesh: Any = None

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def setup(cfg: TrainConfig) -> DistContext:
    """Pick the device and, under torchrun, start the process group and a 1-D device mesh."""
    use_cuda = cfg.device == "cuda" or (cfg.device == "auto" and torch.cuda.is_available())
    if use_cuda and not torch.cuda.is_available():
        raise RuntimeError("--device cuda was requested but no CUDA device is visible")
    if cfg.deterministic:
        if use_cuda:  # cuBLAS needs this before its first call to be deterministic
            os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=use_cuda)
    if "WORLD_SIZE" not in os.environ:
        return DistContext(0, 1, torch.device("cuda" if use_cuda else "cpu"))
    from torch.distributed.device_mesh import init_device_mesh

    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if use_cuda:
        torch.cuda.set_device(local_rank)
    dist.init_process_group("nccl" if use_cuda else "gloo")
    device = torch.device("cuda", local_rank) if use_cuda else torch.device("cpu")
    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    return DistContext(dist.get_rank(), dist.get_world_size(), device, mesh)


def teardown(ctx: DistContext) -> None:
    """Destroy the process group if ``setup`` made one."""
    if ctx.mesh is not None and dist.is_initialized():
        dist.destroy_process_group()


def lr_lambda(cfg: TrainConfig) -> Callable[[int], float]:
    """Multiplier of ``cfg.lr`` at a given step: linear warmup, then cosine down to ``min_lr``."""

    def fn(step: int) -> float:
        if step < cfg.warmup_steps:
            return (step + 1) / (cfg.warmup_steps + 1)
        progress = min(1.0, (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps))
        floor = cfg.min_lr / cfg.lr
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))

    return fn


def build_model(cfg: TrainConfig, ctx: DistContext) -> GPT:
    """The model, identically initialised on every rank, then sharded with FSDP2 if distributed."""
    torch.manual_seed(cfg.seed)
    model = GPT(GPTConfig(**cfg.model_dims(), remat=cfg.remat))
    if ctx.mesh is None:
        return model.to(ctx.device)
    from torch.distributed.fsdp import fully_shard

    for block in model.blocks:
        fully_shard(block, mesh=ctx.mesh)
    fully_shard(model, mesh=ctx.mesh)  # root: embeddings (tied with the head) and final norm
    return model


def build_parts(cfg: TrainConfig, ctx: DistContext) -> Parts:
    """Model, optimizer, scheduler, scaler and data stream for this rank."""
    model = build_model(cfg, ctx)
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), foreach=True)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg))
    scaler = make_scaler(cfg, ctx)
    dims = cfg.model_dims()
    data = TokenStream(dims["vocab_size"], dims["seq_len"], cfg.batch_size, seed=cfg.seed,
                       rank=ctx.rank, world_size=ctx.world_size)
    return Parts(model, optimizer, scheduler, scaler, data, cfg)


def make_scaler(cfg: TrainConfig, ctx: DistContext) -> torch.amp.GradScaler:
    """fp16 loss scaler (disabled otherwise). Sharded ranks agree on inf/NaN via ShardedGradScaler."""
    enabled = cfg.amp == "fp16"
    if ctx.mesh is not None:
        from torch.distributed.fsdp.sharded_grad_scaler import ShardedGradScaler

        return ShardedGradScaler(ctx.device.type, enabled=enabled)
    return torch.amp.GradScaler(ctx.device.type, enabled=enabled)


def autocast(cfg: TrainConfig, device: torch.device) -> contextlib.AbstractContextManager:
    """The AMP context for forward passes."""
    if cfg.amp == "none":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if cfg.amp == "bf16" else torch.float16
    return torch.autocast(device.type, dtype=dtype)


class StopFlag:
    """Set by SIGTERM/SIGUSR1; the loop finishes the step, saves, and exits 0."""

    def __init__(self) -> None:
        self.signum: int | None = None

    def install(self) -> None:
        for sig in (signal.SIGTERM, signal.SIGUSR1):
            signal.signal(sig, self._handle)

    def _handle(self, signum: int, frame: Any) -> None:
        self.signum = signum


def _all_max(values: list[float], ctx: DistContext) -> list[float]:
    """Element-wise max over ranks, so every rank takes the same save/stop decision."""
    if ctx.mesh is None:
        return values
    t = torch.tensor(values, dtype=torch.float64, device=ctx.device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.tolist()


def _mean(value: torch.Tensor, ctx: DistContext) -> float:
    value = value.detach().float()
    if ctx.mesh is not None:
        dist.all_reduce(value, op=dist.ReduceOp.SUM)
        value = value / ctx.world_size
    return float(value)


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.full_tensor() if hasattr(t, "full_tensor") else t


@torch.no_grad()
def evaluate(parts: Parts, ctx: DistContext) -> float:
    """Mean loss over the fixed validation batches."""
    parts.model.eval()
    total = torch.zeros((), device=ctx.device)
    for i in range(parts.cfg.val_batches):
        x, y = (t.to(ctx.device) for t in parts.data.val_batch(i))
        with autocast(parts.cfg, ctx.device):
            total += parts.model(x, y)[1].float()
    parts.model.train()
    return _mean(total / parts.cfg.val_batches, ctx)


def train_step(parts: Parts, ctx: DistContext) -> tuple[float, float]:
    """One optimizer step (with accumulation, clipping and the AMP scaler)."""
    cfg, model, opt, scaler = parts.cfg, parts.model, parts.optimizer, parts.scaler
    loss_sum = torch.zeros((), device=ctx.device)
    for micro in range(cfg.grad_accum):
        x, y = (t.to(ctx.device) for t in parts.data.next_batch())
        if ctx.mesh is not None:  # reduce-scatter gradients only on the last micro-batch
            model.set_requires_gradient_sync(micro == cfg.grad_accum - 1)
        with autocast(cfg, ctx.device):
            _, loss = model(x, y)
        loss = loss / cfg.grad_accum
        scaler.scale(loss).backward()
        loss_sum += loss.detach()
    scaler.unscale_(opt)
    if cfg.grad_clip > 0:
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
    else:
        grad_norm = torch.nn.utils.get_total_norm([p.grad for p in model.parameters() if p.grad is not None])
    scaler.step(opt)
    scaler.update()
    opt.zero_grad(set_to_none=True)
    parts.scheduler.step()
    return _mean(loss_sum, ctx), float(_local(grad_norm))


def train(cfg: TrainConfig, backend_factory: Callable[[TrainConfig], Backend] | None = None,
          *, stop: StopFlag | None = None) -> list[dict[str, Any]]:
    """Run (or resume) training as ``cfg`` says; return this process's step records.

    ``backend_factory`` replaces ``ckptstore.Checkpointer`` (tests); ``stop`` lets a caller
    trigger an emergency stop without a signal.
    """
    ctx = setup(cfg)
    try:
        cfg.validate(ctx.world_size)
        return _run(cfg, ctx, backend_factory, stop)
    finally:
        teardown(ctx)


def _run(cfg: TrainConfig, ctx: DistContext, backend_factory: Callable[[TrainConfig], Backend] | None,
         stop: StopFlag | None) -> list[dict[str, Any]]:
    parts = build_parts(cfg, ctx)
    if cfg.amp != "none" and ctx.device.type == "cpu":
        log.warning("--amp %s on CPU works but runs 10x slower or worse without native %s matmuls "
                    "(this CPU: %s); it is here to exercise the %s path, use --amp none for speed",
                    cfg.amp, cfg.amp, torch.backends.cpu.get_cpu_capability(),
                    "GradScaler" if cfg.amp == "fp16" else "autocast")
    metrics = MetricsLog(cfg.metrics_path, enabled=ctx.is_main, log_every=cfg.log_every)
    ckpt = TrainCheckpointer(parts, backend_factory)
    if stop is None:
        stop = StopFlag()
        stop.install()
    if ctx.is_main:
        log.info("model: %.2fM parameters, world size %d, device %s, amp %s, remat %s",
                 parts.model.num_params() / 1e6, ctx.world_size, ctx.device, cfg.amp, cfg.remat)
    step = ckpt.maybe_resume()
    if step:
        metrics.event("resume", step=step)
    records: list[dict[str, Any]] = []
    tokens_per_step = cfg.batch_size * cfg.grad_accum * cfg.model_dims()["seq_len"]
    peak = PeakMemory(ctx.device)
    last_save = time.monotonic()
    best_val = math.inf
    try:
        while step < cfg.steps:
            step += 1
            peak.reset()
            t0 = time.perf_counter()
            loss, grad_norm = train_step(parts, ctx)
            dt = time.perf_counter() - t0
            record = {"step": step, "loss": loss, "lr": parts.scheduler.get_last_lr()[0],
                      "grad_norm": grad_norm, "ms": dt * 1e3, "tok_per_s": tokens_per_step / dt,
                      "peak_mem_mb": peak.peak_mb(), "mem_kind": peak.kind}
            if cfg.amp == "fp16":
                record["loss_scale"] = float(parts.scaler.get_scale())
            records.append(record)
            metrics.step(record)
            if cfg.step_delay:
                time.sleep(cfg.step_delay)

            val_metrics = None
            if cfg.val_every and step % cfg.val_every == 0:
                val_metrics = {"val_loss": evaluate(parts, ctx)}
                metrics.event("val", step=step, val_loss=val_metrics["val_loss"])
            improved = val_metrics is not None and val_metrics["val_loss"] < best_val
            if improved:
                best_val = val_metrics["val_loss"]  # type: ignore[index]
            time_due = cfg.ckpt_every_seconds > 0 and time.monotonic() - last_save >= cfg.ckpt_every_seconds
            stop_now, time_due = _all_max([float(stop.signum is not None), float(time_due)], ctx)
            every = cfg.ckpt_every_steps > 0 and step % cfg.ckpt_every_steps == 0
            reason = "best_val" if improved else "steps" if every else "seconds" if time_due else None
            if stop_now or step == cfg.steps:
                reason = "emergency" if stop_now else "final"
                ckpt.save(step, val_metrics)
                ckpt.wait()  # durable before we report it or exit
                metrics.event("checkpoint", step=step, reason=reason, durable=True)
                if stop_now:
                    metrics.event("emergency", step=step, signal=stop.signum)
                    break
            elif reason is not None:
                ckpt.save(step, val_metrics)  # returns once staged; written in the background
                metrics.event("checkpoint", step=step, reason=reason)
                last_save = time.monotonic()
    except BaseException as exc:  # this rank alone: no collective the other ranks may never join
        ckpt.abort(exc)
        raise
    finally:
        ckpt.close()  # a no-op after abort
        metrics.close()
    return records
