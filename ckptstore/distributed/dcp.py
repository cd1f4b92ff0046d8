"""``torch.distributed.checkpoint`` storage backed by ckptstore.

``dcp.save(sd, storage_writer=CkptStoreWriter(path))`` and
``dcp.load(sd, storage_reader=CkptStoreReader(path))``: DCP plans what each rank
writes and reads (dedup of replicas, resharding); ckptstore decides how the bytes
are stored: chunked, byte-grouped and compressed, xxh3-128 per chunk, files written
through the atomic-write path, and a ckptstore manifest written last by the
coordinator as the commit. The result is an ordinary ckptstore checkpoint:
``ckptstore.load`` / ``fsck`` / tiers work on it and give the nested state that was
given to ``dcp.save`` (DCP's flatten mapping tells the nesting; DCP turns every dict
key into a string). Non-tensor values are stored as typed JSON, never pickle: the
writer takes them from the planner's state, and the reader hands DCP's load planner
the bytes of ``torch.save(value)`` that it expects, built from the decoded value.
Only a value typed JSON cannot hold (an arbitrary object, or a container holding
tensors) keeps DCP's pickled bytes, which ``ckptstore.load`` returns as a uint8 array.
The reader serves plain ``ckptstore.save`` checkpoints too (:mod:`.dcp_tree`).

Call order (from DCP): ``reset`` -> ``set_up_storage_writer`` -> ``prepare_local_plan``
-> ``prepare_global_plan`` (coordinator) -> ``write_data`` (every rank) -> ``finish``
(coordinator, after gathering every rank's WriteResults; DCP raises the same
CheckpointException on every rank when any rank failed).

A failed save leaves no file of itself. DCP calls ``finish`` only when no rank raised,
so a rank whose ``write_data`` fails removes its own files and reports the failure as
its result (:class:`FailedWrite`) instead of raising: ``finish`` then removes every
rank's files (the path is shared: the manifest names them all) and raises. ``finish``
does the same when its own commit fails, unless the manifest may already be visible
(the outcome is unknown): then the files are kept, since it names them.
"""
from __future__ import annotations

import dataclasses
import io
import json
import logging
import math
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
    MetadataIndex,
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
from ckptstore.commit.atomic import commit_manifest, manifest_visible
from ckptstore.distributed.dcp_tree import DcpView, dcp_view, fill, leaves_in, nest, save_bytes, value_json
from ckptstore.errors import CheckpointExistsError, CorruptCheckpointError, DistributedSaveError
from ckptstore.manifest import builder
from ckptstore.manifest.io import read_catalog
from ckptstore.pipeline.engine import engine
from ckptstore.pipeline.options import DEFAULT_CHUNK, SaveOptions
from ckptstore.pipeline.pipeline import SavePipeline
from ckptstore.plan.tree import Leaf, torch_dtype
from ckptstore.read.boxes import read_boxes, whole_shards
from ckptstore.read.reader import read_tensors
from ckptstore.storage import Storage, open_storage

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class StoredItem:
    """Where one WriteItem's bytes went (travels to the coordinator in a WriteResult)."""

    files: tuple[fmt.FileRecord, ...]  # the rank's files, on its first item only
    chunks: tuple[fmt.ChunkRecord, ...]
    nbytes: int
    value_json: str | None = None  #: a non-tensor value as typed JSON (no data written)


