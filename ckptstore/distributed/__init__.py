"""Distributed save and load on ``torch.distributed``.

``ckptstore.save`` hands a state holding DTensors (FSDP2, tensor parallel) to
:mod:`.dsave`: each rank writes only its own boxes, replicated values once, and a
two-phase commit (:mod:`.commit2pc`) makes rank 0 write the manifest only after
every rank succeeded. ``ckptstore.load`` hands sharded checkpoints and DTensor
targets to :mod:`.reshard`, which reads only the chunks each rank needs, for any
number of ranks. :mod:`.dcp` plugs ckptstore storage into
``torch.distributed.checkpoint`` as a StorageWriter / StorageReader.
See docs/distributed.md.
"""
from __future__ import annotations

from typing import Any

from ckptstore.distributed.shards import holds_dtensor, is_dtensor

__all__ = ["holds_dtensor", "is_dtensor", "wants_distributed_save", "save", "load_resharded",
           "CkptStoreWriter", "CkptStoreReader"]


def wants_distributed_save(state: Any, distributed: bool | None = None) -> bool:
    """Whether ``ckptstore.save`` must run the collective save.

    ``distributed=None`` (the default) means: when the state holds DTensors. A plain
    state is saved by the calling rank alone even inside a process group, because the
    common pattern is ``if rank == 0: save(full_state)``, which a collective would
    deadlock; pass ``distributed=True`` when every rank calls ``save`` together.
    """
    if distributed is not None:
        return bool(distributed)
    return holds_dtensor(state)


def __getattr__(name: str) -> Any:
    if name == "save":
        from ckptstore.distributed.dsave import save
        return save
    if name == "load_resharded":
        from ckptstore.distributed.reshard import load_resharded
        return load_resharded
    if name in ("CkptStoreWriter", "CkptStoreReader"):
        from ckptstore.distributed import dcp
        return getattr(dcp, name)
    raise AttributeError(f"module 'ckptstore.distributed' has no attribute {name!r}")
