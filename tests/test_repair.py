"""Damage in incremental chains is contained: a damaged or missing local file (the
step's own, or an older step's it depends on) is replaced by the verified copy the
remote tier (moto S3) holds; ``ls`` and ``fsck`` say which steps a step reads;
retention keeps the files of a dropped full save that later steps read."""
from __future__ import annotations

import json
import logging
import os
import warnings

import fsspec
import pytest
import torch

import ckptstore
from ckptstore import manifest as fmt
from ckptstore.api.checkpointer import CheckpointFallbackWarning
from ckptstore.cli.main import main as cli_main
from ckptstore.runs.gc import gc
from ckptstore.runs.layout import step_name
from ckptstore.storage import open_storage
from conftest_tiers import *  # noqa: F401,F403

pytestmark = pytest.mark.timeout(300)
S1, S2, S3, S4 = (step_name(s) for s in (1, 2, 3, 4))


def _state(step: int) -> dict:
    g = torch.Generator().manual_seed(step)
    return {"frozen": torch.randn(128, 32, generator=torch.Generator().manual_seed(7)),
            "mid": torch.full((64, 32), float(min(step, 2))),  # changes at step 2 only
            "w": torch.randn(32, 8, generator=g), "step": step}


def _assert_state(out: dict, step: int) -> None:
    want = _state(step)
    assert set(out) == set(want) and out["step"] == step
    for k in ("frozen", "mid", "w"):
        assert out[k].dtype == want[k].dtype and torch.equal(out[k], want[k]), k


def _manifest(d) -> fmt.Manifest:
    return fmt.read_manifest(open_storage(d))


def _base_chunk(run, step: str, tensor: str, base: str) -> tuple[str, int]:
    """(file, offset in the middle of a chunk) of ``tensor`` that ``step`` reads from
    step directory ``base``."""
    m = _manifest(run / step)
    files = {f.name: f.base or step for f in m.files}
    c = next(c for t in m.tensors if t.name == tensor for c in t.chunks if files[c.file] == base)
    return c.file, c.offset + c.length // 2


def _flip(path, offset: int) -> bytes:
    raw = bytearray(path.read_bytes())
    raw[offset] ^= 0x10
    path.write_bytes(bytes(raw))
    return bytes(raw)


def _run(tmp_path, url, opts, steps, **kw) -> None:
    with ckptstore.Checkpointer(tmp_path, url, storage_options=opts, keep_last=5, **kw) as ck:
        for s in steps:
            ck.save(s, _state(s))


def _opt_args(opts: dict, flag: str = "--storage-option") -> list[str]:
    return [a for k, v in opts.items() if isinstance(v, str) for a in (flag, f"{k}={v}")]


def _s3(url: str, opts: dict):
    return fsspec.filesystem("s3", skip_instance_cache=True, **opts), url.removeprefix("s3://")


def test_damaged_base_chunk_is_repaired_from_remote(tmp_path, s3_bucket, caplog):
    bucket, opts = s3_bucket
    url = f"{bucket}/repair-base"
    _run(tmp_path, url, opts, (1, 2, 3))
    assert {f.base for f in _manifest(tmp_path / S3).files if f.base} == {S1, S2}
    file, off = _base_chunk(tmp_path, S3, "frozen", S1)
    good = (tmp_path / S1 / file).read_bytes()
    _flip(tmp_path / S1 / file, off)  # every later step reads this chunk
    with ckptstore.Checkpointer(tmp_path, url, storage_options=opts, keep_last=5) as ck:
        with warnings.catch_warnings(), caplog.at_level(logging.WARNING, "ckptstore.repair"):
            warnings.simplefilter("error", CheckpointFallbackWarning)  # no fallback at all
            out = ck.load("latest")
        assert ck.loaded_step == 3
    _assert_state(out, 3)
    assert (tmp_path / S1 / file).read_bytes() == good  # the local copy is whole again
    assert any("repaired" in r.getMessage() and file in r.getMessage() for r in caplog.records)
    for s in (S1, S2, S3):
        assert ckptstore.fsck(tmp_path / s).ok
    assert not [n for n in os.listdir(tmp_path / S1) if n.startswith(".tmp-")]


def test_no_intact_copy_falls_back_and_writes_nothing(tmp_path, s3_bucket, caplog):
    bucket, opts = s3_bucket
    url = f"{bucket}/repair-none"
    _run(tmp_path, url, opts, (1, 2, 3, 4), full_every=3)  # step 4 is full again
    assert not any(f.base for f in _manifest(tmp_path / S4).files)
    file, off = _base_chunk(tmp_path, S4, "frozen", S4)
    damaged = _flip(tmp_path / S4 / file, off)
    fs, prefix = _s3(url, opts)
    remote_bad = bytearray(fs.cat_file(f"{prefix}/{S4}/{file}"))
    remote_bad[off + 1] ^= 0x01  # the remote copy is damaged too (elsewhere)
    fs.pipe_file(f"{prefix}/{S4}/{file}", bytes(remote_bad))
    with ckptstore.Checkpointer(tmp_path, url, storage_options=opts, keep_last=5) as ck:
        with pytest.warns(CheckpointFallbackWarning), caplog.at_level(logging.WARNING, "ckptstore.repair"):
            out = ck.load("latest")
        assert ck.loaded_step == 3
    _assert_state(out, 3)
    assert (tmp_path / S4 / file).read_bytes() == damaged  # a bad copy is never written
    msgs = [r.getMessage() for r in caplog.records if r.name == "ckptstore.repair"]
    assert any("no intact copy" in m and "hash mismatch" in m for m in msgs), msgs
    assert not any(m.startswith("repaired") for m in msgs), msgs


