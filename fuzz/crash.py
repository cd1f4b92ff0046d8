"""Crash injection: a kill-point sweep over every I/O call of a save, and blackbox kills.

Kill-point sweep. A clean save of a small state is run once through a
:class:`~ckptstore.storage.faulty.FaultyStorage` to count its mutating calls (every
open, write, fsync, close, rename, link, directory fsync of shards and manifest).
Then, for every call k, a fresh process saves the same state and SIGKILLs its
whole process group (trainer and writers, like a lost node) just before or just
after call k. Two scenarios per compression mode: a new step next to a committed
one, and ``overwrite=True`` over a committed one.

Oracle after each kill: the previously committed checkpoint loads bit-identical
(or, for an overwrite, exactly one of old/new loads); the new one either loads
bit-identical or is absent (``load`` raises CheckpointNotFoundError and ``fsck``
exits 2), never a mix; once the manifest's link/rename has run the new one must
load (nothing committed is lost); and a new save to the same path then succeeds.

Blackbox kills: a parent SIGKILLs the trainer, one writer, or the whole group after
a random delay; the same oracle applies.
"""
from __future__ import annotations

import json
import os
import random
import shutil
import signal
import tempfile

import ckptstore
from ckptstore.errors import CheckpointExistsError
from ckptstore.storage import Storage, open_storage
from ckptstore.storage.faulty import Ledger, ops_of

from .common import MODES, SMALL, Budget, ForkServer, Report, fsck_code, make_state, outcome, tree_digest

OLD_SEED, NEW_SEED = 1, 2


class Zygote(ForkServer):
    """A fork server (``python -m fuzz.child --serve``): torch is imported once and
    every saving process is a fork of it, so a kill point costs a fork, not a start.
    One writer per save: a deterministic call order."""

    def __init__(self, tmp: str) -> None:
        super().__init__("fuzz.child", tmp, "zygote.log")

    def run(self, spec: dict) -> tuple[int, dict]:
        """Run one save; returns (exit status, the child's JSON answer or {})."""
        result = os.path.join(self.tmp, "result.json")
        self.send(dict(spec, result=result))
        status = self.answer()["status"]
        try:
            with open(result) as f:
                text = f.read().strip()
            os.unlink(result)
        except FileNotFoundError:
            text = ""
        return status, (json.loads(text.splitlines()[-1]) if text else {})


class LocalTier:
    """Runs are directories below a temp dir."""

    name = "local"
    options: dict | None = None

    def __init__(self, tmp: str) -> None:
        self.tmp = tmp

    def join(self, run: str, name: str) -> str:
        return f"{run}/{name}"

    def storage(self, where: str) -> Storage:
        return open_storage(where, self.options)

    def base(self, mode: str) -> str:
        """A run holding one committed checkpoint, ``step-1``."""
        base = os.path.join(self.tmp, f"base-{mode}")
        if not os.path.exists(base):
            ckptstore.save(make_state(OLD_SEED), self.storage(self.join(base, "step-1")),
                           compression=mode, blocking=True, **SMALL)
        return base

    def fresh(self, base: str, tag: str) -> str:
        run = os.path.join(self.tmp, f"run-{tag}")
        shutil.rmtree(run, ignore_errors=True)
        shutil.copytree(base, run)
        return run

    def remove(self, run: str) -> None:
        shutil.rmtree(run, ignore_errors=True)

    def fsck(self, where: str) -> int:
        return fsck_code(where)

    def close(self) -> None:
        pass


