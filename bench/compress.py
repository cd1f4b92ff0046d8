"""``compress`` mode: stored fraction of plain vs byte-grouped zstd/lz4 per dtype and kind.

Byte grouping splits every element into its byte planes (plane k holds byte k of
every element; on little-endian machines the last plane holds sign and exponent)
and compresses each plane on its own, in the same chunking the engine uses. This
is measured with numpy directly so it works without the engine.

The engine's own codec (``ckptstore.pipeline.codec``) is measured too, as the
engine runs it: each tensor cut into the engine's 16 MiB chunks, encoded and
decoded on one thread. Its GB/s are per core: bytes over the thread's CPU time,
which a shared, busy machine does not inflate (wall-clock figures are kept too).
"""
from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

import lz4.block
import numpy as np
import torch
import zstandard

from bench.common import Options
from bench.state import DTYPES, BenchState, describe, iter_role_tensors, load_state
from bench.timing import GB, gbps

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


def engine_chunks(st: BenchState, chunk: int, grouped: dict[torch.dtype, int]) -> list[tuple[memoryview, int]]:
    """(raw bytes, byte group) of every chunk the engine would encode: chunks never span
    tensors, and only the dtypes the engine groups are grouped."""
    out = []
    for t in st.flat.values():
        raw = memoryview(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy())
        group = grouped.get(t.dtype, 1)
        out += [(raw[o:o + chunk], group) for o in range(0, len(raw), chunk)]
    return out


Stored = tuple[memoryview, list[tuple[str, int]], int]  # a chunk as stored: bytes, plane table, group


def engine_codec(st: BenchState, repeat: int, codec_name: str = "zstd", level: int = 1) -> dict[str, Any]:
    """Encode and decode GB/s per core of the engine's codec, and the stored fraction."""
    try:
        from ckptstore.pipeline import codec
        from ckptstore.pipeline.options import DEFAULT_CHUNK
        from ckptstore.plan.layout import GROUPED
    except Exception as e:  # noqa: BLE001 - reported, so the numpy figures still come out
        return {"unavailable": f"import failed: {type(e).__name__}: {e}"}

    def encode_all() -> tuple[float, float, list[Stored]]:
        """Each chunk timed alone and dropped after, as the writer writes and drops it
        (keeping every result would time fresh memory instead of the codec)."""
        cpu = wall = 0.0
        out = []
        for raw, group in chunks:
            c0, w0 = time.thread_time(), time.perf_counter()
            enc = codec.encode_chunk(raw, group, codec_name, level)
            cpu, wall = cpu + time.thread_time() - c0, wall + time.perf_counter() - w0
            out.append((memoryview(b"".join(d for _, d in enc.planes)),
                        [(c, len(d)) for c, d in enc.planes], enc.group))
        return cpu, wall, out

    def decode_all(stored: list[Stored]) -> tuple[float, float]:
        c0, w0 = time.thread_time(), time.perf_counter()
        for (data, planes, group), out in zip(stored, outs):
            codec.decode_planes(data, planes, group, out)
        return time.thread_time() - c0, time.perf_counter() - w0

    chunks = engine_chunks(st, DEFAULT_CHUNK, GROUPED)
    nbytes = sum(len(raw) for raw, _ in chunks)
    # outputs touched beforehand, and unlike any chunk, so a decode that writes nothing fails
    outs = [memoryview(np.full(len(raw), 0xA5, np.uint8)) for raw, _ in chunks]
    times: dict[str, list[float]] = {k: [] for k in ("encode", "encode_wall", "decode", "decode_wall")}
    for _ in range(repeat):
        cpu, wall, stored = encode_all()
        times["encode"].append(cpu)
        times["encode_wall"].append(wall)
        cpu, wall = decode_all(stored)
        times["decode"].append(cpu)
        times["decode_wall"].append(wall)
    identical = all(out == raw for out, (raw, _) in zip(outs, chunks))
    fraction = sum(len(data) for data, _, _ in stored) / nbytes
    log.info("engine codec %s: encode %.2f GB/s/core, decode %.2f, stored %.3f", st.dtype,
             nbytes / GB / min(times["encode"]), nbytes / GB / min(times["decode"]), fraction)
    return {"codec": codec_name, "level": level, "chunk_bytes": DEFAULT_CHUNK, "chunks": len(chunks),
            "bytes": nbytes, "stored": fraction, "roundtrip_identical": identical,
            **{f"{k}_gbps": gbps(nbytes, v).to_dict() for k, v in times.items()}}


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
            out.append({"requested_size": size, **run_one(st), "engine_codec": engine_codec(st, opt.repeat)})
    return out

