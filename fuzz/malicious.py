"""The malicious corpus: hostile checkpoints that must be refused with a typed error,
without reading or writing anything outside the checkpoint.

``fuzz/corpus/base/`` is a small valid checkpoint; ``fuzz/corpus/cases.json`` lists
each case: a replacement manifest (``<name>.manifest``), optional extra files
(``<name>.extra.<file>``) and the error it must raise. ``python -m fuzz.malicious
--write-corpus`` regenerates the corpus. Cases that a repository cannot hold
(symlinks, FIFOs, a 2 GiB sparse manifest) are built at run time.

Each case runs ``load``, ``fsck`` (shallow and deep) and ``ckptstore fsck`` in a
sandbox next to an ``outside`` directory holding a secret, a pickle canary target
and the symlink targets. Oracle: the expected CkptError class from ``load``; fsck
reports damage or exits 1/2; the sandbox outside the checkpoint and the
checkpoint itself are unchanged; no pickle was executed; nothing blocked on a FIFO.
"""
from __future__ import annotations

import base64
import json
import os
import pickle
import shutil
import stat
import sys
import tempfile
import threading

import zstandard

import ckptstore
from ckptstore import errors as E, manifest as fmt
from ckptstore.pipeline.codec import hash_bytes
from ckptstore.storage import LocalStorage
from ckptstore.verify.fsck import fsck

from .common import SMALL, Budget, Report, dir_snapshot, fsck_code, make_state
from .parsers import seal

CORPUS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "corpus")
CANARY = "PWNED"


