"""The one manifest builder: chunk records from the writers' results, sharded
tensors joined from their boxes, and the manifest with its writer block.

Used by single-process saves, by the coordinator of a distributed save (which
joins every rank's records) and by the DCP storage writer.
"""
from __future__ import annotations

import datetime as _dt
import platform
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any

from ckptstore import manifest as fmt
from ckptstore.version import __version__

if TYPE_CHECKING:  # the builder reads the pipeline's records; it does not run it
    from ckptstore.pipeline.pipeline import Written

#: one box of a sharded tensor: global offsets, shape and the chunks that hold it
Part = tuple[tuple[int, ...], tuple[int, ...], tuple[fmt.ChunkRecord, ...]]


def assemble(*, save_id: str, chunk_size: int, compression: str, metadata: Any, tree: Any,
             tensors: Sequence[fmt.TensorRecord], files: Sequence[fmt.FileRecord],
             **writer: Any) -> fmt.Manifest:
    """A manifest of these records, stamped with the library that wrote it; extra
    keyword arguments go into its ``writer`` block (e.g. ``world_size``)."""
    import torch  # loaded already by every saver; this package stays importable without it

    return fmt.Manifest(
        schema_version=fmt.SCHEMA_VERSION,
        writer={"library": "ckptstore", "version": __version__, "torch": torch.__version__,
                "python": platform.python_version(), **writer},
        created=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        save_id=save_id, chunk_size=chunk_size, compression=compression, metadata=metadata,
        tree=tree, tensors=tuple(tensors), files=tuple(files))


def tensor_record(name: str, kind: str, dtype: str, shape: tuple[int, ...], nbytes: int,
                  parts: Iterable[Part]) -> fmt.TensorRecord:
    """A tensor stored as one or more boxes (ordered by offset); a single box that
    covers the whole tensor is recorded without shards."""
    parts = sorted(parts, key=lambda p: p[0])
    chunks = tuple(c for _, _, cs in parts for c in cs)
    whole = len(parts) <= 1 and all(s == tuple(shape) for _, s, _ in parts)
    shards = () if whole else tuple(fmt.ShardRecord(o, s, len(cs)) for o, s, cs in parts)
    return fmt.TensorRecord(name, kind, dtype, tuple(shape), nbytes,
                            fmt.digest_of([c.raw_hash for c in chunks]), chunks, shards)


def file_records(written: "Written", prev: fmt.Manifest | None = None, base: str | None = None
                 ) -> tuple[tuple[fmt.TensorRecord, ...], tuple[fmt.FileRecord, ...]]:
    """Tensor and file records of one writer's files (in plan order). A chunk the
    writer found unchanged in the base checkpoint ``prev`` keeps that checkpoint's
    record, and the file holding it is listed as linked from ``base`` (or from
    the step that file already lives in)."""
    plan = written.plan
    chunks: list[list[fmt.ChunkRecord | None]] = [[None] * t.nchunks for t in plan.tensors]
    prev_recs = {t.name: t for t in prev.tensors} if prev is not None else {}
    linked: dict[str, fmt.FileRecord] = {}
    for r in written.results:
        for c in r.chunks:
            if c.reused:  # the base checkpoint's chunk, in whichever step holds its file
                assert prev is not None and base is not None
                old = prev_recs[plan.tensors[c.tensor].name].chunks[c.index]
                f = prev.file(old.file)
                linked[f.name] = fmt.FileRecord(f.name, f.size, f.format, f.header_length,
                                                f.header_hash, f.base or base)
                chunks[c.tensor][c.index] = old
                continue
            chunks[c.tensor][c.index] = fmt.ChunkRecord(
                r.name, c.offset, c.length, c.raw_length, c.group, c.planes, c.hash, c.raw_hash)
    tensors = []
    for t in plan.tensors:
        cs = tuple(c for c in chunks[t.id] if c is not None)
        assert len(cs) == t.nchunks, f"missing chunks for {t.name}"
        tensors.append(fmt.TensorRecord(t.name, t.kind, t.dtype, t.shape, t.nbytes,
                                        fmt.digest_of([c.raw_hash for c in cs]), cs))
    files = tuple(fmt.FileRecord(fp.name, r.size, fp.format, len(fp.header),
                                 fmt.hash_bytes(fp.header))
                  for fp, r in zip(plan.files, written.results))
    return tuple(tensors), files + tuple(linked[n] for n in sorted(linked))
