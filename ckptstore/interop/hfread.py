"""Read a Hugging Face model folder (``save_pretrained``) as a flat state dict.

Accepted: a folder with ``model.safetensors``, a folder with
``model.safetensors.index.json`` and its shards, or the index file itself (older
``pytorch_model.bin`` folders too, read with ``torch.load(weights_only=True)``). The
tensors are memory maps of the shard files, opened one shard at a time (nothing is
read into memory here; the save that follows streams them). ``config.json`` and
``generation_config.json`` go to the metadata under the keys of
:mod:`ckptstore.interop.hf`.
"""
from __future__ import annotations

import json
import os
from collections.abc import Callable
from typing import Any

import torch

from ckptstore.errors import CheckpointNotFoundError, CorruptCheckpointError, UnsafeCheckpointError
from ckptstore.interop.guard import load_safetensors, torch_load
from ckptstore.interop.hf import CONFIG_KEY, CONFIG_NAME, GENERATION_KEY, GENERATION_NAME, INDEX_NAME, SINGLE_NAME
from ckptstore.storage.base import check_name

BIN_NAME = "pytorch_model.bin"  #: older save_pretrained (torch.save, read with weights_only)
BIN_INDEX_NAME = "pytorch_model.bin.index.json"
#: weight files of a Hugging Face folder, in the order save_pretrained prefers them
WEIGHT_FILES = (INDEX_NAME, SINGLE_NAME, BIN_INDEX_NAME, BIN_NAME)

#: what a folder or file must look like to be read as a Hugging Face model
LOOKED_FOR = f"{SINGLE_NAME} or {INDEX_NAME} (or {BIN_NAME}[.index.json]) of a Hugging Face model folder"

MAX_JSON = 64 << 20  #: config and index files larger than this are refused


def hf_weights(src: str) -> tuple[str, str] | None:
    """(folder, weights file or index file) when ``src`` is a Hugging Face model
    folder or its index file; None otherwise."""
    if os.path.isdir(src):
        for name in WEIGHT_FILES:
            if os.path.isfile(os.path.join(src, name)):
                return src, name
        return None
    if os.path.isfile(src) and src.endswith((".safetensors.index.json", ".bin.index.json")):
        return os.path.dirname(os.path.abspath(src)), os.path.basename(src)
    return None


def read_hf(src: str, progress: Callable[[int], None] | None = None
            ) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The flat state dict of a Hugging Face folder and its metadata
    (``{"hf_config": ..., "hf_generation_config": ...}``, those present)."""
    found = hf_weights(src)
    if found is None:
        raise CheckpointNotFoundError(f"{src} holds neither {LOOKED_FOR}")
    folder, weights = found
    shards: dict[str, list[str] | None] = {weights: None}
    if weights.endswith(".index.json"):
        shards = dict(_shards(folder, weights))
    state: dict[str, torch.Tensor] = {}
    for fname, names in shards.items():
        got = _read_shard(os.path.join(folder, fname))
        if names is not None:
            missing = sorted(set(names) - set(got))
            if missing:
                raise CorruptCheckpointError(f"{fname} lacks tensors its index names: {missing[:5]}")
            extra = set(got) - set(names)
            got = {k: v for k, v in got.items() if k not in extra}
        dup = set(got) & set(state)
        if dup:
            raise CorruptCheckpointError(f"{fname} repeats tensors of another shard: {sorted(dup)[:5]}")
        state.update(got)
        if progress is not None:
            progress(os.path.getsize(os.path.join(folder, fname)))
    metadata = {}
    for key, name in ((CONFIG_KEY, CONFIG_NAME), (GENERATION_KEY, GENERATION_NAME)):
        if os.path.isfile(os.path.join(folder, name)):
            metadata[key] = _json(os.path.join(folder, name))
    return state, metadata


def _shards(folder: str, index: str) -> dict[str, list[str]]:
    """{shard file: [tensor names]} from the index's weight_map, files checked to
    stay inside the folder and to exist."""
    data = _json(os.path.join(folder, index))
    wmap = data.get("weight_map")
    if not isinstance(wmap, dict) or not wmap:
        raise CorruptCheckpointError(f"{index} has no weight_map")
    shards: dict[str, list[str]] = {}
    for name, fname in wmap.items():
        if not isinstance(name, str) or not isinstance(fname, str):
            raise CorruptCheckpointError(f"{index}: weight_map entries must be strings")
        try:
            check_name(fname)
        except UnsafeCheckpointError:
            raise UnsafeCheckpointError(f"{index} names the shard {fname!r}, which is outside {folder}; "
                                        "an index may only name files inside its folder") from None
        shards.setdefault(fname, []).append(name)
    for fname in shards:
        if not os.path.isfile(os.path.join(folder, fname)):
            raise CorruptCheckpointError(f"{index} names {fname}, which is not in {folder}")
    return shards


def _read_shard(path: str) -> dict[str, torch.Tensor]:
    """The tensors of one weights file, memory-mapped (never unpickled freely); the
    header of a safetensors shard is checked first (:mod:`ckptstore.interop.guard`)."""
    if path.endswith(".safetensors"):
        return load_safetensors(path)
    got = torch_load(path, mmap=True)
    if not isinstance(got, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                            for k, v in got.items()):
        raise CorruptCheckpointError(f"{path} does not hold a state dict of tensors")
    return got


def _json(path: str) -> dict:
    if os.path.getsize(path) > MAX_JSON:
        raise CorruptCheckpointError(f"{path} is larger than {MAX_JSON} bytes; not a config or index")
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (ValueError, RecursionError) as e:
        raise CorruptCheckpointError(f"{path} is not valid JSON: {str(e)[:200]}") from None
    if not isinstance(data, dict):
        raise CorruptCheckpointError(f"{path} does not hold a JSON object")
    return data


__all__ = ["LOOKED_FOR", "WEIGHT_FILES", "hf_weights", "read_hf"]
