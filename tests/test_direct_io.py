"""Direct I/O: O_DIRECT shard writes and extent reads, their fallbacks, and what
they must not change (bytes, sizes, safetensors validity, error reporting)."""
from __future__ import annotations

import errno
import fcntl
import json
import os
import threading
import time

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

import ckptstore
from ckptstore.read import reader
from ckptstore.storage import LocalStorage, direct
from conftest_tiers import _bucket, s3_server  # noqa: F401

ALIGN = direct.ALIGN


def _aligned(data: bytes) -> memoryview:
    buf = direct.aligned_buffer(len(data))
    buf[:len(data)] = data
    return memoryview(buf)[:len(data)]


def _direct_supported(path) -> bool:
    try:
        fd = os.open(os.path.join(path, ".probe"), os.O_WRONLY | os.O_CREAT | direct.O_DIRECT)
    except OSError:
        return False
    os.close(fd)
    os.unlink(os.path.join(path, ".probe"))
    return True


@pytest.mark.parametrize("pieces", [
    [("held", 3 * ALIGN)],
    [("copy", 4096), ("held", 5 * ALIGN + 17)],  # a header page, then aligned staged bytes
    [("copy", 100), ("held", 2 * ALIGN), ("copy", 7)],  # unaligned: all through the bounce
    [("held", 40 << 20), ("copy", 3), ("held", ALIGN)],  # several requests in flight
    [("copy", direct.BOUNCE + 5)],  # fills the bounce buffer
    [],
])
def test_direct_handle_writes_exactly_the_bytes_given(tmp_path, pieces):
    s = LocalStorage(tmp_path)
    rng = np.random.default_rng(0)
    want = b""
    h = s.open_bulk_write("f")
    for kind, n in pieces:
        data = rng.integers(0, 256, n, dtype=np.uint8).tobytes()
        want += data
        if kind == "held":
            h.write_held(_aligned(data))
        else:
            h.write(data)
    h.fsync()
    h.close()
    assert (tmp_path / "f").read_bytes() == want


def test_shards_are_written_with_o_direct_where_the_file_system_takes_it(tmp_path, monkeypatch):
    if not _direct_supported(tmp_path):
        pytest.skip("this file system refuses O_DIRECT")
    seen = []
    real = direct.pwrite_all

    def spy(fd, view, offset, path):
        seen.append(bool(fcntl.fcntl(fd, fcntl.F_GETFL) & direct.O_DIRECT))
        return real(fd, view, offset, path)

    monkeypatch.setattr(direct, "pwrite_all", spy)
    ckptstore.save({"w": torch.randn(3 << 20)}, tmp_path / "c", compression="none", blocking=True)
    # the save ran in writer processes: repeat the shard write here to watch the calls
    h = LocalStorage(tmp_path).open_bulk_write("g")
    h.write_held(_aligned(os.urandom(8 * ALIGN)))
    h.fsync()
    h.close()
    assert seen and all(seen)
    monkeypatch.setenv("CKPTSTORE_DIRECT_IO", "0")
    seen.clear()
    h = LocalStorage(tmp_path).open_bulk_write("h")
    h.write_held(_aligned(os.urandom(8 * ALIGN)))
    h.fsync()
    h.close()
    assert seen and not any(seen)


def test_a_refused_direct_request_falls_back_to_buffered_io(tmp_path, monkeypatch):
    real = os.pwrite
    refused = []

    def pwrite(fd, data, offset):
        if fcntl.fcntl(fd, fcntl.F_GETFL) & direct.O_DIRECT:
            refused.append(offset)
            raise OSError(errno.EINVAL, "Invalid argument")
        return real(fd, data, offset)

    monkeypatch.setattr(os, "pwrite", pwrite)
    monkeypatch.setattr(direct, "open_direct",
                        lambda path, flags, mode=0o644: os.open(path, flags | direct.O_DIRECT, mode)
                        if _direct_supported(tmp_path) else os.open(path, flags, mode))
    data = os.urandom(3 * ALIGN + 5)
    h = LocalStorage(tmp_path).open_bulk_write("f")
    h.write_held(_aligned(data))
    h.fsync()
    h.close()
    assert (tmp_path / "f").read_bytes() == data
    if _direct_supported(tmp_path):
        assert refused  # it was tried, refused, and the same bytes went buffered


