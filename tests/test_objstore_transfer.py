"""Uploads in parts and parallel ranged reads on object stores, against the real
protocol servers (moto S3, fake-gcs-server): ``FsspecStorage.open_bulk_write``
(S3 multipart uploads, GCS resumable uploads) and ``FsspecStorage.read_extent``.

Parts are 5 MiB (the smallest S3 takes) and objects ~23 MiB, so several parts are in
flight while the tests stay small.
"""
from __future__ import annotations

import array
import os
import pickle
import uuid

import pytest
import torch
from conftest import assert_same_tree
from conftest_tiers import _bucket, gcs_bucket, gcs_server, s3_bucket, s3_server  # noqa: F401

import ckptstore
from ckptstore.commit.atomic import AtomicFile
from ckptstore.errors import StorageError, TransientStorageError
from ckptstore.storage import object_requests, transfer
from ckptstore.storage.fsspec_backend import FsspecStorage
from ckptstore.storage.transfer import PartedUpload, TransferSettings

pytestmark = pytest.mark.timeout(180)

MIB = 1 << 20
PART = 5 * MIB
SIZE = 23 * MIB + 12345  # five parts, the last one short
SMALL = {"ckptstore_part_size": "5M", "ckptstore_gcs_part_size": "5M", "ckptstore_range_size": "3M",
         "ckptstore_concurrency": 4}


@pytest.fixture(scope="module")
def data() -> bytes:
    return os.urandom(SIZE)




@pytest.fixture(params=["s3", "gs"])
def store(request) -> FsspecStorage:
    """A fresh prefix in a bucket of each emulator, with 5 MiB parts and 3 MiB ranges."""
    url, opts = request.getfixturevalue("s3_bucket" if request.param == "s3" else "gcs_bucket")
    s = FsspecStorage(f"{url}/{uuid.uuid4().hex}/step", {**opts, **SMALL})
    s.makedirs()
    return s


@pytest.fixture
def s3_store(s3_bucket) -> FsspecStorage:
    url, opts = s3_bucket
    return FsspecStorage(f"{url}/{uuid.uuid4().hex}/step", {**opts, **SMALL})


def _write_pieces(h, data: bytes, header: bytes = b"HEAD") -> bytes:
    """A header copied with ``write``, then the data held in 7 MiB pieces (parts span
    pieces and pieces span parts)."""
    h.write(header)
    view = memoryview(data)
    for i in range(0, len(view), 7 * MIB):
        h.write_held(view[i:i + 7 * MIB])
    return header + data


def _incomplete(store: FsspecStorage) -> list:
    return store.incomplete_uploads()


# -- uploads ------------------------------------------------------------------------

def test_bulk_write_in_parts_reads_back_identical(store, data):
    h = store.open_bulk_write("shard")
    assert isinstance(h, PartedUpload) and h.part_size == PART
    whole = _write_pieces(h, data)
    h.fsync()
    assert not store.exists("shard")  # visible, whole, on close only
    h.close()
    assert store.size("shard") == len(whole)
    assert store.read("shard") == whole
    assert len(h.futures) == 0 and h.state == "closed"
    if store.protocol == "s3":  # a multipart upload of five parts, none left behind
        assert str(store.info("shard")["ETag"]).strip('"').endswith("-5")
    assert _incomplete(store) == []
    h.close()  # closing twice is harmless


def test_parts_go_up_while_writing(s3_store, data, monkeypatch):
    sent = []
    real = object_requests.S3Parts.send
    monkeypatch.setattr(object_requests.S3Parts, "send", lambda self, part: sent.append(part.number)
                        or real(self, part))
    h = s3_store.open_bulk_write("shard")
    h.write_held(memoryview(data)[:3 * PART + 1])
    for f in list(h.futures):
        f.result()
    assert sorted(sent) == [1, 2, 3]  # before fsync or close
    h.write_held(memoryview(data)[3 * PART + 1:])
    h.close()
    assert s3_store.read("shard") == data


def test_small_object_is_one_put(store):
    h = store.open_bulk_write("small")
    h.write_held(memoryview(b"x" * 1000))
    h.fsync()
    h.close()
    assert store.read("small") == b"x" * 1000
    if store.protocol == "s3":
        assert "-" not in str(store.info("small")["ETag"])
    h = store.open_bulk_write("empty")
    h.fsync()
    h.close()
    assert store.size("empty") == 0


