"""Import, export and diff: ckptstore <-> plain safetensors, torch.save files, DCP.

* :func:`export_safetensors` writes the tensors of a checkpoint (weights only) as one
  plain safetensors file, for inference and the Hugging Face ecosystem.
* :func:`import_checkpoint` turns a ``.safetensors`` file, a ``torch.save`` file or a
  ``torch.distributed.checkpoint`` directory into a ckptstore checkpoint. Nothing is
  ever unpickled freely: torch.save files go through ``torch.load(weights_only=True)``,
  DCP's pickled ``.metadata`` through an allow-list of DCP's own record classes, and
  DCP's non-tensor items through ``weights_only=True`` as well. Anything else is
  refused with :class:`UnsafeCheckpointError` before any of it runs.
* :func:`diff` compares two checkpoints by name, type and content digest, so
  unchanged tensors compare without reading their data.
"""
from __future__ import annotations

import io
import json
import logging
import math
import os
import pickle
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from ckptstore.commit.atomic import atomic_write
from ckptstore.errors import (
    CheckpointNotFoundError,
    CkptError,
    CorruptCheckpointError,
    UnsafeCheckpointError,
    UnsupportedTypeError,
)
from ckptstore.interop.diff import DiffReport, diff
from ckptstore.interop.guard import is_damage, load_safetensors, pickle_reason, torch_load
from ckptstore.interop.hfread import LOOKED_FOR, hf_weights, read_hf
from ckptstore.interop.select import InteropUsageError, select, split_parent
from ckptstore.read.lazy import KeySpec, open as open_lazy
from ckptstore.storage import open_storage
from ckptstore.storage.base import check_name

log = logging.getLogger(__name__)


# -- export -------------------------------------------------------------------

def export_safetensors(path: "str | os.PathLike", out: "str | os.PathLike", *,
                       keys: KeySpec = None, strip_prefix: str | None = None,
                       verify: bool = True, storage_options: dict | None = None,
                       progress: Callable[[int], None] | None = None) -> list[str]:
    """Write the torch tensors of checkpoint ``path`` to the safetensors file ``out``.

    ``keys`` selects names or prefixes (e.g. ``"model."``); ``strip_prefix`` removes
    a prefix from the written names (``"model."`` gives plain state_dict names; keys
    without it are skipped). Non-tensor values and numpy arrays are not weights and
    are left out. Aliases (tied weights) are written once per name, as copies (for a
    folder that ``from_pretrained`` loads, see :func:`ckptstore.interop.hf.export_hf`).
    Returns the written names. The file is written atomically. Raises
    :class:`InteropUsageError` when the selection matches no tensor.
    """
    from safetensors.torch import save as st_save

    ckpt = open_lazy(path, verify=verify, storage_options=storage_options)
    sel = select(ckpt, keys=keys, strip_prefix=strip_prefix)
    flat = ckpt.flat({e.name for e in sel.entries}.__contains__)
    tensors: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    for e in sel.entries:
        t = flat[e.name]
        if id(t) in seen:  # an alias (tied weights): safetensors stores each name's own copy
            t = t.clone()
        seen.add(id(t))
        tensors[e.out] = t
    try:
        data = st_save(tensors, metadata={"format": "pt", "exported_by": "ckptstore"})
    except (TypeError, ValueError, KeyError) as e:
        raise UnsupportedTypeError(f"safetensors cannot store these tensors: {e}") from None
    folder, name = split_parent(os.fspath(out))
    storage = open_storage(folder, storage_options)
    storage.makedirs()
    atomic_write(storage, name, [data])
    if progress is not None:
        progress(sum(e.nbytes for e in sel.entries))
    return list(tensors)


# -- import -------------------------------------------------------------------

#: staging memory of an import is capped at this (the source is streamed through it)
IMPORT_STAGING = 1 << 30

#: what a file or folder must be to be imported
KNOWN_FORMATS = (f"a .safetensors file, a torch.save file (zip or pickle), a DCP directory (.metadata), "
                 f"or {LOOKED_FOR}")


