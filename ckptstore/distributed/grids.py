"""The coordinator's view of a distributed save: each tensor's grid from the ranks' boxes.

Every rank reports the boxes it wrote as one small integer array (a row per box:
tensor, offsets, shape; dimensions past a tensor's own padded with offset 0, size 1),
not its chunk records, which stay in its rank index. The coordinator joins the
arrays with numpy: per tensor and dimension the distinct intervals must tile the
dimension, and every cell of the grid they form must be written exactly once. Its
cost grows with the number of boxes at numpy speed, not at Python speed per chunk.
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from ckptstore.errors import DistributedSaveError
from ckptstore.manifest.records import Grid


def box_rows(boxes: Sequence[tuple[int, tuple[int, ...], tuple[int, ...]]], width: int) -> np.ndarray:
    """``[(tensor, offsets, shape), ...]`` as an int64 array of ``1 + 2 * width`` columns."""
    rows = np.zeros((len(boxes), 1 + 2 * width), dtype=np.int64)
    rows[:, 1 + width:] = 1
    for i, (t, offsets, shape) in enumerate(boxes):
        rows[i, 0] = t
        rows[i, 1:1 + len(offsets)] = offsets
        rows[i, 1 + width:1 + width + len(shape)] = shape
    return rows


def build_grids(shapes: Sequence[tuple[int, ...]], ranks: Sequence[int],
                rows: Sequence[np.ndarray], width: int) -> dict[int, Grid]:
    """{tensor: Grid} from each rank's ``box_rows`` (``rows[i]`` from ``ranks[i]``);
    ``shapes[t]`` is tensor t's global shape. Raises DistributedSaveError if the
    boxes of a tensor do not tile it as a grid, each cell once."""
    nonempty = [(r, b) for r, b in zip(ranks, rows) if len(b)]
    if not nonempty:
        return {}
    every = np.concatenate([b for _, b in nonempty])
    who = np.concatenate([np.full(len(b), r, dtype=np.int64) for r, b in nonempty])
    order = np.argsort(every[:, 0], kind="stable")
    every, who = every[order], who[order]
    tensors, starts = np.unique(every[:, 0], return_index=True)
    ends = np.append(starts[1:], len(every))
    grids: dict[int, Grid] = {}
    for t, lo, hi in zip(tensors.tolist(), starts.tolist(), ends.tolist()):
        if not 0 <= t < len(shapes):
            raise DistributedSaveError(f"a rank wrote a box of tensor {t}, which does not exist")
        grids[t] = _grid(t, shapes[t], every[lo:hi], who[lo:hi], width)
    return grids


def _grid(t: int, shape: tuple[int, ...], boxes: np.ndarray, who: np.ndarray, width: int) -> Grid:
    cuts: list[tuple[int, ...]] = []
    position: list[np.ndarray] = []
    for d, size in enumerate(shape):
        off, length = boxes[:, 1 + d], boxes[:, 1 + width + d]
        starts, first, inv = np.unique(off, return_index=True, return_inverse=True)
        lengths = length[first]
        if (not np.array_equal(lengths[inv], length) or starts[0] != 0 or np.any(lengths < 1)
                or np.any(starts[1:] != starts[:-1] + lengths[:-1])
                or starts[-1] + lengths[-1] != size):
            raise DistributedSaveError(f"the ranks' boxes of tensor {t} do not tile dimension {d} "
                                       f"of {list(shape)}")
        cuts.append(tuple(lengths.tolist()))
        position.append(inv.reshape(-1))
    dims = [len(c) for c in cuts]
    cells = math.prod(dims)
    index = (np.ravel_multi_index(tuple(position), dims) if shape
             else np.zeros(len(boxes), dtype=np.int64))
    if len(boxes) != cells or len(np.unique(index)) != cells:
        raise DistributedSaveError(f"the ranks' boxes of tensor {t} leave a cell of its grid "
                                   "unwritten or write one twice")
    writers = np.empty(cells, dtype=np.int64)
    writers[index] = who
    return Grid(tuple(cuts), tuple(writers.tolist()))
