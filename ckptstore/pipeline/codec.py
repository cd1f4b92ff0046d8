"""Chunk encoding: byte grouping, compression, hashing (runs in writer processes).

A chunk's raw bytes are split into ``group`` byte planes (plane i holds byte i of
every element; group 1 means no split). Each plane is compressed on its own and kept
only if that pays (``MIN_GAIN``); otherwise it is stored raw. For trained float
weights only the sign/exponent plane compresses, so most planes are stored raw and
cost no codec time (docs/benchmarks.md has the measured plane ratios). This module
imports no torch: writer processes stay small and start fast.

Where the time goes, and why it is spent this way (``python -m bench compress``
measures it; on trained states, zstd-1 encodes bf16/fp32 at 1.2/1.4 GB/s per core and
decodes at about 3 GB/s, where strided copies and zstd's level 1 did 0.5/0.8 and
1.6/2.2):

- Planes are split and merged with shifts on the chunk viewed as 16- or 32-bit
  words, a block at a time, which numpy vectorizes; strided byte copies are 2-4x slower.
- Whether a plane is worth compressing is decided on a probe and a sample of its
  first bytes (``_choose``), so a plane stored raw costs a trial, not a codec pass.
- zstd's levels look for short matches, which on float exponent planes cost more
  than they save: that data is skewed bytes, not repeats. A setting that almost never
  matches and Huffman-codes the literals (``_LITERALS``) stores 2-11% less there and
  runs about twice as fast. The requested level is tried too and wins on repeats.
- Codec contexts and scratch buffers are per thread (a zstandard context must not be
  shared between threads); zstd, lz4, xxhash and numpy release the GIL on large
  buffers, so threads encode and decode in parallel.

The stored format is fixed: planes in byte order, each a zstd frame that records its
content size, an lz4 block without a stored size, or raw bytes; the stored hash is
xxh3-128 over the planes concatenated. Any zstd setting decodes with any decoder.
"""
from __future__ import annotations

import os
import threading
from collections.abc import Callable, Sequence
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
PROBE = 16 * 1024  #: the shortest prefix on which zstd settings are compared (``_choose``)
SKEWED = 0.8  #: a probe the literals setting stores below this fraction is a skewed plane
NEAR = 0.99  #: a probe the literals setting stores above this fraction rules it out
MIN_PLANE = 64  #: planes shorter than this are stored raw: a frame header costs more
#: Word types whose shifts split and merge planes; other groups use strided copies.
#: Little-endian on purpose: plane i is byte i in memory order on every machine.
WORDS: dict[int, np.dtype[Any]] = {2: np.dtype("<u2"), 4: np.dtype("<u4")}
#: Elements split or merged at a time: blocks stay in cache between plane passes.
BLOCK = 1 << 18
#: zstd parameters for byte planes of floats: the fast strategy with the longest
#: minimum match and a tiny hash table finds almost no matches, so nearly all bytes
#: go to the Huffman-coded literals, which is where the gain on such planes is.
_LITERALS = {"strategy": zstandard.STRATEGY_FAST, "window_log": 17, "hash_log": 6, "chain_log": 6,
             "search_log": 1, "min_match": 7, "target_length": 0, "write_content_size": True}

#: The most raw bytes one stored byte of a codec can decode to: a zstd RLE block is
#: 4 bytes for 128 KiB (frame headers only lower it), an lz4 sequence adds at most
#: 255 bytes of match length per byte. A claim above this is refused before decoding.
MAX_RATIO = {"zstd": 32768, "lz4": 256}
#: The largest raw length of a compressed chunk a reader decodes (its decoder output
#: is held in memory at once); ``CKPTSTORE_MAX_CHUNK_BYTES`` raises it.
MAX_CODED_CHUNK = 256 << 20
CHUNK_LIMIT_ENV = "CKPTSTORE_MAX_CHUNK_BYTES"

Compress = Callable[[Any], bytes]


