"""Hostile and malformed files given to ``ckptstore import``: every one is a typed
error and a one-line CLI message (never a traceback), header size and tensor count
are bounded before safetensors parses anything, and valid files still import."""
from __future__ import annotations

import io
import json
import os
import struct
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import save as st_save

import ckptstore
from ckptstore.cli.main import main
from ckptstore.errors import CkptError, CorruptCheckpointError, UnsafeCheckpointError
from ckptstore.interop.convert import import_checkpoint
from ckptstore.interop.guard import HEADER_ENV, TENSORS_ENV


def _st(path, header, data: bytes = b"", length: int | None = None):
    h = header if isinstance(header, bytes) else json.dumps(header).encode()
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(h) if length is None else length) + h + data)
    return str(path)


def _f32(n: int, begin: int = 0) -> dict:
    return {"dtype": "F32", "shape": [n], "data_offsets": [begin, begin + 4 * n]}


def _cli(capsys, src, dest) -> tuple[int, str]:
    code = main(["import", str(src), str(dest)])
    err = capsys.readouterr().err.strip()
    return code, err


def _refused(capsys, tmp_path, src, kind: type, words: str) -> str:
    """Both the library (typed error) and the CLI (one line, exit 1) refuse ``src``."""
    with pytest.raises(kind) as info:
        import_checkpoint(src, tmp_path / "lib-out")
    assert type(info.value) is kind, repr(info.value)
    assert words in str(info.value), str(info.value)
    code, err = _cli(capsys, src, tmp_path / "cli-out")
    assert code == 1, err
    assert len(err.splitlines()) == 1 and err.startswith("ckptstore import: "), err
    assert "Traceback" not in err and words in err
    assert not (tmp_path / "cli-out").exists() and not (tmp_path / "lib-out").exists()
    return err


GOOD = st_save({"a": torch.arange(6, dtype=torch.float32), "b": torch.ones(2, 2, dtype=torch.bfloat16)})


@pytest.mark.parametrize("case", ["short", "data_truncated", "length_beyond_file", "bad_json", "not_object",
                                  "offsets_out_of_range", "unknown_dtype", "shape_mismatch", "negative_shape",
                                  "deep_json"])
def test_malformed_safetensors_is_corrupt(tmp_path, capsys, case):
    p = tmp_path / "m.safetensors"
    if case == "short":
        p.write_bytes(GOOD[:5])
        words = "truncated"
    elif case == "data_truncated":
        p.write_bytes(GOOD[:-3])
        words = "out of range"
    elif case == "length_beyond_file":
        _st(p, b"{}", length=1 << 20)
        words = "runs past the end of the file"
    elif case == "bad_json":
        _st(p, b'{"a": [1,')
        words = "bad header JSON"
    elif case == "not_object":
        _st(p, b"[1, 2]")
        words = "not a JSON object"
    elif case == "offsets_out_of_range":
        _st(p, {"a": {"dtype": "F32", "shape": [100], "data_offsets": [0, 400]}}, b"\0" * 16)
        words = "out of range"
    elif case == "unknown_dtype":
        _st(p, {"a": {"dtype": "Q99", "shape": [4], "data_offsets": [0, 16]}}, b"\0" * 16)
        words = "unknown dtype 'Q99'"
    elif case == "shape_mismatch":
        _st(p, {"a": {"dtype": "F32", "shape": [5], "data_offsets": [0, 16]}}, b"\0" * 16)
        words = "does not match"
    elif case == "negative_shape":
        _st(p, {"a": {"dtype": "F32", "shape": [-4], "data_offsets": [0, 16]}}, b"\0" * 16)
        words = "malformed shape"
    else:
        _st(p, b"[" * 100_000 + b"]" * 100_000)
        words = "bad header JSON"
    _refused(capsys, tmp_path, p, CorruptCheckpointError, words)


def test_overlapping_and_duplicate_tensors_are_unsafe(tmp_path, capsys):
    p = _st(tmp_path / "o.safetensors", {"a": _f32(4), "b": _f32(4, 8)}, b"\0" * 24)
    _refused(capsys, tmp_path, p, UnsafeCheckpointError, "overlap")
    # duplicate names: safetensors itself keeps the last one silently
    h = b'{"a":{"dtype":"F32","shape":[4],"data_offsets":[0,16]},"a":{"dtype":"F32","shape":[4],' \
        b'"data_offsets":[0,16]}}'
    p = _st(tmp_path / "d.safetensors", h, b"\0" * 16)
    _refused(capsys, tmp_path, p, UnsafeCheckpointError, "names 'a' twice")


