"""Plan: which bytes go to which file, decided before anything is copied.

A tensor's raw bytes are cut into chunks of ``chunk_size`` (counted from the start of
the tensor). Files are filled in tree order up to ``shard_size``; a tensor larger
than that is split across files at chunk boundaries. Each file's data section is the
pieces' raw bytes back to back, exactly as they sit in the staging region, so an
uncompressed shard is written with one large ``write`` of staged memory.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from ckptstore.plan.tree import Leaf, path_name

#: torch dtype -> safetensors dtype name; anything else is written as U8 bytes
ST_DTYPES = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8",
    torch.uint8: "U8", torch.bool: "BOOL", torch.float8_e4m3fn: "F8_E4M3",
    torch.float8_e5m2: "F8_E5M2", torch.uint16: "U16", torch.uint32: "U32", torch.uint64: "U64",
    torch.complex64: "C64",
}
DATA_ALIGN = 4096  #: file offset of an uncompressed shard's data section
GROUPED = {torch.float16: 2, torch.bfloat16: 2, torch.float32: 4}


@dataclass(frozen=True, slots=True)
class TensorPlan:
    """One array leaf: its identity in the manifest and how it is laid out."""

    id: int
    name: str
    kind: str  # "torch" | "numpy"
    dtype: str  # torch dtype name or numpy dtype string
    shape: tuple[int, ...]
    nbytes: int
    itemsize: int
    group: int  # byte-grouping width used when compressing
    st_dtype: str  # safetensors dtype of the header entry
    nchunks: int


@dataclass(frozen=True, slots=True)
class Piece:
    """Bytes ``[start, start+length)`` of a tensor, at ``offset`` in its file's data."""

    tensor: int
    start: int
    length: int
    first_chunk: int
    offset: int


@dataclass(frozen=True, slots=True)
class FilePlan:
    name: str
    format: str  # "safetensors" | "chunks"
    pieces: tuple[Piece, ...]
    nbytes: int  # raw data bytes (staging region size)
    header: bytes  # safetensors header (length prefix included) or b""


@dataclass(frozen=True, slots=True)
class SavePlan:
    tensors: tuple[TensorPlan, ...]
    files: tuple[FilePlan, ...]
    chunk_size: int

    @property
    def nbytes(self) -> int:
        return sum(f.nbytes for f in self.files)


def _describe(leaf: Leaf) -> tuple[str, str, tuple, int, int, int, str]:
    v = leaf.value
    if isinstance(v, torch.Tensor):
        dt = v.dtype
        itemsize = dt.itemsize
        st = ST_DTYPES.get(dt, "U8")
        return ("torch", str(dt).removeprefix("torch."), tuple(v.shape), v.numel() * itemsize,
                itemsize, GROUPED.get(dt, 1), st)
    assert isinstance(v, np.ndarray)
    try:
        st = ST_DTYPES.get(torch.from_numpy(np.empty(0, dtype=v.dtype)).dtype, "U8")
    except TypeError:
        st = "U8"
    return ("numpy", v.dtype.str, tuple(v.shape), v.nbytes, v.dtype.itemsize, 1, st)


def make_plan(leaves: list[Leaf], *, chunk_size: int, shard_size: int, compressed: bool,
              save_id: str, byte_grouping: bool = True) -> SavePlan:
    """Lay out every leaf into files; pure function of its inputs."""
    assert chunk_size % 64 == 0 and shard_size >= chunk_size
    tensors = []
    used: set[str] = set()
    for leaf in leaves:
        kind, dtype, shape, nbytes, itemsize, group, st = _describe(leaf)
        name = path_name(leaf.path)
        if name in used:
            name = f"{name}~{leaf.id}"
        used.add(name)
        tensors.append(TensorPlan(leaf.id, name, kind, dtype, shape, nbytes, itemsize,
                                  group if compressed and byte_grouping else 1, st,
                                  math.ceil(nbytes / chunk_size)))
    # greedy packing; pieces of big tensors start new files
    files_pieces: list[list[Piece]] = [[]]
    fill = 0
    max_piece = shard_size // chunk_size * chunk_size
    for t in tensors:
        start = 0
        while True:
            length = min(t.nbytes - start, max_piece)
            if fill and fill + length > shard_size:
                files_pieces.append([])
                fill = 0
            files_pieces[-1].append(Piece(t.id, start, length, start // chunk_size, fill))
            fill += length
            start += length
            if start >= t.nbytes:
                break
    ext = "chunks" if compressed else "safetensors"
    files = []
    for i, pieces in enumerate(p for p in files_pieces if p):
        name = f"shard-{i:05d}-{save_id}.{ext}"
        nbytes = sum(p.length for p in pieces)
        header = b"" if compressed else _st_header(pieces, tensors, save_id)
        files.append(FilePlan(name, ext, tuple(pieces), nbytes, header))
    return SavePlan(tuple(tensors), tuple(files), chunk_size)


def _st_header(pieces: list[Piece], tensors: list[TensorPlan], save_id: str) -> bytes:
    """A safetensors header for a file of uncompressed pieces."""
    entries: dict[str, Any] = {"__metadata__": {"format": "pt", "writer": "ckptstore",
                                                "save_id": save_id}}
    for p in pieces:
        t = tensors[p.tensor]
        whole = p.start == 0 and p.length == t.nbytes
        if t.st_dtype == "U8" and t.itemsize != 1 or (t.kind == "numpy" and t.st_dtype == "U8"):
            shape: list[int] = [p.length]
        elif whole:
            shape = list(t.shape)
        else:
            shape = [p.length // t.itemsize]
        key = t.name if whole else f"{t.name}#{p.start // t.itemsize}"
        entries[key] = {"dtype": t.st_dtype, "shape": shape,
                        "data_offsets": [p.offset, p.offset + p.length]}
    text = json.dumps(entries, separators=(",", ":")).encode()
    # Padded with spaces (which safetensors allows) so that the data section starts
    # on a page boundary: shards are then written with O_DIRECT straight from the
    # page-aligned staging arena, and read back into aligned memory.
    text += b" " * (-(8 + len(text)) % DATA_ALIGN)
    return len(text).to_bytes(8, "little") + text
