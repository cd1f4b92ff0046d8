"""The copy step's ordering, proved on CPU with a device double (tests/fake_device.py).

The double's copies land late, on another thread, and read their source when they
run: a writer handed a file too early, a mutation that overtakes a copy, or a copy
that overtakes queued work all show up as wrong bytes in the checkpoint.
"""
from __future__ import annotations

import threading
import time

import pytest
import torch
from hypothesis import given, settings, strategies as st

import ckptstore
from ckptstore.pipeline.engine import engine, shutdown
from tests.conftest import assert_same_tree
from tests.fake_device import FakeDeviceCopier, FakeStream

SHARD = 64 * 1024


def _state(seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {"w": [torch.randn(40_000, generator=g) for _ in range(4)],  # 160 KB each
            "t": torch.randn(300, 200, generator=g).t(),  # non-contiguous, several files
            "step": seed}


def _clone(state: dict) -> dict:
    return {"w": [w.clone() for w in state["w"]], "t": state["t"].clone(), "step": state["step"]}


def _mutate(state: dict) -> None:
    for w in state["w"]:
        w.add_(1.0)
    state["t"].mul_(-3.0)


class Submits:
    """Records when each file was handed to a writer."""

    def __init__(self, eng) -> None:
        self.at: dict[str, float] = {}
        real_get = eng.writers.get
        outer = self

        class Proxy:
            def submit(self, fn, job):
                outer.at[job.name] = time.monotonic()
                return real_get().submit(fn, job)
        eng.writers.get = lambda: Proxy()


@pytest.fixture
def device():
    """A fresh engine whose copy step is the device double; its current stream."""
    shutdown()
    eng = engine()
    current = FakeStream("current")
    eng.copier = FakeDeviceCopier(current, delay=0.03)
    yield eng, current
    shutdown()


def _save(state, path, **kw):
    return ckptstore.save(state, path, compression="none", shard_size=SHARD, chunk_size=SHARD,
                          **kw)


def test_no_writer_reads_a_file_before_its_copies_landed(device, tmp_path):
    eng, current = device
    submits = Submits(eng)
    # the first save leaves its bytes in the arena: a file written too early would
    # hold them (with a valid hash) instead of the second save's
    _save(_state(1), tmp_path / "a").wait()
    state = _state(2)
    expect = _clone(state)
    h = _save(state, tmp_path / "b", overlap=True)
    h.wait()
    copier = eng.copier
    assert len(submits.at) >= 6, "the state must span several files"
    for name, t in submits.at.items():
        assert name in copier.completed and copier.completed[name] <= t, name
    assert_same_tree(ckptstore.load(tmp_path / "b"), expect)


def test_default_mode_returns_after_the_copies_so_any_mutation_is_safe(device, tmp_path):
    eng, current = device
    state = _state(3)
    expect = _clone(state)
    h = _save(state, tmp_path / "c")
    assert len(eng.copier.completed) == len(eng.copier.issued) >= 6
    _mutate(state)  # from the host, right away: no stream ordering involved
    h.wait()
    assert_same_tree(ckptstore.load(tmp_path / "c"), expect)


def test_overlap_returns_before_the_copies_and_fences_the_current_stream(device, tmp_path):
    eng, current = device
    state = _state(4)
    expect = _clone(state)
    t0 = time.monotonic()
    h = _save(state, tmp_path / "d", overlap=True)
    returned = time.monotonic() - t0
    n = len(eng.copier.issued)
    assert n >= 6
    assert len(eng.copier.completed) < n, "overlap=True waited for the copies"
    assert returned < n * eng.copier.delay
    current.launch(lambda: _mutate(state))  # the optimizer step, queued on the stream
    h.wait_staged()
    assert len(eng.copier.completed) == n
    h.wait()
    current.synchronize()
    assert not torch.equal(state["w"][0], expect["w"][0]), "the mutation never ran"
    assert_same_tree(ckptstore.load(tmp_path / "d"), expect)


@pytest.mark.parametrize("overlap", [False, True])
def test_work_queued_before_save_is_in_the_checkpoint(device, tmp_path, overlap):
    eng, current = device
    state = _state(5)
    expect = _clone(state)
    _mutate(expect)
    current.launch(lambda: _mutate(state), delay=0.3)  # a long kernel, still queued
    h = _save(state, tmp_path / "e", overlap=overlap)
    h.wait()
    assert_same_tree(ckptstore.load(tmp_path / "e"), expect)


def test_wait_staged_then_host_writes_are_safe(device, tmp_path):
    eng, current = device
    state = _state(6)
    expect = _clone(state)
    h = _save(state, tmp_path / "f", overlap=True)
    h.wait_staged()
    _mutate(state)
    h.wait()
    assert_same_tree(ckptstore.load(tmp_path / "f"), expect)


@pytest.mark.parametrize("overlap", [False, True])
def test_a_small_staging_ring_releases_writers_instead_of_deadlocking(device, tmp_path, overlap):
    eng, current = device
    state = _state(7)
    expect = _clone(state)
    h = _save(state, tmp_path / "g", overlap=overlap, staging_budget=2 * SHARD)
    current.launch(lambda: _mutate(state))
    done = threading.Event()
    threading.Thread(target=lambda: (h.exception(), done.set()), daemon=True).start()
    assert done.wait(60), "save with a small ring never finished"
    h.wait()
    assert_same_tree(ckptstore.load(tmp_path / "g"), expect)


def test_a_failed_device_copy_fails_the_save_and_commits_nothing(device, tmp_path):
    eng, current = device
    eng.copier.fail_file = 2
    h = _save(_state(8), tmp_path / "h", overlap=True)
    with pytest.raises(RuntimeError, match="device copy failed"):
        h.wait()
    assert not (tmp_path / "h" / "manifest.json").exists()
    assert not [p for p in (tmp_path / "h").iterdir() if p.name.startswith("shard")]
    eng.copier.fail_file = None
    _save(_state(9), tmp_path / "h2").wait()  # the engine is usable again
    assert eng.copier.closed >= 2  # every session released its temporaries


# The real copy step (host memory) ------------------------------------------------

@pytest.mark.parametrize("compression", ["none", "zstd"])
def test_lazy_conj_and_neg_views_are_saved_with_the_values_they_show(tmp_path, compression):
    z = torch.complex(torch.randn(1000), torch.randn(1000))
    x = torch.randn(1000)
    state = {"conj": z.conj(), "neg": torch._neg_view(x), "conj_t": z.view(40, 25).conj().t()}
    assert state["conj"].is_conj() and state["neg"].is_neg()
    ckptstore.save(state, tmp_path / "c", compression=compression).wait()
    out = ckptstore.load(tmp_path / "c")
    for k, v in state.items():
        assert torch.equal(out[k], v.resolve_conj().resolve_neg()), k
    assert torch.equal(out["neg"], -x)


def test_a_non_contiguous_tensor_over_many_files_is_made_contiguous_once(tmp_path, monkeypatch):
    from ckptstore.staging import copy as copy_mod
    calls = []
    real = copy_mod.host_object
    monkeypatch.setattr(copy_mod, "host_object", lambda v: calls.append(1) or real(v))
    t = torch.randn(512, 256).t()  # 512 KiB over 8 files of 64 KiB
    other = torch.randn(10)
    ckptstore.save({"t": t, "o": other}, tmp_path / "n", compression="none",
                   shard_size=SHARD, chunk_size=SHARD).wait()
    out = ckptstore.load(tmp_path / "n")
    assert torch.equal(out["t"], t) and torch.equal(out["o"], other)
    assert len(calls) == 2


@settings(max_examples=200, deadline=None)
@given(sizes=st.lists(st.integers(0, 1 << 22), min_size=1, max_size=12), k=st.integers(1, 5))
def test_host_copy_jobs_split_over_threads_cover_every_byte_once(sizes, k):
    from ckptstore.staging.copy import _split
    jobs, d, s = [], 1 << 40, 1 << 20
    for n in sizes:
        jobs.append((d, s, n))
        d, s = d + n + 4096, s + n + 8192
    total = sum(sizes)
    parts = _split(jobs, total, k)
    assert 1 <= len(parts) <= k
    flat = [j for part in parts for j in part if j[2]]
    # the same (dst, src) byte ranges in the same order, only cut
    merged: list[list[int]] = []
    for dd, ss, n in flat:
        if merged and merged[-1][0] + merged[-1][2] == dd and merged[-1][1] + merged[-1][2] == ss:
            merged[-1][2] += n
        else:
            merged.append([dd, ss, n])
    assert merged == [list(j) for j in jobs if j[2]]
    if total >= 4096 * k * 4:
        share = total / k
        assert all(sum(n for *_, n in part) <= share + 4096 for part in parts[:-1])


@pytest.mark.parametrize("threads", ["1", "3"])
def test_host_copies_over_several_threads_save_the_same_bytes(tmp_path, monkeypatch, threads):
    monkeypatch.setenv("CKPTSTORE_COPY_THREADS", threads)
    shutdown()
    try:
        g = torch.Generator().manual_seed(11)
        state = {"big": torch.randn(3_000_001, generator=g), "t": torch.randn(2000, 1500, generator=g).t(),
                 "small": [torch.randn(17, generator=g) for _ in range(50)]}
        ckptstore.save(state, tmp_path / "p", compression="none").wait()
        assert engine().copier.host.threads == int(threads)
        assert_same_tree(ckptstore.load(tmp_path / "p"), state)
    finally:
        shutdown()