def env_bytes(name: str, default: int) -> int:
    """A byte limit from environment variable ``name`` (read at call time), or ``default``."""
    value = os.environ.get(name)
    if not value:
        return default
    try:
        return max(int(value), 1)
    except ValueError:
        raise ValueError(f"{name}={value!r} is not a number of bytes") from None


def max_coded_chunk() -> int:
    """The raw-length cap of a compressed chunk (``CKPTSTORE_MAX_CHUNK_BYTES``, at call time)."""
    return env_bytes(CHUNK_LIMIT_ENV, MAX_CODED_CHUNK)


def plane_bound(codec: str, stored: int) -> int:
    """The most raw bytes a ``codec`` plane of ``stored`` bytes can decode to."""
    return stored if codec == "raw" else MAX_RATIO.get(codec, 0) * stored


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


class _Contexts(threading.local):
    """This thread's codec contexts and scratch memory. zstandard contexts are not
    thread-safe, and making one per call costs more than compressing a small plane."""

    def __init__(self) -> None:
        self.compressors: dict[int | None, zstandard.ZstdCompressor] = {}
        self.decompressor = zstandard.ZstdDecompressor()
        self.scratch = np.empty(0, np.uint8)
        self._halves: np.ndarray | None = None

    def zstd(self, level: int | None) -> zstandard.ZstdCompressor:
        """The compressor for ``level``; None is the literals setting for planes."""
        c = self.compressors.get(level)
        if c is None:
            if level is None:
                c = zstandard.ZstdCompressor(
                    compression_params=zstandard.ZstdCompressionParameters(**_LITERALS))
            else:
                c = zstandard.ZstdCompressor(level=level)
            self.compressors[level] = c
        return c

    def halves(self) -> np.ndarray:
        """Two blocks of 16-bit words for ``_merge4``."""
        if self._halves is None:
            self._halves = np.empty((2, BLOCK), WORDS[2])
        return self._halves

    def plane(self, n: int) -> np.ndarray:
        """``n`` bytes of scratch for planes that are compressed before the next call on
        this thread (it grows to the largest chunk seen): an ``Encoded`` never refers to it."""
        if self.scratch.size < n:
            self.scratch = np.empty(n, np.uint8)
        return self.scratch[:n]


_ctx = _Contexts()


def _pays(out: bytes, raw: Any) -> bool:
    return len(out) <= MIN_GAIN * len(raw)


def _settings(codec: str, level: int) -> tuple[Compress | None, Compress]:
    """(the literals setting where the codec has one, the codec at ``level``)."""
    if codec == "lz4":
        return None, _lz4
    return _ctx.zstd(None).compress, _ctx.zstd(level).compress


