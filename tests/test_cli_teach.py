"""The command line and the API say what went wrong and what to do: one line and exit
code 2 for a wrong path, hints for files of other formats and run directories,
typed errors for unwritable destinations and unknown keys, ``--json`` on every
subcommand, ``inspect``, torch-free ``fsck``/``ls``/``gc``, no thread tracebacks at
exit after a failed first save."""
from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

import ckptstore
from ckptstore.cli.main import main as cli
from ckptstore.errors import CheckpointNotFoundError, DestinationNotWritableError, KeyNotFoundError

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def where(tmp_path_factory) -> Path:
    """One directory with a checkpoint, a run of two steps, a torch.save file, a
    safetensors file, an empty directory and a plain text file."""
    from safetensors.torch import save_file

    d = tmp_path_factory.mktemp("teach")
    state = {"model": {"w": torch.arange(12, dtype=torch.float32).reshape(3, 4),
                       "b": torch.zeros(4, dtype=torch.bfloat16)},
             "arr": np.arange(5, dtype=np.int64), "step": 7, "name": "run-a"}
    ckptstore.save(state, d / "ck", metadata={"lr": 0.1}, blocking=True)
    with ckptstore.Checkpointer(d / "run", keep_last=None) as c:
        for step in (1, 2):
            c.save(step, {"w": torch.full((64,), float(step))}).wait()
    torch.save({"w": torch.ones(2)}, d / "model.pt")
    save_file({"w": torch.ones(2)}, str(d / "model.safetensors"))
    (d / "empty").mkdir()
    (d / "notes.txt").write_text("hello\n")
    return d


def run_cli(capsys, *argv: str) -> tuple[int, str, str]:
    capsys.readouterr()
    rc = cli(list(argv))
    out = capsys.readouterr()
    return rc, out.out, out.err


# -- 1, 3: wrong paths: one line, exit 2, a hint ---------------------------------------

WRONG = [  # (argv with {d} for the directory, words the one-line message must hold)
    ("fsck {d}/model.pt", "torch.save file", "ckptstore import"),
    ("fsck {d}/model.safetensors", "safetensors file", "ckptstore import"),
    ("fsck {d}/run", "run directory", "ckptstore ls"),
    ("fsck {d}/missing", "does not exist", ""),
    ("fsck {d}/empty", "empty directory", "manifest.json"),
    ("fsck {d}/notes.txt", "is a file", "directory"),
    ("inspect {d}/model.pt", "torch.save file", "ckptstore import"),
    ("inspect {d}/run", "run directory", "ckptstore ls"),
    ("export {d}/model.safetensors {d}/out.safetensors", "safetensors file", "ckptstore import"),
    ("diff {d}/model.pt {d}/ck", "torch.save file", ""),
    ("ls {d}/missing", "does not exist", ""),
    ("ls {d}/model.pt", "torch.save file", "ckptstore import"),
    ("ls {d}/ck", "one checkpoint", "ckptstore inspect"),
    ("gc {d}/missing", "does not exist", ""),
    ("gc {d}/model.safetensors", "safetensors file", ""),
    ("promote {d}/missing {d}/dst", "does not exist", ""),
    ("inspect {d}/ck --keys modle", "'modle'", "did you mean 'model'"),
]


@pytest.mark.parametrize("argv,say,todo", WRONG, ids=[w[0].replace("{d}/", "") for w in WRONG])
def test_a_wrong_path_is_one_line_and_exit_2(where, capsys, argv, say, todo):
    rc, out, err = run_cli(capsys, *argv.format(d=where).split())
    assert rc == 2, err
    assert err.count("\n") == 1 and err.startswith(f"ckptstore {argv.split()[0]}: "), err
    assert say in err and todo in err, err
    assert "Traceback" not in err and out == ""


def test_gc_of_an_empty_object_store_prefix_is_not_an_error(capsys):
    """An object store prefix without objects may still hold incomplete uploads: gc runs;
    ls says there is nothing there."""
    pytest.importorskip("fsspec")
    assert run_cli(capsys, "gc", "memory://teach-empty/run")[0] == 0
    rc, _, err = run_cli(capsys, "ls", "memory://teach-empty/run")
    assert rc == 2 and "does not exist" in err


