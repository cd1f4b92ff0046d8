"""Hostile size claims: checkpoints whose manifest claims far more than its files hold
(or files that really are enormous, but sparse), each read in a child process under
a memory limit and a time limit.

Every case is built fresh from a small real checkpoint (its manifest edited and
re-sealed, sparse files made with ``truncate``), then ``load``, ``open`` (every
array read), ``fsck`` and ``fsck --deep`` run on it, each in its own child process
with ``RLIMIT_AS`` set to the child's own address space after its imports plus
:data:`LIMIT` bytes. Oracle: ``load``/``open`` raise a typed ``CkptError``; ``fsck``
reports damage or raises a typed error; a failure is an untyped error, a crash, a
kill by the memory limit or a timeout. ``python -m fuzz hostile --budget S``.
"""
from __future__ import annotations

import json
import os
import random
import resource
import shutil
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from typing import Any

from .common import SMALL, Budget, Report, make_state
from .parsers import seal

LIMIT = 2 << 30  #: address space a child may add to what its imports took
TIMEOUT = 60.0  #: seconds one operation of one case may take
OPS = ("load", "load_noverify", "open", "fsck", "fsck_deep")
READS = ("load", "load_noverify", "load_mmap", "open")
GiB = 1 << 30
_RLE_BLOCK = 128 << 10  #: the largest zstd block


def rle_zstd_frame(size: int) -> bytes:
    """A zstd frame of ``size`` zero bytes made of RLE blocks (4 bytes per 128 KiB, the
    highest ratio zstd has), built without holding ``size`` bytes anywhere."""
    header = struct.pack("<IBB", 0xFD2FB528, 0xC0, (17 - 10) << 3) + struct.pack("<Q", size)
    full, rest = divmod(size, _RLE_BLOCK)
    sizes = [_RLE_BLOCK] * full + ([rest] if rest else [])
    blocks = bytearray()
    for k, n in enumerate(sizes):
        last = 1 if k == len(sizes) - 1 else 0
        blocks += (n << 3 | 1 << 1 | last).to_bytes(3, "little") + b"\0"
    return header + bytes(blocks)


def base_checkpoint(root: str, seed: int = 0) -> str:
    """A small real checkpoint (zstd, several files and chunks) at ``root/base``."""
    import ckptstore

    path = os.path.join(root, "base")
    ckptstore.save(make_state(seed), path, compression="zstd", blocking=True, **SMALL)
    return path


def _manifest(path: str) -> dict:
    with open(os.path.join(path, "manifest.json"), "rb") as f:
        return json.loads(f.read())


def _write_manifest(path: str, obj: dict) -> None:
    with open(os.path.join(path, "manifest.json"), "wb") as f:
        f.write(seal(obj))