def test_exact_parts_and_writes_after_fsync(store, data):
    """Sizes on part and chunk boundaries, an fsync in the middle, then more writes."""
    h = store.open_bulk_write("exact")
    h.write_held(memoryview(data)[:2 * PART])
    h.fsync()
    h.write(memoryview(data)[2 * PART:4 * PART])
    h.fsync()
    h.close()
    assert store.read("exact") == data[:4 * PART]


def test_typed_views_count_bytes(store):
    words = array.array("d", range(1000))
    h = store.open_bulk_write("w")
    assert h.write_held(memoryview(words)) == 8000
    assert h.write(memoryview(words)) == 8000
    h.close()
    assert store.read("w") == words.tobytes() * 2


def test_abort_leaves_no_object_and_no_upload(store, data):
    h = store.open_bulk_write("gone")
    _write_pieces(h, data)  # parts in flight
    h.abort()
    assert not store.exists("gone") and store.listdir() == []
    assert _incomplete(store) == []
    h.abort()  # twice is harmless
    with pytest.raises(StorageError):
        h.write(b"more")


def test_abort_after_fsync_keeps_the_previous_object(store, data):
    h = store.open_bulk_write("f")
    h.write_held(memoryview(data)[:1000])
    h.close()
    h = store.open_bulk_write("f")
    _write_pieces(h, data)
    h.fsync()
    h.abort()
    assert store.read("f") == data[:1000]
    assert _incomplete(store) == []


@pytest.mark.parametrize("when", ["fsync", "close"])
def test_failed_part_fails_typed_and_leaves_nothing(store, data, monkeypatch, when):
    target = object_requests.S3Parts if store.protocol == "s3" else object_requests.GCSResumable
    real = target.send

    def send(self, part):
        if part.number == 2:
            raise PermissionError("injected: part 2 refused")
        return real(self, part)

    monkeypatch.setattr(target, "send", send)
    h = store.open_bulk_write("broken")
    with pytest.raises(StorageError, match="part 2") as info:
        _write_pieces(h, data)
        if when == "fsync":
            h.fsync()
        h.close()
    assert isinstance(info.value.__cause__, PermissionError)
    assert h.state == "failed"
    h.abort()  # what AtomicFile does next: nothing left to do
    assert not store.exists("broken")
    assert _incomplete(store) == []


def test_failed_start_fails_typed(s3_store, data, monkeypatch):
    def begin(self):
        raise PermissionError("injected: no multipart uploads here")

    monkeypatch.setattr(object_requests.S3Parts, "begin", begin)
    h = s3_store.open_bulk_write("shard")
    with pytest.raises(StorageError, match="no multipart") as info:
        h.write_held(memoryview(data))
    assert isinstance(info.value.__cause__, PermissionError) and h.state == "failed"
    h.abort()
    assert not s3_store.exists("shard")


def test_transient_part_faults_are_retried(s3_bucket, s3_server, data):  # noqa: F811
    url, opts = s3_bucket
    store = FsspecStorage(f"{url}/{uuid.uuid4().hex}/step", {**opts, **SMALL})
    s3_server.inject("503", 2, method="PUT", path="partNumber=2")
    try:
        h = store.open_bulk_write("shard")
        whole = _write_pieces(h, data)
        h.fsync()
        h.close()
    finally:
        s3_server.clear()
    assert store.read("shard") == whole


@pytest.mark.parametrize("lost", ["request", "answer"])
def test_gcs_chunk_is_retried(gcs_bucket, data, monkeypatch, lost):
    """A chunk whose request (nothing arrived) or answer (all arrived) was lost is sent
    again, whole, as gcsfs does (chunks bypass the proxy: the session URL names the
    server itself, so the fault is injected here). GCS keeps the bytes it had;
    fake-gcs-server appends them again: then the upload fails and leaves nothing."""
    url, opts = gcs_bucket
    store = FsspecStorage(f"{url}/{uuid.uuid4().hex}/step", {**opts, **SMALL})
    real = object_requests.GCSResumable._post
    failed = []

    def post(self, headers, data):
        if headers["Content-Range"].startswith(f"bytes {PART}-") and not failed:
            failed.append(True)
            if lost == "answer":
                real(self, headers, data)
            raise ConnectionResetError("injected")
        return real(self, headers, data)

    monkeypatch.setattr(object_requests.GCSResumable, "_post", post)
    h = store.open_bulk_write("shard")
    whole = _write_pieces(h, data)
    h.fsync()
    if lost == "request":
        h.close()
        assert failed and store.read("shard") == whole
        return
    try:
        h.close()
    except StorageError as e:
        assert "left" in str(e) and not store.exists("shard")
    else:
        assert store.read("shard") == whole


