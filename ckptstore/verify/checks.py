"""The one verifier: every check of stored bytes against their manifest.

Load, ``fsck``, the Checkpointer's quick check and promotion all verify through
here, at the level each needs:

* files: the manifest decodes and validates (:func:`ckptstore.manifest.read_manifest`),
  every file is present at its recorded size (the quick check);
* headers: and every safetensors header matches its hash (load checks the files it
  reads, fsck all of them);
* chunks: and every chunk's stored bytes match their hash; ``deep`` also decodes
  them and checks the raw hash (fsck, promotion, and load chunk by chunk).

A problem is a :class:`Damage`; fsck collects them all, the quick check returns the
first as a sentence, load and promotion raise :class:`CorruptCheckpointError`.
This module imports no torch (promotion runs in a spawned process).
"""
from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

import xxhash

from ckptstore import manifest as fmt
from ckptstore.errors import CkptError, CorruptCheckpointError
from ckptstore.pipeline.codec import decode_planes, hash_bytes, max_coded_chunk
from ckptstore.storage.base import LinkedView, Storage, linked

FILE_MISSING = "file is missing"
PIECE = 8 << 20  #: bytes fsck reads and hashes at a time (no chunk or header is read whole)
HEADER_DAMAGED = "safetensors header is damaged"


@dataclass(frozen=True, slots=True)
class Damage:
    """One problem: ``tensor``/``chunk`` are None when it is not about one chunk."""

    file: str | None
    tensor: str | None
    chunk: int | None
    problem: str

    def __str__(self) -> str:
        where = []
        if self.tensor is not None:
            where.append(f"tensor {self.tensor!r}")
        if self.chunk is not None:
            where.append(f"chunk {self.chunk}")
        if self.file is not None:
            where.append(f"in {self.file}")
        return (" ".join(where) + ": " if where else "") + self.problem

    def sentence(self, url: str | None = None) -> str:
        """The problem as one sentence (the quick check's and load's wording); a
        missing file is said to be missing from ``url``, if given."""
        if self.tensor is None and self.file is not None:
            if self.problem == HEADER_DAMAGED:
                return f"the safetensors header of {self.file} is damaged"
            if self.problem == FILE_MISSING and url is not None:
                return f"file {self.file} of {url} is missing"
            if self.problem.startswith("file "):  # "file is missing" -> "file X is missing"
                return f"file {self.file} {self.problem[5:]}"
        return str(self)

    def error(self, prefix: str = "", suffix: str = "", url: str | None = None
              ) -> CorruptCheckpointError:
        """It as the error load and promotion raise (naming the damaged chunk, if any)."""
        chunks = [(self.tensor, self.chunk)] if self.tensor is not None else []
        return CorruptCheckpointError(f"{prefix}{self.sentence(url)}{suffix}", chunks)


# -- chunks -------------------------------------------------------------------

def stored_problem(data: "bytes | memoryview", c: fmt.ChunkRecord, *, verify: bool = True) -> str | None:
    """What is wrong with the stored bytes of chunk ``c``: truncated, or (``verify``)
    not matching their hash."""
    if len(data) != c.length:
        return f"truncated: {len(data)} of {c.length} bytes present"
    if verify and hash_bytes(data) != c.hash:
        return "hash mismatch"
    return None


def decoded_problem(data: "bytes | memoryview", c: fmt.ChunkRecord, out: memoryview, *,
                    verify: bool = True) -> str | None:
    """Decode the stored bytes of chunk ``c`` into ``out``; what is wrong: they do
    not decode, or (``verify``) the decoded bytes do not match the raw hash."""
    try:
        decode_planes(memoryview(data), list(c.planes), c.group, out)
    except CorruptCheckpointError as e:
        return f"does not decode: {e}"
    if verify and hash_bytes(out) != c.raw_hash:
        return "decoded bytes do not match"
    return None


def chunk_where(rec: fmt.TensorRecord, index: int) -> str:
    c = rec.chunks[index]
    return f"tensor {rec.name!r} chunk {index} ({c.file} bytes [{c.offset}, {c.offset + c.length}))"


def _chunk_error(rec: fmt.TensorRecord, index: int, problem: str | None) -> None:
    if problem is not None:
        raise CorruptCheckpointError(f"{chunk_where(rec, index)}: {problem} (the data is damaged)",
                                     [(rec.name, index)])


def check_chunk(rec: fmt.TensorRecord, index: int, data: "bytes | memoryview", *,
                verify: bool = True) -> None:
    """Load's check of a chunk's stored bytes: raise CorruptCheckpointError naming it."""
    _chunk_error(rec, index, stored_problem(data, rec.chunks[index], verify=verify))


