"""``torch.distributed.checkpoint`` storage backed by ckptstore.

``dcp.save(sd, storage_writer=CkptStoreWriter(path))`` and
``dcp.load(sd, storage_reader=CkptStoreReader(path))``: DCP plans what each rank
writes and reads (dedup of replicas, resharding); ckptstore decides how the bytes
are stored: chunked, byte-grouped and compressed, xxh3-128 per chunk, files written
through the atomic-write path, and a ckptstore manifest written last by the
coordinator as the commit. The result is an ordinary ckptstore checkpoint:
``ckptstore.load`` / ``fsck`` / tiers work on it, and its metadata is JSON, never
pickle. (DCP's own planner still unpickles values it saved as bytes with
``torch.save``; tensors never take that path.)

Call order (from DCP): ``reset`` -> ``set_up_storage_writer`` -> ``prepare_local_plan``
-> ``prepare_global_plan`` (coordinator) -> ``write_data`` (every rank) -> ``finish``
(coordinator, after gathering every rank's WriteResults; DCP raises the same
CheckpointException on every rank when any rank failed).
"""
from __future__ import annotations

import dataclasses
import datetime as _dt
import io
import json
import math
import os
import platform
import secrets
from dataclasses import dataclass
from typing import Any

import torch
from torch.distributed.checkpoint.metadata import (
    BytesStorageMetadata,
    ChunkStorageMetadata,
    Metadata,
    StorageMeta,
    TensorProperties,
    TensorStorageMetadata,
)
from torch.distributed.checkpoint.planner import (
    LoadItemType,
    LoadPlan,
    LoadPlanner,
    SavePlan,
    SavePlanner,
    WriteItemType,
)
from torch.distributed.checkpoint.storage import StorageReader, StorageWriter, WriteResult
from torch.futures import Future

from ckptstore import __version__, manifest as fmt
from ckptstore.commit.atomic import AtomicFile, commit_manifest
from ckptstore.distributed.reshard import read_boxes, whole_shards
from ckptstore.errors import CheckpointExistsError, CorruptCheckpointError
from ckptstore.manifest.io import read_manifest
from ckptstore.pipeline import codec as _codec
from ckptstore.plan.layout import GROUPED
from ckptstore.plan.tree import torch_dtype
from ckptstore.read.reader import read_tensors
from ckptstore.storage import Storage, open_storage

DEFAULT_CHUNK = 16 << 20


@dataclass(frozen=True, slots=True)
class StoredItem:
    """Where one WriteItem's bytes went (travels to the coordinator in a WriteResult)."""

    file: fmt.FileRecord | None  # set on the last item of each file
    chunks: tuple  # fmt.ChunkRecord
    nbytes: int