def test_wrong_path_as_a_real_process(where):
    """``python -m ckptstore``: exit 2, one line on stderr, no traceback; --json adds an
    error object on stdout."""
    p = subprocess.run([sys.executable, "-m", "ckptstore", "fsck", str(where / "model.pt"), "--json"],
                       capture_output=True, text=True, timeout=120, cwd=REPO)
    assert p.returncode == 2, p.stderr
    assert p.stderr.count("\n") == 1 and "torch.save file" in p.stderr, p.stderr
    err = json.loads(p.stdout)
    assert err["error"] == "CheckpointNotFoundError" and err["exit_code"] == 2
    assert "ckptstore import" in err["hint"]


def test_load_of_a_file_carries_the_hint(where):
    for name, kind in (("model.pt", "torch.save"), ("model.safetensors", "safetensors")):
        with pytest.raises(CheckpointNotFoundError) as e:
            ckptstore.load(where / name)
        assert isinstance(e.value, FileNotFoundError)
        assert f"this is a {kind} file" in str(e.value) and "ckptstore import" in e.value.hint
    with pytest.raises(CheckpointNotFoundError, match="ckptstore ls"):
        ckptstore.open(where / "run")


# -- 2: unwritable destinations are refused before save() returns ------------------------


def test_save_under_a_file_is_refused_before_anything_is_staged(where, tmp_path):
    with pytest.raises(DestinationNotWritableError) as e:
        ckptstore.save({"x": torch.ones(3)}, where / "notes.txt" / "ck")
    assert isinstance(e.value, PermissionError) and e.value.errno == errno.ENOTDIR
    assert str(where / "notes.txt") in str(e.value) and "directory" in str(e.value)
    with ckptstore.Checkpointer(where / "notes.txt" / "run") as c:
        with pytest.raises(DestinationNotWritableError, match="is a file"):
            c.save(1, {"x": torch.ones(3)})


def test_save_to_a_read_only_directory_is_refused(tmp_path, monkeypatch):
    ro = tmp_path / "ro"
    ro.mkdir()
    if os.geteuid() == 0:  # root writes anywhere but on read-only mounts: pretend one
        real = os.access

        def access(p, mode, **kw):
            return False if str(p) == str(ro) else real(p, mode, **kw)

        monkeypatch.setattr(os, "access", access)
    else:
        ro.chmod(0o555)
    try:
        with pytest.raises(DestinationNotWritableError, match="save to a writable directory") as e:
            ckptstore.save({"x": torch.ones(3)}, ro / "ck")
        assert str(ro) in str(e.value)
        assert not (ro / "ck").exists()
    finally:
        ro.chmod(0o755)


def test_fsspec_read_only_protocol_is_refused():
    pytest.importorskip("fsspec")
    with pytest.raises(DestinationNotWritableError, match="read-only"):
        ckptstore.save({"x": torch.ones(3)}, "https://example.invalid/ck")


# -- 4: keys that match nothing ----------------------------------------------------------


def test_load_keys_that_match_nothing_raise_a_typed_error(where):
    with pytest.raises(KeyNotFoundError) as e:
        ckptstore.load(where / "ck", keys=["model.w", "modle.b"])
    assert e.value.keys == ("modle.b",) and isinstance(e.value, KeyError)
    assert "'modle.b'" in str(e.value) and "did you mean 'model.b'" in str(e.value)
    with pytest.raises(KeyNotFoundError, match="'nothing'"):
        ckptstore.load(where / "ck", keys="nothing")
    with pytest.raises(KeyNotFoundError, match="selected nothing"):
        ckptstore.load(where / "ck", keys=lambda name: False)
    out = ckptstore.load(where / "ck", keys=(k for k in ["model.", "step"]))  # a generator, once
    assert list(out) == ["model", "step"] and torch.equal(out["model"]["w"], torch.arange(12.0).reshape(3, 4))


