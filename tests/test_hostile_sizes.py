"""Hostile size claims: memory follows what the files hold, not what the manifest claims.

Each case is built fresh from a small real checkpoint and read in a child process
(``fuzz.hostile.run_child``) under an address-space limit of 2 GiB over what its
imports took; the child reports its outcome, its RSS after the imports and its peak
RSS. Every read must end in a typed error (fsck: a damage report), in seconds, with
the peak at most :data:`OVER` bytes above the baseline.
"""
from __future__ import annotations

import dataclasses
import json
import os
import shutil
from collections.abc import Callable

import pytest
import torch

import ckptstore
from ckptstore.errors import CheckpointTooLargeError, CkptError, CorruptCheckpointError, UnsafeCheckpointError
from ckptstore.manifest import read_manifest
from ckptstore.manifest.validate import check_coded_plane
from ckptstore.storage import LocalStorage
from fuzz import hostile
from fuzz.__main__ import main as fuzz_main
from fuzz.common import Budget, Report

OVER = 256 << 20  #: the most a hostile case may add to a child's RSS
SECONDS = 30.0


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> str:
    return hostile.base_checkpoint(str(tmp_path_factory.mktemp("hostile")))


def _build(base: str, tmp_path, builder: Callable[[str], None]) -> str:
    path = str(tmp_path / "case")
    shutil.copytree(base, path)
    builder(path)
    return path


def _assert_refused(ops: tuple[str, ...], path: str, *, limit: int = hostile.LIMIT,
                    expect: str = "") -> list[dict]:
    """Each of ``ops`` (in one child) ends in a typed error (fsck: damage; ``expect`` in
    the outcome of the others), in seconds, in bounded memory."""
    results = hostile.run_ops(list(ops), path, limit=limit, timeout=120)
    for res in results:
        assert hostile.acceptable(res["op"], res["outcome"]), res
        assert res["op"].startswith("fsck") or expect in res["outcome"], res
        assert res["peak_rss"] - res["base_rss"] <= OVER, res
        assert res["seconds"] < SECONDS, res
    return results


@pytest.mark.timeout(300)
def test_a_16_byte_shard_claiming_64_gib_through_zstd_is_refused_before_allocating(base, tmp_path):
    path = _build(base, tmp_path, hostile.claim_zstd)
    _assert_refused(hostile.OPS, path, expect="UnsafeCheckpointError")
    for deep in (False, True):
        report = ckptstore.fsck(path, deep=deep)
        assert not report.ok and "zstd can decode to" in report.damage[0].problem, report


@pytest.mark.timeout(300)
def test_a_16_byte_shard_the_manifest_says_is_64_gib_is_refused_by_its_size(base, tmp_path):
    path = _build(base, tmp_path, hostile.claim_raw)
    _assert_refused(("load", "load_noverify", "fsck", "fsck_deep"), path,
                    expect="tensor 'model.w' chunk 0 (hostile.chunks bytes [0, 68719476736)) lies past its end")


@pytest.mark.timeout(300)
def test_a_sparse_1_tib_shard_matching_its_manifest_is_too_large_to_load(base, tmp_path):
    path = _build(base, tmp_path, hostile.sparse(1 << 40))
    for res in _assert_refused(hostile.READS, path, expect="CheckpointTooLargeError"):
        assert "'model.w'" in res["outcome"] and "keys=" in res["outcome"], res


def test_a_load_larger_than_physical_memory_is_refused_before_allocating(base):
    from ckptstore.read import extents

    rec = read_manifest(LocalStorage(base)).tensors[0]
    physical = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    assert extents.memory_limit() >= physical  # no address-space limit in this process
    huge = dataclasses.replace(rec, nbytes=extents.memory_limit() + 1)
    with pytest.raises(CheckpointTooLargeError, match=f"tensor {rec.name!r}"):
        extents.check_memory([huge])
    extents.check_memory([rec])


@pytest.mark.timeout(300)
def test_fsck_streams_a_sparse_4_gib_shard_in_bounded_memory(base, tmp_path):
    path = _build(base, tmp_path, hostile.sparse(4 << 30))
    _assert_refused(("fsck",), path)  # the hash of 4 GiB of zeros is not the claimed one


@pytest.mark.timeout(300)
def test_a_zstd_frame_of_4_gib_of_zeros_is_refused_before_decoding(base, tmp_path):
    path = _build(base, tmp_path, hostile.zstd_bomb)
    _assert_refused(hostile.OPS, path, expect="CKPTSTORE_MAX_CHUNK_BYTES")


@pytest.mark.timeout(300)
def test_many_small_zstd_bombs_stop_at_the_first_damaged_chunk(base, tmp_path):
    """1 GiB of zeros as 64 chunks of 16 MiB, each within every limit, with wrong raw
    hashes: no address-space limit here, so only stopping early keeps memory bounded."""
    path = _build(base, tmp_path, hostile.zstd_bombs(64))
    res = _assert_refused(("load", "fsck_deep"), path, limit=0, expect="CorruptCheckpointError")
    assert "chunk 0 " in res[0]["outcome"], res


