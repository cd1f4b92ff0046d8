"""Corruption matrix: damage a committed checkpoint and check that fsck names exactly
the damaged tensors and chunks, and that load refuses with a typed error.

Mutations, for every compression mode: every bit of the manifest, every bit of each
safetensors header, sampled bits of every chunk, truncation of each file at every
chunk boundary, zeroed 4 KiB blocks, two blocks swapped, and each chunk pasted from
an older checkpoint of the same run (same layout, other values).

The oracle is computed from a byte diff, not from the mutation's intent: a chunk is
damaged iff one of its stored bytes changed or the file now ends inside it; a header
iff one of its bytes changed; a file's size iff it changed. ``fsck`` must report
exactly that set (no false positives), ``load`` must raise a CkptError when it is
not empty and return the saved state bit-identical when it is. A damaged manifest
must be refused (or, for a change that keeps it byte-for-byte equivalent, such as
trailing whitespace, decode to the same manifest).
"""
from __future__ import annotations

import os
import random
import shutil
import tempfile
from typing import Iterator

import ckptstore
from ckptstore import manifest as fmt
from ckptstore.errors import CkptError
from ckptstore.storage import LocalStorage
from ckptstore.verify.fsck import fsck

from .common import MODES, Budget, Report, fsck_code, make_state, outcome, tree_digest

#: a state with several 4 KiB blocks per file and several chunks per tensor
LAYOUT = dict(chunk_size=4096, shard_size=32768)
SCALE = 16
BLOCK = 4096
CHUNK_BITS = 8  #: bits flipped per chunk


def _read_all(path: str) -> dict[str, bytes]:
    out = {}
    for n in os.listdir(path):
        with open(os.path.join(path, n), "rb") as f:
            out[n] = f.read()
    return out


