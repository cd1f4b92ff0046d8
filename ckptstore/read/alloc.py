"""Host buffers that reads fill: allocated without touching their memory.

``torch.empty`` fills new memory with NaN (or the integer maximum) whenever
deterministic algorithms are on (``torch.use_deterministic_algorithms(True)`` with
``torch.utils.deterministic.fill_uninitialized_memory``, its default), as trainers
that resume bit-exactly run. Every byte of a read buffer is written by the read
anyway, so that fill is a second pass over the whole state for nothing. These
buffers come from numpy (which never fills) and are viewed as torch tensors.
"""
from __future__ import annotations

import math

import numpy as np
import torch

from ckptstore.storage.direct import aligned_buffer

HUGE = 2 << 20  #: from this size up, huge pages: one fault per 2 MiB instead of 512


def host_empty(shape: tuple[int, ...] | list[int], dtype: torch.dtype) -> torch.Tensor:
    """An uninitialised, contiguous CPU tensor of ``shape`` and ``dtype``."""
    shape = tuple(int(d) for d in shape)
    n = math.prod(shape) * dtype.itemsize
    if n == 0:  # nothing to fill (numpy's empty buffer would not view as a wider dtype)
        return torch.empty(shape, dtype=dtype)
    return host_bytes(n).view(dtype).reshape(shape)


def host_bytes(n: int) -> torch.Tensor:
    """An uninitialised 1-D uint8 CPU tensor of ``n`` bytes (``n`` > 0): fresh anonymous
    memory on huge pages when it is large, else numpy's."""
    if n >= HUGE:
        return torch.frombuffer(aligned_buffer(n), dtype=torch.uint8, count=n)
    return torch.from_numpy(np.empty(int(n), dtype=np.uint8))
