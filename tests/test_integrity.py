"""Integrity: any flipped bit is detected; malicious manifests are refused."""
from __future__ import annotations

import json
import os
import pickle
import random
import subprocess
import sys
import time

import pytest
import torch

import ckptstore
from ckptstore import manifest as fmt
from ckptstore.cli.main import main as cli

MODES = ["none", "zstd", "lz4"]


def _flip(path, pos: int, bit: int = 0) -> None:
    with open(path, "r+b") as f:
        f.seek(pos)
        b = f.read(1)[0]
        f.seek(pos)
        f.write(bytes([b ^ (1 << bit)]))


def _owner(manifest: fmt.Manifest, file: str, pos: int) -> str | None:
    """The tensor whose chunk holds byte ``pos`` of ``file`` (None: header)."""
    for t in manifest.tensors:
        for c in t.chunks:
            if c.file == file and c.offset <= pos < c.offset + c.length:
                return t.name
    return None


@pytest.mark.parametrize("mode", MODES)
def test_single_bit_flips_are_detected_and_named(tmp_path, mode, small_state, capsys):
    src = tmp_path / "c"
    ckptstore.save(small_state, src, compression=mode).wait()
    manifest = fmt.decode((src / "manifest.json").read_bytes())
    rng = random.Random(1)
    files = sorted(p.name for p in src.iterdir())
    trials = 0
    for name in files:
        size = (src / name).stat().st_size
        positions = {0, size - 1} | {rng.randrange(size) for _ in range(6)}
        for pos in sorted(positions):
            bit = rng.randrange(8)
            _flip(src / name, pos, bit)
            try:
                capsys.readouterr()
                rc = cli(["fsck", str(src), "--json"])
                report = json.loads(capsys.readouterr().out)
                assert rc == 1, (name, pos)
                if name == "manifest.json":
                    assert report["damage"][0]["file"] == "manifest.json"
                else:
                    owner = _owner(manifest, name, pos)
                    if owner is None:  # safetensors header: the file is named
                        assert [d["file"] for d in report["damage"]] == [name]
                        assert "header" in report["damage"][0]["problem"]
                    else:
                        assert report["damaged_tensors"] == [owner], (name, pos)
                with pytest.raises(ckptstore.CkptError):
                    ckptstore.load(src)
                trials += 1
            finally:
                _flip(src / name, pos, bit)
    assert trials >= 8
    assert cli(["fsck", str(src)]) == 0  # restored: clean again, no false positives
    ckptstore.load(src)


def test_fsck_exit_codes(tmp_path, small_state, capsys):
    assert cli(["fsck", str(tmp_path / "nothing")]) == 2
    assert cli(["fsck"]) == 2
    ckptstore.save(small_state, tmp_path / "c").wait()
    assert cli(["fsck", str(tmp_path / "c")]) == 0
    shard = next(p for p in (tmp_path / "c").iterdir() if p.name.startswith("shard"))
    with open(shard, "r+b") as f:
        f.truncate(shard.stat().st_size - 10)
    assert cli(["fsck", str(tmp_path / "c")]) == 1
    out = capsys.readouterr().out
    assert "DAMAGED" in out and "bytes, the manifest says" in out


def test_mutation_after_save_does_not_change_checkpoint(tmp_path):
    state = {f"w{i}": torch.randn(256, 256) for i in range(8)}
    expect = {k: v.clone() for k, v in state.items()}
    h = ckptstore.save(state, tmp_path / "c", compression="none")
    for v in state.values():  # training moves on the moment save() returns
        v.add_(1.0)
    h.wait()
    back = ckptstore.load(tmp_path / "c")
    for k in expect:
        assert torch.equal(back[k], expect[k])


def _write_manifest(dirpath, obj: dict) -> None:
    body = json.dumps(obj, separators=(",", ":")).encode()[:-1]
    data = body + b',"manifest_checksum":"' + fmt.hash_bytes(body).encode() + b'"}\n'
    (dirpath / "manifest.json").write_bytes(data)