def test_a_failed_request_fails_fsync_and_abort_waits_for_every_request(tmp_path, monkeypatch):
    finished = []

    def slow_then_fail(fd, view, offset, path):
        time.sleep(0.2)
        finished.append(time.monotonic())
        if offset == 0:
            raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(direct, "pwrite_all", slow_then_fail)
    monkeypatch.setattr(direct, "BLOCK", ALIGN)
    h = LocalStorage(tmp_path).open_bulk_write("f")
    h.write_held(_aligned(os.urandom(4 * ALIGN)))
    with pytest.raises(OSError) as e:
        h.fsync()
    assert e.value.errno == errno.ENOSPC
    h.abort()
    finished.clear()
    h = LocalStorage(tmp_path).open_bulk_write("g")
    h.write_held(_aligned(os.urandom(4 * ALIGN)))
    h.abort()
    returned = time.monotonic()
    assert len(finished) == 4 and max(finished) <= returned  # nothing reads the memory after


def test_uncompressed_shards_start_their_data_on_a_page_and_stay_safetensors(tmp_path):
    state = {"a": torch.randn(1000), "b": torch.arange(7, dtype=torch.int8),
             "c": torch.randn(33, 3).to(torch.bfloat16)}
    ckptstore.save(state, tmp_path / "c", compression="none", blocking=True)
    shards = sorted((tmp_path / "c").glob("*.safetensors"))
    assert shards
    for f in shards:
        raw = f.read_bytes()
        n = int.from_bytes(raw[:8], "little")
        assert (8 + n) % ALIGN == 0
        json.loads(raw[8:8 + n])  # padded with spaces only
        with safe_open(str(f), "pt") as st:
            for k in st.keys():
                assert torch.equal(st.get_tensor(k), state[k])
        assert set(load_file(str(f))) == set(state)


def test_read_extent_returns_writable_bytes_and_is_short_at_the_end(tmp_path):
    data = os.urandom(5 * ALIGN + 123)
    (tmp_path / "f").write_bytes(data)
    s = LocalStorage(tmp_path)
    for off, n in [(0, len(data)), (1, 10), (ALIGN - 1, 2 * ALIGN + 3), (len(data) - 5, 100),
                   (len(data), 10), (3 * ALIGN, 0)]:
        got = s.read_extent("f", off, n)
        assert bytes(got) == data[off:off + n]
        if len(got):
            got[0] = (got[0] + 1) % 256  # the caller owns it
    with pytest.raises(FileNotFoundError):
        s.read_extent("missing", 0, 10)


def test_cold_files_are_read_and_cached_files_are_mapped(tmp_path, monkeypatch):
    path = tmp_path / "c"
    state = {"w": torch.randn(1 << 20), "v": torch.randn(100)}
    ckptstore.save(state, path, compression="none", blocking=True)
    s = LocalStorage(path)
    shard = next(p.name for p in path.glob("*.safetensors"))
    fd = os.open(path / shard, os.O_RDONLY)
    os.fsync(fd)
    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    os.close(fd)
    frac = s.cached_fraction(shard)
    if frac is None:
        pytest.skip("no RWF_NOWAIT here: never mapped by default")
    assert frac < reader.WARM
    mapped = []
    real = reader.FileMaps

    def spy(*a):
        mapped.append(True)
        return real(*a)

    monkeypatch.setattr(reader, "FileMaps", spy)
    cold = ckptstore.load(path)
    assert not mapped and torch.equal(cold["w"], state["w"]) and torch.equal(cold["v"], state["v"])
    (path / shard).read_bytes()  # now in the page cache
    assert s.cached_fraction(shard) == 1.0
    warm = ckptstore.load(path)
    assert mapped and torch.equal(warm["w"], state["w"])
    mapped.clear()
    ckptstore.load(path, mmap=False)
    assert not mapped


def test_extent_reads_handle_tensors_not_aligned_to_their_element_size(tmp_path):
    state = {"a": torch.arange(3, dtype=torch.int8), "b": torch.randn(1000, dtype=torch.float64),
             "c": np.arange(5, dtype=np.int16), "d": torch.randn(10).to(torch.bfloat16)}
    ckptstore.save(state, tmp_path / "c", compression="none", blocking=True)
    out = ckptstore.load(tmp_path / "c", mmap=False)
    for k in state:
        got, want = out[k], state[k]
        if isinstance(want, np.ndarray):
            assert np.array_equal(got, want) and got.dtype == want.dtype
        else:
            assert torch.equal(got, want)
            got.add_(1)  # usable and writable (its own copy or a view of the extent)


