"""CLI subcommand ``inspect``: what a checkpoint holds, from its manifest alone.

No tensor data is read: names, kinds, dtypes, shapes, stored and raw sizes and chunk
counts come from the tensor records; other values (numbers, strings, ...) from the
state tree stored in the manifest; then the save id, creation time, compression and
user metadata.

``--json`` fields: ``path``, ``save_id``, ``created``, ``schema_version``, ``writer``,
``compression``, ``chunk_size``, ``files``, ``chunks``, ``stored_bytes``,
``raw_bytes``, ``metadata`` and ``entries``: for an array ``name``, ``kind``
("torch"/"numpy"), ``dtype``, ``shape``, ``stored_bytes``, ``raw_bytes``, ``chunks``,
``sharded``; for another value ``name``, ``kind`` ("value"), ``type``, ``value``
(its ``repr``, shortened).
"""
from __future__ import annotations

import argparse
import json
import reprlib
from dataclasses import dataclass
from typing import Any

from ckptstore.cli.base import command, common_options, emit, storage_options
from ckptstore.cli.runs import human

SHORT = reprlib.Repr()
SHORT.maxstring, SHORT.maxother, SHORT.maxlist, SHORT.maxdict = 200, 60, 6, 6


@dataclass(frozen=True, slots=True)
class _Array:
    """An array leaf of the tree (its data is never read)."""

    index: int


def _inspect_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("path", help="checkpoint directory or URL")
    p.add_argument("--keys", action="append", default=[], metavar="PREFIX",
                   help="show only these names or prefixes (repeatable), e.g. model.")
    common_options(p)


@command("inspect", "show a checkpoint's tree, dtypes, shapes, sizes and metadata (manifest only)",
         _inspect_args)
def _inspect(args) -> int:
    from ckptstore.manifest.io import read_manifest
    from ckptstore.plan.tree import unflatten
    from ckptstore.read.into import leaves_of
    from ckptstore.read.lazy import check_keys, key_filter, node_names
    from ckptstore.storage import open_storage

    storage = open_storage(args.path, storage_options(args))
    m = read_manifest(storage)
    tree = unflatten(m.tree, lambda kind, i: _Array(i))
    keys = args.keys or None
    check_keys(keys, node_names(tree), storage.url)
    pick = key_filter(keys)
    entries: list[dict[str, Any]] = []
    for name, (value, _parent, _key) in leaves_of(tree).items():
        if pick is not None and not pick(name):
            continue
        if isinstance(value, _Array):
            t = m.tensors[value.index]
            entries.append({"name": name, "kind": t.kind, "dtype": t.dtype, "shape": list(t.shape),
                            "stored_bytes": sum(c.length for c in t.chunks), "raw_bytes": t.nbytes,
                            "chunks": len(t.chunks), "sharded": bool(t.shards)})
        else:
            entries.append({"name": name, "kind": "value", "type": type(value).__name__,
                            "value": SHORT.repr(value)})
    payload = {"path": storage.url, "save_id": m.save_id, "created": m.created,
               "schema_version": m.schema_version, "writer": m.writer, "compression": m.compression,
               "chunk_size": m.chunk_size, "files": len(m.files),
               "chunks": sum(len(t.chunks) for t in m.tensors),
               "stored_bytes": sum(c.length for t in m.tensors for c in t.chunks),
               "raw_bytes": sum(t.nbytes for t in m.tensors), "metadata": m.metadata,
               "entries": entries}
    emit(args, payload, _text(payload))
    return 0


def _text(p: dict[str, Any]) -> str:
    w = p["writer"] if isinstance(p["writer"], dict) else {}
    arrays = [e for e in p["entries"] if e["kind"] != "value"]
    lines = [p["path"],
             f"  save id {p['save_id']}, created {p['created']}, schema {p['schema_version']}, "
             f"written by ckptstore {w.get('version', '?')} (torch {w.get('torch', '?')})",
             f"  compression {p['compression']}, chunk size {human(p['chunk_size'])}, "
             f"{p['chunks']} chunks in {p['files']} files, {human(p['stored_bytes'])} stored, "
             f"{human(p['raw_bytes'])} raw",
             f"  metadata: {SHORT.repr(json.dumps(p['metadata'], default=str))[1:-1]}"]
    head = ("name", "kind", "dtype", "shape", "stored", "raw", "chunks")
    rows = [(e["name"], e["kind"] + (" (sharded)" if e["sharded"] else ""), e["dtype"], str(e["shape"]),
             human(e["stored_bytes"]), human(e["raw_bytes"]), str(e["chunks"])) for e in arrays]
    values = [(e["name"], e["type"], e["value"]) for e in p["entries"] if e["kind"] == "value"]
    widths = [max([len(r[i]) for r in [head, *rows]] + ([len(v[i]) for v in values] if i < 2 else []))
              for i in range(7)]
    for r in [head, *rows]:
        lines.append("  ".join(c.ljust(widths[i]) if i < 4 else c.rjust(widths[i])
                               for i, c in enumerate(r)).rstrip())
    for v in values:
        lines.append(f"{v[0].ljust(widths[0])}  {v[1].ljust(widths[1])}  {v[2]}")
    lines.append(f"{len(arrays)} arrays, {len(p['entries']) - len(arrays)} other values")
    return "\n".join(lines)