def decode_chunk(rec: fmt.TensorRecord, index: int, data: "bytes | memoryview", out: memoryview,
                 *, verify: bool = True) -> None:
    """Load's decoding of a chunk into ``out``, checked as :func:`decoded_problem`."""
    _chunk_error(rec, index, decoded_problem(data, rec.chunks[index], out, verify=verify))


def _chunk_damage(tensor: str, index: int, c: fmt.ChunkRecord, data: "bytes | memoryview",
                  deep: bool) -> Damage | None:
    problem = stored_problem(data, c)
    if problem is None and deep and c.hash != c.raw_hash:
        problem = decoded_problem(data, c, memoryview(bytearray(c.raw_length)))
    return None if problem is None else Damage(c.file, tensor, index, problem)


# -- files --------------------------------------------------------------------

def _file_damage(f: fmt.FileRecord, size: int | None,
                 header: Callable[[], str] | None) -> Iterator[Damage]:
    """Damage of file ``f`` stored with ``size`` bytes (None: missing) whose header's
    hash ``header()`` returns (None: not checked)."""
    if size is None:
        yield Damage(f.name, None, None, FILE_MISSING)
        return
    if size != f.size:
        yield Damage(f.name, None, None, f"file is {size} bytes, the manifest says {f.size}")
    if header is not None and f.header_length and header() != f.header_hash:
        yield Damage(f.name, None, None, HEADER_DAMAGED)


def bytes_damage(f: fmt.FileRecord, data: bytes,
                 chunks: Iterable[tuple[str, int, fmt.ChunkRecord]]) -> Iterator[Damage]:
    """Damage of file ``f`` read whole as ``data`` (promotion reads each file once):
    size, header, and the hash of each of its ``(tensor, index, chunk)``."""
    yield from _file_damage(f, len(data), lambda: hash_bytes(data[:f.header_length]))
    view = memoryview(data)
    for tensor, i, c in chunks:
        d = _chunk_damage(tensor, i, c, view[c.offset:c.offset + c.length], False)
        if d is not None:
            yield d