def test_header_and_tensor_limits_have_env_overrides(tmp_path, capsys, monkeypatch):
    tensors = {f"t{i}": torch.full((2,), float(i)) for i in range(50)}
    p = tmp_path / "many.safetensors"
    p.write_bytes(st_save(tensors))
    monkeypatch.setenv(TENSORS_ENV, "20")
    err = _refused(capsys, tmp_path, p, UnsafeCheckpointError, "tensor count 50 exceeds the import limit of 20")
    assert f"{TENSORS_ENV}=" in err  # says how to raise it
    monkeypatch.setenv(TENSORS_ENV, "50")
    monkeypatch.setenv(HEADER_ENV, "100")
    err = _refused(capsys, tmp_path, p, UnsafeCheckpointError, "exceeds the import limit of 100")
    assert f"{HEADER_ENV}=" in err
    monkeypatch.setenv(HEADER_ENV, "lots")
    code, err = _cli(capsys, p, tmp_path / "x")
    assert code == 2 and HEADER_ENV in err and len(err.splitlines()) == 1
    monkeypatch.delenv(HEADER_ENV)
    assert main(["import", str(p), str(tmp_path / "ok")]) == 0  # raised limits let it through
    got = ckptstore.load(str(tmp_path / "ok"))
    assert set(got) == set(tensors) and all(torch.equal(got[k], v) for k, v in tensors.items())


@pytest.mark.timeout(120)
def test_huge_header_refused_in_seconds_and_bounded_memory(tmp_path):
    """A valid file with an 84 MB header of 1.4 M empty tensors took minutes and GBs."""
    n = 1_400_000
    h = b"{" + b",".join(b'"t%07d":{"dtype":"F32","shape":[0],"data_offsets":[0,0]}' % i
                         for i in range(n)) + b"}"
    p = _st(tmp_path / "big.safetensors", h)
    del h
    # the peak of this process's own memory (VmHWM, kB): ru_maxrss would carry over the
    # peak of the test runner that forked it
    code = ("import re, sys, time\n"
            "from ckptstore.cli.main import main\n"
            "t = time.monotonic(); rc = main(sys.argv[1:4])\n"
            "hwm = re.search(r'VmHWM:\\s+(\\d+)', open('/proc/self/status').read()).group(1)\n"
            "print(rc, time.monotonic() - t, hwm)\n")
    for env in ({}, {HEADER_ENV: str(200 << 20)}):  # the header size, then the tensor count
        t = time.monotonic()
        r = subprocess.run([sys.executable, "-c", code, "import", p, str(tmp_path / "out")],
                           capture_output=True, text=True, env={**os.environ, **env}, timeout=100)
        wall = time.monotonic() - t
        rc, secs, rss_kb = r.stdout.split()
        assert rc == "1", r.stderr
        assert "UnsafeCheckpointError" in r.stderr and "Traceback" not in r.stderr
        assert (TENSORS_ENV if env else HEADER_ENV) in r.stderr, r.stderr
        assert float(secs) < 10 and wall < 40, (secs, wall)
        assert int(rss_kb) < 1_500_000, rss_kb  # kB: torch itself is a few hundred MB
    assert not (tmp_path / "out").exists()


def _torch_bytes(obj, legacy: bool = False) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf, _use_new_zipfile_serialization=not legacy)
    return buf.getvalue()


@pytest.mark.parametrize("case", ["zip_truncated", "zip_flipped", "legacy_bad_memo", "legacy_bad_opcode",
                                  "legacy_truncated"])