@dataclass(frozen=True, slots=True)
class Imported:
    """What :func:`import_checkpoint` read and saved."""

    source: str
    format: str  #: "hf", "safetensors", "torch", "dcp"
    dest: str
    tensors: int
    nbytes: int
    metadata_keys: tuple[str, ...]
    result: Any  #: the save's SaveResult

    def to_json(self) -> dict:
        return {"source": self.source, "format": self.format, "dest": self.dest,
                "tensors": self.tensors, "bytes": self.nbytes,
                "metadata_keys": list(self.metadata_keys), "result": repr(self.result)}


def import_checkpoint(src: "str | os.PathLike", dest: "str | os.PathLike", *,
                      compression: str = "auto", overwrite: bool = False,
                      storage_options: dict | None = None,
                      progress: Callable[[int], None] | None = None) -> Imported:
    """Convert ``src`` (a ``.safetensors`` file, a ``torch.save`` file, a DCP
    directory, or a Hugging Face model folder or its ``model.safetensors.index.json``,
    all local) into a committed ckptstore checkpoint at ``dest``.

    A Hugging Face folder becomes the flat state dict, with ``config.json`` (and
    ``generation_config.json``) in the metadata (see :mod:`ckptstore.interop.hf`);
    its shards are memory-mapped one at a time and streamed through at most
    ``IMPORT_STAGING`` bytes of staging memory. Raises :class:`UnsafeCheckpointError`
    for a file that would need arbitrary unpickling (nothing in it is executed) and
    :class:`CheckpointNotFoundError`, naming the formats looked for, for anything else.
    """
    from ckptstore.api.save import save

    state, metadata, kind = read_source(src, progress)
    tensors = _tensors(state)
    nbytes = sum(t.numel() * t.element_size() for t in tensors)
    handle = save(state, dest, compression=compression, overwrite=overwrite,
                  storage_options=storage_options, metadata=metadata or None,
                  staging_budget=IMPORT_STAGING if nbytes > IMPORT_STAGING else None)
    result = handle.wait()
    return Imported(os.fspath(src), kind, os.fspath(dest), len(tensors), nbytes,
                    tuple(metadata), result)


def _tensors(node: Any) -> list[torch.Tensor]:
    if isinstance(node, torch.Tensor):
        return [node]
    if isinstance(node, dict):
        return [t for v in node.values() for t in _tensors(v)]
    if isinstance(node, (list, tuple)):
        return [t for v in node for t in _tensors(v)]
    return []


def read_source(src: "str | os.PathLike", progress: Callable[[int], None] | None = None
                ) -> tuple[Any, dict, str]:
    """(state, metadata, format name) of a foreign checkpoint, without arbitrary unpickling."""
    src = os.fspath(src)
    kind = "hf" if hf_weights(src) is not None and not os.path.isfile(os.path.join(src, ".metadata")) \
        else _format(src)
    metadata: dict = {}
    try:
        if kind == "hf":
            state, metadata = read_hf(src, progress)
            return state, metadata, kind
        state = read_dcp(src) if kind == "dcp" else (
            read_safetensors(src) if kind == "safetensors" else read_torch_save(src))
    except (CkptError, FileNotFoundError, PermissionError):
        raise
    except Exception as e:  # a damaged file of a known format: one typed line, not a traceback
        msg = str(e).splitlines()[0][:300] if str(e) else ""
        raise CorruptCheckpointError(f"{src} is not a readable {kind} checkpoint: {type(e).__name__} "
                                     f"{msg}".rstrip()) from None
    if progress is not None:
        progress(_size(src))
    return state, metadata, kind


def read_foreign(src: "str | os.PathLike") -> Any:
    """Load a foreign checkpoint into a state tree, without arbitrary unpickling."""
    return read_source(src)[0]


def _format(src: str) -> str:
    """"dcp", "safetensors" or "torch" from a path's content; anything else is refused
    with the formats looked for (a torch.load of it would blame unpickling)."""
    if os.path.isdir(src):
        if not os.path.isfile(os.path.join(src, ".metadata")):
            raise CheckpointNotFoundError(f"{src} is a directory holding none of: .metadata (DCP), "
                                          f"{LOOKED_FOR}")
        return "dcp"
    if not os.path.isfile(src):
        raise CheckpointNotFoundError(f"{src} does not exist")
    with open(src, "rb") as f:
        head = f.read(9)
    if (len(head) == 9 and head[8:9] == b"{") or src.endswith(".safetensors"):
        return "safetensors"  # read_safetensors checks the header length and size
    if head[:4] == b"PK\x03\x04" or (len(head) >= 2 and head[0] == 0x80 and 2 <= head[1] <= 5):
        return "torch"  # a zip (torch.save) or a pickle (legacy torch.save)
    raise CheckpointNotFoundError(f"{src} is none of the formats ckptstore imports: {KNOWN_FORMATS}")


