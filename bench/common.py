"""Shared pieces of the write and load runs: options, series of samples, paired ratios."""
from __future__ import annotations

import os
import platform
import shutil
import statistics
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import psutil
import torch

from bench.timing import GB, MemorySampler, Stat


@dataclass
class Options:
    """Everything a mode needs from the command line."""

    sizes: list[int]
    dtypes: list[str]
    repeat: int = 3
    dir: Path = Path("bench/out/work")
    modes: str = "all"
    peers: str = "all"
    drop_caches: bool = False
    gpu: bool = False
    staging_budget: int | None = None
    every: int = 20
    steps: int = 100
    extra: dict[str, Any] = field(default_factory=dict)


class Series:
    """Samples of one measured thing (a dict of floats per repeat)."""

    def __init__(self, kind: str, nbytes: int) -> None:
        self.kind = kind
        self.nbytes = nbytes
        self.samples: list[dict[str, float]] = []
        self.meta: dict[str, Any] = {}

    def add(self, rec: dict[str, float]) -> None:
        self.samples.append(rec)

    def field(self, name: str) -> list[float]:
        return [s[name] for s in self.samples if s.get(name) is not None]

    def summary(self) -> dict[str, Any]:
        out: dict[str, Any] = {"kind": self.kind, "samples": self.samples, **self.meta}
        names = sorted({k for s in self.samples for k, v in s.items() if isinstance(v, (int, float))})
        for n in names:
            vals = self.field(n)
            if vals:
                out[n] = Stat.of(vals).to_dict()
        if self.field("total"):
            out["gbps"] = Stat.of([self.nbytes / GB / t for t in self.field("total")]).to_dict()
        phys = self.field("physical_bytes")
        if phys:
            out["ratio_stored"] = statistics.median(phys) / self.nbytes
            out["physical_gbps"] = Stat.of([p / GB / t for p, t in zip(phys, self.field("total"))]).to_dict()
        return out


def paired_ratio(num: list[float], den: list[float]) -> dict[str, float] | None:
    """Median (min-max) of per-repeat ratios num[i]/den[i] (runs were interleaved)."""
    pairs = [a / b for a, b in zip(num, den) if b > 0]
    return Stat.of(pairs).to_dict() if pairs else None


def sampled(fn: Callable[[], dict[str, float]]) -> dict[str, float]:
    """Run ``fn`` while sampling memory; adds peak_rss, peak_tree_pss, pss_before."""
    with MemorySampler() as ms:
        before = ms.peak_tree_pss
        rec = fn()
    rec.update(peak_rss=ms.peak_rss, peak_tree_pss=ms.peak_tree_pss, pss_before=before)
    return rec


def fresh(path: Path) -> Path:
    """Remove ``path`` (file or tree) if present and return it."""
    if path.is_dir():
        shutil.rmtree(path)
    elif path.exists():
        path.unlink()
    return path


def rotated(items: list[Any], r: int) -> list[Any]:
    """The r-th rotation, so no measurement always runs first (or last) in a repeat."""
    if not items:
        return items
    k = r % len(items)
    return items[k:] + items[:k]


def machine(path: Path) -> dict[str, Any]:
    """Machine description for the report."""
    cpu = platform.processor() or ""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    fs = ""
    try:
        fs = subprocess.run(["df", "-T", str(path)], capture_output=True, text=True, timeout=5).stdout
        fs = fs.strip().splitlines()[-1]
    except (OSError, subprocess.SubprocessError, IndexError):
        pass
    thp = ""
    try:
        thp = Path("/sys/kernel/mm/transparent_hugepage/enabled").read_text().strip()
    except OSError:
        pass
    return {
        "cpu": cpu, "cores": os.cpu_count(), "ram_gib": round(psutil.virtual_memory().total / 2**30, 1),
        "kernel": platform.release(), "python": platform.python_version(), "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(), "filesystem": fs, "thp": thp,
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }
