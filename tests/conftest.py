"""Shared fixtures and helpers for the test-suite."""
from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("CKPTSTORE_WRITERS", "2")


def raw_bytes(t: torch.Tensor) -> bytes:
    """The exact bytes of a tensor (NaN-safe comparison of any dtype)."""
    t = t.detach().contiguous().cpu()
    n = t.numel() * t.element_size()
    if n == 0:
        return b""
    u8 = torch.empty(0, dtype=torch.uint8).set_(t.untyped_storage(), t.storage_offset() * t.element_size(), (n,), (1,))
    return u8.numpy().tobytes()


def assert_same_tree(a, b, path="") -> None:
    """Bit-identical comparison of two state trees (types, shapes, dtypes, bytes)."""
    import numpy as np

    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor), path
        assert a.dtype == b.dtype and a.shape == b.shape, (path, a.dtype, b.dtype, a.shape, b.shape)
        assert raw_bytes(a) == raw_bytes(b), path
    elif isinstance(a, np.ndarray):
        assert isinstance(b, np.ndarray) and a.dtype == b.dtype and a.shape == b.shape, path
        assert a.tobytes() == b.tobytes(), path
    elif isinstance(a, dict):
        assert type(a) is type(b) and list(a.keys()) == list(b.keys()), path
        for k in a:
            assert_same_tree(a[k], b[k], f"{path}.{k}")
    elif isinstance(a, (list, tuple)):
        assert type(b) is (list if isinstance(a, list) else tuple) and len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same_tree(x, y, f"{path}[{i}]")
    elif isinstance(a, float) and a != a:
        assert isinstance(b, float) and b != b, path
    else:
        assert type(a) is type(b) and a == b, (path, a, b)


@pytest.fixture
def small_state():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.ReLU(), torch.nn.Linear(64, 8))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.randn(4, 32)).sum().backward()
    opt.step()
    return {"model": model.state_dict(), "optim": opt.state_dict(), "step": 7,
            "rng": torch.get_rng_state(), "bf16": torch.randn(300, 7).to(torch.bfloat16)}


def step_state(step: int, frozen: torch.Tensor) -> dict:
    """A training-like state for step ``step``: one tensor that never changes (so
    incremental saves reference it) and one that does."""
    g = torch.Generator().manual_seed(step)
    return {"frozen": frozen, "w": torch.randn(64, 16, generator=g), "step": step}


@pytest.fixture
def frozen() -> torch.Tensor:
    return torch.randn(256, 64, generator=torch.Generator().manual_seed(99))
