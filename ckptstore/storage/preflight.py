"""Checks before work starts: can a save write here, and what is at a path that holds
no checkpoint (so that an error can say what to do instead).

Both use only the :class:`~ckptstore.storage.base.Storage` interface (and a backend's
own ``check_writable`` where it has one); neither imports torch.
"""
from __future__ import annotations

import posixpath
import struct

from ckptstore.storage.base import Storage, wrapped_storages

#: the name of the file whose absence means "not committed" (manifest.records.MANIFEST_NAME;
#: storage sits below manifest, so it is spelled here once more)
MANIFEST = "manifest.json"
STEP_PREFIX = "step-"


def check_writable(storage: Storage) -> None:
    """Raise :class:`~ckptstore.errors.DestinationNotWritableError` if a save to
    ``storage`` cannot work (read-only file system or directory, no permission, a file
    where a directory must be, a read-only fsspec protocol), naming the path and what
    to do. Wrappers (fault injection) are looked through; backends without a cheap
    check pass."""
    for obj in wrapped_storages(storage):
        check = getattr(type(obj), "check_writable", None)
        if callable(check):
            check(obj)


def sniff_file(head: bytes, name: str) -> str | None:
    """What kind of file starts with ``head`` (its first bytes): ``"torch.save"``,
    ``"safetensors"``, ``"numpy"`` or None. ``name`` breaks ties by extension."""
    ext = posixpath.splitext(name)[1].lower()
    if head.startswith(b"PK\x03\x04"):  # torch.save's zip format names <archive>/data.pkl
        if b"data.pkl" in head or b"/version" in head or ext in (".pt", ".pth", ".bin", ".ckpt"):
            return "torch.save"
        return None
    if head[:1] == b"\x80" and ext in (".pt", ".pth", ".bin", ".ckpt"):  # legacy pickle format
        return "torch.save"
    if len(head) >= 9 and head[8:9] == b"{":
        (n,) = struct.unpack("<Q", head[:8])
        if 2 <= n <= 100_000_000:
            return "safetensors"
    if head.startswith(b"\x93NUMPY"):
        return "numpy"
    if ext == ".safetensors":
        return "safetensors"
    return None


def root_file(storage: Storage) -> tuple[Storage, str] | None:
    """(parent, name) if the root of ``storage`` is a file, else None."""
    url = storage.url.rstrip("/")
    name = posixpath.basename(url)
    if not name:
        return None
    parent = storage.parent()
    if parent.exists(name) and not parent.isdir(name):
        return parent, name
    return None


def describe(storage: Storage) -> str | None:
    """Why ``storage`` holds no checkpoint and what to do instead, as one sentence,
    or None when there is nothing better to say than "manifest.json is missing".
    Never raises (it only improves an error message)."""
    try:
        return _describe(storage)
    except Exception:  # noqa: BLE001 - a hint must never hide the real error
        return None


def _describe(storage: Storage) -> str | None:
    url = storage.url
    found = root_file(storage)
    if found is not None:
        parent, name = found
        kind = sniff_file(parent.read(name, 0, 128), name)
        if kind in ("torch.save", "safetensors"):
            return (f"this is a {kind} file, not a checkpoint directory; convert it with "
                    f"`ckptstore import {url} DEST`"
                    + (" (weights and plain values only)" if kind == "torch.save" else ""))
        if kind == "numpy":
            return "this is a numpy .npy file, not a checkpoint directory; load it with numpy.load"
        return f"this is a file, not a checkpoint directory (a checkpoint is a directory holding {MANIFEST})"
    try:
        entries = storage.listdir("")
    except FileNotFoundError:
        entries = []
    if not entries and not storage.isdir(""):
        return "the path does not exist"
    steps = [e for e in entries if e.startswith(STEP_PREFIX) and storage.isdir(e)]
    if steps:
        return (f"this is a run directory with {len(steps)} step directories, not one checkpoint; "
                f"list them with `ckptstore ls {url}`, or pass one step, e.g. "
                f"{posixpath.join(url, steps[-1])}")
    if ".metadata" in entries:
        return ("this is a torch.distributed.checkpoint (DCP) directory; convert it with "
                f"`ckptstore import {url} DEST`")
    if not entries:
        return f"this is an empty directory ({MANIFEST} is missing)"
    return None
