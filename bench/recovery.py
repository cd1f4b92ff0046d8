"""``python -m bench recovery``: time from process start to training state restored.

One step of a state of each size is saved through a ``Checkpointer`` with the memory
tier on, a buddy keeper (another "node": its own keeper process and memory directory
on 127.0.0.1), a local disk tier and an S3 tier (moto on loopback), and the bench waits
until every tier holds it. Then a fresh interpreter restores it (``load("latest")``),
once per source, in a rotated order per repeat:

- **memory**: the run's node-local memory tier is intact (a restart after SIGKILL);
- **peer**: the own memory tier is gone (the node was lost), the buddy keeper has it;
- **disk**: no memory tier, no peer; the local files dropped from the page cache (cold);
- **object store**: only the S3 tier has it.

Each child reports when the restore returned and where the state came from; the time
from the parent's ``Popen`` to that moment is the recovery time (interpreter and torch
import included). Also given: the child's whole ``load("latest")`` (finding the newest
step on every tier, S3 included, then restoring it) and the restore from the tier that
served it (``load_timings``: for the peer, the verified fetch into the own memory tier
and the load from there). Limits measured in
the same run: a memcpy of the same bytes plus hashing them (xxh3-128, which every
verified restore does), raw loopback TCP throughput, and the same loopback transfer
landed with plain writes into a fresh file in the memory directory's tmpfs (the cost
of new pages that any restore into memory pays).

Targets: the memory tier's restore <= 1.5x (memcpy + hash); the peer's restore speed
(bytes / its restore seconds) >= 0.8x the loopback speed. The peer's restore speed
against the loopback-into-tmpfs speed is reported too, without a target.
"""
from __future__ import annotations

import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from bench import report, targets
from bench.common import Options, rotated
from bench.timing import fmt_size

SOURCES = ("memory", "peer", "disk", "object store")

_RESTORE = r"""
import json, sys, time
import torch  # imported before the clock starts: "load s" is the restore alone
import ckptstore
args = json.loads(sys.argv[1])
t = time.perf_counter()
ck = ckptstore.Checkpointer(args["local"], args["remote"], storage_options=args["opts"],
                            memory=args["memory"], peer=args["peer"], distributed=False,
                            compression=args["compression"])
state = ck.load("latest")
done = time.time()
n = sum(v.numel() * v.element_size() for v in state["model"].values())
print(json.dumps({"done": done, "load": time.perf_counter() - t, "bytes": n,
                  "from": ck.loaded_from, "timings": [list(x) for x in ck.load_timings]}),
      flush=True)
import os
os._exit(0)  # as a crash would: the memory tier stays for the next restore
"""

_SAVE = r"""
import json, os, sys, time
import torch
import ckptstore
from ckptstore.peer import PeerClient
args = json.loads(sys.argv[1])
n = args["nbytes"] // (4 * 64 * 1024)
g = torch.Generator().manual_seed(args["nbytes"])
state = {"model": {f"w{i}": torch.randn(max(n, 1), 1024, generator=g) for i in range(64)}}
ck = ckptstore.Checkpointer(args["local"], args["remote"], storage_options=args["opts"],
                            memory=True, peer=args["peer"], distributed=False,
                            compression=args["compression"])
ck.save(1, state)
ck.wait()  # on local disk and in the object store
c, end = PeerClient(args["peer"]), time.time() + 600
while 1 not in c.steps(ck.memory_path.name):  # and on the buddy node
    if time.time() > end:
        sys.exit("the step never reached the buddy keeper")
    time.sleep(0.1)
print(json.dumps({"run": ck.memory_path.name, "memory": str(ck.memory_path)}), flush=True)
os._exit(0)  # a crash after the save: the memory tier outlives this process
"""


def _shm_base() -> Path:
    return Path(os.environ.get("CKPTSTORE_BENCH_SHM", "/dev/shm"))


def _limits(nbytes: int) -> dict[str, float]:
    """Seconds of a memcpy of ``nbytes`` plus xxh3-128 over them; loopback bytes/s,
    plain and landed into a fresh tmpfs file."""
    import xxhash

    from ckptstore.peer import landing_speed, loopback_speed

    src = np.random.default_rng(0).integers(0, 256, nbytes, dtype=np.uint8)
    dst = np.empty_like(src)
    copies, hashes = [], []
    for _ in range(3):
        t = time.perf_counter()
        np.copyto(dst, src)
        copies.append(time.perf_counter() - t)
        t = time.perf_counter()
        xxhash.xxh3_128(memoryview(dst)).hexdigest()
        hashes.append(time.perf_counter() - t)
    del src, dst  # the landing below needs the memory
    return {"memcpy_s": min(copies), "hash_s": min(hashes), "loopback_bps": loopback_speed(nbytes),
            "landing_bps": landing_speed(nbytes, _shm_base())}


def _child(code: str, args: dict[str, Any], env: dict[str, str]) -> tuple[float, dict[str, Any]]:
    """(seconds from start to the child's report, the report)."""
    t0 = time.time()
    proc = subprocess.run([sys.executable, "-c", code, json.dumps(args)], capture_output=True,
                          text=True, env=env)
    if proc.returncode:
        raise RuntimeError(f"bench recovery child failed:\n{proc.stderr[-3000:]}")
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    return out.pop("done", time.time()) - t0, out