def test_a_damaged_shard_read_as_an_extent_names_the_tensor(tmp_path):
    ckptstore.save({"w": torch.randn(1 << 16)}, tmp_path / "c", compression="none", blocking=True)
    shard = next((tmp_path / "c").glob("*.safetensors"))
    raw = bytearray(shard.read_bytes())
    raw[-100] ^= 0xFF
    shard.write_bytes(bytes(raw))
    with pytest.raises(ckptstore.CorruptCheckpointError, match="w"):
        ckptstore.load(tmp_path / "c", mmap=False)
    shard.write_bytes(bytes(raw[:-1000]))  # truncated
    with pytest.raises(ckptstore.CorruptCheckpointError):
        ckptstore.load(tmp_path / "c", mmap=False)


def test_auto_compression_is_raw_on_local_disks_and_zstd_on_object_stores(tmp_path, s3_server):
    state = {"w": torch.randn(4096)}
    ckptstore.save(state, tmp_path / "c", blocking=True)
    m = ckptstore.open(tmp_path / "c").manifest
    assert m.compression == "none" and all(f.name.endswith(".safetensors") for f in m.files)
    url, opts = _bucket("s3", s3_server)
    ckptstore.save(state, url + "/c", storage_options=opts, blocking=True)
    m = ckptstore.open(url + "/c", storage_options=opts).manifest
    assert m.compression == "zstd"
    assert torch.equal(ckptstore.load(url + "/c", storage_options=opts)["w"], state["w"])


def test_auto_compression_can_be_overridden_for_slow_local_file_systems(tmp_path, monkeypatch):
    monkeypatch.setenv("CKPTSTORE_AUTO_COMPRESSION", "zstd")
    ckptstore.save({"w": torch.randn(4096)}, tmp_path / "c", blocking=True)
    assert ckptstore.open(tmp_path / "c").manifest.compression == "zstd"
    monkeypatch.setenv("CKPTSTORE_AUTO_COMPRESSION", "fast")
    with pytest.raises(ValueError, match="CKPTSTORE_AUTO_COMPRESSION"):
        ckptstore.save({"w": torch.randn(4)}, tmp_path / "d", blocking=True)


def test_concurrent_extent_loads_share_the_request_threads(tmp_path):
    state = {f"t{i}": torch.randn(1 << 18) for i in range(8)}
    ckptstore.save(state, tmp_path / "c", compression="none", blocking=True, shard_size=1 << 20,
                   chunk_size=1 << 18)
    errors = []

    def go():
        try:
            out = ckptstore.load(tmp_path / "c", mmap=False)
            assert all(torch.equal(out[k], state[k]) for k in state)
        except BaseException as e:  # reported below
            errors.append(e)

    threads = [threading.Thread(target=go) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors


def test_a_shards_staged_pieces_are_written_as_one_run():
    from ckptstore.pipeline.writer import PieceJob, _runs

    pieces = (PieceJob(0, 0, 4096, 10, 1), PieceJob(1, 0, 4106, 0, 1),  # empty: skipped
              PieceJob(2, 0, 4106, 3, 1), PieceJob(3, 0, 8192, 100, 1))
    assert _runs(pieces) == [(4096, 4109), (8192, 8292)]


def test_checkpointer_auto_compression_follows_its_first_tier(tmp_path):
    ck = ckptstore.Checkpointer(tmp_path / "run", compression="auto")
    assert ck.compression == "none" and not ck.incremental  # plain shards cannot be incremental
    ck.save(1, {"w": torch.randn(64)})
    ck.wait()
    m = ckptstore.open(ck.primary.root.child(ck.primary.root.listdir()[0])).manifest
    assert m.compression == "none"
    ck.close()
    assert ckptstore.Checkpointer(tmp_path / "run2").compression == "zstd"  # its default
    with pytest.raises(ValueError, match="compression"):
        ckptstore.Checkpointer(tmp_path / "run3", compression="brotli")


def test_drop_cached_evicts_every_file_under_a_directory(tmp_path):
    files = [tmp_path / "a" / "x", tmp_path / "a" / "b" / "y", tmp_path / "z"]
    for f in files:
        f.parent.mkdir(parents=True, exist_ok=True)
        f.write_bytes(os.urandom(1 << 20))
        f.read_bytes()

    def cached(f) -> float | None:
        fd = os.open(f, os.O_RDONLY)
        try:
            return direct.cached_fraction(fd)
        finally:
            os.close(fd)

    if any(cached(f) != 1.0 for f in files):
        pytest.skip("this file system does not show its page cache through mincore")
    direct.drop_cached(tmp_path / "z")  # one file
    if cached(tmp_path / "z") == 1.0:
        pytest.skip("the page cache here ignores POSIX_FADV_DONTNEED (tmpfs)")
    assert cached(tmp_path / "z") == 0.0 and cached(files[0]) == 1.0
    direct.drop_cached(tmp_path / "a")  # a tree
    assert [cached(f) for f in files] == [0.0, 0.0, 0.0]