class Subject:
    """A pristine checkpoint, its bytes and manifest, and an older one of the same run."""

    def __init__(self, tmp: str, mode: str) -> None:
        self.mode = mode
        self.path = os.path.join(tmp, f"ckpt-{mode}")
        older = os.path.join(tmp, f"older-{mode}")
        ckptstore.save(make_state(3, SCALE), older, compression=mode, blocking=True, **LAYOUT)
        ckptstore.save(make_state(1, SCALE), self.path, compression=mode, blocking=True, **LAYOUT)
        self.digest = tree_digest(make_state(1, SCALE))
        self.files = _read_all(self.path)
        self.manifest = fmt.decode(self.files[fmt.MANIFEST_NAME])
        self.older_files = _read_all(older)
        self.older = fmt.decode(self.older_files[fmt.MANIFEST_NAME])

    def mutations(self, rng: random.Random) -> Iterator[tuple[str, str, bytes]]:
        """(label, file name, new content) for every mutation of the matrix."""
        m = self.manifest
        man = self.files[fmt.MANIFEST_NAME]
        for bit in range(len(man) * 8):
            yield f"manifest bit {bit}", fmt.MANIFEST_NAME, _flip(man, bit)
        for f in m.files:
            data = self.files[f.name]
            for bit in range(f.header_length * 8):
                yield f"{f.name} header bit {bit}", f.name, _flip(data, bit)
            cuts = sorted({0, f.header_length, f.size} | {c.offset for t in m.tensors
                                                           for c in t.chunks if c.file == f.name})
            for cut in cuts[:-1] + [f.size - 1]:
                yield f"{f.name} truncated at {cut}", f.name, data[:cut]
            nblocks = -(-len(data) // BLOCK)
            for b in range(nblocks):
                zeroed = data[:b * BLOCK] + bytes(len(data[b * BLOCK:(b + 1) * BLOCK])) + \
                    data[(b + 1) * BLOCK:]
                yield f"{f.name} block {b} zeroed", f.name, zeroed
            for a in range(nblocks - 1):
                b = rng.randrange(a + 1, nblocks)
                if (b + 1) * BLOCK <= len(data):
                    swapped = bytearray(data)
                    swapped[a * BLOCK:(a + 1) * BLOCK] = data[b * BLOCK:(b + 1) * BLOCK]
                    swapped[b * BLOCK:(b + 1) * BLOCK] = data[a * BLOCK:(a + 1) * BLOCK]
                    yield f"{f.name} blocks {a} and {b} swapped", f.name, bytes(swapped)
        older = {t.name: t for t in self.older.tensors}
        for t in m.tensors:
            for i, c in enumerate(t.chunks):
                data = self.files[c.file]
                for _ in range(CHUNK_BITS):
                    bit = rng.randrange(c.offset * 8, (c.offset + c.length) * 8)
                    yield f"tensor {t.name} chunk {i} bit {bit}", c.file, _flip(data, bit)
                o = older[t.name].chunks[i]
                piece = self.older_files[o.file][o.offset:o.offset + min(o.length, c.length)]
                pasted = data[:c.offset] + piece + data[c.offset + len(piece):]
                yield f"tensor {t.name} chunk {i} pasted from an older checkpoint", c.file, pasted

    def expected(self, name: str, new: bytes) -> tuple[set, bool, bool]:
        """(damaged (tensor, chunk) pairs, header damaged, size changed) for ``name``."""
        old = self.files[name]
        rec = self.manifest.file(name)
        n = min(len(old), len(new))
        changed = [i for i in range(n) if old[i] != new[i]]
        chunks = set()
        for t in self.manifest.tensors:
            for i, c in enumerate(t.chunks):
                if c.file != name:
                    continue
                end = c.offset + c.length
                if end > len(new) or any(c.offset <= p < end for p in changed):
                    chunks.add((t.name, i))
        header = rec.header_length > 0 and old[:rec.header_length] != new[:rec.header_length]
        return chunks, header, len(new) != len(old)


def _flip(data: bytes, bit: int) -> bytes:
    b = bytearray(data)
    b[bit // 8] ^= 1 << (bit % 8)
    return bytes(b)


def check(report: Report, s: Subject, label: str, name: str, new: bytes, cli: bool) -> None:
    what = f"{s.mode}: {label}"
    path = os.path.join(os.path.dirname(s.path), f"work-{s.mode}")
    target = os.path.join(path, name)
    with open(target, "wb") as f:
        f.write(new)
    try:
        got = outcome(path)
        report_ = fsck(LocalStorage(path))
        code = fsck_code(path) if cli else None
    finally:
        with open(target, "wb") as f:
            f.write(s.files[name])
    report.add("corruptions")
    if name == fmt.MANIFEST_NAME:
        try:
            same = fmt.decode(new) == s.manifest
        except CkptError:
            same = False
        if same:
            report.check(got == s.digest and report_.ok, f"{what}: equivalent manifest refused")
        else:
            report.check(got.startswith("error:"), f"{what}: load gave {got}")
            report.check(not report_.ok and any(d.file == fmt.MANIFEST_NAME for d in report_.damage),
                         f"{what}: fsck did not name the manifest: {report_.damage}")
        return
    chunks, header, size = s.expected(name, new)
    found = {(d.tensor, d.chunk) for d in report_.damage if d.chunk is not None}
    file_level = [d for d in report_.damage if d.chunk is None]
    report.check(found == chunks, f"{what}: fsck named {sorted(found)}, damaged {sorted(chunks)}")
    report.check(all(d.file == name for d in report_.damage),
                 f"{what}: fsck blamed another file: {report_.damage}")
    header_found = any("header" in d.problem for d in file_level)
    size_found = any("bytes, the manifest says" in d.problem for d in file_level)
    report.check(header_found == header and size_found == size and
                 len(file_level) == header + size,
                 f"{what}: file-level damage {file_level}, expected header={header} size={size}")
    damaged = bool(chunks or header or size)
    if damaged:
        report.check(got.startswith("error:") and got != "error:CheckpointNotFoundError",
                     f"{what}: load gave {got}")
    else:
        report.check(got == s.digest, f"{what}: undamaged checkpoint loads as {got}")
    if code is not None:
        report.check(code == (1 if damaged else 0), f"{what}: fsck exited {code}")


def run(report: Report, budget: Budget, *, modes=MODES, seed: int = 0) -> None:
    """Every mutation of the matrix while the budget lasts (in a random order)."""
    rng = random.Random(seed)
    with tempfile.TemporaryDirectory(prefix="fuzz-corrupt-") as tmp:
        subjects = [Subject(tmp, m) for m in modes]
        work = []
        for s in subjects:
            shutil.copytree(s.path, os.path.join(tmp, f"work-{s.mode}"))
            work += [(s, *mu) for mu in s.mutations(rng)]
        rng.shuffle(work)
        for k, (s, label, name, new) in enumerate(work):
            if budget.out():
                return
            check(report, s, label, name, new, cli=k % 16 == 0)