@dataclass(frozen=True, slots=True)
class FailedWrite:
    """A rank's failed ``write_data``, sent to the coordinator as its only WriteResult
    so that ``finish`` runs and removes every rank's files."""

    rank: str  #: the rank's name in the global plan (``r<index>``)
    error: str  #: the error's type name
    message: str
    files: tuple[str, ...]  #: the files it planned (it removed them; removed again)


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
        self._planned: tuple[str, ...] = ()  #: the names of this rank's files being written
        self._rank: int | None = None  #: this process's rank in DCP's group, when told

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
        rank = kwargs.get("rank")  # given by DCP since torch 2.5
        self._rank = rank if isinstance(rank, int) else None

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
        self._planned = ()
        try:
            results = self._write_items(plan, planner)
        except BaseException as e:  # DCP catches it too: every rank goes on to the gather
            rank = plan.storage_data or "r0"
            log.error("rank %s: DCP write to %s failed; the coordinator removes every rank's "
                      "files of this save", rank, self.storage.url, exc_info=True)
            failed = FailedWrite(str(rank), type(e).__name__, str(e)[:2000], self._planned)
            results = [WriteResult(index=MetadataIndex(f"<failed write of {rank}>"),
                                   size_in_bytes=0, storage_data=failed)]
        fut: Future = Future()
        fut.set_result(results)
        return fut

    def _write_items(self, plan: SavePlan, planner: SavePlanner) -> list[WriteResult]:
        leaves: list[Leaf] = []
        data_items = []
        texts: dict[int, str] = {}
        objects = getattr(planner, "state_dict", None)  # DCP's flat state (default planner)
        for k, item in enumerate(plan.items):
            if item.type == WriteItemType.BYTE_IO:
                text = None
                if isinstance(objects, dict) and item.index.fqn in objects:
                    text = value_json(objects[item.index.fqn])
                if text is not None:
                    texts[k] = text
                    continue
                # not typed-JSON storable: keep the bytes DCP made (read back by dcp.load)
                log.warning("DCP item %r is stored as DCP's pickled bytes: ckptstore.load gives "
                            "it as a uint8 array", item.index.fqn)
                data = planner.resolve_data(item)
                buf = data.getbuffer() if isinstance(data, io.BytesIO) else bytes(data)
                value: Any = np.frombuffer(buf, dtype=np.uint8)
            else:
                value = planner.resolve_data(item).detach()
            offsets = "" if item.index.offset is None else "@" + ",".join(map(str, item.index.offset))
            leaves.append(Leaf(len(leaves), (item.index.fqn + offsets,), value))
            data_items.append(k)
        stored: dict[int, StoredItem] = {k: StoredItem((), (), 0, t) for k, t in texts.items()}
        files: tuple[fmt.FileRecord, ...] = ()
        if leaves:
            tensors, files = self._write(leaves, plan.storage_data)
            stored.update((k, StoredItem((), t.chunks, t.nbytes)) for k, t in zip(data_items, tensors))
        return [WriteResult(index=item.index, size_in_bytes=stored[k].nbytes,
                            storage_data=dataclasses.replace(stored[k], files=files)
                            if k == 0 else stored[k])
                for k, item in enumerate(plan.items)]

    def _write(self, leaves: list[Leaf], rank: Any) -> tuple[tuple, tuple[fmt.FileRecord, ...]]:
        eng = engine()
        pipe = SavePipeline(eng, self.storage, self.options)
        # held until the files are written: the next save reuses the staging memory
        with eng.admit("wait"):
            planned = pipe.plan(leaves, f"{self.save_id}-{rank or 'r0'}")
            self._planned = tuple(f.name for f in planned.files)
            staged = pipe.stage(leaves, planned)
            try:
                return builder.file_records(pipe.written(staged))
            except BaseException:
                pipe.discard(staged.files)
                raise

    def finish(self, metadata: Metadata, results: list[list[WriteResult]]) -> None:
        written = [f.name for rs in results for r in rs if isinstance(r.storage_data, StoredItem)
                   for f in r.storage_data.files]
        failed = [r.storage_data for rs in results for r in rs
                  if isinstance(r.storage_data, FailedWrite)]
        if failed:
            self._remove(written + [n for f in failed for n in f.files])
            failures = tuple((_rank_number(f.rank), "write", f.error, f.message) for f in failed)
            parts = "; ".join(f"rank {f.rank[1:]} failed in write: {f.error}: {f.message}"
                              for f in failed)
            raise DistributedSaveError(
                f"DCP save to {self.storage.url} was not committed ({parts}); every rank's "
                "files of it were removed and the previous checkpoint is untouched: fix the "
                "failing rank's error and save again", failures)
        data: bytes | None = None
        try:
            manifest = self._manifest(metadata, results)
            data = fmt.encode(manifest)
            commit_manifest(self.storage, manifest, overwrite=self.options.overwrite, data=data)
        except BaseException as e:
            if manifest_visible(self.storage, data):  # e.g. the directory fsync failed
                log.error("the commit of %s reported %s but its manifest may be in place: "
                          "every rank's files were kept", self.storage.url, e)
                raise DistributedSaveError(
                    f"the commit of {self.storage.url} failed after its manifest may have "
                    f"landed ({type(e).__name__}: {e}); the files were kept: check the "
                    "checkpoint with ckptstore fsck before trusting or removing it",
                    ((self._rank, "commit", type(e).__name__, str(e)),)) from e
            self._remove(written)
            raise

    def _remove(self, names: list[str]) -> None:
        """Remove a failed save's files (every rank's: the path is shared)."""
        storage = self.storage
        for name in dict.fromkeys(names):
            try:
                storage.remove(name)
            except FileNotFoundError:
                pass
            except Exception as e:  # the original error matters more; say what is left
                log.warning("could not remove %s of a failed save from %s: %s",
                            name, storage.url, e)

    def _manifest(self, metadata: Metadata, results: list[list[WriteResult]]) -> fmt.Manifest:
        stored = {(r.index.fqn, _key(r.index.offset)): r.storage_data
                  for rs in results for r in rs}
        files = [f for rs in results for r in rs for f in r.storage_data.files]
        tensors: list[fmt.TensorRecord] = []
        nodes: dict[str, Any] = {}
        byte_keys: list[str] = []
        for fqn, md in metadata.state_dict_metadata.items():
            if isinstance(md, BytesStorageMetadata):
                s = stored[(fqn, None)]
                if s.value_json is not None:
                    nodes[fqn] = json.loads(s.value_json)
                    continue
                rec = builder.tensor_record(fqn, "numpy", "|u1", (s.nbytes,), s.nbytes,
                                            [((0,), (s.nbytes,), s.chunks)])
                byte_keys.append(fqn)
                nodes[fqn] = {"T": "ndarray", "id": len(tensors)}
            else:
                rec = _tensor_record(fqn, md, stored)
                nodes[fqn] = {"T": "tensor", "id": len(tensors)}
            tensors.append(rec)
        dcp_meta: dict[str, Any] = {"version": metadata.version, "bytes": byte_keys}
        manifest = builder.assemble(
            save_id=self.save_id, chunk_size=self.options.chunk_size,
            compression=self.options.compression, metadata={"dcp": dcp_meta},
            tree=nest(nodes, metadata.planner_data), tensors=tensors, files=files,
            via="torch.distributed.checkpoint")
        fmt.validate(manifest)
        return manifest


