"""Distributed save and load on ``torch.distributed``.

``ckptstore.save`` hands a state holding DTensors (FSDP2, tensor parallel) to
:mod:`.dsave`: each rank writes only its own boxes, replicated values once, and a
two-phase commit (:mod:`ckptstore.commit.twophase`) makes rank 0 write the manifest only after
every rank succeeded. ``ckptstore.load`` hands sharded checkpoints and DTensor
targets to :mod:`.reshard`, which reads only the chunks each rank needs, for any
number of ranks. :mod:`.dcp` plugs ckptstore storage into
``torch.distributed.checkpoint`` as a StorageWriter / StorageReader.
See docs/distributed.md.
"""
from __future__ import annotations

from typing import Any

from ckptstore.distributed.shards import holds_dtensor, is_dtensor, wants_distributed_save

__all__ = ["holds_dtensor", "is_dtensor", "wants_distributed_save", "save", "load_resharded",
           "CkptStoreWriter", "CkptStoreReader"]


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
