"""One save pipeline for single-process, distributed and DCP saves.

Call order (every caller holds ``engine.admit(...)`` around ``stage``)::

    pipe = SavePipeline(engine, storage, options)
    plan = pipe.plan(leaves, save_id)        # where every byte goes (cached layout)
    staged = pipe.stage(leaves, plan)        # per file: ring region -> copy
                                             #   -> submit to a writer process
                                             # (the training stall ends here)
    written = pipe.written(staged)           # wait for every file job (any thread)
    ... build the manifest (manifest.builder) and commit it (commit/) ...
    pipe.discard(staged.files)               # on failure only: remove written files

Between the stages travel frozen records: :class:`Staged` (the plan and one future
per file) and :class:`Written` (the plan and each file's chunk records). A writer
process that dies surfaces as :class:`WriterDiedError`; the pool is then replaced.
"""
from __future__ import annotations

import concurrent.futures as cf
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from typing import Any

from ckptstore.errors import WriterDiedError
from ckptstore.pipeline.engine import Engine
from ckptstore.pipeline.options import SaveOptions
from ckptstore.pipeline.writer import FileJob, FileResult, PieceJob, write_file
from ckptstore.plan.layout import FilePlan, SavePlan, make_plan
from ckptstore.plan.tree import Leaf
from ckptstore.staging.arena import Arena, Ring
from ckptstore.staging.copy import stage_file
from ckptstore.storage.base import Storage

#: {tensor id: raw hashes of that tensor's chunks in the base checkpoint}
PrevHashes = dict[int, tuple[str, ...]]


@dataclass(frozen=True, slots=True)
class StagedFile:
    """One file whose bytes are staged and whose writer job is submitted."""

    plan: FilePlan
    job: cf.Future  # -> FileResult


@dataclass(frozen=True, slots=True)
class Staged:
    """Everything staged for one save: the plan and a job per file."""

    plan: SavePlan
    files: tuple[StagedFile, ...]


@dataclass(frozen=True, slots=True)
class Written:
    """Every file of a save is durable under its final name."""

    plan: SavePlan
    results: tuple[FileResult, ...]  #: in plan order

    @property
    def stored_bytes(self) -> int:
        return sum(r.size for r in self.results)


class SavePipeline:
    """Stage, submit and collect the files of one save on ``storage``."""

    def __init__(self, engine: Engine, storage: Storage, options: SaveOptions) -> None:
        self.engine, self.storage, self.options = engine, storage, options

    def plan(self, leaves: list[Leaf], save_id: str, *, cached: bool = False) -> SavePlan:
        o = self.options
        params: dict[str, Any] = dict(chunk_size=o.chunk_size, shard_size=o.file_size,
                                      compressed=o.codec != "raw", byte_grouping=o.byte_grouping)
        if cached:
            return self.engine.plans.plan(leaves, save_id=save_id, **params)
        return make_plan(leaves, save_id=save_id, **params)

    def stage(self, leaves: list[Leaf], plan: SavePlan, *,
              prev: PrevHashes | None = None) -> Staged:
        """Copy every file of ``plan`` into staging and submit it to a writer. On
        failure nothing is left behind (running jobs end, their files are removed)."""
        eng = self.engine
        eng.writers.start_async()  # the first save overlaps writer start-up with staging
        arena = eng.staging.ensure(self.options.staging_capacity([f.nbytes for f in plan.files]))
        ring = Ring(arena.size)
        self.storage.makedirs()
        files: list[StagedFile] = []
        try:
            for fp in plan.files:
                files.append(StagedFile(fp, self._submit(arena, ring, fp, plan, leaves, prev)))
        except BaseException as e:
            self.discard(files)
            if isinstance(e, BrokenProcessPool):
                eng.writers.reset()
                raise WriterDiedError(
                    f"a writer process died while staging {self.storage.url}") from e
            raise
        return Staged(plan, tuple(files))

    def _submit(self, arena: Arena, ring: Ring, fp: FilePlan, plan: SavePlan,
                leaves: list[Leaf], prev: PrevHashes | None) -> cf.Future:
        offset, region = ring.alloc(fp.nbytes)
        stage_file(arena, offset, fp, leaves, self.engine.streams)
        chunk = plan.chunk_size
        pieces = tuple(PieceJob(p.tensor, p.first_chunk, offset + p.offset, p.length,
                                plan.tensors[p.tensor].group,
                                _piece_prev(prev, p.tensor, p.first_chunk, -(-p.length // chunk)))
                       for p in fp.pieces)
        o = self.options
        job = FileJob(self.storage, fp.name, fp.header, arena.ref, pieces, chunk, o.codec,
                      o.zstd_level)
        fut = self.engine.writers.get().submit(write_file, job)  # waits for a pool starting
        fut.add_done_callback(lambda _f: ring.free(region))
        return fut

    def written(self, staged: Staged) -> Written:
        """Wait for every file job; a dead writer becomes :class:`WriterDiedError`."""
        try:
            results = tuple(f.job.result() for f in staged.files)
        except BrokenProcessPool as e:
            self.engine.writers.reset()
            raise WriterDiedError(f"a writer process died while writing {self.storage.url}; "
                                  "nothing was committed") from e
        return Written(staged.plan, results)

    def discard(self, files: "tuple[StagedFile, ...] | list[StagedFile]") -> None:
        """After a failure: let running jobs end (they read staging), remove their files."""
        for f in files:
            f.job.cancel()
        for f in files:
            try:
                f.job.result()
            except BaseException:
                pass
            try:
                self.storage.remove(f.plan.name)
            except Exception:
                pass


def _piece_prev(prev: PrevHashes | None, tensor: int, first: int, n: int) -> tuple | None:
    hashes = (prev or {}).get(tensor)
    return None if hashes is None else hashes[first:first + n]