@pytest.mark.timeout(300)
def test_a_90_mb_manifest_of_empty_objects_is_refused_before_parsing(base, tmp_path):
    path = _build(base, tmp_path, hostile.empty_objects(90 << 20))
    _assert_refused(("load", "open", "fsck"), path, expect="CKPTSTORE_MAX_MANIFEST_MEMORY")


def test_the_manifest_memory_limit_can_be_raised_for_a_trusted_checkpoint(base, tmp_path, monkeypatch):
    path = _build(base, tmp_path, hostile.empty_objects(1 << 20))
    monkeypatch.setenv("CKPTSTORE_MAX_MANIFEST_MEMORY", str(16 << 20))
    with pytest.raises(UnsafeCheckpointError, match="CKPTSTORE_MAX_MANIFEST_MEMORY"):
        read_manifest(LocalStorage(path))
    monkeypatch.setenv("CKPTSTORE_MAX_MANIFEST_MEMORY", str(256 << 20))
    assert len(read_manifest(LocalStorage(path)).metadata) > 300_000


def test_a_legitimate_checkpoint_loads_under_the_same_limit(base):
    results = hostile.run_ops(["load", "open", "load_mmap", "fsck_deep"], base)
    assert [r["outcome"] for r in results] == ["ok"] * 4, results


def test_compressed_chunks_over_the_decode_limit_are_refused_on_save_and_can_be_allowed(tmp_path, monkeypatch):
    w = torch.zeros(1 << 16)
    monkeypatch.setenv("CKPTSTORE_MAX_CHUNK_BYTES", str(64 << 10))
    with pytest.raises(ValueError, match="CKPTSTORE_MAX_CHUNK_BYTES"):
        ckptstore.save({"w": w}, tmp_path / "a", compression="zstd", chunk_size=128 << 10)
    ckptstore.save({"w": w}, tmp_path / "a", compression="none", chunk_size=128 << 10).wait()
    monkeypatch.delenv("CKPTSTORE_MAX_CHUNK_BYTES")
    ckptstore.save({"w": w}, tmp_path / "b", compression="zstd", chunk_size=128 << 10).wait()
    assert torch.equal(ckptstore.load(tmp_path / "b")["w"], w)
    monkeypatch.setenv("CKPTSTORE_MAX_CHUNK_BYTES", str(64 << 10))  # a reader with a lower limit
    with pytest.raises(UnsafeCheckpointError, match="over the 65536-byte limit"):
        ckptstore.load(tmp_path / "b")
    assert torch.equal(ckptstore.load(tmp_path / "a")["w"], w)  # raw chunks: bounded by the file


def test_a_compressed_plane_is_bounded_by_its_codec_and_its_raw_size():
    check_coded_plane("c", "lz4", 10, 2560)
    with pytest.raises(UnsafeCheckpointError, match="lz4 can decode to"):
        check_coded_plane("c", "lz4", 10, 2561)
    check_coded_plane("c", "zstd", 16, 16 * 32768)
    with pytest.raises(UnsafeCheckpointError, match="zstd can decode to"):
        check_coded_plane("c", "zstd", 16, 16 * 32768 + 1)
    with pytest.raises(CorruptCheckpointError, match="larger than"):
        check_coded_plane("c", "zstd", 300, 256)
    frame = hostile.rle_zstd_frame(1 << 20)  # the densest zstd there is fits the bound
    assert (1 << 20) <= 32768 * len(frame)


def test_an_allocation_the_allocator_refuses_is_a_typed_error(base, monkeypatch):
    from ckptstore.read import extents

    def refuse(*a, **k):
        raise RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 1 bytes")

    monkeypatch.setattr(LocalStorage, "read_extent", refuse)
    with pytest.raises(CheckpointTooLargeError, match="does not fit in memory") as e:
        ckptstore.load(base, mmap=False)
    assert isinstance(e.value, MemoryError) and isinstance(e.value, CkptError)
    assert extents.memory_limit() > 0


@pytest.mark.timeout(300)
def test_hostile_family_short_run():
    report = Report()
    hostile.run(report, Budget(8), seed=1, cases=("zstd_bombs_4g", "sparse_1t"))
    assert report.counts["failures"] == 0, report.details
    assert report.counts["hostile_cases"] >= 2, report.counts


@pytest.mark.timeout(300)
def test_hostile_family_cli(tmp_path, capsys):
    assert fuzz_main(["hostile", "--budget", "3", "--json", str(tmp_path / "r.json")]) == 0
    with open(tmp_path / "r.json") as f:
        assert json.load(f)["hostile_cases"] >= 1
