"""``python -m bench meta``: the metadata cost of a distributed save at 8 to 1,024 ranks.

R ranks are simulated, each holding one box of every one of T tensors (each tensor
sharded over all ranks along its first dimension, one chunk per box). What each
rank would do alone is done first, outside the measurements: its rank index is
encoded with the library's own encoder and written to a directory, and its vote
(the same ``RankWrite`` the real save gathers) is stored as plain arrays.

Measured against the real code, each R in a fresh interpreter (so peak memory is a
rank's, not this driver's):

- **commit**: rank 0's work in the two-phase commit, ``dcommit.commit_catalog``
  (grids from the votes, validation, encoding, the durable manifest write);
- **manifest**: the bytes of ``manifest.json`` and of one rank index;
- **catalog read**: ``read_catalog``, what every load reads first;
- **own boxes**: a resharded load at M = R: the catalog, then the one rank index
  holding that rank's boxes (``resolve`` with the rank's boxes);
- **all indexes**: M = 1, or fsck: the catalog and all R indexes;
- **peak RSS** of the commit process (the interpreter with torch imported included);
- **train overhead**: a training-like loop (matmuls) on rank 0 while commits run back
  to back in a background thread for 2 s, as the real save runs its commit: median
  step time during / before.

DCP's metadata for the same layout (its ``Metadata`` with one ``ChunkStorageMetadata``
and one ``_StorageInfo`` per box, pickled as DCP writes ``.metadata``) is measured in
the same run: its bytes and the time to load it (``pickle.loads``, which DCP's every
load runs on every rank).
"""
from __future__ import annotations

import json
import os
import resource
import secrets
import shutil
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

ROWS = 4  #: rows of each tensor per rank
COLS = 256


def _glob(ranks: int, tensors: int) -> tuple:
    from ckptstore.distributed.shards import GlobalLeaf

    return tuple(GlobalLeaf(i, f"layers.{i // 6}.w{i % 6}", "torch", "float32", (ranks * ROWS, COLS),
                            4, True) for i in range(tensors))


def _skeleton(glob: tuple) -> Any:
    import torch

    from ckptstore.plan.tree import flatten

    skeleton, _ = flatten({g.name: torch.empty(0) for g in glob})
    return skeleton


def generate(where: Path, ranks: int, tensors: int) -> str:
    """Every rank's index file and vote (outside the measurement); returns the save id."""
    from ckptstore import manifest as fmt
    from ckptstore.distributed.dcommit import box_width
    from ckptstore.distributed.grids import box_rows
    from ckptstore.manifest import ranked

    save_id = secrets.token_hex(6)
    glob = _glob(ranks, tensors)
    nbytes = ROWS * COLS * 4
    width = box_width(glob)
    records, rows = [], []
    for r in range(ranks):
        name = f"shard-00000-{save_id}-r{r:05d}.chunks"
        chunks = [fmt.ChunkRecord(name, i * nbytes, nbytes, nbytes, 1, (("raw", nbytes),),
                                  secrets.token_hex(16), secrets.token_hex(16)) for i in range(tensors)]
        files = (fmt.FileRecord(name, tensors * nbytes, "chunks", 0, secrets.token_hex(16)),)
        boxes = tuple((i, (r * ROWS, 0), (ROWS, COLS), (chunks[i],)) for i in range(tensors))
        data = ranked.encode_index(ranked.RankIndex(save_id, r, files, boxes))
        (where / ranked.index_name(save_id, r)).write_bytes(data)
        rec = ranked.index_record(ranked.index_name(save_id, r), data)
        records.append([rec.name, rec.size, rec.header_hash, tensors * nbytes])
        rows.append(box_rows([(i, o, s) for i, o, s, _ in boxes], width))
    (where / "votes.json").write_text(json.dumps(records))
    np.save(where / "votes.npy", np.stack(rows))
    return save_id