def test_persistent_part_fault_is_transient_storage_error(s3_bucket, s3_server, data,  # noqa: F811
                                                          monkeypatch):
    monkeypatch.setenv("CKPTSTORE_RETRIES", "2")
    url, opts = s3_bucket
    store = FsspecStorage(f"{url}/{uuid.uuid4().hex}/step", {**opts, **SMALL})
    store.fs.retries = 1  # s3fs's own retries off: ckptstore's schedule decides
    s3_server.inject("503", 100, method="PUT", path="partNumber=3")
    try:
        h = store.open_bulk_write("shard")
        with pytest.raises(TransientStorageError):
            _write_pieces(h, data)
            h.fsync()
    finally:
        s3_server.clear()
    h.abort()
    assert not store.exists("shard") and _incomplete(store) == []


def test_atomic_file_bulk_path(store, data):
    """The engine's writers: AtomicFile(bulk=True), header written, pieces held."""
    with AtomicFile(store, "shard-0.chunks", bulk=True) as f:
        whole = _write_pieces(f, data)
    assert store.read("shard-0.chunks") == whole
    with pytest.raises(RuntimeError):
        with AtomicFile(store, "shard-1.chunks", bulk=True) as f:
            _write_pieces(f, data)
            raise RuntimeError("writer failed")
    assert not store.exists("shard-1.chunks") and _incomplete(store) == []


# -- ranged reads ---------------------------------------------------------------------