def _tamper(tmp_path, small_state, edit) -> type:
    src = tmp_path / "c"
    if not src.exists():
        ckptstore.save(small_state, src, compression="none").wait()
    raw = (src / "manifest.json").read_bytes()
    obj = json.loads(raw)
    obj.pop("manifest_checksum")
    edit(obj)
    _write_manifest(src, obj)
    with pytest.raises(ckptstore.CkptError) as e:
        ckptstore.load(src)
    (src / "manifest.json").write_bytes(raw)
    return e.value


def test_malicious_manifests_are_refused(tmp_path, small_state):
    outside = tmp_path / "secret"
    outside.write_bytes(b"x" * 4096)

    def path_to(p):
        return lambda o: o["files"][0].update(name=p) or [c.__setitem__(0, p) for t in o["tensors"] for c in t["chunks"]]

    for bad in ["../secret", str(outside), "a/../../secret", ""]:
        err = _tamper(tmp_path, small_state, path_to(bad))
        assert isinstance(err, ckptstore.CorruptCheckpointError), bad
    err = _tamper(tmp_path, small_state, lambda o: o["tensors"][0]["chunks"][0].__setitem__(2, 2**63))
    assert isinstance(err, ckptstore.UnsafeCheckpointError)
    err = _tamper(tmp_path, small_state, lambda o: o["files"][0].__setitem__("size", 2**63))
    assert isinstance(err, ckptstore.UnsafeCheckpointError)

    def overlap(o):
        a, b = o["tensors"][0]["chunks"][0], o["tensors"][1]["chunks"][0]
        b[1] = a[1]
    err = _tamper(tmp_path, small_state, overlap)
    assert isinstance(err, ckptstore.UnsafeCheckpointError) and "overlap" in str(err)
    err = _tamper(tmp_path, small_state, lambda o: o.__setitem__("schema_version", 99))
    assert isinstance(err, ckptstore.SchemaVersionError) and "upgrade ckptstore" in str(err)
    err = _tamper(tmp_path, small_state, lambda o: o["tensors"][0].__setitem__("dtype", "float32)"))
    assert isinstance(err, ckptstore.CorruptCheckpointError)


def test_symlink_out_of_checkpoint_is_refused(tmp_path, small_state):
    ckptstore.save(small_state, tmp_path / "c", compression="none").wait()
    shard = next(p for p in (tmp_path / "c").iterdir() if p.suffix == ".safetensors")
    target = tmp_path / "elsewhere.safetensors"
    os.rename(shard, target)
    os.symlink(target, shard)
    with pytest.raises(ckptstore.UnsafeCheckpointError):
        ckptstore.load(tmp_path / "c")


def test_duplicate_keys_and_deep_nesting_are_refused(tmp_path):
    d = tmp_path / "c"
    d.mkdir()
    for body in [b'{"format":"ckptstore","format":"x"', b'{"a":' + b"[" * 100000 + b"]" * 100000]:
        (d / "manifest.json").write_bytes(body + b',"manifest_checksum":"' + fmt.hash_bytes(body).encode() + b'"}')
        with pytest.raises(ckptstore.UnsafeCheckpointError):
            ckptstore.load(d)


def test_pickle_in_place_of_manifest_is_refused_without_running(tmp_path):
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    d = tmp_path / "c"
    d.mkdir()
    (d / "manifest.json").write_bytes(pickle.dumps(Evil()))
    with pytest.raises(ckptstore.CorruptCheckpointError):
        ckptstore.load(d)
    assert cli(["fsck", str(d)]) == 1
    assert not marker.exists()