def source_bytes(src: "str | os.PathLike") -> int:
    """Bytes of the files an import of ``src`` reads (for a progress bar); 0 if unknown."""
    src = os.fspath(src)
    try:
        found = hf_weights(src)
        if found is None:
            return _size(src) if os.path.exists(src) else 0
        folder, weights = found
        names = {weights}
        if weights.endswith(".index.json"):
            with open(os.path.join(folder, weights), "rb") as f:
                names = {v for v in json.load(f)["weight_map"].values() if isinstance(v, str)}
        return sum(os.path.getsize(os.path.join(folder, check_name(n))) for n in names)
    except (OSError, ValueError, KeyError, TypeError, AttributeError, RecursionError):
        return 0  # read_source reports what is wrong


def _size(src: str) -> int:
    if os.path.isdir(src):
        return sum(os.path.getsize(os.path.join(src, n)) for n in os.listdir(src)
                   if os.path.isfile(os.path.join(src, n)))
    return os.path.getsize(src)


def read_safetensors(src: str) -> dict[str, torch.Tensor]:
    """The tensors of a ``.safetensors`` file, its header checked first (limits,
    offsets, dtypes: see :mod:`ckptstore.interop.guard`)."""
    return load_safetensors(src)


def read_torch_save(src: str) -> Any:
    """``torch.load(weights_only=True)``: tensors, containers and plain values only."""
    return torch_load(src)


# -- DCP ----------------------------------------------------------------------

#: the only globals a DCP ``.metadata`` pickle may name: DCP's own plain records
_DCP_GLOBALS = {
    "torch.distributed.checkpoint.metadata": {
        "Metadata", "TensorStorageMetadata", "TensorProperties", "ChunkStorageMetadata",
        "BytesStorageMetadata", "MetadataIndex", "StorageMeta", "_MEM_FORMAT_ENCODING"},
    "torch.distributed.checkpoint.filesystem": {"_StorageInfo"},
    "torch.serialization": {"_get_layout"},
    "torch": {"Size"},
    "collections": {"OrderedDict"},
    "pathlib": {"PosixPath", "PurePosixPath", "WindowsPath", "PureWindowsPath", "Path"},
}


class _MetadataUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if name in _DCP_GLOBALS.get(module, ()):
            return super().find_class(module, name)
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        raise UnsafeCheckpointError(
            f"DCP .metadata names {module}.{name}, which is not one of DCP's metadata records; "
            "ckptstore does not unpickle arbitrary objects, so it refuses this checkpoint")


def read_dcp_metadata(src: str) -> Any:
    """Unpickle ``src/.metadata`` with only DCP's record classes allowed."""
    from torch.distributed.checkpoint.metadata import Metadata

    try:
        with open(os.path.join(src, ".metadata"), "rb") as f:
            md = _MetadataUnpickler(f).load()
    except UnsafeCheckpointError:
        raise
    except Exception as e:  # a damaged pickle raises almost anything
        raise CorruptCheckpointError(f"{src}/.metadata is not a valid DCP metadata file: {e}") from None
    if not isinstance(md, Metadata):
        raise CorruptCheckpointError(f"{src}/.metadata holds a {type(md).__name__}, not DCP Metadata")
    return md