class ObjectTier(LocalTier):
    """Runs are prefixes in a bucket of an S3 (moto) or GCS (fake-gcs-server) server
    started here; the saving processes reach it over HTTP. No rename: data objects,
    then a create-only manifest object (``If-None-Match: *`` / ``ifGenerationMatch=0``)."""

    def __init__(self, tmp: str, kind: str) -> None:
        from .servers import ObjectStore

        super().__init__(tmp)
        self.name = kind
        self.store = ObjectStore(kind)
        self.options = self.store.direct
        self.fs = self.store.fs
        self.fs.mkdir("fuzz")

    def base(self, mode: str) -> str:
        base = self.store.url(f"fuzz/base-{mode}")
        if not self.fs.exists(f"fuzz/base-{mode}/step-1/manifest.json"):
            ckptstore.save(make_state(OLD_SEED), self.storage(self.join(base, "step-1")),
                           compression=mode, blocking=True, **SMALL)
        return base

    def fresh(self, base: str, tag: str) -> str:
        run = self.store.url(f"fuzz/run-{tag}")
        self.remove(run)
        src = self.store.path(base)
        for key in self.fs.find(src):
            self.fs.copy(key, "fuzz/run-" + tag + key[len(src):])
        return run

    def remove(self, run: str) -> None:
        path = self.store.path(run)
        if self.fs.find(path):
            self.fs.rm(path, recursive=True)
        self.fs.invalidate_cache()

    def fsck(self, where: str) -> int:
        from ckptstore.errors import CheckpointNotFoundError
        from ckptstore.verify.fsck import fsck

        try:
            return 0 if fsck(self.storage(where)).ok else 1
        except CheckpointNotFoundError:
            return 2

    def close(self) -> None:
        self.store.close()


def _commit_index(journal: list[dict]) -> int:
    """The mutating-call index of the manifest's link/rename (0 if none)."""
    for r in journal:
        if r["op"] in ("link_exclusive", "rename", "put_exclusive") and \
                r.get("dst", r["name"]).rpartition("/")[2] == "manifest.json":
            return r["index"]
    return 0


class Case:
    """One (mode, scenario) pair: its base directory and clean-save call count."""

    def __init__(self, tmp: str, zygote: Zygote, mode: str, scenario: str,
                 tier: LocalTier | None = None) -> None:
        self.mode, self.scenario = mode, scenario
        self.tier = tier or LocalTier(tmp)
        self.base = self.tier.base(mode)
        self.tmp = tmp
        self.old = tree_digest(make_state(OLD_SEED))
        self.new = tree_digest(make_state(NEW_SEED))
        run = self.fresh("count")
        ledger = Ledger(os.path.join(tmp, f"ledger-{mode}-{scenario}"))
        status, _ = zygote.run(self.spec(run, ledger))
        if status != 0:
            raise RuntimeError(f"clean save failed with status {status} ({mode}, {scenario})")
        ops = ops_of(ledger.journal())
        self.total = len(ops)
        self.commit_at = _commit_index(ops)
        ledger.remove()
        self.tier.remove(run)

    def fresh(self, tag: str) -> str:
        return self.tier.fresh(self.base, f"{self.mode}-{self.scenario}-{tag}")

    def target(self, run: str) -> str:
        return self.tier.join(run, "step-1" if self.scenario == "overwrite" else "step-2")

    def spec(self, run: str, ledger: Ledger, **kw) -> dict:
        return dict(target=self.target(run), options=self.tier.options, ledger=ledger.path,
                    mode=self.mode, seed=NEW_SEED, overwrite=self.scenario == "overwrite", **kw)

    def check(self, report: Report, run: str, status: int, answer: dict, what: str,
              must_be_new: bool = False, failed: bool = False) -> None:
        """The oracle (see the module docstring), then a recovery save. ``failed``:
        the save reported an error, so the new checkpoint must not be committed."""
        if status not in (0, -signal.SIGKILL) and not failed:
            report.fail(f"{what}: saving process ended with status {status} {answer}")
        target = self.tier.storage(self.target(run))
        got = outcome(target)
        what = f"{self.tier.name} {what}"
        if self.scenario == "new":
            report.check(outcome(self.tier.storage(self.tier.join(run, "step-1"))) == self.old,
                         f"{what}: the committed step-1 changed")
            allowed = {self.new} if (must_be_new or status == 0) else {self.new, "absent"}
        else:
            allowed = {self.new} if (must_be_new or status == 0) else {self.old, self.new}
        if failed:
            allowed = {"absent" if self.scenario == "new" else self.old}
        if not report.check(got in allowed, f"{what}: load gave {got}, allowed {sorted(allowed)}"):
            return
        code = self.tier.fsck(self.target(run))
        report.check(code == (2 if got == "absent" else 0), f"{what}: fsck exited {code} ({got})")
        if got == self.new:
            return
        try:  # recovery: the same save again, over the debris of the killed one
            ckptstore.save(make_state(NEW_SEED), target, compression=self.mode, blocking=True,
                           overwrite=self.scenario == "overwrite", **SMALL)
        except CheckpointExistsError as e:
            report.fail(f"{what}: recovery save refused: {e}")
            return
        report.check(outcome(target) == self.new, f"{what}: recovery save does not load")