KILL_SCRIPT = r"""
import os, signal, sys, threading, time, torch, ckptstore
from ckptstore.pipeline import engine as saver
state = {f"w{i}": torch.randn(1024, 1024) for i in range(48)}   # 192 MB
h = ckptstore.save(state, sys.argv[1], compression="zstd", chunk_size=1 << 20, shard_size=8 << 20)
pids = saver.engine().writers.pids()
time.sleep(0.05)
for p in pids:
    os.kill(p, signal.SIGKILL)
try:
    h.wait(timeout=120)
    print("COMMITTED")
except ckptstore.WriterDiedError as e:
    print("WRITER_DIED")
# the engine recovers: the next save works with a fresh pool
ckptstore.save({"x": torch.ones(3)}, sys.argv[1] + "-after").wait()
print("RECOVERED")
"""


def test_killing_writers_leaves_previous_checkpoint_intact(tmp_path, small_state):
    ckptstore.save(small_state, tmp_path / "step-1").wait()
    out = subprocess.run([sys.executable, "-c", KILL_SCRIPT, str(tmp_path / "step-2")],
                         capture_output=True, text=True, timeout=300)
    assert "RECOVERED" in out.stdout, out.stderr
    if "WRITER_DIED" in out.stdout:
        assert not (tmp_path / "step-2" / "manifest.json").exists()
        with pytest.raises(ckptstore.CheckpointNotFoundError):
            ckptstore.load(tmp_path / "step-2")
        assert cli(["fsck", str(tmp_path / "step-2")]) == 2
    else:  # the writers finished before the kill landed: then it must be whole
        assert "COMMITTED" in out.stdout
        assert cli(["fsck", str(tmp_path / "step-2")]) == 0
    from conftest import assert_same_tree
    assert_same_tree(small_state, ckptstore.load(tmp_path / "step-1"))
    assert cli(["fsck", str(tmp_path / "step-1")]) == 0


def test_error_of_unwaited_save_is_raised_by_next_save(tmp_path):
    blocker = tmp_path / "c"
    blocker.write_text("a file where the checkpoint directory should be")
    h = ckptstore.save({"x": torch.ones(2)}, tmp_path / "ok")
    h.wait()
    with pytest.raises(OSError):
        ckptstore.save({"x": torch.ones(2)}, blocker)


def test_background_error_keeps_type_and_is_raised_once(tmp_path, monkeypatch):
    from ckptstore.api import save as saver

    class Boom(OSError):
        pass

    def failing_encode(*a, **k):
        raise Boom("disk on fire")

    real = saver.fmt.encode
    monkeypatch.setattr(saver.fmt, "encode", failing_encode)
    h = ckptstore.save({"x": torch.ones(2)}, tmp_path / "a")
    with pytest.raises(Boom):
        h.wait()
    monkeypatch.setattr(saver.fmt, "encode", real)
    ckptstore.save({"x": torch.ones(2)}, tmp_path / "b").wait()  # observed: not raised again
    monkeypatch.setattr(saver.fmt, "encode", failing_encode)
    h = ckptstore.save({"x": torch.ones(2)}, tmp_path / "c")  # nobody waits for this one
    assert isinstance(h.exception(timeout=60), Boom)  # looking does not consume it
    assert h.done()
    monkeypatch.setattr(saver.fmt, "encode", real)
    with pytest.raises(Boom):
        ckptstore.save({"x": torch.ones(2)}, tmp_path / "d")
    h = ckptstore.save({"x": torch.ones(2)}, tmp_path / "e")
    assert h.exception() is None and h.wait().logical_bytes == 8
    assert not (tmp_path / "a" / "manifest.json").exists()


def test_existing_checkpoint_is_not_overwritten_unless_asked(tmp_path):
    ckptstore.save({"x": torch.ones(2)}, tmp_path / "c").wait()
    with pytest.raises(ckptstore.CheckpointExistsError):
        ckptstore.save({"x": torch.zeros(2)}, tmp_path / "c")
    ckptstore.save({"x": torch.zeros(2)}, tmp_path / "c", overwrite=True).wait()
    assert torch.equal(ckptstore.load(tmp_path / "c")["x"], torch.zeros(2))
    assert len(list((tmp_path / "c").iterdir())) == 2  # old shard removed after commit


