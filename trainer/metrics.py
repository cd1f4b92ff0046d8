"""Per-step peak memory and the metrics log (stdout + JSONL, rank 0 only)."""

from __future__ import annotations

import json
import resource
import time
from pathlib import Path
from typing import Any

import torch


class PeakMemory:
    """Peak memory of one step: ``max_memory_allocated`` on GPU, peak RSS on CPU.

    On Linux the RSS high-water mark can be reset per process (``/proc/self/clear_refs`` = 5),
    which makes the CPU number per-step too; where that is refused it is the peak since start.
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.kind = "cuda_max_allocated" if device.type == "cuda" else "rss_peak"

    def reset(self) -> None:
        """Start a new measurement window."""
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
            return
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
        except OSError:
            self.kind = "rss_peak_since_start"

    def peak_mb(self) -> float:
        """Peak bytes in the window, in MiB."""
        if self.device.type == "cuda":
            return torch.cuda.max_memory_allocated(self.device) / 2**20
        try:
            with open("/proc/self/status") as f:
                for line in f:
                    if line.startswith("VmHWM:"):
                        return int(line.split()[1]) / 1024
        except OSError:
            pass
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class MetricsLog:
    """Append-only JSONL of steps and events; also prints a short line per logged step."""

    def __init__(self, path: str, *, enabled: bool, log_every: int = 1) -> None:
        self.enabled = enabled
        self.log_every = log_every
        self.path = Path(path)
        self._file = None
        if enabled:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._file = open(self.path, "a", buffering=1)

    def write(self, record: dict[str, Any]) -> None:
        """Append one record (a step or an event) with a wall-clock timestamp."""
        if self._file is None:
            return
        self._file.write(json.dumps({**record, "time": time.time()}) + "\n")

    def step(self, record: dict[str, Any]) -> None:
        """Log a training step: always to the file, every ``log_every`` steps to stdout."""
        self.write(record)
        if self.enabled and record["step"] % self.log_every == 0:
            print(f"step {record['step']:>6} | loss {record['loss']:.4f} | lr {record['lr']:.2e} | "
                  f"grad {record['grad_norm']:.3f} | {record['ms']:.0f} ms | "
                  f"{record['tok_per_s']:.0f} tok/s | peak {record['peak_mem_mb']:.0f} MiB", flush=True)

    def event(self, kind: str, **fields: Any) -> None:
        """Log an event such as ``checkpoint``, ``resume``, ``val`` or ``emergency``."""
        self.write({"event": kind, **fields})
        if self.enabled:
            print(f"[{kind}] " + " ".join(f"{k}={v}" for k, v in fields.items()), flush=True)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """All records of a metrics JSONL file (a torn last line from a kill is skipped)."""
    out = []
    for line in Path(path).read_text().splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return out
