"""``ckptstore.RNGState``: the random number generators as a Stateful value.

Put ``ckptstore.RNGState()`` in the state given to ``save`` and in ``into=`` of
``load``: Python's ``random``, NumPy's global generator, torch's CPU generator and
every CUDA device's generator are captured on save and restored on load, so a
resumed run draws the same numbers as one that never stopped.
"""
from __future__ import annotations

import json
import logging
import random
from typing import Any

import numpy as np
import torch

from ckptstore.errors import CorruptCheckpointError
from ckptstore.plan.tree import flatten, unflatten

log = logging.getLogger(__name__)


class RNGState:
    """A Stateful holding no state of its own: ``state_dict()`` reads the process's
    generators, ``load_state_dict()`` sets them.

    ``per_rank=True`` (for saves that every rank of a process group calls together)
    gathers every rank's generators into the checkpoint, and each rank restores its
    own (``rank % saved ranks``, so a job may resume on another number of ranks).
    Keep the default when only one rank saves, as a gather would wait for the others.

    ``snapshot=True`` captures the generators when the object is made, for a save
    taken later that must hold the state of that moment (e.g. the start of a step).
    """

    def __init__(self, *, per_rank: bool = False, snapshot: bool = False) -> None:
        self.per_rank = per_rank
        self.captured = capture() if snapshot else None

    def state_dict(self) -> dict[str, Any]:
        mine = self.captured if self.captured is not None else capture()
        if not (self.per_rank and _world() > 1):
            return mine
        return {"ranks": gather(mine)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if not isinstance(state, dict):
            raise CorruptCheckpointError(f"RNG state is a {type(state).__name__}, not a dict")
        if "ranks" in state:
            ranks = list(state["ranks"])
            if not ranks:
                raise CorruptCheckpointError("RNG state holds no rank's generators")
            state = ranks[_rank() % len(ranks)]
        restore(state)


def capture() -> dict[str, Any]:
    """This process's generators as a plain tree of tensors, arrays and numbers."""
    version, internal, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state(legacy=True)
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []
    return {
        "python": {"version": version, "state": torch.tensor(internal, dtype=torch.int64),
                   "gauss_next": gauss},
        "numpy": {"kind": kind, "keys": np.asarray(keys).copy(), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
        "torch": torch.get_rng_state(),
        "cuda": list(cuda),
    }


def restore(state: dict[str, Any]) -> None:
    """Inverse of :func:`capture`."""
    try:
        py = state["python"]
        random.setstate((int(py["version"]), tuple(int(v) for v in py["state"].tolist()),
                         py["gauss_next"]))
        npy = state["numpy"]
        np.random.set_state((str(npy["kind"]), np.asarray(npy["keys"], dtype=np.uint32), int(npy["pos"]),
                             int(npy["has_gauss"]), float(npy["cached_gaussian"])))
        torch.set_rng_state(torch.as_tensor(state["torch"], dtype=torch.uint8).contiguous())
        cuda = list(state.get("cuda") or [])
    except (KeyError, TypeError, ValueError, AttributeError, RuntimeError) as e:
        raise CorruptCheckpointError(f"malformed RNG state: {e}") from None
    if cuda and torch.cuda.is_available():
        n = torch.cuda.device_count()
        if len(cuda) != n:
            log.warning("RNG state holds %d CUDA generators, this process sees %d; restoring the "
                        "first %d", len(cuda), n, min(n, len(cuda)))
        for i, s in enumerate(cuda[:n]):
            torch.cuda.set_rng_state(torch.as_tensor(s, dtype=torch.uint8).cpu(), i)
    elif cuda:
        log.warning("RNG state holds CUDA generators but CUDA is not available; they are not restored")


def gather(state: dict[str, Any]) -> list[dict[str, Any]]:
    """Every rank's :func:`capture` (collective), sent as bytes of typed JSON and raw
    arrays: no pickle, not even between live ranks."""
    import torch.distributed as dist

    blob = _encode(state)
    device = (torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl"
              else torch.device("cpu"))
    world = dist.get_world_size()
    sizes = [torch.zeros(1, dtype=torch.int64, device=device) for _ in range(world)]
    dist.all_gather(sizes, torch.tensor([len(blob)], dtype=torch.int64, device=device))
    longest = max(int(n.item()) for n in sizes)
    mine = torch.zeros(longest, dtype=torch.uint8, device=device)
    mine[:len(blob)] = torch.frombuffer(bytearray(blob), dtype=torch.uint8).to(device)
    out = [torch.empty(longest, dtype=torch.uint8, device=device) for _ in range(world)]
    dist.all_gather(out, mine)
    return [_decode(bytes(t[:int(n.item())].cpu().numpy())) for t, n in zip(out, sizes)]


def _encode(state: dict[str, Any]) -> bytes:
    """One rank's generators as ``len(header) | header JSON | array bytes``."""
    skeleton, leaves = flatten(state)
    arrays = [leaf.value.cpu().numpy() if isinstance(leaf.value, torch.Tensor) else leaf.value
              for leaf in leaves]
    header = json.dumps({"tree": skeleton, "arrays": [
        {"torch": isinstance(leaf.value, torch.Tensor), "dtype": a.dtype.str, "shape": list(a.shape)}
        for leaf, a in zip(leaves, arrays)]}).encode()
    return len(header).to_bytes(8, "little") + header + b"".join(
        np.ascontiguousarray(a).tobytes() for a in arrays)


def _decode(blob: bytes) -> dict[str, Any]:
    n = int.from_bytes(blob[:8], "little")
    header = json.loads(blob[8:8 + n])
    offset, arrays = 8 + n, []
    for spec in header["arrays"]:
        dt = np.dtype(spec["dtype"])
        count = int(np.prod(spec["shape"], dtype=np.int64))
        a = np.frombuffer(blob, dtype=dt, count=count, offset=offset).reshape(spec["shape"]).copy()
        offset += a.nbytes
        arrays.append(torch.from_numpy(a) if spec["torch"] else a)
    return unflatten(header["tree"], lambda kind, i: arrays[i])


def _world() -> int:
    import torch.distributed as dist

    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def _rank() -> int:
    import torch.distributed as dist

    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