def _rank_number(name: str) -> int | None:
    """The rank of a global-plan name ``r<index>``, or None."""
    return int(name[1:]) if name[:1] == "r" and name[1:].isdigit() else None


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
        self._view: DcpView | None = None

    @property
    def storage(self) -> Storage:
        return open_storage(self.path, self.storage_options)

    def manifest(self) -> fmt.Manifest:
        if self._manifest is None:
            self._manifest = read_catalog(self.storage)  # rank indexes: read as boxes need them
        return self._manifest

    def view(self) -> DcpView:
        """The checkpoint's tree flattened the way DCP flattens the load target."""
        if self._view is None:
            self._view = dcp_view(self.manifest().tree)
        return self._view

    def dcp_meta(self) -> dict[str, Any]:
        """What a DCP save recorded in the manifest (empty for ``ckptstore.save``)."""
        meta = self.manifest().metadata
        found = meta.get("dcp") if isinstance(meta, dict) else None
        return found if isinstance(found, dict) else {}

    def reset(self, checkpoint_id: "str | os.PathLike | None" = None) -> None:
        if checkpoint_id:
            self.path = checkpoint_id
        self._manifest = None
        self._view = None

    @classmethod
    def validate_checkpoint_id(cls, checkpoint_id: "str | os.PathLike") -> bool:
        return isinstance(checkpoint_id, (str, os.PathLike))

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        m, view, dcp_meta = self.manifest(), self.view(), self.dcp_meta()
        sdm: dict[str, Any] = {}
        for fqn, value in view.values.items():
            i = view.record_of(value)
            rec = None if i is None else m.tensors[i]
            if rec is not None and rec.kind == "torch" and isinstance(value, torch.Tensor):
                sdm[fqn] = TensorStorageMetadata(
                    TensorProperties(dtype=torch_dtype(rec.dtype)), torch.Size(rec.shape),
                    [ChunkStorageMetadata(offsets=torch.Size(h.offsets), sizes=torch.Size(h.shape))
                     for h in whole_shards(rec)])
            else:
                sdm[fqn] = BytesStorageMetadata()
        planner_data: dict[str, Any] = dict(view.mappings)
        stored = dcp_meta.get("planner_data")  # written by earlier versions (a flat tree)
        if isinstance(stored, dict) and set(stored) == set(sdm):  # JSON made the paths lists
            planner_data = {k: tuple(v) if isinstance(v, list) else v for k, v in stored.items()}
        return Metadata(state_dict_metadata=sdm, planner_data=planner_data,
                        storage_meta=StorageMeta(checkpoint_id=str(self.storage.url),
                                                 load_id=secrets.token_hex(6)),
                        version=dcp_meta.get("version"))

    def set_up_storage_reader(self, metadata: Metadata, is_coordinator: bool, *args: Any,
                              **kwargs: Any) -> None:
        self.view()

    def prepare_local_plan(self, plan: LoadPlan) -> LoadPlan:
        return plan

    def prepare_global_plan(self, plans: list[LoadPlan]) -> list[LoadPlan]:
        return plans

    def read_data(self, plan: LoadPlan, planner: LoadPlanner) -> Future:
        m, storage, view = self.manifest(), self.storage, self.view()
        boxes, tensor_items, byte_items = [], [], []
        for item in plan.items:
            fqn = item.storage_index.fqn
            if fqn not in view.values:
                raise CorruptCheckpointError(f"{storage.url} holds no item {fqn!r}")
            if item.type == LoadItemType.BYTE_IO:
                byte_items.append(item)
                continue
            i = view.record_of(view.values[fqn])
            if i is None or not isinstance(view.values[fqn], torch.Tensor):
                raise CorruptCheckpointError(f"{storage.url}: {fqn!r} is not a tensor in this checkpoint")
            base = tuple(item.storage_index.offset or ())
            start = tuple(b + o for b, o in zip(base, item.storage_offsets)) or ()
            boxes.append((i, start if base else tuple(item.storage_offsets), tuple(item.lengths)))
            tensor_items.append(item)
        if byte_items:
            self._read_bytes(byte_items, planner)
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

    def _read_bytes(self, items: list, planner: LoadPlanner) -> None:
        """Serve non-tensor items as DCP expects them: the bytes of ``torch.save(value)``,
        built here from the typed-JSON value (and any arrays inside it, read and verified)."""
        m, storage, view = self.manifest(), self.storage, self.view()
        raw = set(self.dcp_meta().get("bytes") or ())  # items DCP stored as its own pickled bytes
        values = {it.storage_index.fqn: view.values[it.storage_index.fqn] for it in items}
        needed = set().union(*(leaves_in(v, view) for v in values.values()))
        m = fmt.resolve(storage, m, dict.fromkeys(needed))
        wanted = [m.tensors[i] for i in sorted(needed)]
        arrays = read_tensors(storage, m, verify=self.verify,
                              select=lambda rec: any(rec is w for w in wanted)) if wanted else {}
        for item in items:
            fqn = item.storage_index.fqn
            i = view.record_of(values[fqn])
            if i is not None and m.tensors[i].name in raw:  # DCP's own pickled bytes
                planner.load_bytes(item, io.BytesIO(np.ascontiguousarray(arrays[i]).tobytes()))
            else:
                planner.load_bytes(item, save_bytes(fill(values[fqn], view, arrays)))