def _rss() -> int:
    """This process's peak RSS in bytes: ``VmHWM``, which execve resets (``ru_maxrss``
    would carry the driver's peak into this child)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def child(where: Path, ranks: int, tensors: int, save_id: str) -> dict[str, Any]:
    """Rank 0's commit and the reads, in this (fresh) interpreter."""
    import torch

    from ckptstore import manifest as fmt
    from ckptstore.distributed.dcommit import Global, RankWrite, commit_catalog
    from ckptstore.manifest import ranked
    from ckptstore.pipeline.options import SaveOptions
    from ckptstore.storage import open_storage

    glob = _glob(ranks, tensors)
    shared = Global(str(where), save_id, _skeleton(glob), glob, {"step": 1}, SaveOptions())
    recs = json.loads((where / "votes.json").read_text())
    rows = np.load(where / "votes.npy")
    writes = [RankWrite(r, fmt.FileRecord(n, size, fmt.INDEX_FORMAT, size, h), rows[r], stored, 1)
              for r, (n, size, h, stored) in enumerate(recs)]
    gathered = sum(w.boxes.nbytes + 200 for w in writes)  # what gather_object carries, about
    storage = open_storage(where)
    rss0 = _rss()
    t0 = time.perf_counter()
    commit_catalog(storage, shared, writes)
    commit = time.perf_counter() - t0
    rss_commit = _rss()
    out: dict[str, Any] = {"ranks": ranks, "tensors": tensors, "commit_s": commit,
                           "rss_before": rss0, "rss_commit": rss_commit, "gathered_bytes": gathered,
                           "manifest_bytes": (where / fmt.MANIFEST_NAME).stat().st_size,
                           "index_bytes": recs[0][1]}

    def best(fn: Any, n: int = 3) -> float:
        times = []
        for _ in range(n):
            t = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t)
        return min(times)

    me = ranks // 2
    mine = {i: [((me * ROWS, 0), (ROWS, COLS))] for i in range(tensors)}
    out["catalog_s"] = best(lambda: fmt.read_catalog(storage))
    out["own_boxes_s"] = best(lambda: ranked.resolve(storage, fmt.read_catalog(storage), mine))
    own = ranked.resolve(storage, fmt.read_catalog(storage), mine)
    assert all(len(t.chunks) == 1 for t in own.tensors), "the resolved boxes are wrong"
    out["all_indexes_s"] = best(lambda: fmt.read_manifest(storage), 1 if ranks > 256 else 3)
    out["rss_end"] = _rss()
    out["train_overhead"], out["train_lost_s"] = _train_overhead(
        torch, lambda: _commit_again(storage, shared, writes))
    return out


def _commit_again(storage: Any, shared: Any, writes: list) -> None:
    """Rank 0's commit of the same votes again, as the next save's would run."""
    from ckptstore import manifest as fmt
    from ckptstore.distributed.dcommit import commit_catalog

    storage.remove(fmt.MANIFEST_NAME)
    commit_catalog(storage, shared, writes)


def _train_overhead(torch: Any, commit: Any, seconds: float = 2.0) -> tuple[float, float]:
    """A training-like loop (matmuls, about 20 ms a step) while commits run back to back
    in a background thread for ``seconds``, as the real save runs its commit on rank 0:
    (median step time during / median step time before, 1.0 meaning no slowdown;
    training seconds lost per commit)."""
    torch.set_num_threads(1)
    a = torch.randn(384, 384)

    def step() -> float:
        t = time.perf_counter()
        for _ in range(8):
            a @ a
        return time.perf_counter() - t

    base = [step() for _ in range(40)]
    stop = time.perf_counter() + seconds

    done = [0]

    def commits() -> None:
        while time.perf_counter() < stop:
            commit()
            done[0] += 1

    th = threading.Thread(target=commits)
    during: list[float] = []
    th.start()
    while th.is_alive():
        during.append(step())
    th.join()
    lost = sum(during) - len(during) * statistics.median(base)
    return statistics.median(during) / statistics.median(base), lost / max(done[0], 1)


def dcp_metadata(ranks: int, tensors: int) -> dict[str, Any]:
    """DCP's ``.metadata`` for the same layout: bytes, and the time to load it."""
    import pickle  # DCP's own metadata format: measured here, never read by ckptstore

    import torch
    from torch.distributed.checkpoint.filesystem import _StorageInfo
    from torch.distributed.checkpoint.metadata import (
        ChunkStorageMetadata,
        Metadata,
        MetadataIndex,
        TensorProperties,
        TensorStorageMetadata,
    )

    nbytes = ROWS * COLS * 4
    sd, storage = {}, {}
    for i in range(tensors):
        fqn = f"layers.{i // 6}.w{i % 6}"
        sd[fqn] = TensorStorageMetadata(
            TensorProperties(dtype=torch.float32), torch.Size((ranks * ROWS, COLS)),
            [ChunkStorageMetadata(torch.Size((r * ROWS, 0)), torch.Size((ROWS, COLS)))
             for r in range(ranks)])
        for r in range(ranks):
            storage[MetadataIndex(fqn, torch.Size((r * ROWS, 0)))] = _StorageInfo(
                f"__{r}_0.distcp", i * nbytes, nbytes)
    data = pickle.dumps(Metadata(sd, storage_data=storage))
    times = []
    for _ in range(1 if ranks > 256 else 3):
        t = time.perf_counter()
        pickle.loads(data)
        times.append(time.perf_counter() - t)
    return {"dcp_bytes": len(data), "dcp_load_s": min(times)}


