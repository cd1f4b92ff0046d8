"""Checks that an import runs before a foreign file's parser does.

A ``.safetensors`` file's 8-byte header length, the header's size and its tensor
count are bounded up front (a valid file with a 99 MB header of a million empty
tensors would otherwise take minutes and gigabytes), and its entries are checked
(known dtypes, shapes matching the byte ranges, ranges inside the file, no overlaps,
no duplicate names) so that every malformed file raises a typed error that says
what is wrong. ``torch.load(weights_only=True)`` failures are sorted into refusals
(:class:`UnsafeCheckpointError`: the file names a global that is not allowed) and
damage (:class:`CorruptCheckpointError`: everything else the unpickler or the zip
reader raises).

The limits are :data:`MAX_HEADER_BYTES` and :data:`MAX_TENSORS`; the environment
variables :data:`HEADER_ENV` and :data:`TENSORS_ENV` raise them for a trusted file.
"""
from __future__ import annotations

import json
import math
import os
import pickle
import pickletools
import re
import zipfile
from typing import Any

import torch

from ckptstore.errors import CorruptCheckpointError, UnsafeCheckpointError
from ckptstore.interop.select import InteropUsageError
from ckptstore.manifest.jsonio import refuse_duplicate_keys

#: a safetensors header (JSON) larger than this is refused (real ones are KBs to a few MBs)
MAX_HEADER_BYTES = 32 << 20
#: a safetensors file (or shard) with more tensors than this is refused
MAX_TENSORS = 100_000
HEADER_ENV = "CKPTSTORE_IMPORT_MAX_HEADER_BYTES"
TENSORS_ENV = "CKPTSTORE_IMPORT_MAX_TENSORS"

#: bits per element of every safetensors dtype
DTYPE_BITS = {"BOOL": 8, "U8": 8, "I8": 8, "F8_E4M3": 8, "F8_E5M2": 8, "F8_E8M0": 8, "I16": 16,
              "U16": 16, "F16": 16, "BF16": 16, "I32": 32, "U32": 32, "F32": 32, "I64": 64, "U64": 64,
              "F64": 64, "C64": 64, "F4": 4, "F6_E2M3": 6, "F6_E3M2": 6}

_OPCODES = frozenset(op.code for op in pickletools.opcodes)
#: words of torch's weights_only refusals that mean damage, not a forbidden object
_DAMAGE_WORDS = ("truncated", "protocol", "MARK", "memo", "Unexpected", "unexpected")


def limit(env: str, default: int) -> int:
    """``default``, or the positive integer in environment variable ``env``."""
    raw = os.environ.get(env)
    if raw is None or not raw.strip():
        return default
    try:
        value = int(raw.replace("_", ""))
    except ValueError:
        value = 0
    if value <= 0:
        raise InteropUsageError(f"{env}={raw!r} is not a positive integer; set it to a number of "
                                f"{'bytes' if env == HEADER_ENV else 'tensors'} or unset it")
    return value


def _too_many(src: str, what: str, got: int, allowed: int, env: str) -> UnsafeCheckpointError:
    return UnsafeCheckpointError(
        f"{src}: {what} {got} exceeds the import limit of {allowed} ({env}); if the file is "
        f"trusted, raise it, e.g. {env}={max(got, allowed * 2)} ckptstore import ...")


_no_dup_pairs = refuse_duplicate_keys("the header names {key} twice")


