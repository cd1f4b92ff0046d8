"""Simulated power loss: replay a save's journal and keep only what was durable.

A save runs through a recording :class:`~ckptstore.storage.faulty.FaultyStorage`
(every write's bytes, fsync, rename, link and unlink, in order). A small model of a
POSIX file system then replays a prefix of that journal and, at that crash point,
builds the directories a power cut could leave behind:

``durable``   directory entries only as of the last directory fsync, file contents
              only as of each file's last fsync (unsynced data is lost);
``garbage``   every directory change reached the disk, but unsynced data is garbage;
``dironly``   every directory change reached the disk, unsynced data is lost
              (the classic zero-length file after rename-without-fsync);
``volatile``  everything reached the disk (what a process kill leaves).

Each state is materialised in a fresh directory and checked: ``load`` gives the old
or the new committed checkpoint bit-identical (or, for a new step, the new one or
CheckpointNotFoundError), and once the new manifest is durable, the new one.
"""
from __future__ import annotations

import os
import random
import shutil
import tempfile
from dataclasses import dataclass, field

import ckptstore
from ckptstore.storage import LocalStorage
from ckptstore.storage.faulty import FaultyStorage, Ledger

from .common import MODES, SMALL, Budget, Report, make_state, outcome, tree_digest

VARIANTS = ("durable", "garbage", "dironly", "volatile")


@dataclass
class Inode:
    data: bytearray = field(default_factory=bytearray)
    durable: bytes = b""


class Model:
    """A flat directory: volatile and durable entries, inodes with synced prefixes."""

    def __init__(self, initial: dict[str, bytes]) -> None:
        self.inodes: list[Inode] = []
        self.vdir: dict[str, int] = {}
        for name, data in initial.items():
            self.vdir[name] = self._new(bytes(data), durable=True)
        self.ddir = dict(self.vdir)
        self.open: dict[str, int] = {}

    def _new(self, data: bytes = b"", durable: bool = False) -> int:
        self.inodes.append(Inode(bytearray(data), bytes(data) if durable else b""))
        return len(self.inodes) - 1

    def apply(self, rec: dict, data: bytes) -> None:
        op, name = rec["op"], rec["name"]
        if "/" in name or "/" in rec.get("dst", ""):
            raise ValueError(f"the power model is flat; {name!r} has a directory")
        if op == "open_write":
            self.open[name] = self.vdir[name] = self._new()
        elif op == "write":
            self.inodes[self.open[name]].data += data
        elif op == "fsync":
            ino = self.inodes[self.open[name]]
            ino.durable = bytes(ino.data)
        elif op in ("rename", "link_exclusive"):
            self.vdir[rec["dst"]] = self.vdir.pop(name)
        elif op == "put_exclusive":
            self.vdir[name] = self._new(data, durable=True)
        elif op == "fsync_dir":
            self.ddir = dict(self.vdir)
        elif op == "remove":
            self.vdir.pop(name, None)
        elif op not in ("makedirs", "close", "abort"):
            raise ValueError(f"the power model does not know {op!r}")

    def state(self, variant: str, rng: random.Random) -> dict[str, bytes]:
        if variant == "durable":
            return {n: self.inodes[i].durable for n, i in self.ddir.items()}
        out = {}
        for n, i in self.vdir.items():
            ino = self.inodes[i]
            if variant == "volatile":
                out[n] = bytes(ino.data)
            elif variant == "dironly":
                out[n] = ino.durable
            else:
                lost = len(ino.data) - len(ino.durable)
                out[n] = ino.durable + rng.randbytes(max(lost, 0))
        return out

    def durable_manifest(self) -> bytes | None:
        i = self.ddir.get("manifest.json")
        return None if i is None else self.inodes[i].durable


def _files(path: str) -> dict[str, bytes]:
    out = {}
    for n in sorted(os.listdir(path)):
        with open(os.path.join(path, n), "rb") as f:
            out[n] = f.read()
    return out


def _materialise(path: str, files: dict[str, bytes]) -> None:
    shutil.rmtree(path, ignore_errors=True)
    os.makedirs(path)
    for n, data in files.items():
        with open(os.path.join(path, n), "wb") as f:
            f.write(data)


def _record(tmp: str, mode: str, scenario: str) -> tuple[dict, list, bytes]:
    """Save the new state through a recording storage; returns (initial files,
    journal, final manifest bytes)."""
    target = os.path.join(tmp, f"rec-{mode}-{scenario}")
    shutil.rmtree(target, ignore_errors=True)
    if scenario == "overwrite":
        ckptstore.save(make_state(1), target, compression=mode, blocking=True, **SMALL)
    initial = _files(target) if os.path.isdir(target) else {}
    ledger = Ledger(os.path.join(tmp, f"ledger-{mode}-{scenario}"))
    storage = FaultyStorage(LocalStorage(target), ledger=ledger, record=True)
    ckptstore.save(make_state(2), storage, compression=mode, blocking=True,
                   overwrite=scenario == "overwrite", **SMALL)
    journal = [(r, d) for r, d in ledger.journal() if r["op"] != "note"]
    ledger.remove()
    with open(os.path.join(target, "manifest.json"), "rb") as f:
        final = f.read()
    return initial, journal, final


def run(report: Report, budget: Budget, *, modes=MODES, seed: int = 0,
        drop: tuple = ()) -> None:
    """Enumerate every crash point of each save and every variant at each point.
    ``drop``: journal ops to leave out of the replay (a self-test of the oracle:
    dropping ``fsync`` must produce failures)."""
    rng = random.Random(seed)
    old, new = tree_digest(make_state(1)), tree_digest(make_state(2))
    with tempfile.TemporaryDirectory(prefix="fuzz-power-") as tmp:
        work = [(m, s) for m in modes for s in ("new", "overwrite")]
        rng.shuffle(work)
        for mode, scenario in work:
            if budget.out():
                return
            initial, journal, final = _record(tmp, mode, scenario)
            journal = [(r, d) for r, d in journal if r["op"] not in drop]
            model = Model(initial)
            points = list(range(len(journal) + 1))
            for p in points:
                if p:
                    model.apply(*journal[p - 1])
                if budget.out():
                    return
                report.add("crash_points")
                committed = model.durable_manifest() == final
                for variant in VARIANTS:
                    where = os.path.join(tmp, "state")
                    _materialise(where, model.state(variant, rng))
                    got = outcome(where)
                    report.add("crash_states")
                    if committed or p == len(journal):
                        allowed = {new}
                    else:
                        allowed = {new, "absent" if scenario == "new" else old}
                    report.check(got in allowed,
                                 f"power loss {mode}/{scenario} after call {p} ({variant}): "
                                 f"load gave {got}, allowed {sorted(allowed)}")
