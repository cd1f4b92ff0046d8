"""``compress`` mode: stored fraction of plain vs byte-grouped zstd/lz4 per dtype and kind.

Byte grouping splits every element into its byte planes (plane k holds byte k of
every element; on little-endian machines the last plane holds sign and exponent)
and compresses each plane on its own, in the same chunking the engine uses. This
is measured with numpy directly so it works without the engine.
"""
from __future__ import annotations

import logging
import time
from typing import Any, Callable

import lz4.block
import numpy as np
import torch
import zstandard

from bench.common import Options
from bench.state import DTYPES, BenchState, describe, iter_role_tensors, load_state
from bench.timing import GB

log = logging.getLogger("bench")
CHUNK = 4 << 20  # bytes of one compressed chunk (per plane when grouped)

Codec = Callable[[bytes], bytes]


def codecs() -> dict[str, Codec]:
    """Name -> compress function (one chunk in, one frame out)."""
    z1 = zstandard.ZstdCompressor(level=1)
    z3 = zstandard.ZstdCompressor(level=3)
    return {
        "zstd-1": z1.compress,
        "zstd-3": z3.compress,
        "lz4": lambda b: lz4.block.compress(b, store_size=False),
    }


def planes(raw: np.ndarray, itemsize: int) -> list[np.ndarray]:
    """Split little-endian elements into ``itemsize`` contiguous byte planes."""
    grid = raw.reshape(-1, itemsize)
    return [np.ascontiguousarray(grid[:, k]) for k in range(itemsize)]


def compressed_size(buf: np.ndarray, codec: Codec) -> int:
    """Bytes after compressing ``buf`` chunk by chunk (a chunk never grows: stored raw)."""
    mv = memoryview(buf)
    return sum(min(len(codec(mv[o : o + CHUNK])), len(mv[o : o + CHUNK])) for o in range(0, len(mv), CHUNK))


def entropy0(buf: np.ndarray) -> float:
    """Order-0 (byte histogram) entropy bound as a stored fraction."""
    counts = np.bincount(buf, minlength=256).astype(np.float64)
    p = counts[counts > 0] / buf.size
    return float(-(p * np.log2(p)).sum() / 8.0)


def measure(raw: np.ndarray, itemsize: int) -> dict[str, Any]:
    """Stored fractions (and codec GB/s) for one kind's bytes."""
    out: dict[str, Any] = {"bytes": int(raw.size)}
    t0 = time.perf_counter()
    pl = planes(raw, itemsize)
    out["split_gbps"] = raw.size / GB / (time.perf_counter() - t0)
    out["plane_entropy0"] = [round(entropy0(p), 4) for p in pl]
    out["entropy0_grouped"] = sum(entropy0(p) * p.size for p in pl) / raw.size
    for name, fn in codecs().items():
        t0 = time.perf_counter()
        plain = compressed_size(raw, fn)
        t_plain = time.perf_counter() - t0
        t0 = time.perf_counter()
        per_plane = [compressed_size(p, fn) for p in pl]
        t_bg = time.perf_counter() - t0
        out[name] = {
            "plain": plain / raw.size,
            "grouped": sum(per_plane) / raw.size,
            "per_plane": [round(s / p.size, 4) for s, p in zip(per_plane, pl)],
            # only the sign/exponent plane compressed, mantissa planes stored raw
            "exponent_plane_only": (per_plane[-1] + sum(p.size for p in pl[:-1])) / raw.size,
            "plain_gbps": raw.size / GB / t_plain,
            "grouped_gbps": raw.size / GB / t_bg,
        }
    return out


def run_one(st: BenchState) -> dict[str, Any]:
    """Per kind (weights, exp_avg, exp_avg_sq) and overall."""
    groups: dict[str, list[np.ndarray]] = {}
    for kind, _, t in iter_role_tensors(st):
        groups.setdefault(kind, []).append(t.detach().cpu().contiguous().view(torch.uint8).reshape(-1).numpy())
    itemsize = DTYPES[st.dtype].itemsize
    kinds: dict[str, Any] = {}
    for kind, arrs in groups.items():
        raw = np.concatenate(arrs)
        kinds[kind] = measure(raw, itemsize)
        log.info("compress %s %s: zstd-1 plain %.3f grouped %.3f", st.dtype, kind,
                 kinds[kind]["zstd-1"]["plain"], kinds[kind]["zstd-1"]["grouped"])
    total = sum(k["bytes"] for k in kinds.values())
    overall = {}
    for codec in codecs():
        overall[codec] = {v: sum(k[codec][v] * k["bytes"] for k in kinds.values()) / total
                          for v in ("plain", "grouped", "exponent_plane_only")}
    best = {kind: min(((c, v, k[c][v]) for c in codecs() for v in ("plain", "grouped")), key=lambda x: x[2])
            for kind, k in kinds.items()}
    return {"size": st.nbytes, "dtype": st.dtype, "state": describe(st), "itemsize": itemsize,
            "kinds": kinds, "overall": overall,
            "best_per_kind": {k: {"codec": c, "variant": v, "ratio": r} for k, (c, v, r) in best.items()},
            "chunk_bytes": CHUNK}


def run(opt: Options) -> list[dict[str, Any]]:
    """Every dtype x size."""
    out = []
    for dtype in opt.dtypes:
        for size in opt.sizes:
            st = load_state(size, dtype)
            log.info("compress: %s", describe(st))
            out.append({"requested_size": size, **run_one(st)})
    return out