def _hostile_tensor(path: str, obj: dict, nbytes: int, chunks: list[list], data: bytes | None,
                    size: int, chunk_size: int) -> None:
    """Point tensor 0 (float32) at ``chunks`` of a new file ``hostile.chunks`` holding
    ``data`` (or a sparse file of ``size`` bytes) and claim ``nbytes`` for it."""
    from ckptstore.pipeline.codec import hash_bytes

    name = "hostile.chunks"
    with open(os.path.join(path, name), "wb") as f:
        if data is not None:
            f.write(data)
        else:
            f.truncate(size)
    obj["files"].append({"name": name, "size": size, "format": "chunks", "header_length": 0,
                         "header_hash": hash_bytes(b"")})
    t = obj["tensors"][0]
    t.update(dtype="float32", shape=[nbytes // 4], nbytes=nbytes,
             chunks=[[name, *c] for c in chunks])
    t.pop("shards", None)
    obj["chunk_size"] = chunk_size
    _write_manifest(path, obj)


FAKE = "0" * 32  #: a raw hash the bytes never have


def claim_zstd(path: str) -> None:
    """A 16-byte shard whose one zstd chunk claims 64 GiB raw."""
    from ckptstore.pipeline.codec import hash_bytes

    data = rle_zstd_frame(4 << 10)[:16]
    _hostile_tensor(path, _manifest(path), 64 * GiB,
                    [[0, 16, 64 * GiB, 1, [["zstd", 16]], hash_bytes(data), FAKE]], data, 16, 64 * GiB)


def claim_raw(path: str) -> None:
    """A 16-byte shard the manifest says is 64 GiB, one raw chunk of 64 GiB in it."""
    obj = _manifest(path)
    _hostile_tensor(path, obj, 64 * GiB, [[0, 64 * GiB, 64 * GiB, 1, [["raw", 64 * GiB]], FAKE, FAKE]],
                    b"\1" * 16, 64 * GiB, 64 * GiB)
    with open(os.path.join(path, "hostile.chunks"), "r+b") as f:
        f.truncate(16)


def sparse(size: int) -> Callable[[str], None]:
    def build(path: str) -> None:
        """A sparse shard of ``size`` bytes, one raw chunk, matching its manifest."""
        _hostile_tensor(path, _manifest(path), size, [[0, size, size, 1, [["raw", size]], FAKE, FAKE]],
                        None, size, size)
    build.__doc__ = f"a sparse {size >> 30} GiB shard matching its manifest"
    return build


def zstd_bomb(path: str) -> None:
    """A 128 KiB zstd frame of 4 GiB of zeros, one chunk."""
    from ckptstore.pipeline.codec import hash_bytes

    data = rle_zstd_frame(4 * GiB)
    _hostile_tensor(path, _manifest(path), 4 * GiB,
                    [[0, len(data), 4 * GiB, 1, [["zstd", len(data)]], hash_bytes(data), FAKE]],
                    data, len(data), 4 * GiB)


def zstd_bombs(n: int) -> Callable[[str], None]:
    def build(path: str) -> None:
        """``n`` zstd chunks of 16 MiB of zeros (each within every limit), 526 bytes each."""
        _zstd_bombs(path, n)
    build.__doc__ = f"{n} zstd chunks of 16 MiB of zeros, 526 bytes each"
    return build


def _zstd_bombs(path: str, n: int) -> None:
    from ckptstore.pipeline.codec import hash_bytes

    frame = rle_zstd_frame(16 << 20)
    chunks = [[k * len(frame), len(frame), 16 << 20, 1, [["zstd", len(frame)]], hash_bytes(frame), FAKE]
              for k in range(n)]
    _hostile_tensor(path, _manifest(path), n * (16 << 20), chunks, frame * n, n * len(frame), 16 << 20)


def empty_objects(size: int) -> Callable[[str], None]:
    def build(path: str) -> None:
        """A manifest of ``size`` bytes, nearly all of it empty JSON objects."""
        from ckptstore.pipeline.codec import hash_bytes

        text = seal(_manifest(path))
        cut = text.rindex(b',"manifest_checksum":"')
        body = text[:cut]
        n = max(1, (size - len(body)) // 3)
        body = body.replace(b'"metadata":null', b'"metadata":[' + b"{}," * (n - 1) + b"{}]", 1)
        with open(os.path.join(path, "manifest.json"), "wb") as f:
            f.write(body + b',"manifest_checksum":"' + hash_bytes(body).encode() + b'"}\n')
    build.__doc__ = f"a {size >> 20} MB manifest of empty objects"
    return build


#: name -> (builder, operations); every operation must end in a typed error or damage
CASES: dict[str, tuple[Callable[[str], None], tuple[str, ...]]] = {
    "claim_zstd_64g": (claim_zstd, OPS),
    "claim_raw_64g": (claim_raw, OPS),
    "sparse_1t": (sparse(1 << 40), READS),
    "sparse_4g": (sparse(4 * GiB), ("fsck", "fsck_deep")),  # 1 TiB would take minutes to hash
    "zstd_bomb_4g": (zstd_bomb, OPS),
    "zstd_bombs_4g": (zstd_bombs(256), ("load", "load_noverify", "open", "fsck_deep")),  # raw hashes only
    "manifest_90mb": (empty_objects(90 << 20), ("load", "open", "fsck")),
}


def build(name: str, root: str, base: str) -> str:
    """Case ``name`` built fresh at ``root/name`` from the checkpoint ``base``."""
    path = os.path.join(root, name)
    shutil.rmtree(path, ignore_errors=True)
    shutil.copytree(base, path)
    CASES[name][0](path)
    return path


# -- the child -----------------------------------------------------------------

def _status(key: str) -> int:
    """A size from /proc/self/status in bytes (VmSize, VmRSS, VmHWM: this process's
    own, unlike ru_maxrss, which Linux carries over from the parent across exec)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    return 0


def _op(op: str, path: str) -> str:
    import ckptstore
    from ckptstore.verify.fsck import fsck

    if op in ("load", "load_noverify", "load_mmap"):
        ckptstore.load(path, verify=op != "load_noverify", mmap=True if op == "load_mmap" else None)
        return "ok"
    if op == "open":
        ckptstore.open(path).flat()
        return "ok"
    report = fsck(path, deep=op == "fsck_deep")
    return "ok" if report.ok else "damage"


def child(ops: list[str], path: str, limit: int) -> list[dict[str, Any]]:
    """Run each of ``ops`` on ``path`` here (a child) under ``RLIMIT_AS`` of what the
    imports took plus ``limit`` (0: none); for each, what happened, the RSS before it
    and its peak RSS (the peak is reset between operations)."""
    import ckptstore  # noqa: F401  (the imports count as the baseline)
    import ckptstore.verify.fsck  # noqa: F401

    if limit:
        cap = _status("VmSize") + limit
        resource.setrlimit(resource.RLIMIT_AS, (cap, cap))
    out = []
    for op in ops:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current RSS
        base_rss = _status("VmRSS")
        start = time.monotonic()
        try:
            outcome = _op(op, path)
        except Exception as e:  # noqa: BLE001 - the oracle sorts typed from untyped
            from ckptstore.errors import CkptError

            kind = "typed" if isinstance(e, CkptError) else "untyped"
            outcome = f"{kind}:{type(e).__name__}: {str(e)[:300]}"
        out.append({"op": op, "outcome": outcome, "seconds": round(time.monotonic() - start, 3),
                    "base_rss": base_rss, "peak_rss": _status("VmHWM")})
    return out


def run_ops(ops: list[str], path: str, *, limit: int = LIMIT, timeout: float = TIMEOUT
            ) -> list[dict[str, Any]]:
    """``child(ops, path, limit)`` in a fresh interpreter; a crash, kill or timeout is
    the outcome of every operation (``crash:...``, ``timeout``)."""
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the repository
    env = dict(os.environ, MALLOC_ARENA_MAX="2",
               PYTHONPATH=os.pathsep.join(p for p in (os.environ.get("PYTHONPATH"), here) if p))
    cmd = [sys.executable, "-m", "fuzz.hostile", ",".join(ops), path, str(limit)]
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout * len(ops), env=env,
                           cwd=os.path.dirname(os.path.abspath(path)))  # not the repository: PYTHONPATH decides
    except subprocess.TimeoutExpired:
        return [{"op": op, "outcome": "timeout", "seconds": timeout} for op in ops]
    lines = p.stdout.strip().splitlines()
    if p.returncode != 0 or not lines:
        return [{"op": op, "outcome": f"crash:exit {p.returncode}: {p.stderr.strip()[-300:]}"} for op in ops]
    return json.loads(lines[-1])


def run_child(op: str, path: str, *, limit: int = LIMIT, timeout: float = TIMEOUT) -> dict[str, Any]:
    """One operation in a child of its own (:func:`run_ops`)."""
    return run_ops([op], path, limit=limit, timeout=timeout)[0]


def acceptable(op: str, outcome: str) -> bool:
    """A typed error from every operation; fsck may report damage instead."""
    return outcome.startswith("typed:") or (op.startswith("fsck") and outcome == "damage")


def run(report: Report, budget: Budget, *, seed: int = 0,
        cases: tuple[str, ...] | None = None) -> None:
    """Every case (in an order drawn from ``seed``), every operation, until ``budget``."""
    names = list(cases or CASES)
    random.Random(seed).shuffle(names)
    with tempfile.TemporaryDirectory(prefix="ckpt-hostile-") as root:
        base = base_checkpoint(root, seed)
        for name in names:
            for op in CASES[name][1]:
                if budget.out():
                    return
                path = build(name, root, base)  # fresh for every operation
                res = run_child(op, path)
                report.add("hostile_cases")
                report.check(acceptable(op, res["outcome"]), f"hostile {name} {op}: {res}")
                shutil.rmtree(path, ignore_errors=True)


if __name__ == "__main__":
    print(json.dumps(child(sys.argv[1].split(","), sys.argv[2], int(sys.argv[3]))))