def test_open_getitem_of_a_missing_or_non_array_name(where):
    ck = ckptstore.open(where / "ck")
    with pytest.raises(KeyNotFoundError, match="did you mean 'model.w'"):
        ck["model.W"]
    with pytest.raises(KeyNotFoundError, match="not an array"):
        ck["step"]
    assert "model.w" in ck and "nope" not in ck and ck.get("nope") is None


# -- 5: promote's progress bar counts bytes ---------------------------------------------


def test_promote_progress_bar_counts_bytes(where, tmp_path, capsys, monkeypatch):
    pytest.importorskip("tqdm")
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True, raising=False)
    capsys.readouterr()
    rc = cli(["promote", str(where / "run"), str(tmp_path / "remote"), "--json"])
    out = capsys.readouterr()
    assert rc == 0, out.err
    report = json.loads(out.out)
    assert [r["name"] for r in report["promoted"]] == ["step-000000000001", "step-000000000002"]
    total = sum(s.stat().st_size for s in (where / "run").rglob("shard-*"))
    assert report["uploaded_bytes"] == total
    from tqdm import tqdm

    # the bar's total is the bytes of the two steps (it was the number of steps, shown as B)
    assert f"/{tqdm.format_sizeof(total, divisor=1024)} [" in out.err, (total, out.err)
    assert "B/s" in out.err, out.err


# -- 6: --json on fsck, ls, gc, promote ---------------------------------------------------


def test_json_fields(where, tmp_path, capsys):
    rc, out, _ = run_cli(capsys, "fsck", str(where / "ck"), "--json")
    r = json.loads(out)
    assert rc == 0 and r["ok"] is True and r["tensors"] == 3 and r["damage"] == []
    assert {"path", "chunks", "files", "bytes_checked", "damaged_tensors"} <= set(r)
    rc, out, _ = run_cli(capsys, "ls", str(where / "run"), "--json")
    r = json.loads(out)
    assert rc == 0 and r["tier"] == "local" and [s["step"] for s in r["steps"]] == [1, 2]
    assert all(s["state"] == "committed" and s["logical_bytes"] == 256 for s in r["steps"])
    rc, out, _ = run_cli(capsys, "gc", str(where / "run"), "--dry-run", "--json")
    r = json.loads(out)
    assert rc == 0 and r == {"url": str(where / "run"), "dry_run": True, "grace_seconds": 3600.0,
                             "removed": [], "count": 0}
    rc, out, _ = run_cli(capsys, "promote", str(where / "ck"), str(tmp_path / "r2"), "--json")
    r = json.loads(out)
    assert rc == 0 and r["promoted"][0]["name"] == "ck" and r["promoted"][0]["already"] is False
    rc, out, _ = run_cli(capsys, "ls", str(where / "missing"), "--json")
    assert rc == 2 and json.loads(out)["error"] == "CheckpointNotFoundError"


# -- 7: --version and inspect -------------------------------------------------------------


def test_version(capsys):
    rc, out, _ = run_cli(capsys, "--version")
    assert rc == 0 and out.strip() == f"ckptstore {ckptstore.__version__}"


def test_inspect_reads_the_manifest_only(where, capsys, monkeypatch):
    from ckptstore.storage.local import LocalStorage

    real_read = LocalStorage.read
    read: list[str] = []
    monkeypatch.setattr(LocalStorage, "read", lambda self, name, *a, **k: (read.append(name),
                                                                            real_read(self, name, *a, **k))[1])
    rc, out, _ = run_cli(capsys, "inspect", str(where / "ck"), "--json")
    assert rc == 0 and set(read) == {"manifest.json"}
    r = json.loads(out)
    assert r["metadata"] == {"lr": 0.1} and r["compression"] == "none" and r["chunks"] == 3
    by = {e["name"]: e for e in r["entries"]}
    assert list(by) == ["model.w", "model.b", "arr", "step", "name"]
    assert by["model.w"] == {"name": "model.w", "kind": "torch", "dtype": "float32", "shape": [3, 4],
                             "stored_bytes": 48, "raw_bytes": 48, "chunks": 1, "sharded": False}
    assert by["model.b"]["dtype"] == "bfloat16" and by["arr"]["kind"] == "numpy"
    assert by["step"] == {"name": "step", "kind": "value", "type": "int", "value": "7"}
    assert len(r["save_id"]) == 12 and r["created"].startswith("20")
    rc, out, _ = run_cli(capsys, "inspect", str(where / "ck"), "--keys", "model.")
    assert rc == 0 and "model.w" in out and "float32" in out and "[3, 4]" in out and "\narr " not in out
    assert "save id" in out and "metadata: {\"lr\": 0.1}" in out