def sweep(report: Report, budget: Budget, *, modes=MODES, scenarios=("new", "overwrite"),
          seed: int = 0, tier: str = "local") -> None:
    """The kill-point sweep; exhaustive when the budget allows, else a random sample.
    ``tier``: ``"local"``, ``"s3"`` (a moto server) or ``"gcs"`` (fake-gcs-server)."""
    rng = random.Random(seed)
    with tempfile.TemporaryDirectory(prefix="fuzz-crash-") as tmp:
        where = LocalTier(tmp) if tier == "local" else ObjectTier(tmp, tier)
        try:
            with Zygote(tmp) as zygote:
                _sweep(report, budget, zygote, where, tmp, modes, scenarios, rng)
        finally:
            where.close()


def _sweep(report: Report, budget: Budget, zygote: "Zygote", tier: LocalTier, tmp: str,
           modes, scenarios, rng: random.Random) -> None:
    # Cases are built lazily and visited round-robin, so a short budget still
    # samples every (mode, scenario) and a long one is exhaustive.
    pending = [(m, s) for m in modes for s in scenarios]
    rng.shuffle(pending)
    queues: list[tuple[Case, list]] = []
    done = 0  # at least one point, however slow the setup was
    while pending or any(pts for _, pts in queues):
        if budget.out() and done:
            break
        if pending:
            c = Case(tmp, zygote, *pending.pop(), tier=tier)
            pts = [(k, when) for k in range(1, c.total + 1) for when in ("before", "after")]
            rng.shuffle(pts)
            queues.append((c, pts))
        for c, pts in queues:
            if not pts or (budget.out() and done):
                continue
            k, when = pts.pop()
            _kill_point(report, tmp, zygote, c, k, when)
            done += 1


def _kill_point(report: Report, tmp: str, zygote: Zygote, c: Case, k: int, when: str) -> None:
    """Kill one save at call ``k`` and check the oracle."""
    run = c.fresh(f"{k}-{when}")
    ledger = Ledger(os.path.join(tmp, "ledger"))
    status, answer = zygote.run(c.spec(run, ledger, kill_at=k, kill_when=when))
    ledger.remove()
    report.add("crash_points")
    if status == -signal.SIGKILL:
        report.add("kills")
    else:
        report.fail(f"kill at {c.mode}/{c.scenario} call {k} {when} did not happen "
                    f"(status {status} {answer})")
    done = k > c.commit_at or (k == c.commit_at and when == "after")
    c.check(report, run, status, answer, f"{c.mode}/{c.scenario} kill {when} call {k}",
            must_be_new=done and c.commit_at > 0)
    c.tier.remove(run)


def blackbox(report: Report, budget: Budget, kills: int, *, seed: int = 0) -> None:
    """Kill the trainer, a writer or both after random delays, ``kills`` times."""
    rng = random.Random(seed)
    with tempfile.TemporaryDirectory(prefix="fuzz-kill-") as tmp, Zygote(tmp) as zygote:
        cases = {}
        for i in range(kills):
            if budget.out():
                break
            mode, scenario = rng.choice(MODES), rng.choice(("new", "overwrite"))
            if (mode, scenario) not in cases:
                cases[mode, scenario] = Case(tmp, zygote, mode, scenario)
            c = cases[mode, scenario]
            run = c.fresh(f"bb-{i}")
            ledger = Ledger(os.path.join(tmp, "ledger"))
            victim = rng.choice(("group", "trainer", "writer"))
            spec = c.spec(run, ledger, blackbox=dict(victim=victim, delay=rng.uniform(0, 0.6)))
            status, answer = zygote.run(spec)
            ledger.remove()
            report.add("kills")
            failed = victim == "writer" and status == 3 and answer.get("error") == "WriterDiedError"
            c.check(report, run, status, answer, f"blackbox {victim} kill #{i} {mode}/{scenario}",
                    failed=failed)
            shutil.rmtree(run, ignore_errors=True)