def test_staging_budget_pipelines_through_a_small_ring(tmp_path):
    from conftest import assert_same_tree
    state = {f"w{i}": torch.randn(64, 1024) for i in range(16)}  # 4 MB through 1 MB
    ckptstore.save(state, tmp_path / "c", staging_budget=1 << 20, chunk_size=64 << 10,
                   compression="lz4").wait()
    assert_same_tree(state, ckptstore.load(tmp_path / "c"))
    from ckptstore.pipeline import engine as saver
    assert saver.engine().staging.arena.size >= 1 << 20


def test_if_busy_raise(tmp_path):
    state = {f"w{i}": torch.randn(512, 1024) for i in range(32)}
    h = ckptstore.save(state, tmp_path / "a", compression="zstd", zstd_level=9)
    try:
        with pytest.raises(ckptstore.StagingBusyError):
            ckptstore.save(state, tmp_path / "b", if_busy="raise")
    finally:
        h.wait()


def test_overwrite_keeps_files_a_later_incremental_step_references(tmp_path):
    """``overwrite=True`` of a step must not delete the files that a sibling step saved
    incrementally on top of it still reads: that would lose a committed checkpoint."""
    frozen = torch.randn(64, 256)
    ckptstore.save({"frozen": frozen, "x": torch.ones(8)}, tmp_path / "s1",
                   compression="zstd").wait()
    ckptstore.save({"frozen": frozen, "x": torch.full((8,), 2.0)}, tmp_path / "s2",
                   compression="zstd", base="s1").wait()
    refs = [f for f in ckptstore.open(tmp_path / "s2").manifest.files if f.base == "s1"]
    assert refs  # s2 reads "frozen" from a file of s1
    ckptstore.save({"x": torch.zeros(8)}, tmp_path / "s1", compression="zstd",
                   overwrite=True).wait()
    assert torch.equal(ckptstore.load(tmp_path / "s1")["x"], torch.zeros(8))
    out = ckptstore.load(tmp_path / "s2")
    assert torch.equal(out["frozen"], frozen) and torch.equal(out["x"], torch.full((8,), 2.0))
    assert ckptstore.fsck(tmp_path / "s2").ok
    # a file nobody references is still removed
    names = {f.name for f in ckptstore.open(tmp_path / "s1").manifest.files} | \
        {f.name for f in refs} | {"manifest.json"}
    assert set(os.listdir(tmp_path / "s1")) == names


