"""The chunk codec: round trips for every codec, group and awkward size, the stored
format against the previous implementation (kept here as the reference), threads."""
from __future__ import annotations

import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import lz4.block
import numpy as np
import pytest
import xxhash
import zstandard

from ckptstore.errors import CorruptCheckpointError
from ckptstore.pipeline import codec
from ckptstore.pipeline.codec import Encoded, decode_planes, encode_chunk, hash_bytes

SIZES = [0, 1, 2, 3, 5, 63, 64, 127, 128, 129, 255, 256, 257, 1000, 4097, 65537, 3 * 65536 + 6,
         1 << 20]
GROUPS = [1, 2, 3, 4, 8]


# -- reference: the codec as it was before planes were split with shifts ------------

def old_encode(raw: memoryview, group: int, codec_name: str, level: int = 1) -> Encoded:
    """The previous encoder: strided plane copies, zstd at ``level`` on every plane."""
    raw_hash = hash_bytes(raw)
    if codec_name == "raw":
        return Encoded(1, (("raw", raw),), raw_hash, raw_hash)

    def compress(data: memoryview) -> bytes:
        if codec_name == "zstd":
            return zstandard.ZstdCompressor(level=level).compress(data)
        return lz4.block.compress(data, store_size=False)

    def maybe(plane: memoryview) -> tuple[str, object]:
        n = len(plane)
        if n < 64:
            return "raw", plane
        if n > 4 * 65536 and len(compress(plane[:65536])) > 0.95 * 65536:
            return "raw", plane
        out = compress(plane)
        return ("raw", plane) if len(out) > 0.95 * n else (codec_name, out)

    if group > 1 and len(raw) % group == 0 and len(raw) >= group * 64:
        grid = np.frombuffer(raw, dtype=np.uint8).reshape(-1, group)
        planes = [np.ascontiguousarray(grid[:, i]).data for i in range(group)]
    else:
        group, planes = 1, [raw]
    stored = tuple(maybe(p) for p in planes)
    if group == 1 and stored[0][0] == "raw":
        return Encoded(1, (("raw", raw),), raw_hash, raw_hash)
    h = xxhash.xxh3_128()
    for _, data in stored:
        h.update(data)
    return Encoded(group, stored, h.hexdigest(), raw_hash)


def old_decode(stored: bytes, planes: list[tuple[str, int]], group: int, raw_len: int) -> bytes:
    """The previous decoder: one plane at a time into a strided column of the output."""
    assert len(planes) == group and sum(n for _, n in planes) == len(stored)
    plane_len = raw_len // group
    target = np.zeros(raw_len, np.uint8)
    grid = target.reshape(-1, group)
    pos = 0
    for i, (name, length) in enumerate(planes):
        data = stored[pos:pos + length]
        pos += length
        if name == "raw":
            plane = data
        elif name == "zstd":
            assert zstandard.frame_content_size(data) == plane_len
            plane = zstandard.ZstdDecompressor().decompress(data, max_output_size=plane_len)
        else:
            plane = lz4.block.decompress(data, uncompressed_size=plane_len)
        assert len(plane) == plane_len
        grid[:, i] = np.frombuffer(plane, dtype=np.uint8)
    return target.tobytes()


# -- helpers ----------------------------------------------------------------------

def stored_bytes(enc: Encoded) -> bytes:
    return b"".join(bytes(data) for _, data in enc.planes)


def table(enc: Encoded) -> list[tuple[str, int]]:
    return [(name, len(data)) for name, data in enc.planes]


def decode(enc: Encoded, raw_len: int) -> bytes:
    out = bytearray(raw_len)
    decode_planes(memoryview(stored_bytes(enc)), table(enc), enc.group, memoryview(out))
    return bytes(out)


def check(raw: bytes, group: int, name: str, level: int = 1) -> Encoded:
    """Encode, check the record is consistent, decode with both decoders."""
    enc = encode_chunk(memoryview(raw), group, name, level)
    stored = stored_bytes(enc)
    assert enc.length == len(stored) and enc.raw_hash == hash_bytes(raw)
    assert enc.hash == hash_bytes(stored)
    assert enc.group in (1, group) and len(enc.planes) == enc.group and len(raw) % enc.group == 0
    assert all(c in codec.CODECS for c, _ in enc.planes)
    assert all(len(d) * enc.group == len(raw) for c, d in enc.planes if c == "raw")
    assert decode(enc, len(raw)) == raw
    assert old_decode(stored, table(enc), enc.group, len(raw)) == raw
    return enc


