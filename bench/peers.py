"""Peer checkpoint writers, each made durable (fsync) so the comparison is fair.

Each peer takes the state and a fresh destination and returns
``{"stall": seconds the caller was blocked, "total": seconds until durable}``.
For synchronous peers the two are equal.
"""
from __future__ import annotations

import os
import time
import warnings
from pathlib import Path
from typing import Callable

import torch
from safetensors.torch import save_file

from bench.state import BenchState

PeerFn = Callable[[BenchState, Path], dict[str, float]]


def _fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def torch_save(st: BenchState, dest: Path) -> dict[str, float]:
    """``torch.save`` of the nested state to one file, then fsync file and directory."""
    t0 = time.perf_counter()
    with open(dest, "wb") as f:
        torch.save(st.tree(), f)
        f.flush()
        os.fsync(f.fileno())
    _fsync_path(dest.parent)
    t = time.perf_counter() - t0
    return {"stall": t, "total": t}


def safetensors_save(st: BenchState, dest: Path) -> dict[str, float]:
    """``safetensors.torch.save_file`` of the flat tensors, then fsync."""
    flat = {k.replace("/", "."): v for k, v in st.flat.items()}
    t0 = time.perf_counter()
    save_file(flat, str(dest))
    _fsync_path(dest)
    _fsync_path(dest.parent)
    t = time.perf_counter() - t0
    return {"stall": t, "total": t}


def _dcp_writer(dest: Path, threads: int):
    from torch.distributed.checkpoint import FileSystemWriter

    # sync_files=True (the default) fsyncs every file DCP writes
    return FileSystemWriter(str(dest), thread_count=threads, sync_files=True)


def dcp_save(st: BenchState, dest: Path, threads: int = 1) -> dict[str, float]:
    """``torch.distributed.checkpoint.save``, single process (no process group)."""
    import torch.distributed.checkpoint as dcp

    tree = st.tree()
    t0 = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp.save(tree, storage_writer=_dcp_writer(dest, threads), no_dist=True)
    _fsync_path(dest)
    t = time.perf_counter() - t0
    return {"stall": t, "total": t}


def dcp_save_t2(st: BenchState, dest: Path) -> dict[str, float]:
    """DCP ``save`` with ``thread_count=2`` (one writer thread per core here)."""
    return dcp_save(st, dest, threads=2)


def dcp_async_save(st: BenchState, dest: Path) -> dict[str, float]:
    """``torch.distributed.checkpoint.async_save``: stall = call, total = future done."""
    import torch.distributed.checkpoint as dcp

    tree = st.tree()
    t0 = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fut = dcp.async_save(tree, storage_writer=_dcp_writer(dest, 1), no_dist=True)
        stall = time.perf_counter() - t0
        upload = getattr(fut, "upload_completion", fut)  # AsyncSaveResponse or Future
        upload.result()
    _fsync_path(dest)
    return {"stall": stall, "total": time.perf_counter() - t0}


PEERS: dict[str, PeerFn] = {
    "torch.save": torch_save,
    "safetensors": safetensors_save,
    "dcp.save": dcp_save,
    "dcp.save(t=2)": dcp_save_t2,
    "dcp.async_save": dcp_async_save,
}
