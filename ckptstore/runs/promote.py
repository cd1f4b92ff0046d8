"""Promotion: copy one committed checkpoint to another tier with the commit protocol.

Order, the same as a save: every data object is uploaded (bounded parallelism; s3fs
and gcsfs switch to multipart/resumable uploads for large objects) and verified —
the source chunks against the manifest's hashes before they leave, the stored object
by size and the backend's own checksum (GCS crc32c, S3 MD5 ETag of a single-part
upload) — then the manifest is created last, create-only. Never copy+delete.

Incremental checkpoints reference files held by older steps (``FileRecord.base``).
A referenced file that the destination tier already holds under that step stays a
reference; one it lacks is uploaded into the promoted step itself and the record's
``base`` cleared, so the promoted checkpoint is complete on the destination alone.

This module must not import torch: it runs in a spawned promotion process.
"""
from __future__ import annotations

import base64
import concurrent.futures as cf
import hashlib
import logging
from dataclasses import dataclass, replace

from ckptstore import manifest as fmt
from ckptstore.commit.atomic import atomic_write
from ckptstore.errors import CheckpointExistsError, CorruptCheckpointError, StorageError
from ckptstore.storage.base import Storage
from ckptstore.storage.capabilities import ObjectInfo
from ckptstore.verify.checks import bytes_damage

log = logging.getLogger("ckptstore.promote")
UPLOAD_THREADS = 4


@dataclass(frozen=True, slots=True)
class PromoteResult:
    """What one promotion did."""

    name: str
    dst: str
    files: int  #: data files the promoted manifest names
    uploaded_files: int
    uploaded_bytes: int
    already: bool  #: the destination already held this very checkpoint


def promote_step(src_root: Storage, dst_root: Storage, name: str, *,
                 threads: int = UPLOAD_THREADS) -> PromoteResult:
    """Copy committed checkpoint ``name`` from ``src_root`` to ``dst_root``. Decisions
    use its manifest as this library reads it (migrated); the committed manifest
    bytes are copied unchanged unless file references must be rewritten."""
    src, dst = src_root.child(name), dst_root.child(name)
    data, m = fmt.read_manifest_bytes(src)
    if dst.exists(fmt.MANIFEST_NAME):
        return _already(dst, m, name)
    dst.makedirs()
    uploads: list[tuple[Storage, fmt.FileRecord]] = []
    records = []
    for f in m.files:
        if f.base is not None:
            holder = dst_root.child(f.base)
            if _holds(holder, f):
                records.append(f)
                continue
            uploads.append((src_root.child(f.base), f))
            records.append(replace(f, base=None))
        else:
            uploads.append((src, f))
            records.append(f)
    chunks_of = _chunks_by_file(m)
    with cf.ThreadPoolExecutor(max(1, min(threads, len(uploads) or 1)),
                               thread_name_prefix="ckptstore-upload") as ex:
        sizes = list(ex.map(lambda sf: _copy_file(sf[0], dst, sf[1], chunks_of.get(sf[1].name, [])),
                            uploads))
    if records != list(m.files):
        data = fmt.encode(replace(m, files=tuple(records)))
    try:
        atomic_write(dst, fmt.MANIFEST_NAME, [data], exclusive=True)
    except FileExistsError:
        return _already(dst, m, name)
    log.info("promoted %s to %s (%d files, %d bytes uploaded)", name, dst.url, len(uploads),
             sum(sizes))
    return PromoteResult(name, dst.url, len(records), len(uploads), sum(sizes), False)


def _already(dst: Storage, m: fmt.Manifest, name: str) -> PromoteResult:
    try:
        there = fmt.read_manifest(dst)
    except CorruptCheckpointError:
        there = None
    if there is None or there.save_id != m.save_id:
        raise CheckpointExistsError(
            f"{dst.url} already holds a different committed checkpoint for {name}; "
            "it was not replaced (remove it first if it is wrong)")
    return PromoteResult(name, dst.url, len(there.files), 0, 0, True)


def _holds(holder: Storage, f: fmt.FileRecord) -> bool:
    try:
        return holder.size(f.name) == f.size
    except FileNotFoundError:
        return False


def _chunks_by_file(m: fmt.Manifest) -> dict[str, list[tuple[str, int, fmt.ChunkRecord]]]:
    out: dict[str, list] = {}
    for t in m.tensors:
        for i, c in enumerate(t.chunks):
            out.setdefault(c.file, []).append((t.name, i, c))
    return out


def _copy_file(src: Storage, dst: Storage, f: fmt.FileRecord, chunks) -> int:
    """Read one file, check it against the manifest, upload it, check the upload."""
    data = src.read(f.name)
    for damage in bytes_damage(f, data, chunks):
        raise damage.error(f"{src.url}: ", "; a damaged checkpoint is never promoted")
    atomic_write(dst, f.name, [data])
    verify_upload(dst, f.name, data)
    return len(data)


def verify_upload(dst: Storage, name: str, data: bytes) -> None:
    """Compare the stored object with the bytes sent: size always, and the backend's
    checksum where it reports one."""
    if not isinstance(dst, ObjectInfo):
        if dst.size(name) != len(data):
            raise StorageError(f"{dst.url}/{name}: stored size differs from the bytes sent")
        return
    meta = dst.info(name)
    if int(meta.get("size", -1)) != len(data):
        raise StorageError(f"{dst.url}/{name}: stored {meta.get('size')} bytes, sent {len(data)}")
    crc = meta.get("crc32c")
    if crc:
        import google_crc32c

        mine = base64.b64encode(google_crc32c.value(data).to_bytes(4, "big")).decode()
        if mine != crc:
            raise StorageError(f"{dst.url}/{name}: crc32c {crc} of the stored object differs "
                               f"from {mine} of the bytes sent")
        return
    etag = str(meta.get("ETag") or meta.get("etag") or "").strip('"')
    if etag and "-" not in etag and len(etag) == 32:  # single-part S3 upload: MD5
        if hashlib.md5(data, usedforsecurity=False).hexdigest() != etag:
            raise StorageError(f"{dst.url}/{name}: ETag {etag} differs from the MD5 of the "
                               "bytes sent")
