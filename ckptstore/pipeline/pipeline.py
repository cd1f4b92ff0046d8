"""One save pipeline for single-process, distributed and DCP saves.

Call order (every caller holds ``engine.admit(...)`` around ``stage``)::

    pipe = SavePipeline(engine, storage, options)
    plan = pipe.plan(leaves, save_id)        # where every byte goes (cached layout)
    staged = pipe.stage(leaves, plan)        # per file: ring region -> copy; a
                                             #   handoff thread submits it to a writer
                                             #   once its copies completed
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
from ckptstore.pipeline.engine import Engine, typed_os_error
from ckptstore.pipeline.handoff import Handoff
from ckptstore.pipeline.options import SaveOptions
from ckptstore.pipeline.writer import BaseChunk, FileJob, FileResult, PieceJob, write_file
from ckptstore.plan.layout import FilePlan, SavePlan, make_plan
from ckptstore.plan.tree import Leaf
from ckptstore.staging.arena import Arena, Ring
from ckptstore.storage.base import Storage

#: {tensor id: that tensor's chunks in the base checkpoint}
PrevChunks = dict[int, tuple[BaseChunk, ...]]


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
    handoff: Handoff  #: the copies, and the thread that hands files to writers

    def wait_copied(self) -> None:
        """Block until every copy of this save completed."""
        self.handoff.wait_copied()


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
              prev: PrevChunks | None = None, overlap: bool = False) -> Staged:
        """Copy every file of ``plan`` into staging; each goes to a writer once its
        copies completed (:mod:`ckptstore.pipeline.handoff`).

        Returns once every copy completed, or with ``overlap`` once every copy is
        issued and fenced (device copies may still run; the producer's later work is
        ordered after them). On failure nothing is left behind (running jobs end,
        their files are removed)."""
        eng = self.engine
        eng.writers.start_async()  # the first save overlaps writer start-up with staging
        arena = eng.staging.ensure(self.options.staging_capacity([f.nbytes for f in plan.files]))
        ring = Ring(arena.size)
        try:
            self.storage.makedirs()
        except OSError as e:  # ENOSPC/EDQUOT/EIO creating the directory: typed like the writes
            raise typed_os_error(e, self.storage.url) from None  # its frames are kept on it
        handoff = Handoff(eng.copier.session(leaves))
        files: list[StagedFile] = []
        try:
            try:
                for fp in plan.files:
                    files.append(StagedFile(fp, self._issue(handoff, arena, ring, fp, plan, prev)))
            finally:
                handoff.close()  # writers released: every copy is issued (or we failed)
            if overlap:
                for b in handoff.batches:
                    b.fence()
            else:
                handoff.wait_copied()
        except BaseException as e:
            try:  # the next save reuses the arena: no copy of this one may still run
                handoff.wait_copied()
            except BaseException:
                pass
            self.discard(files)
            if isinstance(e, BrokenProcessPool):
                eng.writers.reset()
                raise WriterDiedError(
                    f"a writer process died while staging {self.storage.url}") from e
            raise
        return Staged(plan, tuple(files), handoff)

    def _issue(self, handoff: Handoff, arena: Arena, ring: Ring, fp: FilePlan, plan: SavePlan,
               prev: PrevChunks | None) -> cf.Future:
        # a full ring needs finished files: let the writers start before waiting for one
        offset, region = ring.alloc(fp.nbytes, before_wait=handoff.release)
        try:
            batch = handoff.session.copy(arena, offset, fp)
        except BaseException:
            ring.free(region)
            raise
        chunk = plan.chunk_size
        pieces = tuple(PieceJob(p.tensor, p.first_chunk, offset + p.offset, p.length,
                                plan.tensors[p.tensor].group,
                                _piece_prev(prev, p.tensor, p.first_chunk, -(-p.length // chunk)))
                       for p in fp.pieces)
        o = self.options
        job = FileJob(self.storage, fp.name, fp.header, arena.ref, pieces, chunk, o.codec,
                      o.zstd_level)
        writers = self.engine.writers
        return handoff.put(batch, lambda: writers.submit(write_file, job),
                           lambda: ring.free(region))

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


def _piece_prev(prev: PrevChunks | None, tensor: int, first: int, n: int) -> tuple | None:
    chunks = (prev or {}).get(tensor)
    return None if chunks is None else chunks[first:first + n]
