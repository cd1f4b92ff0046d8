"""Schema-version skew between writer and reader (``python -m fuzz skew --budget S``).

A newer ckptstore on another node writes steps with ``schema_version + 1`` into a run
this version also reads. Each case builds a run with this version's Checkpointer
(full or incremental saves, zstd or none), then makes some steps *newer*, drawn from:

* ``written``: saved with ``records.SCHEMA_VERSION`` patched to +1 (a newer writer,
  incremental ones naming this version's shards);
* ``resealed``: a committed step's manifest re-sealed with ``schema_version + 1``, an
  unknown top-level field, and an extra file the newer writer added;
* ``copied``: a new step number holding a copy of a step's files under a re-sealed
  newer manifest;

at the newest, a middle or the oldest step. Then this version must, for every case:
``latest()`` returns the newest step it can read and warns naming each newer step it
passed over; that step loads bit-exact; a newer step loads as ``SchemaVersionError``;
a save of a newer step's number is refused with ``CheckpointExistsError``; a save of
a new step with ``keep_last=1`` (a retention round) and ``gc(grace=0)`` leave every
newer step byte-identical and still loadable by the newer version, and never delete
a readable step a newer one may name. The golden checkpoints of every older schema
(``tests/golden/``) still load bit-exact. Counters: ``skew_cases``,
``skew_newer_steps``, ``skew_checks``.
"""
from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import random
import shutil
import tempfile
import warnings
from collections.abc import Iterator

import torch

import ckptstore
from ckptstore.errors import CheckpointExistsError, SchemaVersionError
from ckptstore.manifest import records
from ckptstore.runs.gc import gc
from ckptstore.runs.layout import step_name
from ckptstore.storage import LocalStorage

from .common import Budget, Report, dir_snapshot, tree_digest
from .parsers import seal

GOLDEN = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests", "golden")
HOW = ("written", "resealed", "copied")


@contextlib.contextmanager
def newer_schema() -> Iterator[None]:
    """This process reads and writes as the next schema version would."""
    old = records.SCHEMA_VERSION
    records.SCHEMA_VERSION = old + 1
    try:
        yield
    finally:
        records.SCHEMA_VERSION = old


def _state(step: int, frozen: torch.Tensor) -> dict:
    return {"frozen": frozen, "w": torch.full((96,), float(step)),
            "b": torch.arange(step, step + 40, dtype=torch.int64), "step": step}


def _reseal(folder: str, extra_file: bool) -> None:
    path = os.path.join(folder, "manifest.json")
    with open(path) as f:
        obj = json.load(f)
    obj["schema_version"] = records.SCHEMA_VERSION + 1
    obj["feature_of_a_newer_version"] = {"enabled": True}
    with open(path, "wb") as f:
        f.write(seal(obj))
    if extra_file:
        with open(os.path.join(folder, "sidecar-newer.bin"), "wb") as f:
            f.write(os.urandom(64))


