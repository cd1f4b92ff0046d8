"""CUDA snapshots: what ``save()`` copies is the state as of the call, bit for bit.

Skipped without CUDA. Each test queues long kernels before the save (the copy
must wait for them) and overwrites the state on the default stream right after
``save()`` returns (the copy must not see it), in both modes.
"""
from __future__ import annotations

import pytest
import torch

import ckptstore

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

GIB = 1 << 30


def _long_kernel() -> None:
    torch.cuda._sleep(200_000_000)  # ~0.1 s of GPU time, queued on the current stream


def _state(nbytes: int, device: str = "cuda") -> dict:
    n = nbytes // 4 // 8
    g = torch.Generator(device=device).manual_seed(0)
    return {f"p{i}": torch.randn(n, device=device, generator=g) for i in range(8)}


def _expect_then_save(state: dict, path, overlap: bool, **kw):
    """Queue kernels that change every tensor, then save: the checkpoint must hold
    the changed values although the host never waited for the kernels."""
    expect = {k: (v.detach().clone() * 2).cpu() for k, v in state.items()}
    torch.cuda.synchronize()
    _long_kernel()
    for v in state.values():
        v.mul_(2)  # queued behind the long kernel
    h = ckptstore.save(state, path, overlap=overlap, **kw)
    for v in state.values():  # the optimizer step: right away, on the default stream
        v.add_(1).neg_()
    return h, expect


@pytest.mark.parametrize("overlap", [False, True])
def test_multi_gib_state_mutated_right_after_save_loads_pre_save_values(tmp_path, overlap):
    state = _state(2 * GIB)
    h, expect = _expect_then_save(state, tmp_path / "c", overlap, compression="none")
    h.wait()
    out = ckptstore.load(tmp_path / "c")
    for k, v in expect.items():
        assert torch.equal(out[k].view(torch.uint8), v.view(torch.uint8)), k


@pytest.mark.parametrize("overlap", [False, True])
def test_non_contiguous_conj_and_mixed_cpu_gpu_state(tmp_path, overlap):
    a = torch.randn(4096, 1024, device="cuda")
    z = torch.complex(torch.randn(1 << 20, device="cuda"), torch.randn(1 << 20, device="cuda"))
    cpu = torch.randn(1 << 20)
    state = {"t": a.t(), "zc": z.conj(), "cpu": cpu, "step": 7}
    expect = {"t": a.t().cpu() * 2, "zc": z.conj().resolve_conj().cpu() * 2, "cpu": cpu.clone()}
    _long_kernel()
    a.mul_(2)
    z.mul_(2)
    h = ckptstore.save(state, tmp_path / "m", overlap=overlap, compression="zstd",
                       shard_size=1 << 22, chunk_size=1 << 20)
    a.zero_()
    z.zero_()
    h.wait_staged()
    cpu.zero_()
    h.wait()
    out = ckptstore.load(tmp_path / "m")
    for k, v in expect.items():
        assert torch.equal(out[k], v), k
    assert out["step"] == 7


@pytest.mark.parametrize("overlap", [False, True])
def test_overlap_returns_before_queued_work_ends_and_default_mode_after(tmp_path, overlap):
    state = _state(GIB // 4)
    ckptstore.save(state, tmp_path / "warm", compression="none").wait()
    torch.cuda._sleep(2_000_000_000)  # about a second of GPU time
    marker = torch.cuda.Event()
    marker.record()
    h = ckptstore.save(state, tmp_path / "o", overlap=overlap, compression="none")
    # default: save() waited for the copies, which waited for the queued kernel;
    # overlap: it returned while that kernel still ran
    assert marker.query() is (not overlap)
    h.wait_staged()
    assert marker.query()
    h.wait()


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
@pytest.mark.parametrize("overlap", [False, True])
def test_tensors_on_several_devices(tmp_path, overlap):
    state = {f"d{i}": torch.randn(1 << 24, device=f"cuda:{i}") for i in range(2)}
    expect = {k: v.cpu() * 2 for k, v in state.items()}
    for i, v in enumerate(state.values()):
        with torch.cuda.device(i):
            _long_kernel()
            v.mul_(2)
    h = ckptstore.save(state, tmp_path / "md", overlap=overlap, compression="none")
    for i, v in enumerate(state.values()):
        with torch.cuda.device(i):
            v.zero_()
    h.wait()
    out = ckptstore.load(tmp_path / "md")
    for k, v in expect.items():
        assert torch.equal(out[k], v), k


@pytest.mark.parametrize("overlap", [False, True])
def test_tensors_dropped_right_after_save_and_memory_reused(tmp_path, overlap):
    state = {"a": torch.randn(8192, 8192, device="cuda").t(),  # a temporary is made for it
             "b": torch.randn(1 << 26, device="cuda")}
    expect = {k: v.cpu() for k, v in state.items()}
    _long_kernel()
    h = ckptstore.save(state, tmp_path / "r", overlap=overlap, compression="none")
    del state
    churn = [torch.full((1 << 26,), 7.0, device="cuda") for _ in range(4)]  # reuses freed blocks
    h.wait()
    out = ckptstore.load(tmp_path / "r")
    for k, v in expect.items():
        assert torch.equal(out[k], v), k
    del churn