def read_dcp(src: str) -> Any:
    """Read a DCP checkpoint directory into a (nested, when DCP recorded how) state."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.api import CheckpointException
    from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
    from torch.distributed.checkpoint.metadata import BytesStorageMetadata, TensorStorageMetadata

    md = read_dcp_metadata(src)
    budget = _dcp_budget(src, md)
    state: dict[str, Any] = {}
    total = 0
    for fqn, item in md.state_dict_metadata.items():
        if isinstance(item, TensorStorageMetadata):
            dtype = item.properties.dtype
            if not isinstance(dtype, torch.dtype) or len(item.size) > 64:
                raise UnsafeCheckpointError(f"DCP entry {fqn!r} has a malformed tensor description")
            total += math.prod(item.size) * dtype.itemsize
            if total > budget:
                raise UnsafeCheckpointError(f"DCP metadata asks for more tensor bytes ({total}) "
                                            f"than the checkpoint's files could hold ({budget})")
            state[fqn] = torch.empty(tuple(item.size), dtype=dtype)
        elif isinstance(item, BytesStorageMetadata):
            state[fqn] = None  # filled by the planner below
        else:
            raise CorruptCheckpointError(f"DCP entry {fqn!r} has unknown metadata {type(item).__name__}")

    class _Reader(dcp.FileSystemReader):
        def read_metadata(self, *args: Any, **kwargs: Any) -> Any:
            return md

    class _Planner(DefaultLoadPlanner):
        def load_bytes(self, read_item: Any, value: io.BytesIO) -> None:
            # DCP's own planner unpickles these with weights_only=False
            try:
                obj = torch.load(value, map_location="cpu", weights_only=True)
            except pickle.UnpicklingError as e:
                if is_damage(pickle_reason(e)):
                    raise CorruptCheckpointError(f"DCP item {read_item.dest_index.fqn!r} is damaged "
                                                 f"({pickle_reason(e)})") from None
                raise UnsafeCheckpointError(
                    f"DCP item {read_item.dest_index.fqn!r} needs arbitrary unpickling; "
                    f"refused ({pickle_reason(e)})") from None
            # dcp.load hands the planner a shallow copy of ``state``: keep our own
            byte_items[read_item.dest_index.fqn] = obj

    byte_items: dict[str, Any] = {}
    try:
        dcp.load(state, storage_reader=_Reader(src), planner=_Planner(flatten_state_dict=False))
    except CheckpointException as e:
        # DCP gathers per-rank failures; ours (refusals, damage) keep their own type
        why = []
        for err in getattr(e, "failures", {}).values():
            err = err[0] if isinstance(err, tuple) else err  # (exception, traceback) pairs
            if isinstance(err, CkptError):
                raise err from None
            first = str(err).strip().splitlines()[:1]
            why.append(f"{type(err).__name__}: {first[0][:300]}" if first else type(err).__name__)
        raise CorruptCheckpointError(f"DCP could not read {src} (missing or truncated data files?): "
                                     f"{'; '.join(why) or type(e).__name__}") from None
    missing = [k for k, v in state.items() if v is None and k not in byte_items]
    if missing:
        raise CorruptCheckpointError(f"DCP checkpoint {src} did not provide {missing}")
    state.update(byte_items)
    return _nest(state, md.planner_data)


def _dcp_budget(src: str, md: Any) -> int:
    """Bound on tensor bytes a DCP directory can hold (guards absurd metadata), and
    check that every data file it names stays inside the directory."""
    transformed = False
    for info in (md.storage_data or {}).values():
        rel = getattr(info, "relative_path", None)
        if not isinstance(rel, str):
            raise UnsafeCheckpointError("DCP metadata names a data file that is not a string")
        check_name(rel)
        transformed |= bool(getattr(info, "transform_descriptors", None))
    size = sum(os.path.getsize(os.path.join(src, n)) for n in os.listdir(src)
               if os.path.isfile(os.path.join(src, n)))
    # compressed (transformed) items may expand; raw ones cannot exceed the files
    return size * (64 if transformed else 1) + (1 << 20)


def _nest(flat: dict[str, Any], planner_data: Any) -> Any:
    """Rebuild nesting from DCP's flatten mapping {fqn: path} the way DCP itself does
    (``set_element``: int path keys are list positions); flat when there is none."""
    from torch.distributed.checkpoint._traverse import set_element

    if not isinstance(planner_data, dict) or set(planner_data) != set(flat):
        return flat
    out: dict[Any, Any] = {}
    for fqn, value in flat.items():
        path = planner_data[fqn]
        if not isinstance(path, tuple) or not path or not isinstance(path[0], str) or not all(
                type(k) in (str, int) and (type(k) is str or 0 <= k < 1 << 20) for k in path):
            return flat
        set_element(out, path, value)
    return out


__all__ = ["DiffReport", "Imported", "InteropUsageError", "diff", "export_safetensors", "import_checkpoint",
           "read_foreign", "read_source", "source_bytes"]