def test_corrupt_torch_save_is_corrupt_not_unsafe(tmp_path, capsys, case):
    good = _torch_bytes({"w": torch.arange(10), "n": 3})
    data = {"zip_truncated": good[: len(good) // 2],
            "zip_flipped": good[:40] + bytes(b ^ 0x5A for b in good[40:200]) + good[200:],
            "legacy_bad_memo": b"\x80\x02h\x05.",  # a memo reference that was never stored
            "legacy_bad_opcode": b"\x80\x02K\x01K\x02\x85q\x00\xff.",
            "legacy_truncated": _torch_bytes({"w": torch.arange(10)}, legacy=True)[:60]}[case]
    p = tmp_path / "m.pt"
    p.write_bytes(data)
    _refused(capsys, tmp_path, p, CorruptCheckpointError, "is not a readable torch.save file")


class _Evil:
    def __reduce__(self):
        return (os.system, ("true",))


def test_pickle_that_runs_code_is_still_unsafe(tmp_path, capsys):
    p = tmp_path / "evil.pt"
    torch.save({"x": _Evil()}, p)
    err = _refused(capsys, tmp_path, p, UnsafeCheckpointError, "needs arbitrary unpickling")
    assert "GLOBAL posix.system" in err or "GLOBAL os.system" in err, err


def _hf_folder(tmp_path, weight_map: dict, shards: dict) -> str:
    folder = tmp_path / "hf"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    for name, data in shards.items():
        (folder / name).write_bytes(data)
    return str(folder)


@pytest.mark.parametrize("case", ["missing_shard", "shard_outside", "absolute_shard", "bad_index_json",
                                  "deep_index_json", "bad_shard", "shard_lacks_tensor"])
def test_hostile_hugging_face_folders(tmp_path, capsys, case):
    one = st_save({"a": torch.ones(3)})
    kind, words = CorruptCheckpointError, ""
    if case == "missing_shard":
        src = _hf_folder(tmp_path, {"a": "model-00001.safetensors", "b": "model-00002.safetensors"},
                         {"model-00001.safetensors": one})
        words = "names model-00002.safetensors, which is not in"
    elif case == "shard_outside":
        (tmp_path / "outside.safetensors").write_bytes(one)
        src = _hf_folder(tmp_path, {"a": "../outside.safetensors"}, {})
        kind, words = UnsafeCheckpointError, "outside"
    elif case == "absolute_shard":
        src = _hf_folder(tmp_path, {"a": str(tmp_path / "x.safetensors")}, {})
        kind, words = UnsafeCheckpointError, "outside"
    elif case in ("bad_index_json", "deep_index_json"):
        src = _hf_folder(tmp_path, {"a": "m.safetensors"}, {"m.safetensors": one})
        bad = "{" if case == "bad_index_json" else "[" * 100_000 + "]" * 100_000
        (tmp_path / "hf" / "model.safetensors.index.json").write_text(bad)
        words = "is not valid JSON"
    elif case == "bad_shard":
        src = _hf_folder(tmp_path, {"a": "m.safetensors"}, {"m.safetensors": one[:-2]})
        words = "out of range"
    else:
        src = _hf_folder(tmp_path, {"a": "m.safetensors", "zz": "m.safetensors"}, {"m.safetensors": one})
        words = "lacks tensors its index names"
    _refused(capsys, tmp_path, src, kind, words)


def test_valid_files_still_import(tmp_path, capsys):
    p = tmp_path / "ok.safetensors"
    p.write_bytes(GOOD)
    assert main(["import", str(p), str(tmp_path / "a")]) == 0
    got = ckptstore.load(str(tmp_path / "a"))
    assert torch.equal(got["a"], torch.arange(6, dtype=torch.float32))
    assert torch.equal(got["b"], torch.ones(2, 2, dtype=torch.bfloat16))
    pt = tmp_path / "ok.pt"
    pt.write_bytes(_torch_bytes({"w": torch.arange(10), "n": 3}, legacy=True))
    assert main(["import", str(pt), str(tmp_path / "b")]) == 0
    got = ckptstore.load(str(tmp_path / "b"))
    assert torch.equal(got["w"], torch.arange(10)) and got["n"] == 3
    one = st_save({"a": torch.ones(3)})
    src = _hf_folder(tmp_path, {"a": "m.safetensors"}, {"m.safetensors": one})
    assert main(["import", src, str(tmp_path / "c")]) == 0
    assert torch.equal(ckptstore.load(str(tmp_path / "c"))["a"], torch.ones(3))
    capsys.readouterr()


def test_every_error_is_typed_on_random_damage(tmp_path):
    """Random truncations and byte flips of safetensors and torch.save files: each
    import either succeeds or raises a CkptError (never anything else)."""
    import random

    rng = random.Random(7)
    bases = [("s.safetensors", GOOD), ("z.pt", _torch_bytes({"w": torch.arange(10), "d": {"x": 1.5}})),
             ("l.pt", _torch_bytes({"w": torch.arange(10)}, legacy=True))]
    n = 0
    for name, base in bases:
        for i in range(40):
            b = bytearray(base)
            if i % 2:
                b = b[: rng.randrange(len(b))]
            else:
                for _ in range(rng.randint(1, 6)):
                    b[rng.randrange(len(b))] = rng.randrange(256)
            p = tmp_path / f"{i}-{name}"
            p.write_bytes(bytes(b))
            try:
                import_checkpoint(p, tmp_path / f"out-{i}-{name}")
            except CkptError:
                n += 1
            except Exception as e:  # pragma: no cover - the failure this test looks for
                pytest.fail(f"{name} damaged at round {i} raised untyped {type(e).__name__}: {e}")
    assert n > 60


@pytest.mark.parametrize("case", ["metadata_truncated", "data_truncated", "data_missing", "item_damaged"])
def test_damaged_dcp_directories(tmp_path, capsys, case):
    import torch.distributed.checkpoint as dcp

    src = tmp_path / "dcp"
    dcp.save({"w": torch.arange(100.0), "n": {"x": 3}}, checkpoint_id=str(src))
    data = next(p for p in src.iterdir() if p.suffix == ".distcp")
    if case == "metadata_truncated":
        with open(src / ".metadata", "r+b") as f:
            f.truncate(50)
        words = "is not a valid DCP metadata file"
    elif case == "data_truncated":
        with open(data, "r+b") as f:
            f.truncate(100)
        words = "DCP could not read"
    elif case == "data_missing":
        data.unlink()
        words = "DCP could not read"
    else:  # the pickled non-tensor item overwritten: damage, not a forbidden object
        with open(data, "r+b") as f:
            f.write(b"\xff" * 64)
        words = "is damaged"
    _refused(capsys, tmp_path, src, CorruptCheckpointError, words)
