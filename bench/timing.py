"""Timing primitives: summary statistics, a memory sampler and the size parser.

Every figure the benchmark reports is a median with its min-max over repeats
(the machine is shared and noisy, so a lone time means little).
"""
from __future__ import annotations

import os
import re
import statistics
import threading
import time
from dataclasses import dataclass, field
from typing import Callable

import psutil

GB = 1e9  # throughput is quoted in decimal GB/s, like dd and vendor sheets

_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(i?B?)?\s*$", re.IGNORECASE)
_UNITS = {"": 1, "K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}


def parse_size(text: str) -> int:
    """Parse ``64M``, ``1G``, ``1.5GiB`` or ``4096`` into bytes (binary units)."""
    m = _SIZE_RE.match(text)
    if not m:
        raise ValueError(f"cannot parse size {text!r}: use e.g. 64M, 256M, 1G")
    return int(float(m.group(1)) * _UNITS[m.group(2).upper()])


def parse_sizes(text: str) -> list[int]:
    """Parse a comma-separated size sweep such as ``64M,256M,1G``."""
    return [parse_size(p) for p in text.split(",") if p.strip()]


def fmt_size(n: int) -> str:
    """Short binary size label: 64M, 1G, 1.5G."""
    for unit in ("T", "G", "M", "K"):
        if n >= _UNITS[unit]:
            v = n / _UNITS[unit]
            return f"{v:g}{unit}" if v == int(v) else f"{v:.0f}{unit}" if v >= 100 else f"{v:.3g}{unit}"
    return str(n)


@dataclass(frozen=True, slots=True)
class Stat:
    """Median, min and max of a list of samples."""

    median: float
    min: float
    max: float
    n: int

    @classmethod
    def of(cls, samples: list[float]) -> "Stat":
        if not samples:
            raise ValueError("no samples")
        return cls(statistics.median(samples), min(samples), max(samples), len(samples))

    def to_dict(self) -> dict[str, float]:
        return {"median": self.median, "min": self.min, "max": self.max, "n": self.n}


def gbps(nbytes: int, seconds: list[float]) -> Stat:
    """Throughput per sample; min/max of throughput come from max/min time."""
    return Stat.of([nbytes / GB / s for s in seconds if s > 0])


def timed(fn: Callable[[], object]) -> tuple[float, object]:
    """Run ``fn`` and return (seconds, result)."""
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


def _smaps_rollup(pid: int) -> tuple[int, int] | None:
    """(Rss, Pss) in bytes from /proc/PID/smaps_rollup, or None where unavailable."""
    try:
        with open(f"/proc/{pid}/smaps_rollup", "rb") as f:
            text = f.read().decode()
    except OSError:
        return None
    vals: dict[str, int] = {}
    for line in text.splitlines():
        parts = line.split()
        if len(parts) >= 2 and parts[0] in ("Rss:", "Pss:"):
            vals[parts[0][:-1]] = int(parts[1]) * 1024
    if "Rss" not in vals or "Pss" not in vals:
        return None
    return vals["Rss"], vals["Pss"]


@dataclass
class MemorySampler:
    """Samples memory of this process and its children in a background thread.

    ``peak_rss`` is this process alone; ``peak_tree_pss`` sums the proportional set
    size over the process tree, so shared-memory staging buffers mapped by the writer
    processes are counted once, not once per mapping.
    """

    interval: float = 0.01
    peak_rss: int = 0
    peak_tree_pss: int = 0
    samples: int = 0
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def sample(self) -> None:
        me = psutil.Process(os.getpid())
        procs = [me]
        try:
            procs += me.children(recursive=True)
        except psutil.Error:
            pass
        tree_pss = 0
        for p in procs:
            r = _smaps_rollup(p.pid)
            if r is None:
                try:
                    rss = p.memory_info().rss
                except psutil.Error:
                    continue
                r = (rss, rss)
            if p.pid == me.pid:
                self.peak_rss = max(self.peak_rss, r[0])
            tree_pss += r[1]
        self.peak_tree_pss = max(self.peak_tree_pss, tree_pss)
        self.samples += 1

    def _run(self) -> None:
        while not self._stop.is_set():
            self.sample()
            self._stop.wait(self.interval)

    def __enter__(self) -> "MemorySampler":
        self.sample()
        self._thread = threading.Thread(target=self._run, name="mem-sampler", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self.sample()


def current_tree_pss() -> int:
    """Current PSS summed over this process and its children (bytes)."""
    s = MemorySampler()
    s.sample()
    return s.peak_tree_pss