class Verifier:
    """Checks one committed checkpoint, level by level; each level yields Damage.

    ``storage`` is the checkpoint; ``manifest``, if given, its manifest already read
    (else it is read here, and a manifest that does not decode raises)."""

    def __init__(self, storage: Storage, manifest: fmt.Manifest | None = None) -> None:
        self.manifest = fmt.read_manifest(storage) if manifest is None else manifest
        # incremental saves name older steps' files
        self.storage = storage if isinstance(storage, LinkedView) else linked(storage, self.manifest.files)
        self.sizes: dict[str, int | None] = {}
        self.bytes_checked = 0
        self.chunks_checked = 0
        self._buf: memoryview | None = None

    def _size(self, name: str) -> int | None:
        if name not in self.sizes:
            try:
                self.sizes[name] = self.storage.size(name)
            except FileNotFoundError:
                self.sizes[name] = None
        return self.sizes[name]

    def files(self, names: set[str] | None = None, *, headers: bool = True) -> Iterator[Damage]:
        """Every (named) file present at its recorded size; with ``headers``, its
        safetensors header matching its hash."""
        for f in self.manifest.files:
            if names is None or f.name in names:
                head = (lambda f=f: self._header_hash(f)) if headers else None
                yield from _file_damage(f, self._size(f.name), head)

    def _header_hash(self, f: fmt.FileRecord) -> str:
        """The hash of ``f``'s header, read a piece at a time (a claimed header longer
        than the file stops at its end) with read_extent (O_DIRECT on local disks, so
        that reading it does not pull megabytes of the file into the page cache by
        readahead)."""
        h = xxhash.xxh3_128()
        for pos in range(0, f.header_length, PIECE):
            piece = self.storage.read_extent(f.name, pos, min(PIECE, f.header_length - pos))
            h.update(piece)
            if len(piece) < min(PIECE, f.header_length - pos):
                break
        return h.hexdigest()

    def _stored_hash(self, c: fmt.ChunkRecord, progress: Callable[[int], None] | None) -> tuple[int, str]:
        """(bytes present, their hash) of chunk ``c``'s stored bytes, read and hashed a
        piece at a time into one reused buffer: fsck's memory does not grow with a chunk."""
        if self._buf is None:
            self._buf = memoryview(bytearray(PIECE))
        h = xxhash.xxh3_128()
        pos = 0
        while pos < c.length:
            want = min(PIECE, c.length - pos)
            got = self.storage.readinto(c.file, c.offset + pos, self._buf[:want])
            h.update(self._buf[:got])
            pos += got
            if progress is not None:
                progress(got)
            if got < want:
                break
        return pos, h.hexdigest()

    def chunks(self, *, deep: bool = False,
               progress: Callable[[int], None] | None = None) -> Iterator[Damage]:
        """Every chunk's stored bytes against their hash (``deep``: decoded too)."""
        for t in self.manifest.tensors:
            for i, c in enumerate(t.chunks):
                self.chunks_checked += 1
                if self._size(c.file) is None:
                    yield Damage(c.file, t.name, i, "its file is missing")
                    continue
                n, digest = self._stored_hash(c, progress)
                self.bytes_checked += n
                problem = (f"truncated: {n} of {c.length} bytes present" if n != c.length
                           else "hash mismatch" if digest != c.hash else None)
                if problem is None and deep and c.hash != c.raw_hash:
                    problem = self._decoded(c)
                if problem is not None:
                    yield Damage(c.file, t.name, i, problem)

    def _decoded(self, c: fmt.ChunkRecord) -> str | None:
        """fsck --deep of a chunk whose raw bytes differ from its stored ones: decode it
        (validation bounds a compressed chunk's raw length) and check the raw hash."""
        if c.group == 1 and c.planes[0][0] == "raw":  # the stored bytes are the raw bytes
            return "decoded bytes do not match"
        if c.raw_length > max_coded_chunk():
            return (f"a chunk of {c.length} stored bytes claims {c.raw_length} raw bytes, over the "
                    f"{max_coded_chunk()}-byte limit of what is decoded at once")
        return decoded_problem(self.storage.read(c.file, c.offset, c.length), c,
                               memoryview(bytearray(c.raw_length)))

    def structure(self) -> Iterator[Damage]:
        """What ``load`` would refuse before reading data: unknown or unsafe dtypes,
        sizes that do not fit the shape, a state tree naming missing tensors."""
        from ckptstore.plan.tree import safe_numpy_dtype, torch_dtype, unflatten  # imports torch

        m = self.manifest
        for t in m.tensors:
            try:
                itemsize = (torch_dtype(t.dtype).itemsize if t.kind == "torch"
                            else safe_numpy_dtype(t.dtype).itemsize)
                if math.prod(t.shape) * itemsize != t.nbytes:
                    raise CorruptCheckpointError(f"{t.nbytes} bytes do not fit shape "
                                                 f"{list(t.shape)} of {t.dtype}")
            except CkptError as e:
                yield Damage(fmt.MANIFEST_NAME, t.name, None, str(e))

        def leaf(kind: str, i: object) -> None:
            if not isinstance(i, int) or isinstance(i, bool) or not 0 <= i < len(m.tensors):
                raise CorruptCheckpointError(f"state tree refers to tensor {i!r}, which does not exist")
            if m.tensors[i].kind != ("torch" if kind == "tensor" else "numpy"):
                raise CorruptCheckpointError(f"state tree expects another kind of array for tensor {i}")

        try:
            unflatten(m.tree, leaf)
        except CkptError as e:
            yield Damage(fmt.MANIFEST_NAME, None, None, f"state tree: {e}")


def check_files(storage: Storage, manifest: fmt.Manifest, names: set[str], *,
                headers: bool = True) -> None:
    """Load's check of the files it reads: present, at their size (which bounds every
    chunk in them, so no claim larger than the file is allocated), headers intact
    (``headers``); raises CorruptCheckpointError on the first problem."""
    v = Verifier(storage, manifest)
    for d in v.files(names, headers=headers):
        size = v.sizes.get(d.file or "")
        for t in manifest.tensors:  # name the first chunk that the file cannot hold
            for i, c in enumerate(t.chunks):
                if c.file == d.file and (size is None or c.offset + c.length > size):
                    held = "is missing" if size is None else f"lies past its end ({size} bytes)"
                    raise d.error(url=storage.url, suffix=f"; {chunk_where(t, i)} {held}")
        raise d.error(url=storage.url)


def check_quick(storage: Storage) -> str | None:
    """None if ``storage`` holds a committed checkpoint whose manifest is valid and
    whose every file is present at its recorded size; else what is wrong."""
    try:
        first = next(Verifier(storage).files(headers=False), None)
    except FileNotFoundError:
        return "no manifest (not committed)"
    except (OSError, ValueError) as e:
        return f"{type(e).__name__}: {e}"
    return None if first is None else first.sentence()
