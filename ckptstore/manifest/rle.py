"""Run-length forms of the integer lists of a distributed save's grids (schema 2).

A sharded tensor's cut sizes repeat (``torch.chunk`` cuts a dimension into equal
pieces and one remainder) and its writer ranks run in arithmetic progressions
(rank ``r`` writes cell ``r``), so 1,024 ranks x 300 tensors fit in a few kilobytes.
Unpacking is bounded: a hostile count never allocates more than ``limit`` items.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from ckptstore.errors import CorruptCheckpointError, UnsafeCheckpointError

#: the most cells (boxes) one tensor's grid may have
MAX_CELLS = 1 << 22


def pack_sizes(values: Sequence[int]) -> list[list[int]]:
    """``[5, 5, 5, 2]`` -> ``[[5, 3], [2, 1]]`` (value, count)."""
    out: list[list[int]] = []
    for v in values:
        if out and out[-1][0] == v:
            out[-1][1] += 1
        else:
            out.append([int(v), 1])
    return out


def pack_ranks(values: Sequence[int]) -> list[list[int]]:
    """``[0, 1, 2, 3, 7, 7]`` -> ``[[0, 4, 1], [7, 2, 0]]`` (first, count, step):
    greedy arithmetic runs."""
    out: list[list[int]] = []
    i, n = 0, len(values)
    while i < n:
        first = int(values[i])
        if i + 1 == n:
            out.append([first, 1, 0])
            break
        step = int(values[i + 1]) - first
        j = i + 1
        while j + 1 < n and values[j + 1] - values[j] == step:
            j += 1
        out.append([first, j - i + 1, step])
        i = j + 1
    return out


def _count(runs: Any, width: int, what: str, limit: int) -> int:
    if not isinstance(runs, list):
        raise CorruptCheckpointError(f"{what} is not a list")
    total = 0
    for r in runs:
        if (not isinstance(r, list) or len(r) != width
                or not all(isinstance(x, int) and not isinstance(x, bool) for x in r)):
            raise CorruptCheckpointError(f"{what} holds a malformed run {r!r}")
        if r[1] < 1:
            raise CorruptCheckpointError(f"{what} holds a run of {r[1]} items")
        total += r[1]
        if total > limit:
            raise UnsafeCheckpointError(f"{what} claims more than {limit} items")
    return total


def unpack_sizes(runs: Any, what: str, limit: int = MAX_CELLS) -> tuple[int, ...]:
    """Inverse of :func:`pack_sizes`; every size at least 1."""
    _count(runs, 2, what, limit)
    out: list[int] = []
    for v, n in runs:
        if v < 1:
            raise CorruptCheckpointError(f"{what} holds an interval of {v} elements")
        out += [v] * n
    return tuple(out)


def unpack_ranks(runs: Any, what: str, limit: int = MAX_CELLS) -> tuple[int, ...]:
    """Inverse of :func:`pack_ranks` (ranks are checked by the caller)."""
    _count(runs, 3, what, limit)
    out: list[int] = []
    for first, n, step in runs:
        out += range(first, first + n * step, step) if step else [first] * n
    return tuple(out)