def floats(n_bytes: int, itemsize: int, seed: int = 0) -> bytes:
    """Trained-weight-like floats: normal values, little endian, bf16 as truncated fp32."""
    rng = np.random.default_rng(seed)
    x = (rng.standard_normal(n_bytes // itemsize + 1) * 0.02).astype("<f4")
    if itemsize == 2:
        x = (x.view("<u4") >> 16).astype("<u2")
    return x.tobytes()[:n_bytes]


def kinds(n: int, group: int) -> dict[str, bytes]:
    rng = np.random.default_rng(n * 31 + group)
    return {
        "floats": floats(n, 4 if group > 2 else 2),
        "random": rng.integers(0, 256, n, dtype=np.uint8).tobytes(),
        "zeros": bytes(n),
        "pattern": (bytes(range(7)) * (n // 7 + 1))[:n],
    }


# -- round trips --------------------------------------------------------------------

@pytest.mark.parametrize("name", ["zstd", "lz4", "raw"])
@pytest.mark.parametrize("group", GROUPS)
def test_round_trip_every_codec_group_and_size(name: str, group: int) -> None:
    for n in SIZES:
        for kind, raw in kinds(n, group).items():
            try:
                check(raw, group, name)
            except AssertionError as e:
                raise AssertionError(f"{name} group {group} size {n} {kind}") from e


@pytest.mark.parametrize("level", [-5, 1, 3, 19])
def test_round_trip_other_zstd_levels(level: int) -> None:
    for group, itemsize in ((2, 2), (4, 4)):
        check(floats(300_000, itemsize), group, "zstd", level)


def test_incompressible_data_is_stored_raw_and_unsplit() -> None:
    raw = np.random.default_rng(1).integers(0, 256, 1 << 20, dtype=np.uint8).tobytes()
    for group in (1, 2, 4):
        for name in ("zstd", "lz4"):
            enc = check(raw, group, name)
            assert enc.group == 1 and table(enc) == [("raw", len(raw))]
            assert enc.hash == enc.raw_hash


def test_highly_compressible_data_shrinks() -> None:
    raw = np.repeat(np.arange(64, dtype="<f4"), 4096).tobytes()  # long runs of equal floats
    for name in ("zstd", "lz4"):
        for group in (1, 4):
            enc = check(raw, group, name)
            assert enc.length < 0.02 * len(raw), (name, group, table(enc))
    tiled = np.tile(np.random.default_rng(2).standard_normal(2048).astype("<f4"), 64).tobytes()
    enc = check(tiled, 4, "zstd")  # repeats only the zstd level finds
    assert enc.length < 0.05 * len(tiled), table(enc)


@pytest.mark.parametrize("itemsize", [2, 4])
def test_float_chunks_compress_only_the_exponent_plane_and_no_worse_than_before(itemsize: int) -> None:
    raw = floats(4 << 20, itemsize, seed=3)
    enc = check(raw, itemsize, "zstd")
    assert [c for c, _ in enc.planes] == ["raw"] * (itemsize - 1) + ["zstd"]
    old = old_encode(memoryview(raw), itemsize, "zstd")
    assert enc.length <= old.length * 1.002, (enc.length, old.length)


def test_sample_that_promises_too_much() -> None:
    """A plane whose start compresses but whole does not is stored raw, and the raw
    bytes survive later calls on the same thread (they are not the scratch plane)."""
    rng = np.random.default_rng(4)
    raw = np.concatenate([np.zeros(1 << 16, np.uint8), rng.integers(0, 256, 1 << 21, dtype=np.uint8)])
    first = encode_chunk(memoryview(raw.tobytes()), 2, "zstd")
    later = [encode_chunk(memoryview(floats(len(raw), 2, seed=s)), 2, "zstd") for s in range(3)]
    assert any(c == "raw" for c, _ in first.planes)
    assert decode(first, len(raw)) == raw.tobytes()
    for s, enc in enumerate(later):
        assert decode(enc, len(raw)) == floats(len(raw), 2, seed=s)


# -- the stored format ------------------------------------------------------------

@pytest.mark.parametrize("name", ["zstd", "lz4"])
@pytest.mark.parametrize("group", [1, 2, 4])
def test_chunks_from_the_previous_encoder_decode(name: str, group: int) -> None:
    for n in (0, 64, 200, 4096, 300_000, 1 << 20):
        for raw in kinds(n, group).values():
            old = old_encode(memoryview(raw), group, name)
            assert decode(old, len(raw)) == raw


def test_zstd_planes_are_frames_that_record_their_size() -> None:
    enc = check(floats(1 << 20, 2), 2, "zstd")
    for name, data in enc.planes:
        if name == "zstd":
            assert zstandard.frame_content_size(data) == (1 << 20) // 2


def test_lz4_planes_are_blocks_without_a_stored_size() -> None:
    enc = check(floats(1 << 20, 2), 2, "lz4")
    (name, data), = [p for p in enc.planes if p[0] == "lz4"]
    assert lz4.block.decompress(data, uncompressed_size=(1 << 20) // 2) == floats(1 << 20, 2)[1::2]


def test_decoder_refuses_bad_planes() -> None:
    enc = check(floats(1 << 16, 2), 2, "zstd")
    stored, planes = stored_bytes(enc), table(enc)
    with pytest.raises(CorruptCheckpointError):  # the zstd frame declares another size
        decode_planes(memoryview(stored), planes, 2, memoryview(bytearray((1 << 16) + 2)))
    bad = bytearray(stored)
    bad[planes[0][1] + 20] ^= 0xFF  # inside the compressed exponent plane
    try:
        decode_planes(memoryview(bytes(bad)), planes, 2, memoryview(bytearray(1 << 16)))
    except CorruptCheckpointError:
        pass  # or it decodes to other bytes: the raw hash catches that
    with pytest.raises(CorruptCheckpointError):
        decode_planes(memoryview(b"x" * 10), [("lz4", 10)], 1, memoryview(bytearray(100)))
    with pytest.raises(CorruptCheckpointError):
        decode_planes(memoryview(b"x" * 12), [("snappy", 4)] * 3, 3, memoryview(bytearray(12)))


def test_unknown_codec_is_refused() -> None:
    with pytest.raises(ValueError):
        encode_chunk(memoryview(b"abcd"), 1, "brotli")


def test_the_codec_module_does_not_import_torch() -> None:
    code = "import sys, ckptstore.pipeline.codec; sys.exit('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0


# -- threads ----------------------------------------------------------------------

def test_threads_encode_and_decode_like_one_thread() -> None:
    """Contexts and scratch are per thread: concurrent calls give the bytes one thread
    gives (run twice over, so every thread reuses its contexts)."""
    chunks = [(floats(n, g, seed=i), g) for i, (n, g) in
              enumerate([(1 << 20, 2), (1 << 20, 4), (300_000, 2), (4096, 4), (1000, 2)] * 4)]
    chunks += [(kinds(1 << 18, 4)["pattern"], 4), (bytes(1 << 18), 2)]
    ref = [encode_chunk(memoryview(raw), g, "zstd") for raw, g in chunks]

    def enc(i: int) -> Encoded:
        raw, g = chunks[i % len(chunks)]
        return encode_chunk(memoryview(raw), g, "zstd")

    def dec(i: int) -> bytes:
        e = ref[i % len(chunks)]
        return decode(e, len(chunks[i % len(chunks)][0]))

    with ThreadPoolExecutor(8) as pool:
        encoded = list(pool.map(enc, range(2 * len(chunks))))
        decoded = list(pool.map(dec, range(2 * len(chunks))))
    for i, e in enumerate(encoded):
        r = ref[i % len(chunks)]
        assert (e.group, table(e), e.hash, e.raw_hash) == (r.group, table(r), r.hash, r.raw_hash)
        assert stored_bytes(e) == stored_bytes(r)
    for i, d in enumerate(decoded):
        assert d == chunks[i % len(chunks)][0]
