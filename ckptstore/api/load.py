"""``ckptstore.load``: verified reads back into the saved tree."""
from __future__ import annotations

import os
from typing import Any

from ckptstore.errors import CorruptCheckpointError, UnsupportedOperationError
from ckptstore.manifest.io import read_catalog
from ckptstore.manifest.ranked import resolve
from ckptstore.plan.stateful import holds_stateful
from ckptstore.plan.tree import unflatten
from ckptstore.read.into import LoadReport, apply_into
from ckptstore.read.reader import read_tensors
from ckptstore.storage import Storage, open_storage


def load(path: "str | os.PathLike | Storage", *, into: Any = None, strict: bool = True,
         verify: bool = True, cast: bool = False, rename: Any = None, keys: Any = None,
         storage_options: dict | None = None, mmap: bool | None = None) -> Any:
    """Load a committed checkpoint.

    Without ``into``, returns the saved tree with CPU tensors (numpy arrays stay
    numpy), bit-identical to what was saved. With ``into`` (a nested state dict or
    an ``nn.Module``), copies every value into the existing tensors (on any device)
    and containers and returns a :class:`LoadReport`; with ``strict=True`` any
    missing, unexpected or mismatched key raises :class:`StrictLoadError` before
    anything is modified.

    Every chunk's xxh3-128 hash is checked unless ``verify=False``; damage raises
    :class:`CorruptCheckpointError` naming the tensor and chunk.

    ``rename`` (prefix mapping, regex rules or callable, see :mod:`ckptstore.rename`)
    maps the checkpoint's '.'-joined names onto new ones. ``keys`` (names, prefixes
    or a predicate over the checkpoint's names) loads only those leaves and reads
    only their chunks. Both are described in docs/compat.md.

    ``mmap``: how uncompressed tensors are read. ``False`` reads them as large
    extents of their files (O_DIRECT, several requests in flight) into memory of
    their own: the fast path when the files are not in the page cache.
    ``True`` maps them copy-on-write from a local checkpoint: no copy out of the
    page cache (the fast path when it holds them), but such a tensor reads the file
    for as long as it lives (a truncated file kills it with SIGBUS, a file rewritten
    in place changes it). ``None`` (the default) maps only where every file is
    already cached. Every chunk is verified either way. ``Checkpointer.load`` never
    maps, as retention may remove the files of a run.
    """
    if into is not None and holds_stateful(into):
        mmap = False  # objects keep what load_state_dict gets: never a map of a file
    storage = open_storage(path, storage_options)
    manifest = read_catalog(storage)  # a distributed save's rank indexes are read as needed
    from ckptstore.distributed import holds_dtensor

    sharded = manifest.indexes or any(t.shards for t in manifest.tensors)
    if (sharded and rename is None and keys is None) or holds_dtensor(into):  # saved or loaded sharded
        if rename is not None or keys is not None:
            raise UnsupportedOperationError("rename= and keys= are not supported yet for DTensor "
                                            "targets; load into plain tensors, or without them")
        from ckptstore.distributed.reshard import load_resharded

        return load_resharded(storage, manifest, into=into, strict=strict, verify=verify,
                              cast=cast)
    if rename is not None or keys is not None:
        from ckptstore.read.lazy import partial_load

        # of a distributed save, only the rank indexes holding the selected tensors are read
        return partial_load(storage, manifest, into=into, strict=strict, verify=verify,
                            cast=cast, rename=rename, keys=keys, mmap=mmap)
    manifest = resolve(storage, manifest)
    arrays = read_tensors(storage, manifest, verify=verify, mmap=mmap)
    state = unflatten(manifest.tree, lambda kind, i: _leaf(manifest, arrays, kind, i))
    if into is None:
        return state
    return apply_into(state, into, strict=strict, cast=cast)


def _leaf(manifest, arrays: dict, kind: str, i: Any) -> Any:
    if not isinstance(i, int) or isinstance(i, bool) or not 0 <= i < len(manifest.tensors):
        raise CorruptCheckpointError(f"state tree refers to tensor {i!r}, which does not exist")
    want = "torch" if kind == "tensor" else "numpy"
    if manifest.tensors[i].kind != want:
        raise CorruptCheckpointError(f"state tree expects a {want} array for tensor {i}")
    return arrays[i]


__all__ = ["load", "LoadReport"]
