"""Error injection: failing storage calls, real file-size limits, short writes,
signals (EINTR), stale temp files and two savers of one step.

Injected errors come from a data table run through
:class:`~ckptstore.storage.faulty.FaultyStorage`: for each mutating call of a save
(on a shard, on the manifest, or the directory fsync), each errno (EIO, ENOSPC,
EFBIG), failing before the call runs or after it has run. Oracle: the save raises
the injected ``OSError`` (same errno) from ``wait()``; nothing torn is committed
(the step loads as absent, or as the complete new state when the failure came
after the commit point); a failed fsync is never retried and its file never
renamed into place; no temp or shard files are left behind; and the same save
then succeeds.
"""
from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time

import ckptstore
from ckptstore.commit.atomic import is_temp_name
from ckptstore.errors import CheckpointExistsError
from ckptstore.storage import LocalStorage
from ckptstore.storage.faulty import FaultyStorage, Ledger

from .common import MODES, SMALL, Budget, Report, fsck_code, make_state, outcome, tree_digest

ERRNOS = (errno.EIO, errno.ENOSPC, errno.EFBIG)
#: (call, which files: glob of the base name, or None for directory calls)
CALLS = [(op, where) for op in ("open_write", "write", "fsync", "close", "rename")
         for where in (".tmp-shard-*", ".tmp-manifest.json.*")] + \
        [("link_exclusive", ".tmp-manifest.json.*"), ("fsync_dir", None), ("makedirs", None)]


def clean_counts(tmp: str, mode: str) -> dict[str, int]:
    """Calls per op of a clean save (to aim at the last directory fsync)."""
    ledger = Ledger(os.path.join(tmp, "ledger-clean"))
    target = os.path.join(tmp, f"clean-{mode}")
    ckptstore.save(make_state(2), FaultyStorage(LocalStorage(target), ledger=ledger),
                   compression=mode, blocking=True, **SMALL)
    counts = ledger.counts()
    ledger.remove()
    shutil.rmtree(target)
    return counts


def table(modes=MODES, counts: dict | None = None) -> list[dict]:
    """Every injected-error case: the data that drives FaultyStorage. ``counts``
    (mode -> clean-save call counts) adds the last directory fsync (the manifest's)."""
    cases = []
    for mode in modes:
        last_dir = (counts or {}).get(mode, {}).get("fsync_dir", 2)
        for op, where in CALLS:
            for code in ERRNOS:
                for when in ("before", "after"):
                    if op == "rename" and where and "manifest" in where:
                        continue  # the manifest is linked (create-only), never renamed
                    nths = (1, last_dir) if op == "fsync_dir" else (1,)  # a shard's / the manifest's
                    for nth in nths:
                        cases.append(dict(mode=mode, op=op, where=where, errno=code,
                                          when=when, nth=nth))
    return cases


def _leftovers(path: str) -> list[str]:
    if not os.path.isdir(path):
        return []
    return [n for n in os.listdir(path) if is_temp_name(n) or n.startswith("shard-")]


