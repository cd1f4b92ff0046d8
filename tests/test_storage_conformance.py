"""One behaviour for every Storage backend (in the style of zarr-python's StoreTests).

:class:`StorageTests` is what the :class:`~ckptstore.storage.base.Storage` interface
promises: each method's docstring, the call order of ``base.py``, and the capability
flags, each exercised rather than trusted. The classes at the end run it against
every backend: local files, fsspec ``memory://``, S3 (moto) and GCS
(fake-gcs-server) through the tier tests' fixtures, a FaultyStorage without faults,
and the read-only LinkedView of an incremental checkpoint.
"""
from __future__ import annotations

import array
import contextlib
import hashlib
import os
import pickle
import subprocess
import sys
import threading
import time
import uuid

import pytest
from conftest_tiers import _bucket, gcs_bucket, gcs_server, s3_bucket, s3_server  # noqa: F401

from ckptstore.errors import UnsafeCheckpointError, UnsupportedOperationError
from ckptstore.storage import LocalStorage, Storage, fsspec_backend, open_storage
from ckptstore.storage.base import LinkedView, check_name, linked
from ckptstore.storage.capabilities import IncompleteUpload, MultipartGC, ObjectInfo
from ckptstore.storage.faulty import FaultyStorage, Ledger
from ckptstore.storage.fsspec_backend import FsspecStorage

pytestmark = pytest.mark.timeout(120)

DATA = b"0123456789abcdefghij"  # tiny payloads: the emulators are slow

#: names that leave the storage's root or are not plain relative paths
BAD_NAMES = ["..", "../x", "a/../../x", "/etc/passwd", "./a", "a/./b", "a//b", "a/",
             "a\\b", "a\x00b"]
#: file operations, each refusing a bad name (and the empty name: the root is no file)
FILE_OPS = {
    "open_write": lambda s, n: s.open_write(n),
    "put_exclusive": lambda s, n: s.put_exclusive(n, b"x"),
    "rename_src": lambda s, n: s.rename(n, "ok"),
    "rename_dst": lambda s, n: s.rename("ok", n),
    "link_exclusive_src": lambda s, n: s.link_exclusive(n, "ok"),
    "link_exclusive_dst": lambda s, n: s.link_exclusive("ok", n),
    "remove": lambda s, n: s.remove(n),
    "size": lambda s, n: s.size(n),
    "read": lambda s, n: s.read(n),
    "readinto": lambda s, n: s.readinto(n, 0, memoryview(bytearray(4))),
    "read_extent": lambda s, n: s.read_extent(n, 0, 4),
    "open_bulk_write": lambda s, n: s.open_bulk_write(n),
    "map_file": lambda s, n: s.map_file(n),
    "mtime": lambda s, n: s.mtime(n),
    "child": lambda s, n: s.child(n),
    "sibling": lambda s, n: s.sibling(n),
}
WRITE_OPS = {"open", "put", "rename", "link", "remove"}
#: directory operations: the empty name is the root itself
DIR_OPS = {
    "exists": lambda s, n: s.exists(n),
    "isdir": lambda s, n: s.isdir(n),
    "listdir": lambda s, n: s.listdir(n),
    "fsync_dir": lambda s, n: s.fsync_dir(n),
}