def run_size(nbytes: int, opt: Options) -> dict[str, Any]:
    import fsspec

    from bench.limits import CacheDropper
    from bench.objstore import serve
    from ckptstore.peer import start_keeper
    from fuzz.servers import store_options

    work = opt.dir / f"recovery-{nbytes}"
    shm = _shm_base() / f"ckptstore-bench-{os.getpid()}"
    for d in (work, shm):
        shutil.rmtree(d, ignore_errors=True)
        d.mkdir(parents=True)
    env = {**os.environ, "CKPTSTORE_MEMORY_DIR": str(shm / "node-a")}
    dropper = CacheDropper(opt.drop_caches)
    results: dict[str, list[dict[str, Any]]] = {s: [] for s in SOURCES}
    try:
        with serve("s3") as (endpoint, _pid):
            opts = store_options("s3", endpoint)
            fsspec.filesystem("s3", skip_instance_cache=True, **opts).mkdir("recovery")
            keeper = start_keeper(shm / "node-b")  # the buddy node's keeper and memory
            try:
                base = {"local": str(work / "local"), "remote": "s3://recovery/run", "opts": opts,
                        "memory": True, "peer": keeper.address, "nbytes": nbytes,
                        "compression": opt.modes if opt.modes != "all" else "none"}
                _, saved = _child(_SAVE, base, env)
                mem = Path(saved["memory"])
                backup = shm / "backup"
                shutil.copytree(mem, backup)
                for r in range(opt.repeat):
                    for source in rotated(list(SOURCES), r):
                        shutil.rmtree(mem, ignore_errors=True)  # the node's memory is lost...
                        args = dict(base)
                        if source == "memory":  # ...except after a plain restart
                            shutil.copytree(backup, mem)
                        elif source != "peer":
                            args.update(peer=None, memory=False)
                            if source == "object store":
                                args["local"] = str(work / f"lost-disk-{r}")
                            else:
                                dropper.drop(base["local"])
                        seconds, out = _child(_RESTORE, args, env)
                        out["recovery"] = seconds
                        results[source].append(out)
            finally:
                keeper.stop()
    finally:
        shutil.rmtree(shm, ignore_errors=True)
        shutil.rmtree(work, ignore_errors=True)
    lim = _limits(nbytes)
    out: dict[str, Any] = {"size": nbytes, "limits": lim, "sources": {}}
    for source, runs in results.items():
        out["sources"][source] = {
            "recovery_s": statistics.median(x["recovery"] for x in runs),
            "load_s": statistics.median(x["load"] for x in runs),
            "restore_s": statistics.median(next(t[1] for t in reversed(x["timings"]) if t[2] == "ok")
                                           for x in runs),
            "from": sorted({x["from"] for x in runs}), "bytes": runs[0]["bytes"],
            "timings": runs[-1]["timings"]}
    return out


def run(opt: Options) -> list[dict[str, Any]]:
    return [run_size(n, opt) for n in opt.sizes]


def tables(results: list[dict[str, Any]]) -> str:
    rows = []
    for res in results:
        lim = res["limits"]
        for source, x in res["sources"].items():
            rows.append([fmt_size(res["size"]), source, ", ".join(x["from"]), f"{x['recovery_s']:.2f}",
                         f"{x['load_s']:.3f}", f"{x['restore_s']:.3f}",
                         f"{x['bytes'] / x['restore_s'] / 1e9:.2f}"])
        limit = lim["memcpy_s"] + lim["hash_s"]
        rows.append([fmt_size(res["size"]), "limit: memcpy + xxh3-128", "", "", "", f"{limit:.3f}",
                     f"{res['size'] / limit / 1e9:.2f}"])
        rows.append([fmt_size(res["size"]), "limit: loopback TCP", "", "", "",
                     f"{res['size'] / lim['loopback_bps']:.3f}", f"{lim['loopback_bps'] / 1e9:.2f}"])
        if "landing_bps" in lim:
            rows.append([fmt_size(res["size"]), "limit: loopback TCP into tmpfs", "", "", "",
                         f"{res['size'] / lim['landing_bps']:.3f}", f"{lim['landing_bps'] / 1e9:.2f}"])
    return report.table(["state", "source", "restored from", "process start → restored s",
                         "load('latest') s", "tier restore s", "GB/s (tier restore)"], rows)


def recovery_targets(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    out = []
    for res in results:
        lim, src, where = res["limits"], res["sources"], fmt_size(res["size"])
        limit = lim["memcpy_s"] + lim["hash_s"]
        out.append(targets.check("memory restore / (memcpy + hash)", where,
                                 src["memory"]["restore_s"] / limit, "<=", 1.5,
                                 "the memory tier's load (mapped, every chunk hashed)"))
        peer_bps = src["peer"]["bytes"] / src["peer"]["restore_s"]
        out.append(targets.check("peer restore speed / loopback speed", where,
                                 peer_bps / lim["loopback_bps"], ">=", 0.8,
                                 "fetch into own memory (verified) + load"))
        if "landing_bps" in lim:
            out.append(_informational("peer restore speed / loopback-into-tmpfs speed", where,
                                      peer_bps / lim["landing_bps"],
                                      "the same loopback transfer landed in fresh tmpfs pages by "
                                      "plain writes; no target"))
    return out


def _informational(what: str, where: str, value: float, note: str) -> dict[str, Any]:
    """A ratio reported next to the targets, without a verdict (shown as n/a)."""
    return {"target": what, "where": where, "value": value, "op": "", "threshold": None,
            "pass": None, "margin": None, "note": f"{value:.3f} ({note})"}


report.TABLES["recovery"] = tables
targets.TARGETS["recovery"] = recovery_targets