def injected(report: Report, budget: Budget, tmp: str, modes=MODES) -> None:
    if budget.out():  # the clean counts below are a save per mode
        return
    new = tree_digest(make_state(2))
    counts = {m: clean_counts(tmp, m) for m in modes}
    for i, case in enumerate(table(modes, counts)):
        if budget.out():
            return
        what = (f"{case['mode']}: {os.strerror(case['errno'])} {case['when']} {case['op']} "
                f"#{case['nth']} on {case['where'] or 'the directory'}")
        target = os.path.join(tmp, f"inj-{i}")
        ledger = Ledger(os.path.join(tmp, "ledger"))
        storage = FaultyStorage(LocalStorage(target), fail={case["op"]: case["nth"]},
                                errno=case["errno"], fail_when=case["when"],
                                where=case["where"], ledger=ledger)
        error: BaseException | None = None
        try:
            ckptstore.save(make_state(2), storage, compression=case["mode"], blocking=True,
                           **SMALL)
        except OSError as e:
            error = e
        journal = [r for r, _ in ledger.journal()]
        ledger.remove()
        fired = any(r["op"] == "note" for r in journal)
        if not fired:
            continue  # that call does not happen in this mode (e.g. no second fsync_dir)
        report.add("faults_injected")
        if not report.check(error is not None and error.errno == case["errno"],
                            f"{what}: save gave {error!r}, not the injected error"):
            continue
        got = outcome(target)
        # A failure reported after the manifest is linked may leave the complete new
        # checkpoint; anything else must leave no checkpoint at all.
        report.check(got in ("absent", new), f"{what}: load gave {got}")
        if got == "absent":
            report.check(fsck_code(target) == 2, f"{what}: fsck of the failed save is not 2")
            report.check(not _leftovers(target), f"{what}: left {_leftovers(target)}")
        if case["op"] == "fsync":
            _no_retry(report, journal, what)
        try:
            ckptstore.save(make_state(2), target, compression=case["mode"], blocking=True,
                           overwrite=got == new, **SMALL)
        except CheckpointExistsError as e:
            report.fail(f"{what}: the retried save was refused: {e}")
            continue
        report.check(outcome(target) == new, f"{what}: the retried save does not load")
        shutil.rmtree(target, ignore_errors=True)


def _no_retry(report: Report, journal: list[dict], what: str) -> None:
    """After a failed fsync of a file: no second fsync of it, and no rename or link
    of it into place (never retry an fsync and trust it)."""
    note = next(r for r in journal if r["op"] == "note")
    name = note["name"]
    later = [r for r in journal if r["index"] > note["index"] and r["op"] != "note"
             and r["name"] == name]
    bad = [r["op"] for r in later if r["op"] in ("fsync", "rename", "link_exclusive")]
    report.check(not bad, f"{what}: after the failed fsync of {name}: {bad}")


def fsize_limit(report: Report, tmp: str) -> None:
    """A real RLIMIT_FSIZE (EFBIG) on the writers, then on the manifest writer only."""
    for i, (limit_writers, limit_self) in enumerate(((True, False), (False, True))):
        target = os.path.join(tmp, f"fsize-{i}")
        spec = dict(target=target, plain=True, mode="none", seed=2, fsize=1024,
                    warm=os.path.join(tmp, f"fsize-warm-{i}"), limit_writers=limit_writers,
                    limit_self=limit_self)
        p = subprocess.run([sys.executable, "-m", "fuzz.child", json.dumps(spec)],
                           capture_output=True, text=True, timeout=300,
                           env=dict(os.environ, CKPTSTORE_WRITERS="1"))
        report.add("faults_injected")
        what = f"RLIMIT_FSIZE on {'writers' if limit_writers else 'the manifest writer'}"
        answer = json.loads(p.stdout.strip().splitlines()[-1]) if p.stdout.strip() else {}
        if not report.check(p.returncode == 4 and answer.get("errno") == errno.EFBIG,
                            f"{what}: exit {p.returncode} {answer} {p.stderr[-300:]}"):
            continue
        report.check(outcome(target) == "absent", f"{what}: something was committed")
        report.check(not _leftovers(target), f"{what}: left {_leftovers(target)}")


def short_writes(report: Report, tmp: str) -> None:
    """os.write writing at most 7 bytes per call (in this process: the manifest)."""
    real = os.write
    target = os.path.join(tmp, "short")

    def short(fd: int, data) -> int:
        return real(fd, memoryview(data)[:7])

    os.write = short
    try:
        ckptstore.save(make_state(2), target, compression="zstd", blocking=True, **SMALL)
    finally:
        os.write = real
    report.add("faults_injected")
    report.check(outcome(target) == tree_digest(make_state(2)), "short writes: bad checkpoint")