def test_storage_class_defined_in_main_is_refused_with_its_cause(tmp_path):
    """Writers are spawned without the parent's ``__main__``, so they cannot unpickle a
    Storage class defined there; the save used to report only WriterDiedError (the
    cause was on the writer's stderr). It is refused up front, naming the class."""
    script = tmp_path / "mine.py"
    script.write_text(
        "import sys, torch, ckptstore\n"
        "from ckptstore.errors import UnsupportedTypeError\n"
        "from ckptstore.storage import LocalStorage\n"
        "from ckptstore.storage.faulty import FaultyStorage\n"
        "class Mine(LocalStorage):\n"
        "    pass\n"
        "for s in (Mine(sys.argv[1]), FaultyStorage(Mine(sys.argv[1]))):\n"
        "    try:\n"
        "        ckptstore.save({'x': torch.ones(2)}, s, blocking=True)\n"
        "    except UnsupportedTypeError as e:\n"
        "        print('refused:', e)\n")
    out = subprocess.run([sys.executable, str(script), str(tmp_path / "c")], capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    lines = [ln for ln in out.stdout.splitlines() if ln.startswith("refused:")]
    assert len(lines) == 2 and all("Mine" in ln and "__main__" in ln for ln in lines), out.stdout
    assert not (tmp_path / "c").exists()


@pytest.mark.parametrize("compression", ["none", "zstd"])
@pytest.mark.parametrize("dtype", ["qint8", "quint8", "qint32", "quint4x2", "bits8", "int4"])
def test_a_manifest_claiming_a_dtype_unsafe_to_rebuild_is_refused_by_load_and_fsck(
        tmp_path, dtype, compression):
    """Such a manifest used to pass validation and crash the interpreter on load."""
    src = tmp_path / "q"
    ckptstore.save({"x": torch.arange(64, dtype=torch.int8)}, src, compression=compression).wait()
    obj = json.loads((src / "manifest.json").read_bytes())
    obj.pop("manifest_checksum")
    for t in obj["tensors"]:
        t["dtype"] = dtype
    _write_manifest(src, obj)
    for fn in (ckptstore.load, lambda p: dict(ckptstore.open(p))):
        with pytest.raises(ckptstore.UnsafeCheckpointError, match=dtype):
            fn(src)
    report = ckptstore.fsck(src)
    assert not report.ok


@pytest.mark.parametrize("make", [
    lambda: torch.quantize_per_tensor(torch.randn(8), 0.1, 0, torch.qint8),
    lambda: torch.zeros(4, dtype=torch.uint8).view(torch.bits8),
])
def test_saving_a_dtype_a_checkpoint_cannot_hold_is_a_typed_error(tmp_path, make):
    with pytest.raises(ckptstore.UnsupportedTypeError, match="dtype|quantized"):
        ckptstore.save({"x": make()}, tmp_path / "u")
    assert not (tmp_path / "u" / "manifest.json").exists()


@pytest.mark.parametrize("make,what", [
    (lambda: torch.empty(4, 4, device="meta"), "meta"),
    (lambda: torch.nested.nested_tensor([torch.ones(2), torch.ones(3)]), "nested"),
    (lambda: torch.ones(4, 4).to_sparse(), "layout"),
])
def test_tensors_without_plain_bytes_are_refused_with_a_typed_error(tmp_path, make, what):
    with pytest.raises(ckptstore.UnsupportedTypeError, match=what):
        ckptstore.save({"x": make()}, tmp_path / "m")
    assert not (tmp_path / "m" / "manifest.json").exists()


def test_an_int_too_long_for_json_is_refused_on_save_and_in_a_manifest(tmp_path):
    with pytest.raises(ckptstore.UnsupportedTypeError, match="digits"):
        ckptstore.save({"n": 10 ** 5000}, tmp_path / "i")
    src = tmp_path / "j"
    ckptstore.save({"n": 7, "x": torch.ones(2)}, src).wait()
    raw = (src / "manifest.json").read_bytes()
    obj = json.loads(raw)
    obj.pop("manifest_checksum")
    _write_manifest(src, obj)
    body = (src / "manifest.json").read_bytes()
    # a re-sealed manifest whose tree holds a 5,000-digit integer
    big = body.replace(b'"tree":{"T":"dict","items":[["n",7]', b'"tree":{"T":"dict","items":[["n",' + b"9" * 5000 + b"]", 1)
    assert big != body
    cut = big.rfind(b',"manifest_checksum":"')
    big = big[:cut] + b',"manifest_checksum":"' + fmt.hash_bytes(big[:cut]).encode() + b'"}\n'
    (src / "manifest.json").write_bytes(big)
    with pytest.raises(ckptstore.CorruptCheckpointError):
        ckptstore.load(src)
    assert not ckptstore.fsck(src).ok


@pytest.mark.parametrize("verify", [True, False])
def test_a_missing_shard_is_a_typed_error_with_or_without_verification(tmp_path, verify):
    src = tmp_path / "m"
    ckptstore.save({"x": torch.ones(10)}, src, compression="none").wait()
    for f in os.listdir(src):
        if f.startswith("shard-"):
            os.remove(src / f)
    with pytest.raises(ckptstore.CorruptCheckpointError, match="missing"):
        ckptstore.load(src, verify=verify)  # verify=False raised a bare FileNotFoundError