class CkptStoreWriter(StorageWriter):
    """A DCP StorageWriter writing a ckptstore checkpoint at ``path``."""

    def __init__(self, path: "str | os.PathLike | Storage", *, compression: str = "zstd",
                 zstd_level: int = 1, byte_grouping: bool = True,
                 chunk_size: int = DEFAULT_CHUNK, overwrite: bool = False,
                 storage_options: dict | None = None) -> None:
        if compression not in ("zstd", "lz4", "none"):
            raise ValueError(f"compression must be zstd, lz4 or none, not {compression!r}")
        if chunk_size <= 0 or chunk_size % 64:
            raise ValueError("chunk_size must be a positive multiple of 64")
        super().__init__()
        self.path, self.compression, self.level = path, compression, zstd_level
        self.byte_grouping, self.chunk_size, self.overwrite = byte_grouping, chunk_size, overwrite
        self.storage_options = storage_options
        self.save_id = secrets.token_hex(6)
        self.is_coordinator = False

    @property
    def storage(self) -> Storage:
        return open_storage(self.path, self.storage_options)

    def reset(self, checkpoint_id: "str | os.PathLike | None" = None) -> None:
        if checkpoint_id:
            self.path = checkpoint_id
        self.save_id = secrets.token_hex(6)

    @classmethod
    def validate_checkpoint_id(cls, checkpoint_id: "str | os.PathLike") -> bool:
        return isinstance(checkpoint_id, (str, os.PathLike))

    def set_up_storage_writer(self, is_coordinator: bool, *args: Any, **kwargs: Any) -> None:
        self.is_coordinator = is_coordinator

    def storage_meta(self) -> StorageMeta | None:
        return StorageMeta(checkpoint_id=str(self.storage.url), save_id=self.save_id)

    def prepare_local_plan(self, plan: SavePlan) -> SavePlan:
        storage = self.storage
        if not self.overwrite and storage.exists(fmt.MANIFEST_NAME):
            raise CheckpointExistsError(f"{storage.url} already holds a committed checkpoint; "
                                        "pass overwrite=True to replace it")
        storage.makedirs()
        return plan

    def prepare_global_plan(self, plans: list[SavePlan]) -> list[SavePlan]:
        # every rank writes its own file, named by its position in the global plan
        return [dataclasses.replace(p, storage_data=f"r{i}") for i, p in enumerate(plans)]

    def write_data(self, plan: SavePlan, planner: SavePlanner) -> Future:
        storage = self.storage
        name = f"dcp-{plan.storage_data or 'r0'}-{self.save_id}.chunks"
        codec = "raw" if self.compression == "none" else self.compression
        items: list[tuple[Any, tuple, int]] = []
        pos = 0
        with AtomicFile(storage, name) as f:
            for item in plan.items:
                if item.type == WriteItemType.BYTE_IO:
                    buf = planner.resolve_data(item)
                    raw = memoryview(buf.getbuffer() if isinstance(buf, io.BytesIO) else bytes(buf))
                    group = 1
                else:
                    t = planner.resolve_data(item).detach().cpu().contiguous()
                    raw = memoryview(_bytes_of(t))
                    group = GROUPED.get(t.dtype, 1) if codec != "raw" and self.byte_grouping else 1
                chunks = []
                for start in range(0, len(raw), self.chunk_size):
                    piece = raw[start:start + self.chunk_size]
                    enc = _codec.encode_chunk(piece, group, codec, self.level)
                    for _, data in enc.planes:
                        f.write(data)
                    chunks.append(fmt.ChunkRecord(name, pos, enc.length, len(piece), enc.group,
                                                  tuple((c, len(d)) for c, d in enc.planes),
                                                  enc.hash, enc.raw_hash))
                    pos += enc.length
                items.append((item, tuple(chunks), len(raw)))
        record = fmt.FileRecord(name, pos, "chunks", 0, fmt.hash_bytes(b""))
        results = [WriteResult(index=item.index, size_in_bytes=n,
                               storage_data=StoredItem(record if k == len(items) - 1 else None,
                                                       chunks, n))
                   for k, (item, chunks, n) in enumerate(items)]
        fut: Future = Future()
        fut.set_result(results)
        return fut

    def finish(self, metadata: Metadata, results: list[list[WriteResult]]) -> None:
        storage = self.storage
        stored = {(r.index.fqn, _key(r.index.offset)): r.storage_data
                  for rs in results for r in rs}
        files = [r.storage_data.file for rs in results for r in rs if r.storage_data.file]
        tensors, items, byte_keys = [], [], []
        for fqn, md in metadata.state_dict_metadata.items():
            if isinstance(md, BytesStorageMetadata):
                s = stored[(fqn, None)]
                rec = fmt.TensorRecord(fqn, "numpy", "|u1", (s.nbytes,), s.nbytes,
                                       fmt.digest_of([c.raw_hash for c in s.chunks]), s.chunks)
                byte_keys.append(fqn)
                node = {"T": "ndarray", "id": len(tensors)}
            else:
                rec = _tensor_record(fqn, md, stored)
                node = {"T": "tensor", "id": len(tensors)}
            tensors.append(rec)
            items.append([fqn, node])
        dcp_meta: dict[str, Any] = {"version": metadata.version, "bytes": byte_keys}
        try:
            dcp_meta["planner_data"] = json.loads(json.dumps(metadata.planner_data))
        except (TypeError, ValueError):
            pass  # not JSON (a custom planner): DCP's default load does not need it
        manifest = fmt.Manifest(
            schema_version=fmt.SCHEMA_VERSION,
            writer={"library": "ckptstore", "version": __version__, "torch": torch.__version__,
                    "python": platform.python_version(), "via": "torch.distributed.checkpoint"},
            created=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            save_id=self.save_id, chunk_size=self.chunk_size, compression=self.compression,
            metadata={"dcp": dcp_meta}, tree={"T": "dict", "items": items},
            tensors=tuple(tensors), files=tuple(files))
        fmt.validate(manifest)
        commit_manifest(storage, manifest, overwrite=self.overwrite)


def _key(offset: Any) -> tuple | None:
    return None if offset is None else tuple(offset)


def _bytes_of(t: torch.Tensor):
    n = t.numel() * t.element_size()
    if n == 0:
        return b""
    return torch.empty(0, dtype=torch.uint8).set_(t.untyped_storage(), t.storage_offset() * t.element_size(),
                                                  (n,), (1,)).numpy()