def run(opt: Any) -> list[dict[str, Any]]:
    ranks = opt.extra.get("ranks") or [8, 64, 256, 1024]
    tensors = opt.extra.get("tensors") or 300
    results = []
    for r in ranks:
        where = opt.dir / f"meta-{r}"
        shutil.rmtree(where, ignore_errors=True)
        where.mkdir(parents=True)
        save_id = generate(where, r, tensors)
        proc = subprocess.run([sys.executable, "-m", "bench.meta", str(where), str(r), str(tensors),
                               save_id], capture_output=True, text=True, env=os.environ.copy())
        if proc.returncode:
            raise RuntimeError(f"bench meta child failed at {r} ranks:\n{proc.stderr}")
        res = json.loads(proc.stdout.strip().splitlines()[-1])
        res.update(dcp_metadata(r, tensors))
        results.append(res)
        shutil.rmtree(where, ignore_errors=True)
    return results


def tables(results: list[dict[str, Any]]) -> str:
    from bench.report import table

    mb = 1e6
    rows = [[str(r["ranks"]), f"{r['commit_s']:.3f}", f"{r['manifest_bytes'] / mb:.3f}",
             f"{r['index_bytes'] / 1e3:.1f}", f"{r['catalog_s']:.4f}", f"{r['own_boxes_s']:.4f}",
             f"{r['all_indexes_s']:.2f}", f"{r['rss_commit'] / 2**20:.0f}",
             f"{r['gathered_bytes'] / mb:.2f}", f"{r['train_overhead']:.2f}",
             f"{r['train_lost_s'] * 1e3:.0f}",
             f"{r['dcp_bytes'] / mb:.1f}", f"{r['dcp_load_s']:.2f}"] for r in results]
    return table(["ranks", "rank-0 commit s", "manifest MB", "rank index kB", "catalog read s",
                  "own boxes (M=R) s", "all indexes (M=1, fsck) s", "commit peak RSS MiB",
                  "votes gathered MB", "train step during commit ×",
                  "train time lost per commit ms", "DCP .metadata MB",
                  "DCP metadata load s"], rows)


def meta_targets(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    from bench.targets import check

    out = []
    big = max(results, key=lambda r: r["ranks"]) if results else None
    if big is None:
        return out
    where = f"{big['ranks']} ranks x {big['tensors']} tensors"
    out.append(check("rank-0 commit s", where, big["commit_s"], "<=", 1.0))
    out.append(check("manifest MB", where, big["manifest_bytes"] / 1e6, "<=", 2.0))
    out.append(check("metadata read s (catalog)", where, big["catalog_s"], "<=", 0.5))
    out.append(check("resharded read of own boxes s", where, big["own_boxes_s"], "<=", 0.1))
    out.append(check("read of every rank index s (M=1 load, fsck)", where, big["all_indexes_s"], "<=",
                     0.5, f"all {big['ranks'] * big['tensors']} chunk records, "
                     f"{big['ranks'] * big['index_bytes'] / 1e6:.0f} MB of indexes parsed and "
                     "validated in Python; loads at M = N read one index (the line above)"))
    out.append(check("rank-0 commit peak RSS MiB", where, big["rss_commit"] / 2**20, "<=", 300))
    small = min(results, key=lambda r: r["ranks"])
    if big is not small:
        per = (big["commit_s"] / big["ranks"]) / (small["commit_s"] / small["ranks"])
        out.append(check("commit cost per rank, largest / smallest", f"{small['ranks']}→{big['ranks']}",
                         per, "<=", 1.0, "linear or better: the cost per rank does not grow"))
    return out


def _register() -> None:
    from bench import report, targets

    report.TABLES["meta"] = tables
    targets.TARGETS["meta"] = meta_targets


_register()

if __name__ == "__main__":
    w, n, t, sid = sys.argv[1:5]
    print(json.dumps(child(Path(w), int(n), int(t), sid)))