class Case:
    """One run: which steps exist, which are newer, and how they were made."""

    def __init__(self, root: str, rng: random.Random) -> None:
        self.root = root
        self.incremental = rng.random() < 0.5
        self.mode = rng.choice(("zstd", "none"))
        self.frozen = torch.randn(2048, generator=torch.Generator().manual_seed(rng.randrange(1 << 30)))
        n = rng.randint(2, 4)
        self.steps = list(range(1, n + 1))
        where = rng.choice(("newest", "middle", "oldest", "two"))
        pick = {"newest": [n], "middle": [max(n // 2, 1)], "oldest": [1], "two": [1, n]}[where]
        self.newer = {s: rng.choice(HOW) for s in sorted(set(pick))}
        if all(s in self.newer for s in self.steps):  # keep one step this version reads
            self.newer.pop(self.steps[0])
        self.digest: dict[int, str] = {}

    def build(self) -> None:
        opts = dict(keep_last=None, compression=self.mode, incremental=self.incremental)
        with ckptstore.Checkpointer(self.root, **opts) as ck:
            for s in self.steps:
                if self.newer.get(s) == "written":
                    with newer_schema():
                        ck.save(s, _state(s, self.frozen)).wait()
                elif self.newer.get(s) == "copied":
                    continue  # made below from a copy of another step
                else:
                    ck.save(s, _state(s, self.frozen)).wait()
                self.digest[s] = tree_digest(_state(s, self.frozen))
            ck.wait()
        for s, how in self.newer.items():
            folder = os.path.join(self.root, step_name(s))
            if how == "resealed":
                _reseal(folder, extra_file=True)
            elif how == "copied":
                src = next(t for t in self.steps if t not in self.newer or self.newer[t] != "copied")
                shutil.copytree(os.path.join(self.root, step_name(src)), folder)
                _reseal(folder, extra_file=False)
                self.digest[s] = self.digest[src]

    @property
    def readable(self) -> list[int]:
        return [s for s in self.steps if s not in self.newer]


def check_case(report: Report, case: Case, what: str) -> None:
    root = case.root
    newer_snap = {s: dir_snapshot(os.path.join(root, step_name(s))) for s in case.newer}
    readable_snap = {s: dir_snapshot(os.path.join(root, step_name(s))) for s in case.readable}

    def ok(cond: bool, msg: str) -> None:
        report.add("skew_checks")
        report.check(cond, f"{what}: {msg}")

    with ckptstore.Checkpointer(root, keep_last=1, compression=case.mode) as ck:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            latest = ck.latest()
        want = max(case.readable)
        ok(latest == want, f"latest() is {latest}, expected {want}")
        said = " ".join(str(w.message) for w in caught)
        for s in case.newer:
            if s > want:
                ok(f"step {s}" in said and "schema" in said,
                   f"latest() passed over newer step {s} without saying why: {said!r}")
        got = tree_digest(ck.load(latest)) if latest is not None else None
        ok(got == case.digest[want], f"step {want} does not load bit-exact")
        for s in case.newer:
            try:
                ckptstore.load(os.path.join(root, step_name(s)))
                ok(False, f"newer step {s} loaded")
            except SchemaVersionError:
                ok(True, "")
            try:
                ck.save(s, _state(s + 1000, case.frozen)).wait()
                ok(False, f"a save over newer step {s} was not refused")
            except CheckpointExistsError as e:
                ok("newer" in str(e), f"refusal of step {s} does not say newer: {e}")
        new_step = max(case.steps) + 1
        ck.save(new_step, _state(new_step, case.frozen)).wait()  # a retention round
        ck.wait()
    gc(LocalStorage(root), grace=0)
    for s, snap in newer_snap.items():
        ok(dir_snapshot(os.path.join(root, step_name(s))) == snap, f"newer step {s} changed on disk")
        with newer_schema():
            try:
                got = tree_digest(ckptstore.load(os.path.join(root, step_name(s))))
            except Exception as e:  # noqa: BLE001 - any failure is the finding
                got = f"{type(e).__name__}: {e}"
        ok(got == case.digest[s], f"newer step {s} no longer loads with the newer version: {got[:200]}")
    for s, snap in readable_snap.items():  # retention skipped its round: nothing dropped
        now = dir_snapshot(os.path.join(root, step_name(s)))
        ok(now == snap, f"readable step {s} (whose files a newer step may name) changed: "
                        f"{sorted(set(snap) ^ set(now))[:5]}")
        if now:
            got = tree_digest(ckptstore.load(os.path.join(root, step_name(s))))
            ok(got == case.digest[s], f"readable step {s} no longer loads bit-exact")
    got = tree_digest(ckptstore.load(os.path.join(root, step_name(new_step))))
    ok(got == tree_digest(_state(new_step, case.frozen)), f"new step {new_step} does not load")


def check_golden(report: Report) -> None:
    """Older schemas' golden checkpoints (tests/golden/vN-*) load bit-exact."""
    maker = os.path.join(GOLDEN, "make_golden.py")
    if not os.path.isfile(maker):
        return
    spec = importlib.util.spec_from_file_location("fuzz_skew_make_golden", maker)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    want = tree_digest(mod.golden_state())
    for name in sorted(os.listdir(GOLDEN)):
        path = os.path.join(GOLDEN, name)
        if name.startswith("v") and os.path.isdir(path):
            report.add("skew_checks")
            report.add("skew_golden")
            report.check(tree_digest(ckptstore.load(path)) == want, f"golden {name} does not load bit-exact")


def run(report: Report, budget: Budget, *, seed: int = 0) -> None:
    """Golden checks, then random skew cases until ``budget`` (at least one case)."""
    rng = random.Random(seed)
    check_golden(report)
    i = 0
    with tempfile.TemporaryDirectory(prefix="fuzz-skew-") as tmp:
        while i == 0 or not budget.out():
            case = Case(os.path.join(tmp, f"run-{i}"), rng)
            what = (f"case {i} ({'incremental' if case.incremental else 'full'}, {case.mode}, steps "
                    f"{case.steps}, newer {case.newer})")
            case.build()
            check_case(report, case, what)
            report.add("skew_cases")
            report.add("skew_newer_steps", len(case.newer))
            shutil.rmtree(case.root, ignore_errors=True)
            i += 1