def _choose(codec: str, level: int, sample: Any, n: int) -> tuple[Compress | None, bytes | None]:
    """How to store a plane of ``n`` bytes, judged on its first bytes ``sample``: the
    compressor (None: raw, and the plane is never compressed whole) and, when it was
    computed, the whole sample compressed by it.

    A probe (1/64 of the plane, PROBE to SAMPLE bytes, so trials cost a few % of
    compressing the plane) tells a skewed plane (a float's exponent), which compresses
    for sure, from the rest. For a skewed plane the probe only picks the smaller zstd
    setting: ``_LITERALS``, or the level, which wins on data with repeats. Any other
    plane is decided on the whole sample as it always was, by the level, or by the
    literals setting where that does better.
    """
    lit, std = _settings(codec, level)
    probe = sample[:max(PROBE, n // 64)]
    whole = len(probe) == len(sample)
    first = lit or std
    first_probe = first(probe)
    if len(first_probe) < SKEWED * len(probe):
        fn, out = first, first_probe
        if lit is not None:
            std_probe = std(probe)
            if len(std_probe) < len(out):
                fn, out = std, std_probe
        return fn, out if whole else None
    tried = [(std, first_probe if whole and first is std else std(sample))]
    if lit is not None and len(first_probe) <= NEAR * len(probe):
        tried.append((lit, first_probe if whole else lit(sample)))
    fn, out = min(tried, key=lambda t: len(t[1]))
    return (fn if _pays(out, sample) else None), out


def _lz4(data: Any) -> bytes:
    return lz4.block.compress(data, store_size=False)


def _split(data: np.ndarray, group: int, outs: Sequence[np.ndarray | None]) -> None:
    """Byte i of every ``group``-byte element of ``data`` into ``outs[i]`` (None: not
    wanted). A block at a time, so the chunk is read from memory once, not per plane."""
    word = WORDS.get(group)
    n = len(data) // group
    for start in range(0, n, BLOCK):
        end = min(start + BLOCK, n)
        block = data[start * group:end * group]
        for i, out in enumerate(outs):
            if out is None:
                continue
            if word is None:
                np.copyto(out[start:end], block[i::group])
            elif i == 0:  # narrowing keeps the low byte
                np.copyto(out[start:end], block.view(word), casting="unsafe")
            else:
                np.right_shift(block.view(word), 8 * i, out=out[start:end], casting="unsafe")


def _merge(planes: Sequence[np.ndarray], out: np.ndarray) -> None:
    """Interleave byte planes into ``out`` (the inverse of ``_split``)."""
    group = len(planes)
    if group == 1:
        np.copyto(out, planes[0])
    elif group == 2:
        _join(planes[0], planes[1], out.view(WORDS[2]))
    elif group == 4:
        _merge4(planes, out.view(WORDS[4]))
    else:  # no word type: strided copies (right for any group, 2-3x slower)
        grid = out.reshape(-1, group)
        for i, plane in enumerate(planes):
            grid[:, i] = plane


def _join(lo: np.ndarray, hi: np.ndarray, out: np.ndarray) -> None:
    """``out = lo | hi << bits(lo)``: two planes into words of twice their width."""
    np.left_shift(hi, 8 * lo.itemsize, out=out, dtype=out.dtype)
    np.bitwise_or(out, lo, out=out)


def _merge4(planes: Sequence[np.ndarray], words: np.ndarray) -> None:
    """Bytes 0+1 and 2+3 into 16-bit halves, then halves into words, a block at a
    time so the halves stay in cache: 1.3x faster than four strided copies."""
    halves = _ctx.halves()
    for start in range(0, len(words), BLOCK):
        end = min(start + BLOCK, len(words))
        lo, hi = halves[0, :end - start], halves[1, :end - start]
        _join(planes[0][start:end], planes[1][start:end], lo)
        _join(planes[2][start:end], planes[3][start:end], hi)
        _join(lo, hi, words[start:end])


@dataclass(slots=True)
class _Plane:
    """One plane of a chunk being encoded, and how it will be stored."""

    sample: Any  #: its first SAMPLE bytes (all of it when the plane is short)
    compress: Compress | None = None  #: None: stored raw
    trial: bytes | None = None  #: the whole plane compressed, when a trial already did it
    whole: Any = None  #: the whole plane, once it is split off


def _planes(data: np.ndarray, group: int, codec: str, level: int) -> list[_Plane]:
    """Every plane of the chunk, judged on its sample (split off first, a cheap copy)."""
    n = len(data) // group
    if group == 1:
        samples: Any = [data[:SAMPLE]]
    else:
        samples = np.empty((group, min(n, SAMPLE)), np.uint8)
        _split(data[:group * samples.shape[1]], group, list(samples))
    planes = [_Plane(sample) for sample in samples]
    if n >= MIN_PLANE:
        for p in planes:
            p.compress, trial = _choose(codec, level, p.sample, n)
            p.trial = trial if len(p.sample) == n else None
    return planes


def _split_whole(data: np.ndarray, group: int, planes: list[_Plane]) -> None:
    """Give every plane its ``whole`` bytes. Planes stored raw go to fresh memory (the
    ``Encoded`` holds on to them); planes to compress to this thread's scratch."""
    n = len(data) // group
    if group == 1 or n == len(planes[0].sample):  # the sample is the whole plane
        for p in planes:
            p.whole = data if group == 1 else p.sample
        return
    squeezed = [p for p in planes if p.compress is not None]
    scratch = iter(_ctx.plane(len(squeezed) * n).reshape(len(squeezed), n))
    for p in planes:
        p.whole = np.empty(n, np.uint8) if p.compress is None else next(scratch)
    _split(data, group, [p.whole for p in planes])


def _store(p: _Plane, codec: str, scratch: bool) -> tuple[str, Any]:
    """Plane ``p`` as stored: (codec, bytes)."""
    if p.compress is None:
        return "raw", p.whole.data
    out = p.compress(p.whole) if p.trial is None else p.trial
    if _pays(out, p.whole):
        return codec, out
    # the sample promised more than the whole plane gives: never keep the scratch
    return "raw", (p.whole.copy() if scratch else p.whole).data


def encode_chunk(raw: memoryview, group: int, codec: str, level: int = 1) -> Encoded:
    """Encode one chunk. ``group`` > 1 byte-groups elements of that size first.

    Safe to call from several threads at once (contexts are per thread).
    """
    raw_hash = hash_bytes(raw)
    if codec == "raw":
        return Encoded(1, (("raw", raw),), raw_hash, raw_hash)
    if codec not in CODECS:
        raise ValueError(f"unknown codec {codec!r}")
    if group < 2 or len(raw) % group or len(raw) < group * MIN_PLANE:
        group = 1
    data = np.frombuffer(raw, dtype=np.uint8)
    planes = _planes(data, group, codec, level)
    if all(p.compress is None for p in planes):  # nothing pays: the raw bytes, unsplit
        return Encoded(1, (("raw", raw),), raw_hash, raw_hash)
    _split_whole(data, group, planes)
    scratch = group > 1 and len(planes[0].sample) < len(data) // group
    stored = tuple(_store(p, codec, scratch) for p in planes)
    h = xxhash.xxh3_128()
    for _, part in stored:
        h.update(part)
    return Encoded(group, stored, h.hexdigest(), raw_hash)


def decode_planes(stored: memoryview, planes: list[tuple[str, int]], group: int,
                  out: memoryview) -> None:
    """Decode a chunk's stored bytes into ``out`` (exactly the raw length).

    Every size comes from the manifest and bounds the decoder: a plane that would
    decode to more or fewer bytes than recorded is corruption, never a big allocation.
    Safe to call from several threads at once (contexts are per thread).
    """
    raw_len = len(out)
    if raw_len % group:
        raise CorruptCheckpointError(f"raw length {raw_len} is not a multiple of group {group}")
    if len(planes) != group or sum(length for _, length in planes) != len(stored):
        raise CorruptCheckpointError(
            f"plane table {list(planes)[:9]} does not match group {group} and "
            f"{len(stored)} stored bytes")
    plane_len = raw_len // group
    decoded = []
    pos = 0
    for codec, length in planes:
        plane = _decode_plane(codec, stored[pos:pos + length], plane_len)
        decoded.append(np.frombuffer(plane, dtype=np.uint8))
        pos += length
    _merge(decoded, np.frombuffer(out, dtype=np.uint8))


def _decode_plane(codec: str, data: memoryview, size: int):
    try:
        if codec == "raw":
            if len(data) != size:
                raise CorruptCheckpointError(f"raw plane holds {len(data)} bytes, expected {size}")
            return data
        if size > plane_bound(codec, len(data)):
            raise CorruptCheckpointError(f"a {codec} plane of {len(data)} bytes cannot decode to {size}")
        if codec == "zstd":
            declared = zstandard.frame_content_size(data)
            if declared != size:
                raise CorruptCheckpointError(
                    f"zstd frame declares {declared} bytes, the manifest says {size}")
            out = _ctx.decompressor.decompress(data, max_output_size=size)
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