class StorageTests:
    """Behaviour every backend has. A subclass provides the ``store`` fixture (an
    empty storage whose root exists), and may override ``writer`` and the hooks."""

    #: the storage refuses every change (LinkedView): its write-side tests expect
    #: PermissionError, and files are put in place through ``writer``
    read_only = False

    @pytest.fixture
    def store(self) -> Storage:
        raise NotImplementedError

    @pytest.fixture
    def writer(self, store: Storage) -> Storage:
        """The storage files are written through (``store`` itself unless read-only)."""
        return store

    # -- hooks -------------------------------------------------------------------
    @contextlib.contextmanager
    def competing_create(self, monkeypatch, store: Storage, name: str, data: bytes):
        """While the body runs, another writer creates ``name`` holding ``data`` as
        late as the backend allows before the body's create-only write reaches the
        store. Here (one atomic system call: O_EXCL, link): before the body."""
        put(store, name, data)
        yield

    def start_incomplete_upload(self, store: Storage, name: str) -> bool:
        """Start a multipart upload of ``name`` and leave it; False where the
        backend has no such thing."""
        return False

    # -- URL, child, sibling, parent -----------------------------------------------
    def test_url_child_sibling_parent(self, store, writer):
        url = store.url
        assert isinstance(url, str) and url and not url.endswith("/")
        assert store.child("a").url == url + "/a"
        assert store.child("a").child("b").url == store.child("a/b").url == url + "/a/b"
        parent = url.rpartition("/")[0]
        assert store.parent().url.rstrip("/") == parent
        assert store.sibling("other").url == parent + "/other"
        assert store.child("a").capabilities == store.capabilities
        # a sibling reaches the same store (same options, e.g. the endpoint)
        sib = writer.sibling("sib-" + uuid.uuid4().hex[:8])
        sib.makedirs()
        put(sib, "f", DATA)
        name = sib.url.rpartition("/")[2]
        assert store.parent().child(name).read("f") == DATA
        assert store.parent().child(name).listdir() == ["f"]
        assert name in store.parent().listdir()

    def test_nested_names_and_children(self, store, writer):
        sub = writer.child("sub")
        sub.makedirs()
        put(sub, "x", DATA)
        deep = writer.child("sub").child("deep")
        deep.makedirs()
        put(deep, "y", b"y")
        assert store.read("sub/x") == DATA and store.size("sub/deep/y") == 1
        assert store.child("sub").read("x") == DATA
        assert store.exists("sub/deep/y") and store.child("sub").exists("deep/y")
        assert store.listdir("sub") == ["deep", "x"]

    # -- names -------------------------------------------------------------------
    @pytest.mark.parametrize("op", sorted(FILE_OPS))
    def test_bad_names_are_refused(self, store, op):
        refused: tuple[type[Exception], ...] = (UnsafeCheckpointError,)
        if self.read_only and op.partition("_")[0] in WRITE_OPS:
            refused += (PermissionError,)  # refuses every change anyway
        if not store.capabilities.rename and op.startswith(("rename", "link")):
            refused += (UnsupportedOperationError,)  # never does anything anyway
        for name in [*BAD_NAMES, ""]:
            with pytest.raises(refused):
                FILE_OPS[op](store, name)
        assert store.listdir() == []  # and nothing was created

    @pytest.mark.parametrize("op", sorted(DIR_OPS))
    def test_bad_names_are_refused_by_directory_ops(self, store, op):
        for name in BAD_NAMES:
            with pytest.raises(UnsafeCheckpointError):
                DIR_OPS[op](store, name)

    def test_empty_name_is_the_root_for_directory_ops(self, store, writer):
        put(writer, "f", DATA)
        assert store.exists("") and store.isdir("")
        assert store.listdir("") == store.listdir() == ["f"]
        store.fsync_dir("")

    def test_sibling_is_one_component(self, store):
        with pytest.raises(UnsafeCheckpointError):
            store.sibling("a/b")

    # -- write, then read ------------------------------------------------------------
    def test_write_close_then_read(self, store):
        if self.read_only:
            with pytest.raises(PermissionError):
                store.open_write("f")
            return
        h = store.open_write("f")
        assert h.write(DATA[:5]) == 5
        assert h.write(memoryview(DATA)[5:]) == len(DATA) - 5
        h.fsync()
        if not store.capabilities.rename:  # object stores: visible, whole, on close
            assert not store.exists("f")
        h.close()
        assert store.exists("f") and not store.isdir("f")
        assert store.size("f") == len(DATA)
        assert store.read("f") == DATA
        assert store.listdir() == ["f"]

    def test_write_returns_bytes_of_typed_memoryview(self, store):
        if self.read_only:
            return
        words = array.array("I", [1, 2, 3])
        h = store.open_write("w")
        assert h.write(memoryview(words)) == 12
        h.close()
        assert store.read("w") == words.tobytes()

    def test_open_write_truncates(self, store):
        if self.read_only:
            return
        put(store, "f", DATA)
        put(store, "f", b"short")
        assert store.read("f") == b"short" and store.size("f") == 5

    def test_empty_file(self, store, writer):
        put(writer, "e", b"")
        assert store.exists("e") and store.size("e") == 0
        assert store.read("e") == b""
        assert store.read("e", 0, 5) == b""
        assert store.readinto("e", 0, memoryview(bytearray(4))) == 0

    def test_partial_reads(self, store, writer):
        put(writer, "f", DATA)
        n = len(DATA)
        assert store.read("f", 0) == DATA
        assert store.read("f", 5) == DATA[5:]
        assert store.read("f", 5, 3) == DATA[5:8]
        assert store.read("f", 0, n) == DATA
        assert store.read("f", 3, 0) == b""
        # short reads at the end of the file return fewer bytes, never an error
        assert store.read("f", n - 2, 10) == DATA[-2:]
        assert store.read("f", n) == b""
        assert store.read("f", n, 4) == b""
        assert store.read("f", n + 7) == b""
        assert store.read("f", n + 7, 4) == b""

    def test_readinto(self, store, writer):
        put(writer, "f", DATA)
        buf = bytearray(8)
        assert store.readinto("f", 4, memoryview(buf)) == 8 and bytes(buf) == DATA[4:12]
        buf = bytearray(b"-" * 8)
        n = len(DATA)
        assert store.readinto("f", n - 3, memoryview(buf)) == 3
        assert bytes(buf[:3]) == DATA[-3:]
        assert store.readinto("f", n, memoryview(bytearray(4))) == 0
        whole = bytearray(n)
        assert store.readinto("f", 0, memoryview(whole)) == n and bytes(whole) == DATA

    def test_bulk_write_and_read_extent(self, store, writer):
        """open_bulk_write keeps open_write's contract, and held memory is free again
        once fsynced; read_extent gives new, writable memory, short at the end."""
        if self.read_only:
            with pytest.raises(PermissionError):
                store.open_bulk_write("b")
        else:
            h = store.open_bulk_write("b")
            held = bytearray(DATA)
            assert h.write(b"<") == 1 and h.write_held(memoryview(held)) == len(DATA)
            h.fsync()
            held[:] = b"-" * len(held)
            if not store.capabilities.rename:
                assert not store.exists("b")
            h.close()
            assert store.read("b") == b"<" + DATA
        put(writer, "f", DATA)
        n = len(DATA)
        for offset, length in ((0, n), (3, 5), (n - 4, 10), (n, 3), (n + 5, 3), (2, 0)):
            got = store.read_extent("f", offset, length)
            assert bytes(got) == DATA[offset:offset + length] and not got.readonly
        with pytest.raises(FileNotFoundError):
            store.read_extent("nope", 0, 4)

    def test_missing_file_raises_file_not_found(self, store):
        for fn in (lambda: store.size("nope"), lambda: store.read("nope"),
                   lambda: store.read("nope", 2, 2), lambda: store.mtime("nope"),
                   lambda: store.readinto("nope", 0, memoryview(bytearray(2))),
                   lambda: store.read("no/such/file")):
            with pytest.raises(FileNotFoundError):
                fn()
        assert not store.exists("nope") and not store.isdir("nope")

    #: map_file gives a map of a local file (FaultyStorage declines: every byte it
    #: serves goes through a counted call)
    maps_files = False

    def test_map_file_only_where_local_path(self, store, writer):
        put(writer, "f", DATA)
        m = store.map_file("f")
        assert (m is not None) == self.maps_files
        assert store.capabilities.local_path or m is None
        if m is not None:
            assert bytes(m) == DATA
            m[0:1] = b"X"  # copy-on-write: never reaches the file
            assert store.read("f") == DATA
            m.close()

    def test_mtime(self, store, writer):
        before = time.time()
        put(writer, "f", DATA)
        after = time.time()
        t = store.mtime("f")
        assert isinstance(t, float)
        assert before - 2 <= t <= after + 2  # object stores keep whole seconds

    # -- listing -----------------------------------------------------------------
    def test_listdir_isdir_exists(self, store, writer):
        assert store.listdir() == []
        put(writer, "b", DATA)
        put(writer, "a", DATA)
        sub = writer.child("sub")
        sub.makedirs()
        put(sub, "x", DATA)
        assert sorted(store.listdir()) == ["a", "b", "sub"]
        assert store.listdir("sub") == ["x"]
        assert store.isdir("sub") and not store.isdir("a") and not store.isdir("missing")
        assert store.exists("sub") and store.exists("a") and not store.exists("missing")
        assert store.listdir("missing") == []  # a missing directory lists as empty

    # -- abort ---------------------------------------------------------------------
    def test_abort_commits_nothing(self, store):
        if self.read_only:
            return
        h = store.open_write("f")
        h.write(DATA)
        h.abort()
        if not store.capabilities.rename:
            # close is the commit on object stores: an aborted upload never shows
            assert not store.exists("f")
        # on rename backends the handle wrote a temp name, that the caller removes
        store.remove("f")
        assert not store.exists("f") and store.listdir() == []

    def test_abort_keeps_the_previous_object(self, store):
        if self.read_only or store.capabilities.rename:
            return  # POSIX: open_write truncated the file already
        put(store, "f", DATA)
        h = store.open_write("f")
        h.write(b"new")
        h.abort()
        assert store.read("f") == DATA

    # -- rename, link_exclusive --------------------------------------------------------
    def test_rename_replaces(self, store):
        if self.read_only:
            with pytest.raises(PermissionError):
                store.rename("a", "b")
            return
        put(store, "a", b"new")
        put(store, "b", b"old")
        if not store.capabilities.rename:
            with pytest.raises(UnsupportedOperationError):
                store.rename("a", "b")
            assert store.read("a") == b"new" and store.read("b") == b"old"
            return
        store.rename("a", "b")
        store.fsync_dir()
        assert not store.exists("a") and store.read("b") == b"new"
        assert store.listdir() == ["b"]
        store.rename("b", "c")  # to a new name
        assert store.listdir() == ["c"]
        with pytest.raises(FileNotFoundError):
            store.rename("missing", "d")

    def test_link_exclusive(self, store):
        if self.read_only:
            with pytest.raises(PermissionError):
                store.link_exclusive("a", "b")
            return
        put(store, "a", b"first")
        if not store.capabilities.rename:
            with pytest.raises(UnsupportedOperationError):
                store.link_exclusive("a", "b")
            assert store.listdir() == ["a"]
            return
        store.link_exclusive("a", "b")  # absent: moved
        assert not store.exists("a") and store.read("b") == b"first"
        put(store, "c", b"second")
        with pytest.raises(FileExistsError):  # present: refused, both unchanged
            store.link_exclusive("c", "b")
        assert store.read("b") == b"first" and store.read("c") == b"second"

    # -- create-only ---------------------------------------------------------------
    def test_put_exclusive(self, store):
        if self.read_only:
            with pytest.raises(PermissionError):
                store.put_exclusive("m", b"first")
            return
        store.put_exclusive("m", b"first")
        assert store.read("m") == b"first"
        with pytest.raises(FileExistsError):  # enforced or best effort: refused
            store.put_exclusive("m", b"second")
        assert store.read("m") == b"first"

    def test_create_only_flag_is_what_the_backend_enforces(self, store, monkeypatch):
        """``capabilities.create_only`` is True exactly when a create-only write
        loses to another writer that created the name first, however late."""
        if self.read_only:
            return
        with self.competing_create(monkeypatch, store, "m", b"theirs"):
            try:
                store.put_exclusive("m", b"mine")
                lost = False
            except FileExistsError:
                lost = True
        assert lost == store.capabilities.create_only
        assert store.read("m") == (b"theirs" if lost else b"mine")

    def test_create_only_race_has_one_winner(self, store):
        if self.read_only or not store.capabilities.create_only:
            return
        barrier = threading.Barrier(4)
        won: list[bytes] = []

        def create(data: bytes) -> None:
            barrier.wait()
            try:
                store.put_exclusive("m", data)
                won.append(data)
            except FileExistsError:
                pass

        threads = [threading.Thread(target=create, args=(b"w%d" % i,)) for i in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert len(won) == 1 and store.read("m") == won[0]

    # -- remove, rmtree, makedirs ----------------------------------------------------
    def test_remove(self, store):
        if self.read_only:
            with pytest.raises(PermissionError):
                store.remove("f")
            return
        put(store, "f", DATA)
        put(store, "g", DATA)
        store.remove("f")
        assert not store.exists("f") and store.listdir() == ["g"]
        store.remove("f")  # a missing file is not an error
        store.remove("never")
        with pytest.raises(FileNotFoundError):
            store.read("f")

    def test_rmtree(self, store):
        if self.read_only:
            return
        d = store.child("d")
        d.makedirs()
        put(d, "x", DATA)
        e = d.child("e")
        e.makedirs()
        put(e, "y", DATA)
        put(store, "keep", DATA)
        store.rmtree("d")
        assert store.listdir() == ["keep"] and not store.exists("d/e/y")
        store.rmtree("d")  # missing: not an error

    def test_makedirs(self, store):
        if self.read_only:
            with pytest.raises(PermissionError):
                store.makedirs()
            return
        store.makedirs()  # again: idempotent
        deep = store.child("a").child("b")
        deep.makedirs()  # with its parents
        deep.makedirs()
        put(deep, "f", DATA)
        assert store.read("a/b/f") == DATA and store.isdir("a") and store.isdir("a/b")

    # -- fsync ---------------------------------------------------------------------
    def test_fsync_exactly_when_capable(self, store, monkeypatch):
        """fsync and fsync_dir are always allowed; they reach the disk exactly
        when ``capabilities.fsync`` says they mean something."""
        if self.read_only:
            store.fsync_dir()
            return
        calls = []
        real = os.fsync
        monkeypatch.setattr(os, "fsync", lambda fd: (calls.append(fd), real(fd))[1])
        sub = store.child("sub")
        sub.makedirs()
        calls.clear()
        h = store.open_write("f")
        h.write(DATA)
        h.fsync()
        h.close()
        store.fsync_dir()
        store.fsync_dir("sub")
        assert bool(calls) == store.capabilities.fsync
        if store.capabilities.fsync:
            assert len(calls) == 3

    # -- pickling, processes ---------------------------------------------------------
    def test_pickled_copy_reads_the_same(self, store, writer):
        put(writer, "f", DATA)
        clone = pickle.loads(pickle.dumps(store))
        assert clone.url == store.url and clone.capabilities == store.capabilities
        assert clone.read("f") == DATA

    def test_other_processes_see_it_unless_process_local(self, store, writer):
        """A pickled copy in another process (how writers and promoters get their
        storage) sees the same files exactly when not ``capabilities.process_local``."""
        put(writer, "f", DATA)
        code = ("import pickle, sys; s = pickle.load(sys.stdin.buffer); "
                f"print(s.exists('f') and s.read('f') == {DATA!r})")
        out = subprocess.run([sys.executable, "-c", code], input=pickle.dumps(store),
                             capture_output=True, timeout=60,
                             cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        assert out.returncode == 0, out.stderr.decode()[-2000:]
        assert out.stdout.decode().strip() == str(not store.capabilities.process_local)

    # -- optional capabilities ---------------------------------------------------------
    def test_object_info(self, store, writer):
        if not isinstance(store, ObjectInfo):
            return
        put(writer, "f", DATA)
        meta = store.info("f")
        assert int(meta["size"]) == len(DATA)
        crc = meta.get("crc32c")
        if crc:
            import base64

            import google_crc32c

            assert crc == base64.b64encode(google_crc32c.value(DATA).to_bytes(4, "big")).decode()
        etag = str(meta.get("ETag") or meta.get("etag") or "").strip('"')
        if etag and "-" not in etag and len(etag) == 32:
            assert etag == hashlib.md5(DATA).hexdigest()
        with pytest.raises(FileNotFoundError):
            store.info("nope")
        with pytest.raises(UnsafeCheckpointError):
            store.info("../x")

    def test_multipart_gc(self, store):
        if not isinstance(store, MultipartGC):
            assert not self.start_incomplete_upload(store, "shard")
            return
        assert store.incomplete_uploads() == []
        if not self.start_incomplete_upload(store, "shard"):
            return
        ups = store.incomplete_uploads()
        assert len(ups) == 1 and isinstance(ups[0], IncompleteUpload)
        assert ups[0].url.endswith("/shard") and ups[0].upload_id
        assert ups[0].started is None or isinstance(ups[0].started, float)
        store.abort_upload(ups[0])
        assert store.incomplete_uploads() == []
        assert not store.exists("shard")


def put(storage: Storage, name: str, data: bytes) -> None:
    """Write ``name`` through the interface: open_write, write, fsync, close."""
    h = storage.open_write(name)
    h.write(data)
    h.fsync()
    h.close()


# -- the backends ------------------------------------------------------------------

def _local_step(tmp_path) -> LocalStorage:
    """A local step directory inside a run directory (siblings have a parent)."""
    s = LocalStorage(tmp_path / "run" / "step")
    s.makedirs()
    return s


class TestLocal(StorageTests):
    maps_files = True

    @pytest.fixture
    def store(self, tmp_path):
        return _local_step(tmp_path)


class _FsspecRace:
    """For FsspecStorage backends: the competing writer creates the object after
    every check this process makes, just before the create-only upload is sent."""

    @contextlib.contextmanager
    def competing_create(self, monkeypatch, store, name, data):
        real = fsspec_backend.retrying
        done = []

        def retrying(fn, what, *args, **kwargs):
            if what.startswith(f"upload of {name} ") and not done:
                done.append(True)
                put(store, name, data)
            return real(fn, what, *args, **kwargs)

        monkeypatch.setattr(fsspec_backend, "retrying", retrying)
        yield
        assert done, "the competing writer never ran"


class TestMemory(_FsspecRace, StorageTests):
    @pytest.fixture
    def store(self):
        s = FsspecStorage(f"memory://conformance-{uuid.uuid4().hex}/run/step")
        s.makedirs()
        yield s
        s.parent().parent().rmtree("")




def _object_store(bucket: tuple[str, dict]) -> FsspecStorage:
    url, opts = bucket
    s = FsspecStorage(f"{url}/{uuid.uuid4().hex}/step", opts)
    s.makedirs()
    return s


class TestS3(_FsspecRace, StorageTests):
    @pytest.fixture
    def store(self, s3_bucket):
        return _object_store(s3_bucket)

    def start_incomplete_upload(self, store, name):
        bucket, _, prefix = store.root.partition("/")
        store.fs.call_s3("create_multipart_upload", Bucket=bucket, Key=f"{prefix}/{name}")
        return True


class TestGCS(_FsspecRace, StorageTests):
    @pytest.fixture
    def store(self, gcs_bucket):
        return _object_store(gcs_bucket)


class TestFaultyLocal(StorageTests):
    """FaultyStorage without faults behaves exactly like what it wraps."""

    @pytest.fixture
    def store(self, tmp_path):
        s = FaultyStorage(LocalStorage(tmp_path / "run" / "step"),
                          ledger=Ledger(str(tmp_path / "ledger")))
        s.makedirs()
        return s


class TestLinkedView(StorageTests):
    """The read-only view of an incremental checkpoint: its own names read from its
    directory, linked names from the sibling step that holds them."""

    read_only = True
    maps_files = True

    @pytest.fixture
    def writer(self, tmp_path):
        return _local_step(tmp_path)

    @pytest.fixture
    def store(self, writer):
        older = writer.sibling("older")
        older.makedirs()
        put(older, "linked.bin", b"held by the older step")
        view = LinkedView(writer, {"linked.bin": "older"})
        return view

    def test_linked_names_read_from_the_sibling(self, store, writer):
        assert store.exists("linked.bin") and not writer.exists("linked.bin")
        assert store.size("linked.bin") == 22
        assert store.read("linked.bin", 8, 7) == b"the old"
        buf = bytearray(4)
        assert store.readinto("linked.bin", 0, memoryview(buf)) == 4 and buf == b"held"
        assert bytes(store.map_file("linked.bin")) == b"held by the older step"
        assert store.mtime("linked.bin") > 0

    def test_linked_without_bases_is_the_storage(self, writer):
        older = writer.sibling("older")
        older.makedirs()
        put(older, "b", b"held by the older step")
        put(writer, "a", b"mine")
        class Rec:
            def __init__(self, name, base=None):
                self.name, self.base = name, base

        assert linked(writer, [Rec("a")]) is writer
        view = linked(writer, [Rec("a"), Rec("b", "older")])
        assert isinstance(view, LinkedView) and view.read("b") == b"held by the older step"
        assert view.read("a") == b"mine"


# -- optional capabilities through the wrappers ------------------------------------

def test_wrappers_implement_exactly_what_they_wrap(tmp_path):
    local = LocalStorage(tmp_path / "l")
    mem = FsspecStorage(f"memory://conformance-{uuid.uuid4().hex}/run",
                        {"use_listings_cache": False})
    mem.makedirs()
    put(mem, "f", DATA)
    assert isinstance(mem, ObjectInfo) and isinstance(mem, MultipartGC)
    assert not isinstance(local, ObjectInfo) and not isinstance(local, MultipartGC)

    ledger = Ledger(str(tmp_path / "ledger"))
    for inner, has in ((local, False), (mem, True)):
        f = FaultyStorage(inner, ledger=ledger)
        for w in (f, f.child("x"), f.sibling("y"), f.parent(), pickle.loads(pickle.dumps(f))):
            assert isinstance(w, FaultyStorage)
            assert isinstance(w, ObjectInfo) == has and isinstance(w, MultipartGC) == has
        view = LinkedView(inner, {"g": "other"})
        # its relatives are the storage's own (with its options: the endpoint...)
        assert view.sibling("s") == inner.sibling("s") and view.parent() == inner.parent()
        assert view.child("c") == inner.child("c")
        clone = pickle.loads(pickle.dumps(view))
        for v in (view, clone):
            assert isinstance(v, LinkedView) and isinstance(v, ObjectInfo) == has
            assert not isinstance(v, MultipartGC)  # read-only: it aborts nothing
        assert type(FaultyStorage(inner, ledger=ledger)) is type(f)

    # forwarded calls are counted and breakable like every other call
    f = FaultyStorage(mem, ledger=ledger, fail={"info": 2})
    before = ledger.counts().get("info", 0)
    assert f.info("f")["size"] == len(DATA)
    with pytest.raises(OSError):
        f.info("f")
    assert ledger.counts()["info"] == before + 2
    assert f.incomplete_uploads() == []
    assert LinkedView(mem, {}).info("f")["size"] == len(DATA)
    mem.parent().rmtree("")


def test_process_local_flag(tmp_path):
    assert open_storage("memory://x/y").capabilities.process_local
    assert not open_storage(tmp_path).capabilities.process_local
    assert not open_storage("s3://b/x").capabilities.process_local
    assert not open_storage("gs://b/x").capabilities.process_local
    ledger = Ledger(str(tmp_path / "ledger"))
    assert FaultyStorage(open_storage("memory://x/y"), ledger=ledger).capabilities.process_local
    assert LinkedView(open_storage("memory://x/y"), {}).capabilities.process_local


def test_check_name_is_the_one_gate():
    for name in BAD_NAMES + [""]:
        with pytest.raises(UnsafeCheckpointError):
            check_name(name)
    assert check_name("a/b.c") == "a/b.c"