class _Payload:
    """Unpickling this creates the canary file (if anything ever unpickles)."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


# -- corpus generation ---------------------------------------------------------

def _cases(obj: dict, base_files: dict[str, bytes]) -> dict[str, dict]:
    """name -> {expect, why, manifest bytes, extra files} from a valid manifest."""
    def m(**changes):
        o = json.loads(json.dumps(obj))
        for path, value in changes.items():
            cur = o
            keys = path.split(".")
            for k in keys[:-1]:
                cur = cur[int(k) if k.isdigit() else k]
            cur[int(keys[-1]) if keys[-1].isdigit() else keys[-1]] = value
        return o


    multi = next(i for i, t in enumerate(obj["tensors"]) if len(t["chunks"]) > 1)
    c0 = obj["tensors"][multi]["chunks"][0]
    out: dict[str, dict] = {}

    def add(name: str, expect: str, why: str, manifest: bytes, extra=None,
            deep_only: bool = False) -> None:
        out[name] = dict(expect=expect, why=why, manifest=manifest, extra=extra or {},
                         deep_only=deep_only)

    payload = pickle.dumps(_Payload(os.path.join("..", "outside", CANARY)), protocol=2)
    add("pickle_manifest", "CorruptCheckpointError", "a pickle where the manifest should be",
        payload)
    add("pickle_manifest_proto5", "CorruptCheckpointError", "pickle protocol 5",
        pickle.dumps(_Payload(os.path.join("..", "outside", CANARY)), protocol=5))
    first = obj["files"][0]["name"]
    for name, bad in (("dotdot_file", "../outside/secret"), ("absolute_file", "/etc/passwd"),
                      ("dotdot_nested", "sub/../../outside/secret"),
                      ("backslash_file", "..\\outside\\secret"), ("nul_file", "a\x00b"),
                      ("manifest_shadow", "manifest.json")):
        o = m()
        o["files"][0]["name"] = bad
        for t in o["tensors"]:
            for c in t["chunks"]:
                if c[0] == first:
                    c[0] = bad
        add(name, "UnsafeCheckpointError", f"file name {bad!r}", seal(o))
    o = m()
    o["tensors"][multi]["chunks"][0][0] = "../outside/secret"
    add("dotdot_chunk_file", "CorruptCheckpointError", "a chunk names an unlisted outside file",
        seal(o))
    add("size_2_63", "UnsafeCheckpointError", "file size 2^63", seal(m(**{"files.0.size": 2**63})))
    o = m()
    o["tensors"][multi]["chunks"][0][2] = 2**63
    add("chunk_length_2_63", "UnsafeCheckpointError", "chunk length 2^63", seal(o))
    o = m()
    o["tensors"][multi]["chunks"][0][1] = 2**63 - 1
    add("chunk_offset_2_63", "UnsafeCheckpointError", "chunk offset 2^63-1", seal(o))
    o = m()
    o["tensors"][0]["shape"] = [2**63]
    o["tensors"][0]["nbytes"] = 2**63
    add("shape_2_63", "UnsafeCheckpointError", "a 2^63-element tensor", seal(o))
    o = m()
    o["tensors"][0]["shape"] = [2**31] * 4
    add("shape_product_huge", "UnsafeCheckpointError", "dimensions whose product is huge", seal(o))
    o = m()
    o["tensors"][multi]["chunks"][1][1] = c0[1]
    add("overlapping_offsets", "UnsafeCheckpointError", "two chunks share bytes", seal(o))
    o = m()
    o["chunk_size"] = 2**49
    o["tensors"][multi]["chunks"][0][3] = 2**40
    add("raw_length_huge", "CorruptCheckpointError", "a chunk claiming 1 TiB raw", seal(o))
    add("schema_99", "SchemaVersionError", "unknown newer schema", seal(m(schema_version=99)))
    add("schema_0", "CorruptCheckpointError", "schema version 0", seal(m(schema_version=0)))
    add("schema_bool", "CorruptCheckpointError", "schema version true",
        seal(m(schema_version=True)))
    deep = b'{"a":' * 20000 + b"1" + b"}" * 20000
    o = m()
    body = json.dumps(o, separators=(",", ":")).encode()[:-1] + b',"metadata2":' + deep + b"}"
    add("deeply_nested", "UnsafeCheckpointError", "20000 nested objects", _seal_text(body))
    body = json.dumps(o, separators=(",", ":")).encode()
    dup = body[:-1] + b',"save_id":"evil"}'
    add("duplicate_key", "UnsafeCheckpointError", "save_id given twice", _seal_text(dup))
    nan = body[:-1] + b',"extra":NaN}'
    add("nan_constant", "UnsafeCheckpointError", "NaN in JSON", _seal_text(nan))
    add("not_utf8", "CorruptCheckpointError", "invalid UTF-8",
        _seal_text(body[:-1] + b',"x":"\xff\xfe"}'))
    o = m()
    o["tensors"][0]["kind"] = "numpy"
    o["tensors"][0]["dtype"] = "O"
    add("numpy_object_dtype", "UnsafeCheckpointError", "numpy dtype O (pickled objects)", seal(o))
    o = m()
    o["tensors"][0]["kind"] = "numpy"
    o["tensors"][0]["dtype"] = "|V8"
    add("numpy_void_dtype", "CkptError", "numpy structured/void dtype", seal(o))
    o = m()
    o["tree"] = {"T": "tensor", "id": 10**9}
    add("tree_index_huge", "CorruptCheckpointError", "tree names tensor 10^9", seal(o))
    o = m()
    o["tree"] = {"T": "pickle", "v": base64.b64encode(payload).decode()}
    add("tree_pickle_node", "CorruptCheckpointError", "a pickle node in the state tree", seal(o))
    o = m(compression="zstd")
    add("unknown_codec", "CorruptCheckpointError", "a codec that does not exist",
        seal(_set_codec(o, "evil")))
    # A zstd bomb: a tiny frame that expands to 64 MiB, stored as chunk 0 of a
    # tensor whose manifest says 4 KiB raw; its stored hash matches, so only the
    # bounded decoder stands between it and the allocation.
    bomb = zstandard.ZstdCompressor(level=19).compress(bytes(64 << 20))
    o = m()
    o["files"].append({"name": "bomb.chunks", "size": len(bomb), "format": "chunks",
                       "header_length": 0, "header_hash": hash_bytes(b"")})
    t = o["tensors"][multi]
    raw = t["chunks"][0][3]
    t["chunks"][0] = ["bomb.chunks", 0, len(bomb), raw, 1, [["zstd", len(bomb)]],
                      hash_bytes(bomb), t["chunks"][0][7]]
    add("zstd_bomb", "CorruptCheckpointError", "a 64 MiB zstd bomb in a chunk", seal(o),
        {"bomb.chunks": bomb}, deep_only=True)
    # A bomb frame that lies about its content size (no size in the header).
    cctx = zstandard.ZstdCompressor(level=19, write_content_size=False)
    bomb2 = cctx.compress(bytes(64 << 20))
    o2 = json.loads(json.dumps(o))
    o2["files"][-1]["size"] = len(bomb2)
    o2["tensors"][multi]["chunks"][0][2] = len(bomb2)
    o2["tensors"][multi]["chunks"][0][5] = [["zstd", len(bomb2)]]
    o2["tensors"][multi]["chunks"][0][6] = hash_bytes(bomb2)
    add("zstd_bomb_no_size", "CorruptCheckpointError", "a bomb without a content size",
        seal(o2), {"bomb.chunks": bomb2}, deep_only=True)
    return out


def _set_codec(o: dict, codec: str) -> dict:
    for t in o["tensors"]:
        for c in t["chunks"]:
            c[5] = [[codec, p[1]] for p in c[5]]
    return o


def _seal_text(body: bytes) -> bytes:
    prefix = body[:-1]
    return prefix + b',"manifest_checksum":"' + hash_bytes(prefix).encode() + b'"}\n'


def write_corpus(corpus: str = CORPUS) -> None:
    """(Re)generate fuzz/corpus/ from a fresh small checkpoint."""
    shutil.rmtree(corpus, ignore_errors=True)
    base = os.path.join(corpus, "base")
    ckptstore.save(make_state(1), base, compression="zstd", blocking=True, **SMALL)
    files = {n: open(os.path.join(base, n), "rb").read() for n in os.listdir(base)}
    obj = json.loads(files[fmt.MANIFEST_NAME])
    index = {}
    for name, case in _cases(obj, files).items():
        with open(os.path.join(corpus, f"{name}.manifest"), "wb") as f:
            f.write(case["manifest"])
        for extra, data in case["extra"].items():
            with open(os.path.join(corpus, f"{name}.extra.{extra}"), "wb") as f:
                f.write(data)
        index[name] = dict(expect=case["expect"], why=case["why"], extra=sorted(case["extra"]),
                           deep_only=case["deep_only"])
    with open(os.path.join(corpus, "cases.json"), "w") as f:
        json.dump(index, f, indent=1, sort_keys=True)
        f.write("\n")


# -- running ---------------------------------------------------------------------

class Sandbox:
    """``root/outside`` (secrets, symlink targets) next to ``root/ckpt`` (the case)."""

    def __init__(self, root: str) -> None:
        self.root = root
        self.outside = os.path.join(root, "outside")
        self.ckpt = os.path.join(root, "ckpt")
        os.makedirs(self.outside)
        with open(os.path.join(self.outside, "secret"), "wb") as f:
            f.write(b"secret bytes that no checkpoint may read\n" * 100)
        shutil.copytree(os.path.join(CORPUS, "base"), os.path.join(self.outside, "copy"))

    def reset(self) -> None:
        shutil.rmtree(self.ckpt, ignore_errors=True)
        shutil.copytree(os.path.join(CORPUS, "base"), self.ckpt)


def _unblock_fifos(paths: list[str], stop: threading.Event, blocked: list) -> None:
    """If a reader blocks on one of these FIFOs, open its write end to release it."""
    while not stop.wait(0.05):
        for p in paths:
            try:
                fd = os.open(p, os.O_WRONLY | os.O_NONBLOCK)
            except OSError:
                continue  # no reader waiting: good
            blocked.append(p)
            os.close(fd)


def check_case(report: Report, box: Sandbox, name: str, expect: str,
               deep_only: bool = False) -> None:
    """Run load and fsck on the prepared ``box.ckpt`` and apply the oracle.
    ``deep_only``: the damage shows only on decoding (a bomb whose stored bytes
    match their hash), so a shallow fsck may pass it."""
    before_out = dir_snapshot(box.outside)
    before_ckpt = dir_snapshot(box.ckpt)
    fifos = [os.path.join(box.ckpt, n) for n in os.listdir(box.ckpt)
             if stat.S_ISFIFO(os.lstat(os.path.join(box.ckpt, n)).st_mode)]
    stop, blocked = threading.Event(), []
    watcher = threading.Thread(target=_unblock_fifos, args=(fifos, stop, blocked), daemon=True)
    watcher.start()
    try:
        got = "loaded"
        try:
            ckptstore.load(box.ckpt)
        except E.CkptError as e:
            got = type(e).__name__
        except Exception as e:  # noqa: BLE001
            got = f"untyped {type(e).__name__}: {e}"
        want = getattr(E, expect)
        report.check(got != "loaded" and not got.startswith("untyped") and
                     issubclass(getattr(E, got), want),
                     f"malicious {name}: load gave {got}, expected {expect}")
        for deep in (False, True):
            try:
                rep = fsck(LocalStorage(box.ckpt), deep=deep)
                report.check(not rep.ok or (deep_only and not deep),
                             f"malicious {name}: fsck(deep={deep}) says OK")
            except E.CkptError:
                pass
            except Exception as e:  # noqa: BLE001
                report.fail(f"malicious {name}: fsck raised {type(e).__name__}: {e}")
        code = fsck_code(box.ckpt, deep=True)
        report.check(code in (1, 2), f"malicious {name}: ckptstore fsck --deep exited {code}")
    finally:
        stop.set()
        watcher.join()
    report.add("malicious_cases")
    report.check(not blocked, f"malicious {name}: a reader blocked on FIFO {blocked}")
    report.check(not os.path.exists(os.path.join(box.outside, CANARY)) and
                 not os.path.exists(os.path.join(box.root, CANARY)),
                 f"malicious {name}: a pickle payload ran")
    report.check(dir_snapshot(box.outside) == before_out,
                 f"malicious {name}: something outside the checkpoint changed")
    report.check(dir_snapshot(box.ckpt) == before_ckpt,
                 f"malicious {name}: the checkpoint was modified by reading it")


def _runtime_cases(box: Sandbox) -> list[tuple[str, str, object]]:
    """Cases built on disk at run time: (name, expected error, setup function)."""
    def shard() -> str:
        return sorted(n for n in os.listdir(box.ckpt) if n.startswith("shard-"))[0]

    def link_shard() -> None:  # same bytes outside: following it would "work"
        n = shard()
        os.unlink(os.path.join(box.ckpt, n))
        os.symlink(os.path.join(box.outside, "copy", n), os.path.join(box.ckpt, n))

    def link_shard_relative() -> None:
        n = shard()
        os.unlink(os.path.join(box.ckpt, n))
        os.symlink(os.path.join("..", "outside", "copy", n), os.path.join(box.ckpt, n))

    def link_manifest() -> None:
        os.unlink(os.path.join(box.ckpt, fmt.MANIFEST_NAME))
        os.symlink(os.path.join(box.outside, "copy", fmt.MANIFEST_NAME),
                   os.path.join(box.ckpt, fmt.MANIFEST_NAME))

    def fifo_shard() -> None:
        n = shard()
        os.unlink(os.path.join(box.ckpt, n))
        os.mkfifo(os.path.join(box.ckpt, n))

    def dir_shard() -> None:
        n = shard()
        os.unlink(os.path.join(box.ckpt, n))
        os.mkdir(os.path.join(box.ckpt, n))

    def sparse_manifest() -> None:
        with open(os.path.join(box.ckpt, fmt.MANIFEST_NAME), "r+b") as f:
            f.truncate(fmt.MAX_MANIFEST_BYTES + 1)  # sparse: costs no disk

    def fifo_manifest() -> None:
        os.unlink(os.path.join(box.ckpt, fmt.MANIFEST_NAME))
        os.mkfifo(os.path.join(box.ckpt, fmt.MANIFEST_NAME))

    return [("symlink_shard_absolute", "UnsafeCheckpointError", link_shard),
            ("symlink_shard_relative", "UnsafeCheckpointError", link_shard_relative),
            ("symlink_manifest", "UnsafeCheckpointError", link_manifest),
            ("fifo_shard", "CorruptCheckpointError", fifo_shard),
            ("fifo_manifest", "CkptError", fifo_manifest),
            ("directory_shard", "CorruptCheckpointError", dir_shard),
            ("sparse_huge_manifest", "UnsafeCheckpointError", sparse_manifest)]


def run(report: Report, budget: Budget) -> None:
    """Every corpus case and every run-time case, once (they are few)."""
    with open(os.path.join(CORPUS, "cases.json")) as f:
        index = json.load(f)
    with tempfile.TemporaryDirectory(prefix="fuzz-malicious-") as tmp:
        box = Sandbox(tmp)
        box.reset()
        try:  # the base itself must be a good checkpoint, or the cases prove nothing
            ckptstore.load(box.ckpt)
        except E.CkptError as e:
            report.fail(f"malicious: the corpus base does not load: {e}")
            return
        for name, case in sorted(index.items()):
            if budget.out():
                return
            box.reset()
            with open(os.path.join(CORPUS, f"{name}.manifest"), "rb") as src, \
                    open(os.path.join(box.ckpt, fmt.MANIFEST_NAME), "wb") as dst:
                dst.write(src.read())
            for extra in case["extra"]:
                shutil.copyfile(os.path.join(CORPUS, f"{name}.extra.{extra}"),
                                os.path.join(box.ckpt, extra))
            check_case(report, box, name, case["expect"], case.get("deep_only", False))
        for name, expect, setup in _runtime_cases(box):
            if budget.out():
                return
            box.reset()
            setup()
            check_case(report, box, name, expect)


if __name__ == "__main__":
    if sys.argv[1:] == ["--write-corpus"]:
        write_corpus()
        print(f"wrote {CORPUS}")
    else:
        sys.exit("usage: python -m fuzz.malicious --write-corpus")
