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
import functools
import io
import json
import math
import operator
import os
import secrets
from dataclasses import dataclass
from typing import Any

import numpy as np
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

from ckptstore import manifest as fmt
from ckptstore.commit.atomic import commit_manifest
from ckptstore.distributed.reshard import read_boxes, whole_shards
from ckptstore.errors import CheckpointExistsError, CorruptCheckpointError
from ckptstore.manifest import builder
from ckptstore.manifest.io import read_manifest
from ckptstore.pipeline.engine import engine
from ckptstore.pipeline.options import DEFAULT_CHUNK, SaveOptions
from ckptstore.pipeline.pipeline import SavePipeline
from ckptstore.plan.tree import Leaf, torch_dtype
from ckptstore.read.reader import read_tensors
from ckptstore.storage import Storage, open_storage


@dataclass(frozen=True, slots=True)
class StoredItem:
    """Where one WriteItem's bytes went (travels to the coordinator in a WriteResult)."""

    files: tuple[fmt.FileRecord, ...]  # the rank's files, on its first item only
    chunks: tuple[fmt.ChunkRecord, ...]
    nbytes: int


class CkptStoreWriter(StorageWriter):
    """A DCP StorageWriter writing a ckptstore checkpoint at ``path``.

    Each rank's items go through the same save pipeline as :func:`ckptstore.save`
    (staging, writer processes, chunk codec and hashes, atomic files); the
    coordinator's ``finish`` builds the manifest with the same builder and commits it."""

    def __init__(self, path: str | os.PathLike | Storage, *, compression: str = "auto",
                 zstd_level: int = 1, byte_grouping: bool = True,
                 chunk_size: int = DEFAULT_CHUNK, overwrite: bool = False,
                 storage_options: dict | None = None) -> None:
        super().__init__()
        self.options = SaveOptions(compression, zstd_level, byte_grouping, None, chunk_size,
                                   overwrite=overwrite)
        self.path = path
        self.storage_options = storage_options
        self.save_id = secrets.token_hex(6)
        self.is_coordinator = False

    @property
    def storage(self) -> Storage:
        return open_storage(self.path, self.storage_options)

    def reset(self, checkpoint_id: str | os.PathLike | None = None) -> None:
        if checkpoint_id:
            self.path = checkpoint_id
        self.save_id = secrets.token_hex(6)

    @classmethod
    def validate_checkpoint_id(cls, checkpoint_id: str | os.PathLike) -> bool:
        return isinstance(checkpoint_id, (str, os.PathLike))

    def set_up_storage_writer(self, is_coordinator: bool, *args: Any, **kwargs: Any) -> None:
        self.is_coordinator = is_coordinator

    def storage_meta(self) -> StorageMeta | None:
        return StorageMeta(checkpoint_id=str(self.storage.url), save_id=self.save_id)

    def prepare_local_plan(self, plan: SavePlan) -> SavePlan:
        storage = self.storage
        if not self.options.overwrite and storage.exists(fmt.MANIFEST_NAME):
            raise CheckpointExistsError(f"{storage.url} already holds a committed checkpoint; "
                                        "pass overwrite=True to replace it")
        storage.makedirs()
        self.options = self.options.for_storage(storage)
        return plan

    def prepare_global_plan(self, plans: list[SavePlan]) -> list[SavePlan]:
        # every rank writes its own files, named by its position in the global plan
        return [dataclasses.replace(p, storage_data=f"r{i}") for i, p in enumerate(plans)]

    def write_data(self, plan: SavePlan, planner: SavePlanner) -> Future:
        leaves = []
        for i, item in enumerate(plan.items):
            data = planner.resolve_data(item)
            if item.type == WriteItemType.BYTE_IO:
                buf = data.getbuffer() if isinstance(data, io.BytesIO) else bytes(data)
                value: Any = np.frombuffer(buf, dtype=np.uint8)
            else:
                value = data.detach()
            offsets = "" if item.index.offset is None else "@" + ",".join(map(str, item.index.offset))
            leaves.append(Leaf(i, (item.index.fqn + offsets,), value))
        eng = engine()
        pipe = SavePipeline(eng, self.storage, self.options)
        # held until the files are written: the next save reuses the staging memory
        with eng.admit("wait"):
            rank_id = f"{self.save_id}-{plan.storage_data or 'r0'}"
            staged = pipe.stage(leaves, pipe.plan(leaves, rank_id))
            try:
                tensors, files = builder.file_records(pipe.written(staged))
            except BaseException:
                pipe.discard(staged.files)
                raise
        results = [WriteResult(index=item.index, size_in_bytes=t.nbytes,
                               storage_data=StoredItem(files if k == 0 else (), t.chunks, t.nbytes))
                   for k, (item, t) in enumerate(zip(plan.items, tensors))]
        fut: Future = Future()
        fut.set_result(results)
        return fut

    def finish(self, metadata: Metadata, results: list[list[WriteResult]]) -> None:
        stored = {(r.index.fqn, _key(r.index.offset)): r.storage_data
                  for rs in results for r in rs}
        files = [f for rs in results for r in rs for f in r.storage_data.files]
        tensors: list[fmt.TensorRecord] = []
        items: list[list[Any]] = []
        byte_keys: list[str] = []
        for fqn, md in metadata.state_dict_metadata.items():
            if isinstance(md, BytesStorageMetadata):
                s = stored[(fqn, None)]
                rec = builder.tensor_record(fqn, "numpy", "|u1", (s.nbytes,), s.nbytes,
                                            [((0,), (s.nbytes,), s.chunks)])
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
        manifest = builder.assemble(
            save_id=self.save_id, chunk_size=self.options.chunk_size,
            compression=self.options.compression, metadata={"dcp": dcp_meta},
            tree={"T": "dict", "items": items}, tensors=tensors, files=files,
            via="torch.distributed.checkpoint")
        fmt.validate(manifest)
        commit_manifest(self.storage, manifest, overwrite=self.options.overwrite)


def _key(offset: Any) -> tuple | None:
    return None if offset is None else tuple(offset)


def _tensor_record(fqn: str, md: TensorStorageMetadata, stored: dict) -> fmt.TensorRecord:
    shape = tuple(md.size)
    dtype = md.properties.dtype
    parts = [(tuple(c.offsets), tuple(c.sizes), stored[(fqn, tuple(c.offsets))].chunks)
             for c in md.chunks if math.prod(c.sizes)]
    return builder.tensor_record(fqn, "torch", str(dtype).removeprefix("torch."), shape,
                                 math.prod(shape) * dtype.itemsize, parts)


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
                                      select=functools.partial(operator.is_, m.tensors[i])).values()
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
