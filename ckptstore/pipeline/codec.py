"""Chunk encoding: byte grouping, compression, hashing (runs in writer processes).

A chunk's raw bytes are split into ``group`` byte planes (plane i holds byte i of
every element; group 1 means no split). Each plane is compressed on its own and kept
only if that pays (``MIN_GAIN``); otherwise it is stored raw. For trained float
weights only the sign/exponent plane compresses, so most planes are stored raw and
cost no codec time (docs/benchmarks.md has the measured plane ratios). This module
imports no torch: writer processes stay small and start fast.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import lz4.block
import numpy as np
import xxhash
import zstandard

from ckptstore.errors import CorruptCheckpointError

CODECS = ("raw", "zstd", "lz4")
MIN_GAIN = 0.95  #: keep a compressed plane only if it is at most this fraction of raw
SAMPLE = 64 * 1024  #: bytes compressed first to decide whether a plane is worth it


def hash_bytes(data) -> str:
    """xxh3-128 of ``data`` as 32 hex digits."""
    return xxhash.xxh3_128_hexdigest(data)


@dataclass(frozen=True, slots=True)
class Encoded:
    """A chunk as stored: its planes (codec, bytes) and hashes."""

    group: int
    planes: tuple[tuple[str, Any], ...]  # ((codec, bytes-like), ...)
    hash: str  #: xxh3-128 of the stored bytes (planes concatenated)
    raw_hash: str  #: xxh3-128 of the raw bytes

    @property
    def length(self) -> int:
        return sum(len(p) for _, p in self.planes)


def _compress(codec: str, data, level: int) -> bytes:
    if codec == "zstd":
        return zstandard.ZstdCompressor(level=level).compress(data)
    if codec == "lz4":
        return lz4.block.compress(data, store_size=False)
    raise ValueError(f"unknown codec {codec!r}")


def _maybe_compress(codec: str, plane: Any, level: int) -> tuple[str, Any]:
    n = len(plane)
    if codec == "raw" or n < 64:
        return "raw", plane
    if n > 4 * SAMPLE:  # cheap trial on a sample before paying for the whole plane
        trial = _compress(codec, plane[:SAMPLE], level)
        if len(trial) > MIN_GAIN * SAMPLE:
            return "raw", plane
    out = _compress(codec, plane, level)
    if len(out) > MIN_GAIN * n:
        return "raw", plane
    return codec, out


def encode_chunk(raw: memoryview, group: int, codec: str, level: int = 1) -> Encoded:
    """Encode one chunk. ``group`` > 1 byte-groups elements of that size first."""
    raw_hash = hash_bytes(raw)
    if codec == "raw":
        return Encoded(1, (("raw", raw),), raw_hash, raw_hash)
    if group > 1 and len(raw) % group == 0 and len(raw) >= group * 64:
        grid = np.frombuffer(raw, dtype=np.uint8).reshape(-1, group)
        planes = [np.ascontiguousarray(grid[:, i]).data for i in range(group)]
    else:
        group = 1
        planes = [raw]
    stored = tuple(_maybe_compress(codec, p, level) for p in planes)
    if group == 1 and stored[0][0] == "raw":
        return Encoded(1, (("raw", raw),), raw_hash, raw_hash)
    h = xxhash.xxh3_128()
    for _, data in stored:
        h.update(data)
    return Encoded(group, stored, h.hexdigest(), raw_hash)


def decode_planes(stored: memoryview, planes: list[tuple[str, int]], group: int,
                  out: memoryview) -> None:
    """Decode a chunk's stored bytes into ``out`` (exactly the raw length).

    Every size comes from the manifest and bounds the decoder: a plane that would
    decode to more or fewer bytes than recorded is corruption, never a big allocation.
    """
    raw_len = len(out)
    if raw_len % group:
        raise CorruptCheckpointError(f"raw length {raw_len} is not a multiple of group {group}")
    if len(planes) != group or sum(length for _, length in planes) != len(stored):
        raise CorruptCheckpointError(
            f"plane table {list(planes)[:9]} does not match group {group} and "
            f"{len(stored)} stored bytes")
    plane_len = raw_len // group
    target = np.frombuffer(out, dtype=np.uint8)
    grid = target.reshape(-1, group) if group > 1 else None
    pos = 0
    for i, (codec, length) in enumerate(planes):
        data = stored[pos:pos + length]
        pos += length
        plane = _decode_plane(codec, data, plane_len)
        if grid is None:
            target[:] = np.frombuffer(plane, dtype=np.uint8)
        else:
            grid[:, i] = np.frombuffer(plane, dtype=np.uint8)


def _decode_plane(codec: str, data: memoryview, size: int):
    try:
        if codec == "raw":
            if len(data) != size:
                raise CorruptCheckpointError(f"raw plane holds {len(data)} bytes, expected {size}")
            return data
        if codec == "zstd":
            declared = zstandard.frame_content_size(data)
            if declared != size:
                raise CorruptCheckpointError(
                    f"zstd frame declares {declared} bytes, the manifest says {size}")
            out = zstandard.ZstdDecompressor().decompress(data, max_output_size=size)
        elif codec == "lz4":
            out = lz4.block.decompress(data, uncompressed_size=size)
        else:
            raise CorruptCheckpointError(f"unknown codec {codec!r}")
    except CorruptCheckpointError:
        raise
    except (zstandard.ZstdError, lz4.block.LZ4BlockError, ValueError, MemoryError) as e:
        raise CorruptCheckpointError(f"{codec} data does not decode: {e}") from None
    if len(out) != size:
        raise CorruptCheckpointError(f"{codec} plane decoded to {len(out)} bytes, expected {size}")
    return out
