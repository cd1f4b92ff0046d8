"""ckptstore under test: save (stall, durable), load (cold/warm, verify on/off).

The engine is imported lazily so the rest of the benchmark works (and reports a
clear reason) while it is missing or broken.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch


@dataclass(frozen=True, slots=True)
class Mode:
    """One ckptstore save configuration."""

    name: str
    compression: str
    zstd_level: int | None = None
    byte_grouping: bool = True
    extra: dict[str, Any] = field(default_factory=dict)
    #: set the writer processes' nice value before each save (None: the engine's
    #: default, CKPTSTORE_WRITER_NICE); lowering it back needs CAP_SYS_NICE
    writer_nice: int | None = None

    def kwargs(self) -> dict[str, Any]:
        kw: dict[str, Any] = {"compression": self.compression, **self.extra}
        if self.compression not in ("none", "auto"):
            kw["byte_grouping"] = self.byte_grouping
        if self.zstd_level is not None:
            kw["zstd_level"] = self.zstd_level
        return kw


MODES: dict[str, Mode] = {m.name: m for m in (
    Mode("auto", "auto"),
    Mode("none", "none"),
    Mode("none+overlap", "none", extra={"overlap": True}),
    Mode("none+nice0", "none", writer_nice=0),
    Mode("lz4", "lz4", byte_grouping=False),
    Mode("lz4+bg", "lz4", byte_grouping=True),
    Mode("zstd-1", "zstd", 1, byte_grouping=False),
    Mode("zstd-1+bg", "zstd", 1, byte_grouping=True),
    Mode("zstd-3", "zstd", 3, byte_grouping=False),
    Mode("zstd-3+bg", "zstd", 3, byte_grouping=True),
)}


def parse_modes(text: str) -> list[Mode]:
    """``none,zstd-1+bg`` -> modes; ``all`` -> every mode."""
    if text == "all":
        return list(MODES.values())
    out = []
    for name in (p.strip() for p in text.split(",") if p.strip()):
        if name not in MODES:
            raise ValueError(f"unknown ckptstore mode {name!r}; choose from {', '.join(MODES)}")
        out.append(MODES[name])
    return out


def engine_available() -> str | None:
    """None when ckptstore.save/load are importable, else the reason they are not."""
    try:
        import ckptstore
    except Exception as e:  # noqa: BLE001 - any import failure is reported, not raised
        return f"import ckptstore failed: {type(e).__name__}: {e}"
    missing = [n for n in ("save", "load") if not hasattr(ckptstore, n)]
    return f"ckptstore lacks {', '.join(missing)}" if missing else None


def save(tree: dict[str, Any], dest: Path, mode: Mode, staging_budget: int | None = None) -> dict[str, float]:
    """One save: ``stall`` is the time save() blocked, ``copied`` until
    ``wait_staged()`` returned (the copies landed), ``total`` until wait() returned."""
    import ckptstore

    kw = mode.kwargs()
    if mode.writer_nice is not None:
        set_writer_nice(mode.writer_nice)
    if staging_budget:
        kw["staging_budget"] = staging_budget
    t0 = time.perf_counter()
    handle = ckptstore.save(tree, str(dest), **kw)
    stall = time.perf_counter() - t0
    handle.wait_staged()
    copied = time.perf_counter() - t0
    result = handle.wait()
    out = {"stall": stall, "copied": copied, "total": time.perf_counter() - t0}
    for attr in ("staged_seconds", "stored_bytes"):  # the engine's own account, if it gives one
        v = getattr(result, attr, None)
        if isinstance(v, (int, float)):
            out[f"engine_{attr}"] = float(v)
    return out


def set_writer_nice(nice: int) -> None:
    """Give the running writer processes (their main threads) this nice value."""
    import os

    from ckptstore.pipeline.engine import engine

    pool = engine().writers
    pool.get()
    for pid in pool.pids():
        try:
            os.setpriority(os.PRIO_PROCESS, pid, nice)
        except OSError as e:
            raise SystemExit(f"cannot set the writers' nice value to {nice}: {e} "
                             "(lowering it needs CAP_SYS_NICE)") from None


def load(path: Path, verify: bool) -> tuple[float, Any]:
    """Seconds for ``ckptstore.load`` and the loaded state."""
    import ckptstore

    t0 = time.perf_counter()
    out = ckptstore.load(str(path), verify=verify)
    return time.perf_counter() - t0, out


def flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    """Nested dicts/lists -> {"a/b/0": leaf}."""
    if isinstance(tree, dict):
        out: dict[str, Any] = {}
        for k, v in tree.items():
            out.update(flatten(v, f"{prefix}{k}/"))
        return out
    if isinstance(tree, (list, tuple)):
        out = {}
        for i, v in enumerate(tree):
            out.update(flatten(v, f"{prefix}{i}/"))
        return out
    return {prefix.rstrip("/"): tree}


def same_tensors(a: Any, b: Any) -> bool:
    """True when every tensor of ``a`` is present and bit-identical in ``b``."""
    fa, fb = flatten(a), flatten(b)
    for k, v in fa.items():
        if isinstance(v, torch.Tensor):
            w = fb.get(k)
            if not isinstance(w, torch.Tensor) or w.dtype != v.dtype or w.shape != v.shape:
                return False
            if not torch.equal(w.cpu().view(torch.uint8) if w.dim() else w.cpu(),
                               v.cpu().view(torch.uint8) if v.dim() else v.cpu()):
                return False
    return True