def test_read_extent_ranges(store, data):
    h = store.open_bulk_write("f")
    h.write_held(memoryview(data))
    h.close()
    n = len(data)
    cases = [(0, 10), (0, n), (1, 7 * MIB), (n // 2, 4 * MIB + 3), (n - 100, 100),
             (n - 100, 10 * MIB), (n, 5), (n + 7, 5), (0, 0)]
    for offset, length in cases:
        got = store.read_extent("f", offset, length)
        assert isinstance(got, memoryview) and not got.readonly
        assert bytes(got) == data[offset:offset + length], (offset, length)
    got = store.read_extent("f", 0, n)
    got[:4] = b"mine"  # the caller's memory: writable, and tensors may view it
    t = torch.frombuffer(got, dtype=torch.uint8)
    assert bytes(t[:4].numpy()) == b"mine"


def test_read_extent_of_an_empty_object(store):
    store.put_exclusive("empty", b"")
    for offset, length in ((0, 10), (0, 10 * MIB), (5, 1)):
        got = store.read_extent("empty", offset, length)
        assert bytes(got) == b"" and not got.readonly


def test_read_ranges_short_only_at_the_end():
    """The pieces' answers make one prefix; a short range followed by bytes means the
    object changed under the read."""
    obj = bytes(range(256)) * 40  # 10240 bytes
    settings = TransferSettings(range_size=1000, concurrency=3)

    def fetch(start, view):
        data = obj[start:start + len(view)]
        view[:len(data)] = data
        return len(data)

    for offset, length in ((0, 10240), (100, 5000), (9000, 5000), (10240, 10), (20000, 3)):
        assert bytes(transfer.read_ranges(fetch, offset, length, settings)) == obj[offset:offset + length]

    def hole(start, view):
        return 10 if start == 1000 else fetch(start, view)

    with pytest.raises(StorageError, match="changed"):
        transfer.read_ranges(hole, 0, 5000, settings)


def test_read_extent_missing_file(store):
    with pytest.raises(FileNotFoundError):
        store.read_extent("nope", 0, 10)
    with pytest.raises(FileNotFoundError):
        store.read_extent("no/such/file", 5, 10 * MIB)


def test_read_extent_retries_transient_faults(s3_bucket, s3_server, data):  # noqa: F811
    url, opts = s3_bucket
    store = FsspecStorage(f"{url}/{uuid.uuid4().hex}/step", {**opts, **SMALL})
    store.put_exclusive("f", data[:10 * MIB])
    s3_server.inject("reset", 2, method="GET")
    try:
        assert bytes(store.read_extent("f", 1, 9 * MIB)) == data[1:1 + 9 * MIB]
    finally:
        s3_server.clear()


# -- settings -------------------------------------------------------------------------

def test_settings_from_options_then_environment(monkeypatch):
    monkeypatch.delenv("CKPTSTORE_PART_SIZE", raising=False)
    monkeypatch.delenv("CKPTSTORE_GCS_PART_SIZE", raising=False)
    monkeypatch.setenv("CKPTSTORE_RANGE_SIZE", "4M")
    monkeypatch.setenv("CKPTSTORE_TRANSFER_CONCURRENCY", "3")
    s = TransferSettings.from_options({"ckptstore_concurrency": "6"})
    assert s == TransferSettings(part_size=transfer.PART_SIZE, range_size=4 * MIB, concurrency=6)
    assert s.serial_part_size == transfer.SERIAL_PART_SIZE
    assert TransferSettings.from_options({"ckptstore_part_size": 64 * MIB}).part_size == 64 * MIB
    assert transfer.parse_count("1GiB", "x") == 1 << 30 and transfer.parse_count("512K", "x") == 512 << 10
    for bad in ("lots", "0", -1):
        with pytest.raises(ValueError):
            transfer.parse_count(bad, "ckptstore_part_size")


def test_options_do_not_reach_fsspec_and_survive_pickling():
    s = FsspecStorage(f"memory://xfer-{uuid.uuid4().hex}/run", {"ckptstore_part_size": "8M"})
    s.makedirs()
    clone = pickle.loads(pickle.dumps(s))
    assert clone.transfer_settings.part_size == 8 * MIB and clone == s
    h = s.open_bulk_write("f")  # no parts on memory://: the buffered handle
    h.write_held(memoryview(b"abc"))
    h.close()
    assert bytes(s.read_extent("f", 1, 10)) == b"bc"


# -- end to end -------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["s3", "gs"])
def test_save_load_round_trip(kind, request, monkeypatch):
    monkeypatch.setenv("CKPTSTORE_PART_SIZE", "5M")  # the writer processes read them too
    monkeypatch.setenv("CKPTSTORE_GCS_PART_SIZE", "5M")
    monkeypatch.setenv("CKPTSTORE_RANGE_SIZE", "2M")
    url, opts = request.getfixturevalue("s3_bucket" if kind == "s3" else "gcs_bucket")
    g = torch.Generator().manual_seed(3)
    state = {"big": torch.randn(3 * 1024 * 1024, generator=g),  # 12 MiB: more than two parts
             "small": torch.arange(10, dtype=torch.int64), "nested": {"b": torch.ones(3, 3)},
             "step": 7}
    dest = f"{url}/{uuid.uuid4().hex}/step-7"
    ckptstore.save(state, dest, storage_options=opts, blocking=True)
    assert_same_tree(ckptstore.load(dest, storage_options=opts), state)
    assert FsspecStorage(dest, opts).incomplete_uploads() == []


# -- the benchmark mode -------------------------------------------------------------------

def test_bench_objstore_mode(tmp_path):
    """``python -m bench objstore`` at a tiny size: fields and arithmetic only."""
    from bench import cli

    rep = cli.run(["objstore", "--size", "6M", "--repeat", "1", "--dir", str(tmp_path / "work"),
                   "--json", str(tmp_path / "objstore.json")])
    assert [r["store"] for r in rep["results"]] == ["s3", "gcs"]
    for res in rep["results"]:
        assert set(res["measurements"]) == {"plain put", "ckptstore put", "plain get", "ckptstore get"}
        assert res["ratios"]["upload"]["median"] > 0 and res["ratios"]["download"]["median"] > 0
    assert {t["target"] for t in rep["targets"]} == {"upload >= 1.0x plain put",
                                                     "download >= 1.0x plain get"}
    assert "ckptstore ÷ plain" in cli.report.render(rep)