# -- 8: fsck, ls and gc start without torch ------------------------------------------------


def test_fsck_ls_gc_do_not_import_torch(where):
    code = textwrap.dedent(f"""
        import sys
        from ckptstore.cli.main import main
        for argv in (["fsck", {str(where / "ck")!r}, "--deep"], ["ls", {str(where / "run")!r}],
                     ["gc", {str(where / "run")!r}, "--dry-run"], ["ls", {str(where / "missing")!r}]):
            rc = main(argv)
            assert rc == (2 if "missing" in argv[1] else 0), (argv, rc)
            assert "torch" not in sys.modules, argv
        print("torch-free")
    """)
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=REPO)
    assert p.returncode == 0 and "torch-free" in p.stdout, p.stderr


def test_fsck_names_a_tree_that_refers_to_a_missing_tensor(tmp_path):
    """The torch-free structure check still finds what load refuses."""
    from fuzz.parsers import seal

    ckptstore.save({"w": torch.ones(3), "n": 1.5}, tmp_path / "ck", blocking=True)
    obj = json.loads((tmp_path / "ck" / "manifest.json").read_bytes())
    obj["tree"] = {"T": "dict", "items": [["w", {"T": "tensor", "id": 5}]]}
    (tmp_path / "ck" / "manifest.json").write_bytes(seal(obj))
    report = ckptstore.fsck(tmp_path / "ck")
    assert not report.ok and "tensor 5" in report.damage[0].problem


# -- 9: no thread traceback at exit after a failed first save -------------------------------

EXIT_CASES = {
    # the writers start in the background, then the save fails in the caller
    "makedirs fails": """
        from ckptstore.storage import LocalStorage
        from ckptstore.storage.faulty import FaultyStorage
        ckptstore.save({"x": torch.ones(1000)}, FaultyStorage(LocalStorage(D + "/c"), fail={"makedirs": "*"}))
    """,
    "unwritable": 'ckptstore.save({"x": torch.ones(3)}, D + "/file/c")',
    "unsupported value": 'ckptstore.save({"x": torch.ones(3), "o": object()}, D + "/u")',
}


@pytest.mark.parametrize("case", list(EXIT_CASES))
def test_failed_first_save_raises_once_with_no_thread_traceback(tmp_path, case):
    (tmp_path / "file").write_text("x")
    code = (f"import torch, ckptstore\nD = {str(tmp_path)!r}\n" + textwrap.dedent(EXIT_CASES[case]))
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=REPO)
    assert p.returncode == 1
    assert p.stderr.count("Traceback") == 1, p.stderr
    assert "Exception in thread" not in p.stderr and "cannot schedule" not in p.stderr, p.stderr
    last = p.stderr.strip().splitlines()[-1]
    want = {"makedirs fails": "StorageError", "unwritable": "DestinationNotWritableError",
            "unsupported value": "UnsupportedTypeError"}[case]
    assert last.split(":")[0].endswith(want), p.stderr


def test_a_save_never_waited_for_commits_at_exit(tmp_path):
    """The save in flight at interpreter exit is finished before concurrent.futures
    stops taking jobs (it used to fail: "cannot schedule new futures after shutdown")."""
    code = f"import torch, ckptstore\nckptstore.save({{'x': torch.arange(10.0)}}, {str(tmp_path / 'c')!r})\n"
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=REPO)
    assert p.returncode == 0 and p.stderr == "", p.stderr
    assert torch.equal(ckptstore.load(tmp_path / "c")["x"], torch.arange(10.0))