def _tensor_record(fqn: str, md: TensorStorageMetadata, stored: dict) -> fmt.TensorRecord:
    shape = tuple(md.size)
    dtype = md.properties.dtype
    boxes = sorted((tuple(c.offsets), tuple(c.sizes)) for c in md.chunks if math.prod(c.sizes))
    parts = [(o, s, stored[(fqn, o)]) for o, s in boxes]
    chunks = tuple(c for _, _, p in parts for c in p.chunks)
    whole = len(parts) == 1 and parts[0][1] == shape
    shards = () if whole or not parts else tuple(
        fmt.ShardRecord(o, s, len(p.chunks)) for o, s, p in parts)
    return fmt.TensorRecord(fqn, "torch", str(dtype).removeprefix("torch."), shape,
                            math.prod(shape) * dtype.itemsize,
                            fmt.digest_of([c.raw_hash for c in chunks]), chunks, shards)


class CkptStoreReader(StorageReader):
    """A DCP StorageReader for any ckptstore checkpoint (written by DCP through
    :class:`CkptStoreWriter` or by ``ckptstore.save``); every chunk read is verified."""

    def __init__(self, path: "str | os.PathLike | Storage", *, verify: bool = True,
                 storage_options: dict | None = None) -> None:
        super().__init__()
        self.path, self.verify, self.storage_options = path, verify, storage_options
        self._manifest: fmt.Manifest | None = None

    @property
    def storage(self) -> Storage:
        return open_storage(self.path, self.storage_options)

    def manifest(self) -> fmt.Manifest:
        if self._manifest is None:
            self._manifest = read_manifest(self.storage)
        return self._manifest

    def reset(self, checkpoint_id: "str | os.PathLike | None" = None) -> None:
        if checkpoint_id:
            self.path = checkpoint_id
        self._manifest = None

    @classmethod
    def validate_checkpoint_id(cls, checkpoint_id: "str | os.PathLike") -> bool:
        return isinstance(checkpoint_id, (str, os.PathLike))

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        m = self.manifest()
        dcp_meta = m.metadata.get("dcp") if isinstance(m.metadata, dict) else None
        dcp_meta = dcp_meta if isinstance(dcp_meta, dict) else {}
        byte_keys = set(dcp_meta.get("bytes") or ())
        sdm: dict[str, Any] = {}
        for rec in m.tensors:
            if rec.name in byte_keys:
                sdm[rec.name] = BytesStorageMetadata()
            elif rec.kind == "torch":
                sdm[rec.name] = TensorStorageMetadata(
                    TensorProperties(dtype=torch_dtype(rec.dtype)), torch.Size(rec.shape),
                    [ChunkStorageMetadata(offsets=torch.Size(h.offsets), sizes=torch.Size(h.shape))
                     for h in whole_shards(rec)])
        planner_data = dcp_meta.get("planner_data")
        if isinstance(planner_data, dict):  # JSON turned the object paths into lists
            planner_data = {k: tuple(v) if isinstance(v, list) else v
                            for k, v in planner_data.items()}
        return Metadata(state_dict_metadata=sdm, planner_data=planner_data,
                        storage_meta=StorageMeta(checkpoint_id=str(self.storage.url),
                                                 load_id=secrets.token_hex(6)),
                        version=dcp_meta.get("version"))

    def set_up_storage_reader(self, metadata: Metadata, is_coordinator: bool, *args: Any,
                              **kwargs: Any) -> None:
        self.manifest()

    def prepare_local_plan(self, plan: LoadPlan) -> LoadPlan:
        return plan

    def prepare_global_plan(self, plans: list[LoadPlan]) -> list[LoadPlan]:
        return plans

    def read_data(self, plan: LoadPlan, planner: LoadPlanner) -> Future:
        m, storage = self.manifest(), self.storage
        index = {rec.name: i for i, rec in enumerate(m.tensors)}
        boxes, tensor_items = [], []
        for item in plan.items:
            fqn = item.storage_index.fqn
            if fqn not in index:
                raise CorruptCheckpointError(f"{storage.url} holds no tensor {fqn!r}")
            if item.type == LoadItemType.BYTE_IO:
                i = index[fqn]
                (arr,) = read_tensors(storage, m, verify=self.verify,
                                      select=lambda r, want=m.tensors[i]: r is want).values()
                planner.load_bytes(item, io.BytesIO(arr.tobytes()))
                continue
            base = tuple(item.storage_index.offset or ())
            start = tuple(b + o for b, o in zip(base, item.storage_offsets)) or ()
            boxes.append((index[fqn], start if base else tuple(item.storage_offsets),
                          tuple(item.lengths)))
            tensor_items.append(item)
        for item, data in zip(tensor_items, read_boxes(storage, m, boxes, verify=self.verify)):
            target = planner.resolve_tensor(item).detach()
            if target.shape != data.shape:
                raise CorruptCheckpointError(f"{item.storage_index.fqn}: read {list(data.shape)}, "
                                             f"DCP expects {list(target.shape)}")
            target.copy_(data)
            planner.commit_tensor(item, target)
        fut: Future = Future()
        fut.set_result(None)
        return fut