def check_safetensors(src: str) -> int:
    """Check ``src``'s header against the limits and its own size before safetensors
    parses it; return the number of tensors. Raises :class:`UnsafeCheckpointError`
    for a limit or an overlap, :class:`CorruptCheckpointError` for other damage."""
    size = os.path.getsize(src)
    if size < 8:
        raise CorruptCheckpointError(f"{src} is truncated: {size} bytes, shorter than the 8-byte "
                                     "header length of a safetensors file")
    with open(src, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        max_header = limit(HEADER_ENV, MAX_HEADER_BYTES)
        if n > max_header:
            raise _too_many(src, "safetensors header size (bytes)", n, max_header, HEADER_ENV)
        if n + 8 > size:
            raise CorruptCheckpointError(f"{src} is not a valid safetensors file: its header length ({n}) "
                                         f"runs past the end of the file ({size} bytes); truncated?")
        raw = f.read(n)
    max_tensors = limit(TENSORS_ENV, MAX_TENSORS)
    if raw.count(b'"data_offsets"') > max_tensors:  # before parsing: a cheap upper bound
        raise _too_many(src, "tensor count", raw.count(b'"data_offsets"'), max_tensors, TENSORS_ENV)
    try:
        header = json.loads(raw, object_pairs_hook=_no_dup_pairs)
    except UnsafeCheckpointError as e:
        raise UnsafeCheckpointError(f"{src} is not a valid safetensors file: {e}") from None
    except (ValueError, RecursionError) as e:
        raise CorruptCheckpointError(f"{src} is not a valid safetensors file: bad header JSON "
                                     f"({str(e)[:200]})") from None
    if not isinstance(header, dict):
        raise CorruptCheckpointError(f"{src} is not a valid safetensors file: its header is not a JSON object")
    entries = {k: v for k, v in header.items() if k != "__metadata__"}
    if len(entries) > max_tensors:
        raise _too_many(src, "tensor count", len(entries), max_tensors, TENSORS_ENV)
    spans = sorted((_span(src, name, e, size - 8 - n), name) for name, e in entries.items())
    for ((_, end), a), ((begin, _), b) in zip(spans, spans[1:]):
        if begin < end:
            raise UnsafeCheckpointError(f"{src}: tensors {a!r} and {b!r} overlap in the file")
    return len(entries)


def _span(src: str, name: str, e: Any, data_len: int) -> tuple[int, int]:
    """(begin, end) of entry ``name`` after checking its dtype, shape and range."""
    bad = f"{src} is not a valid safetensors file: tensor {name!r}"
    if not isinstance(e, dict) or e.get("dtype") not in DTYPE_BITS:
        dtype = e.get("dtype") if isinstance(e, dict) else None
        raise CorruptCheckpointError(f"{bad} has an unknown dtype {dtype!r} (known: {', '.join(DTYPE_BITS)})")
    shape, offs = e.get("shape"), e.get("data_offsets")
    if not isinstance(shape, list) or len(shape) > 64 or not all(
            type(d) is int and 0 <= d < 1 << 62 for d in shape):
        raise CorruptCheckpointError(f"{bad} has a malformed shape {str(shape)[:80]}")
    if not isinstance(offs, list) or len(offs) != 2 or not all(type(o) is int for o in offs) or \
            not 0 <= offs[0] <= offs[1]:
        raise CorruptCheckpointError(f"{bad} has malformed data_offsets {str(offs)[:80]}")
    if offs[1] > data_len:
        raise CorruptCheckpointError(f"{bad} ends at byte {offs[1]} of a data section of {data_len} "
                                     "bytes: offsets out of range (truncated file?)")
    nbytes = math.prod(shape) * DTYPE_BITS[e["dtype"]]
    if nbytes != (offs[1] - offs[0]) * 8:
        raise CorruptCheckpointError(f"{bad}: shape {shape} of {e['dtype']} does not match its "
                                     f"{offs[1] - offs[0]} bytes")
    return offs[0], offs[1]


def load_safetensors(src: str) -> dict[str, torch.Tensor]:
    """:func:`check_safetensors`, then safetensors' own (memory-mapped) load."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    check_safetensors(src)
    try:
        return load_file(src)
    except (SafetensorError, ValueError, TypeError, KeyError) as e:
        raise CorruptCheckpointError(f"{src} is not a valid safetensors file: {e}") from None


def pickle_reason(e: BaseException) -> str:
    """The line of torch's weights_only refusal that says what it met (the rest of
    its message explains how to load the file unsafely)."""
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    for i, ln in enumerate(lines):
        if "WeightsUnpickler error:" in ln:
            rest = ln.split("WeightsUnpickler error:", 1)[1].strip()
            ln = rest or (lines[i + 1] if i + 1 < len(lines) else ln)
            return ln.split(" Please use")[0][:300]  # not advice to allow-list it
        if "unsupported" in ln.lower() or "GLOBAL" in ln:
            return ln.split(" Please use")[0][:300]
    told = [ln for ln in lines[1:] if not ln.startswith(("Check the documentation", "Please file an issue"))]
    return (told or lines or [type(e).__name__])[-1][:300]


def is_damage(reason: str) -> bool:
    """Whether a weights_only refusal's reason (:func:`pickle_reason`) means a damaged
    pickle rather than a forbidden object."""
    found = re.search(r"Unsupported operand (\d+)", reason)
    if found:  # a real pickle opcode torch's safe unpickler lacks (a plain pickle) is a refusal
        return int(found.group(1)) > 255 or chr(int(found.group(1))) not in _OPCODES
    return any(w in reason for w in _DAMAGE_WORDS)


def torch_load(src: str, *, mmap: bool = False) -> Any:
    """``torch.load(weights_only=True)`` with every failure typed: a global that is
    not allowed is :class:`UnsafeCheckpointError`, anything else the damaged zip or
    pickle raises is :class:`CorruptCheckpointError`."""
    try:
        return torch.load(src, map_location="cpu", weights_only=True,
                          mmap=mmap and zipfile.is_zipfile(src))
    except pickle.UnpicklingError as e:
        reason = pickle_reason(e)
        if is_damage(reason):
            raise CorruptCheckpointError(f"{src} is not a readable torch.save file: {reason}") from None
        raise UnsafeCheckpointError(
            f"{src} cannot be loaded with torch.load(weights_only=True): it needs arbitrary "
            "unpickling, which could run code, so ckptstore refuses it. If you trust the file, "
            "load it yourself, convert the objects to tensors and plain values, and save that "
            f"({reason})") from None
    except (MemoryError, OverflowError) as e:
        raise CorruptCheckpointError(f"{src} is not a readable torch.save file: it asks for an "
                                     f"impossible size ({type(e).__name__})") from None
    except OSError as e:
        if isinstance(e, (FileNotFoundError, PermissionError, IsADirectoryError)):
            raise
        raise CorruptCheckpointError(f"{src} is not a readable torch.save file: {e}") from None
    except Exception as e:  # a damaged zip or pickle raises almost anything
        msg = str(e).splitlines()[0][:300] if str(e) else ""
        raise CorruptCheckpointError(f"{src} is not a readable torch.save file: "
                                     f"{type(e).__name__} {msg}".rstrip()) from None


__all__ = ["DTYPE_BITS", "HEADER_ENV", "MAX_HEADER_BYTES", "MAX_TENSORS", "TENSORS_ENV", "check_safetensors",
           "is_damage", "limit", "load_safetensors", "pickle_reason", "torch_load"]