def signals(report: Report, tmp: str) -> None:
    """SIGALRM every millisecond during a save and a load: EINTR must be resumed."""
    hits = [0]

    def handler(signum, frame) -> None:
        hits[0] += 1

    old = signal.signal(signal.SIGALRM, handler)
    signal.setitimer(signal.ITIMER_REAL, 0.001, 0.001)
    try:
        target = os.path.join(tmp, "eintr")
        ckptstore.save(make_state(2), target, compression="lz4", blocking=True, **SMALL)
        got = outcome(target)
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0, 0)
        signal.signal(signal.SIGALRM, old)
    report.add("faults_injected", max(hits[0], 1))
    report.check(got == tree_digest(make_state(2)), f"EINTR: load gave {got}")


def stale_temps(report: Report, tmp: str) -> None:
    """Debris of an earlier crash (temp files, an orphan shard) does not disturb a save."""
    target = os.path.join(tmp, "stale")
    os.makedirs(target)
    for name in (".tmp-manifest.json.1.deadbeef", ".tmp-shard-00000-000000000000.chunks.1.0",
                 "shard-00000-000000000000.chunks"):
        with open(os.path.join(target, name), "wb") as f:
            f.write(os.urandom(5000))
    report.check(outcome(target) == "absent", "stale temps: debris loads as a checkpoint")
    ckptstore.save(make_state(2), target, compression="zstd", blocking=True, **SMALL)
    report.add("faults_injected")
    report.check(outcome(target) == tree_digest(make_state(2)), "stale temps: bad checkpoint")
    report.check(fsck_code(target) == 0, "stale temps: fsck is not clean")


def two_savers(report: Report, tmp: str, rounds: int = 1) -> None:
    """Two processes save different states to one step at once: exactly one commits,
    the other gets CheckpointExistsError, and the winner's state loads."""
    for r in range(rounds):
        target = os.path.join(tmp, f"race-{r}")
        barrier = os.path.join(tmp, f"go-{r}")
        procs = [subprocess.Popen(
            [sys.executable, "-m", "fuzz.child",
             json.dumps(dict(target=target, plain=True, mode="zstd", seed=seed,
                             barrier=barrier))],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            env=dict(os.environ, CKPTSTORE_WRITERS="1")) for seed in (2, 3)]
        deadline = time.monotonic() + 300
        while len([n for n in os.listdir(tmp) if n.startswith(f"go-{r}.ready")]) < 2:
            if time.monotonic() > deadline or any(p.poll() is not None for p in procs):
                break
            time.sleep(0.01)
        open(barrier, "w").close()
        outs = [p.communicate(timeout=300) for p in procs]
        codes = [p.returncode for p in procs]
        report.add("faults_injected")
        what = f"two savers round {r}: exits {codes}"
        if not report.check(sorted(codes) == [0, 3], f"{what} {[o[1][-300:] for o in outs]}"):
            continue
        loser = outs[codes.index(3)][0]
        report.check("CheckpointExistsError" in loser, f"{what}: loser said {loser}")
        winner = (2, 3)[codes.index(0)]
        report.check(outcome(target) == tree_digest(make_state(winner)),
                     f"{what}: the winner's state does not load")


#: seconds left that a slow fixed case (fsize_limit, two_savers: child processes) needs to start
SLOW_PART = 8.0


def run(report: Report, budget: Budget, *, modes=MODES, seed: int = 0,
        slow: bool = True) -> None:
    with tempfile.TemporaryDirectory(prefix="fuzz-errors-") as tmp:
        fixed = [stale_temps, short_writes, signals] + ([fsize_limit, two_savers] if slow else [])
        for i, part in enumerate(fixed):
            # the budget bounds the fixed cases too (the first always runs); the slow
            # ones start children and take ~10 s each on a busy machine
            if i and not budget.afford(SLOW_PART if part in (fsize_limit, two_savers) else 1e-9):
                continue
            part(report, tmp)
        injected(report, budget, tmp, modes)