def test_cli_repair(tmp_path, s3_bucket, capsys):
    bucket, opts = s3_bucket
    url = f"{bucket}/repair-cli"
    _run(tmp_path, url, opts, (1, 2, 3))
    file, off = _base_chunk(tmp_path, S3, "frozen", S1)
    good1 = (tmp_path / S1 / file).read_bytes()
    _flip(tmp_path / S1 / file, off)
    own = next(f.name for f in _manifest(tmp_path / S3).files if f.base is None)
    good3 = (tmp_path / S3 / own).read_bytes()
    os.remove(tmp_path / S3 / own)  # a missing file of the step itself
    capsys.readouterr()
    assert cli_main(["repair", str(tmp_path), url, "--json",
                     *_opt_args(opts, "--remote-option")]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["ok"] is True
    done = {(r["dir"], r["file"]) for s in out["steps"] for r in s["repaired"]}
    assert done == {(S1, file), (S3, own)}
    assert (tmp_path / S1 / file).read_bytes() == good1
    assert (tmp_path / S3 / own).read_bytes() == good3
    _assert_state(ckptstore.load(tmp_path / S3), 3)
    # nothing left to repair; text output
    assert cli_main(["repair", str(tmp_path), url, "--step", "3",
                     *_opt_args(opts, "--remote-option")]) == 0
    assert capsys.readouterr().out.strip() == f"{S3}: OK"
    # no remote copy either: reported, exit 1, nothing written
    fs, prefix = _s3(url, opts)
    fs.rm_file(f"{prefix}/{S3}/{own}")
    os.remove(tmp_path / S3 / own)
    assert cli_main(["repair", str(tmp_path), url, "--step", "3",
                     *_opt_args(opts, "--remote-option")]) == 1
    text = capsys.readouterr().out
    assert f"{S3}: DAMAGED" in text and "no intact copy" in text and own in text
    assert not (tmp_path / S3 / own).exists()


def test_ls_and_fsck_show_dependencies(tmp_path, capsys):
    with ckptstore.Checkpointer(tmp_path, keep_last=5) as ck:
        for s in (1, 2, 3):
            ck.save(s, _state(s))
    os.makedirs(tmp_path / S4)  # uncommitted
    capsys.readouterr()
    assert cli_main(["ls", str(tmp_path), "--json"]) == 0
    steps = {s["name"]: s["depends_on"] for s in json.loads(capsys.readouterr().out)["steps"]}
    assert steps == {S1: [], S2: [S1], S3: [S1, S2], S4: []}
    assert cli_main(["ls", str(tmp_path)]) == 0
    rows = {ln.split()[0]: ln for ln in capsys.readouterr().out.splitlines()[2:]}
    assert rows["1"].endswith("  full") and rows["2"].endswith(f"  base: {S1}")
    assert rows["3"].endswith(f"  base: {S1}, {S2}") and rows["4"].endswith("  -")
    assert cli_main(["fsck", str(tmp_path / S3), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["ok"] is True and report["depends_on"] == [S1, S2]
    file, off = _base_chunk(tmp_path, S3, "frozen", S1)
    _flip(tmp_path / S1 / file, off)
    assert cli_main(["fsck", str(tmp_path / S3), "--json"]) == 1
    report = json.loads(capsys.readouterr().out)
    assert report["depends_on"] == [S1, S2]
    assert {(d["file"], d["held_by"], d["tensor"]) for d in report["damage"]} == {(file, S1, "frozen")}
    assert cli_main(["fsck", str(tmp_path / S3)]) == 1
    text = capsys.readouterr().out
    assert f"reads files of: {S1}, {S2}" in text and f"(a file of {S1})" in text


def test_retention_keeps_files_of_a_dropped_full_save(tmp_path, capsys):
    """Retention already keeps every file a kept manifest references (it deletes only
    unreferenced files): a step built on a dropped full save stays loadable, also
    after gc."""
    with ckptstore.Checkpointer(tmp_path, keep_last=2, full_every=None) as ck:
        for s in (1, 2, 3, 4):
            ck.save(s, _state(s))
        ck.wait()
        assert ck.steps() == [3, 4]
    assert S1 in {f.base for f in _manifest(tmp_path / S4).files}
    assert not (tmp_path / S1 / fmt.MANIFEST_NAME).exists()  # step 1 is dropped...
    assert gc(open_storage(tmp_path), grace=0) == []  # ...but not its referenced files
    for s in (3, 4):
        assert ckptstore.fsck(tmp_path / step_name(s)).ok
        _assert_state(ckptstore.load(tmp_path / step_name(s)), s)
    with ckptstore.Checkpointer(tmp_path, keep_last=2) as ck:
        _assert_state(ck.load("latest"), 4)
    capsys.readouterr()
    assert cli_main(["ls", str(tmp_path), "--json"]) == 0
    steps = {s["name"]: s for s in json.loads(capsys.readouterr().out)["steps"]}
    assert S1 in steps[S4]["depends_on"] and steps[S1]["committed"] is False
