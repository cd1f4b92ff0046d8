"""SIGKILLs of a Checkpointer with a memory tier and a peer replica.

Two "nodes" here: node A, a temp directory with a local run directory and a memory
parent (``CKPTSTORE_MEMORY_DIR``, below ``/dev/shm`` when writable); node B, a keeper
(``ckptstore.peer.start_keeper``) with a root of its own. Each iteration a trainer (a
fork of a server that imported torch once, in a session of its own) opens
``Checkpointer(local, memory=True, peer=<B>)`` with a random policy and saves
``step_state(step)`` (a function of the step, ~2-3 MiB of it shared by every step, so
incremental steps reference older files), noting each save's begin and memory commit
in an events file. Faults, in turn:

- ``commit``: SIGKILL of the trainer (its group, or its pid alone) at a random delay
  into a memory commit (up to the measured length of a save);
- ``push``: SIGKILL of the trainer while a push to B is in flight (a step directory
  without a manifest in the keeper's root);
- ``buddy``: SIGKILL of the keeper's pid while a push is in flight; saves must go on;
  then the trainer is killed, A's memory is lost, and the keeper restarts on its root
  before the restore (its start-up clean must remove the torn push) or after it;
- ``clean``: no fault: 2-3 saves, then ``close()``.

After ``commit`` and ``push`` A's memory is lost too in a third of the iterations.
Then a fresh process (a fork of the same server) calls ``latest()``,
``load("latest")`` and ``close()`` on the same Checkpointer.

Oracle: the trainer dies only by the kill; every committed copy on every tier loads
bit-identical to its step's state; a push cut by the trainer's death leaves nothing
in the keeper's root; memory (unless lost) holds the newest commit the trainer saw;
``latest()`` and ``loaded_step`` are the newest committed step the restore can reach,
from the first tier in the recovery order (memory, peer, local), bit-identical, with
no fallback; no untyped error (nor a typed one while a committed copy exists); after
``close()`` the memory parent is empty, the keeper holds none of the run's steps and
local disk holds the step. Counters: ``memory_<fault>_kills`` (the kill landed in its
window), ``memory_<fault>_missed``, ``memory_torn_commits``, ``memory_loaded_<tier>``,
``memory_clean_runs``, ``memory_lost_tiers``, ``memory_checked_copies``, ``kills``.
"""
from __future__ import annotations

import argparse
import contextlib
import functools
import json
import logging
import os
import random
import shutil
import signal
import sys
import tempfile
import time
from typing import Any

import ckptstore
from ckptstore.commit.atomic import is_temp_name
from ckptstore.errors import CkptError
from ckptstore.runs.layout import committed_steps, parse_step, step_name
from ckptstore.runs.memory import run_key
from ckptstore.storage import open_storage

from .common import Budget, ForkServer, Report, tree_digest, write_json
from .memory_child import step_state

FAULTS = ("commit", "push", "buddy", "clean")
START_LIMIT = 120.0  #: seconds a trainer may take to start and open its Checkpointer
STEP_LIMIT = 60.0  #: seconds to wait for a commit or a push the injection needs
log = logging.getLogger("fuzz.memory")


# -- the parent --------------------------------------------------------------------


def start(server: ForkServer, spec: dict) -> int:
    """Fork a child running ``spec``; its pid (its answer ``{"status"}`` comes later)."""
    server.send(spec)
    return int(server.answer()["pid"])


def alive(pid: int, group: bool = False) -> bool:
    try:
        (os.killpg if group else os.kill)(pid, 0)
    except ProcessLookupError:
        return False
    return True


def until(cond, limit: float, pause: float = 0.01) -> bool:
    """Poll ``cond()`` until it holds or ``limit`` seconds passed; its last value."""
    deadline = time.monotonic() + limit
    while not cond() and time.monotonic() < deadline:
        time.sleep(pause)
    return bool(cond())


def events(path: str) -> list[tuple[str, int, float]]:
    try:
        with open(path) as f:
            lines = f.read().split("\n")[:-1]
    except FileNotFoundError:
        return []
    return [(w, int(s), float(t)) for w, s, t in (ln.split() for ln in lines)]


def last(evs: list, what: str) -> int:
    return max((s for w, s, _ in evs if w == what), default=0)


def steps_in(path: str) -> list[int]:
    """Committed steps of the run directory ``path`` (none when it is absent)."""
    return committed_steps(open_storage(path)) if os.path.isdir(path) else []


def in_flight(run_dir: str) -> int | None:
    """A step being received in the keeper's run directory (no manifest yet)."""
    try:
        names = os.listdir(run_dir)
    except FileNotFoundError:
        return None
    for n in names:
        s = parse_step(n)
        if s is not None and not os.path.exists(os.path.join(run_dir, n, "manifest.json")):
            return s
    return None


def debris(run_dir: str) -> list[str]:
    """Temp files and step directories without a manifest below a run directory."""
    out = []
    for d, _, files in os.walk(run_dir):
        rel = os.path.relpath(d, run_dir)
        out += [os.path.join(rel, f) for f in files if is_temp_name(f)]
        if d != run_dir and "manifest.json" not in files:
            out.append(rel + "/")
    return out


class Family:
    """The servers and nodes of one run of the family."""

    def __init__(self, report: Report, tmp: str, rng: random.Random) -> None:
        self.report, self.tmp, self.rng = report, tmp, rng
        shm = "/dev/shm" if os.access("/dev/shm", os.W_OK) else None
        self.shm = tempfile.mkdtemp(prefix="fuzz-memory-", dir=shm)
        self.server = ForkServer("fuzz.memory_child", tmp, "server.log")
        self.buddy_root = os.path.join(tmp, "node-b", "keeper")
        self.keeper: Any = None  #: a ckptstore.peer.Keeper while B's keeper runs

    def start_keeper(self) -> None:
        from ckptstore.peer import start_keeper

        self.keeper = start_keeper(self.buddy_root)

    def close(self) -> None:
        if self.keeper is not None:
            self.keeper.stop()
        self.server.close()
        shutil.rmtree(self.shm, ignore_errors=True)

    @staticmethod
    @functools.cache
    def digest(step: int, scale: int) -> str:
        return tree_digest(step_state(step, scale))


def iteration(fam: Family, i: int, fault: str) -> None:
    report, rng = fam.report, fam.rng
    if fam.keeper is None:
        fam.start_keeper()
    node = os.path.join(fam.tmp, f"it-{i}")
    memdir = os.path.join(fam.shm, f"it-{i}")
    os.makedirs(node)
    local = os.path.join(node, "local")
    compression = rng.choice(("zstd", "lz4", "none"))
    scale = rng.choice((2, 4) if fault == "commit" else (1, 2))  # MiB of the step's own data
    spec = dict(local=local, memdir=memdir, peer=fam.keeper.address, scale=scale,
                policy=dict(memory_keep=rng.randint(1, 2), compression=compression,
                            incremental=compression != "none" and rng.random() < 0.7,
                            wait_every=rng.randint(1, 2)),
                events=os.path.join(node, "events"), log=os.path.join(node, "trainer.log"),
                close=rng.randint(2, 3) if fault == "clean" else 0)
    run_dir = os.path.join(fam.buddy_root, run_key(local, None))
    victim = rng.choice(("group", "trainer"))
    what = (f"memory #{i} {fault} victim={victim} scale={spec['scale']} {spec['policy']}")
    pid = start(fam.server, dict(spec, role="trainer"))
    done = False
    try:
        until(lambda: not alive(pid) or events(spec["events"]), START_LIMIT)
        if fault == "commit":
            inject_commit(fam, spec, pid, victim, what)
        elif fault in ("push", "buddy"):
            inject_push(fam, spec, pid, victim, run_dir, fault, what)
        else:  # clean: it closes and ends by itself (a hang is killed: a failure)
            until(lambda: not alive(pid), START_LIMIT)
        done = True
    finally:  # also when the run is stopped here: never leave a trainer running
        if fault != "clean" or not done or alive(pid):
            kill(pid, victim if done else "group")
    status = fam.server.answer()["status"]
    if not until(lambda: not alive(pid, group=True), 10):  # writers, promoter
        report.add("memory_orphans")
        kill(pid, "group")
        until(lambda: not alive(pid, group=True), 10)
    if status != (0 if fault == "clean" else -signal.SIGKILL):
        with open(spec["log"]) as f:
            report.fail(f"{what}: the trainer ended with status {status}: {f.read()[-800:]}")
        return
    evs = events(spec["events"])
    if fault == "clean":
        report.add("memory_clean_runs")
        after_close(report, memdir, run_dir, local, last(evs, "committed"), True, what)
        shutil.rmtree(node, ignore_errors=True)
        return
    report.add("kills")
    lose = fault == "buddy" or rng.random() < 1 / 3
    if lose:  # node A's memory is gone (a lost node, or a reboot)
        shutil.rmtree(memdir, ignore_errors=True)
        report.add("memory_lost_tiers")
    restart_first = fault == "buddy" and rng.random() < 0.5
    if fault == "buddy" and restart_first:
        fam.start_keeper()  # on the same root: its start-up clean removes the torn push
        left = debris(run_dir)
        report.check(not left, f"{what}: the restarted keeper left {left[:5]}")
    tiers = check_copies(fam, spec, run_dir, None if lose else evs, what)
    peer_up = fam.keeper is not None
    reach = dict(memory=[] if lose else tiers["memory"], peer=tiers["peer"] if peer_up else [],
                 local=tiers["local"])
    restore(fam, spec, reach, run_dir, peer_up, what)
    if fam.keeper is None:
        fam.start_keeper()
    shutil.rmtree(node, ignore_errors=True)
    shutil.rmtree(run_dir, ignore_errors=True)


def kill(pid: int, victim: str) -> None:
    with contextlib.suppress(ProcessLookupError):
        (os.killpg if victim == "group" else os.kill)(pid, signal.SIGKILL)


def inject_commit(fam: Family, spec: dict, pid: int, victim: str, what: str) -> None:
    """Kill at a random delay into the save of step 2-4."""
    target = fam.rng.randint(2, 4)
    if until(lambda: not alive(pid) or last(events(spec["events"]), "begin") >= target,
             STEP_LIMIT, 0.001) and alive(pid):
        evs = events(spec["events"])
        begun = {s: t for w, s, t in evs if w == "begin"}
        took = [t - begun[s] for w, s, t in evs if w == "committed" and s in begun]
        took = took[1:] or took  # the first save also starts the writer
        # the parent sees the begin late (a busy machine): aim at the first 70% of a save
        at = begun[target] + fam.rng.uniform(0, 0.7 * sum(took) / len(took))
        until(lambda: time.monotonic() >= at, STEP_LIMIT, 0.0005)
        kill(pid, victim)
    evs = events(spec["events"])
    landed = last(evs, "begin") > last(evs, "committed")
    if landed and debris(os.path.join(spec["memdir"], run_key(spec["local"], None))):
        fam.report.add("memory_torn_commits")  # a step directory without its manifest
    fam.report.add("memory_commit_kills" if landed else "memory_commit_missed")
    log.info("%s: killed %s a commit (events %s)", what, "in" if landed else "outside", evs[-3:])


def inject_push(fam: Family, spec: dict, pid: int, victim: str, run_dir: str, fault: str,
                what: str) -> None:
    """Kill the trainer (``push``) or the keeper (``buddy``) while a push is in flight."""
    report = fam.report
    first = fam.rng.randint(1, 4)  # the first step whose push may be cut
    seen: list[int | None] = [None]

    def pushing() -> bool:  # a push of a step >= first in flight, or 12 saves without one
        seen[0] = in_flight(run_dir)
        if seen[0] is not None and seen[0] >= first:
            return True
        seen[0] = None
        return not alive(pid) or last(events(spec["events"]), "committed") >= first + 12
    until(pushing, STEP_LIMIT, 0.0003)
    step = seen[0]
    if fault == "push":
        kill(pid, victim)
        until(lambda: not debris(run_dir), 10)  # the keeper notices the dropped connection
        left = debris(run_dir)
        report.check(not left, f"{what}: a push cut by the trainer's death left {left[:5]} "
                               "in the keeper's root")
        cut = step is not None and step not in steps_in(run_dir)
        report.add("memory_push_kills" if cut else "memory_push_missed")
        log.info("%s: push of step %s in flight: %s", what, step, cut)
        return
    assert fam.keeper is not None
    kill(fam.keeper.pid, "pid")
    fam.keeper.stop()
    fam.keeper = None
    report.add("kills")
    cut = step is not None and step not in steps_in(run_dir)
    report.add("memory_buddy_kills" if cut else "memory_buddy_missed")
    log.info("%s: keeper killed; push of step %s in flight: %s", what, step, cut)
    # training goes on without its buddy: a save begun after the kill commits
    before = last(events(spec["events"]), "committed")
    report.check(until(lambda: last(events(spec["events"]), "committed") > before + 1 or not alive(pid),
                       STEP_LIMIT, 0.005) and alive(pid),
                 f"{what}: no save committed within {STEP_LIMIT:g} s after the buddy was killed")


def load_copy(fam: Family, path: str, step: int, scale: int, what: str) -> bool:
    """Whether the committed copy at ``path`` loads bit-identical to ``step``'s state."""
    fam.report.add("memory_checked_copies")
    try:
        got = tree_digest(ckptstore.load(path))
    except CkptError as e:
        return fam.report.check(False, f"{what}: {path} (committed) raised {type(e).__name__}: {e}")
    except Exception as e:
        return fam.report.check(False, f"{what}: {path} raised an untyped {type(e).__name__}: {e}")
    return fam.report.check(got == fam.digest(step, scale), f"{what}: {path} loads as another state")


def check_copies(fam: Family, spec: dict, run_dir: str, evs: list | None,
                 what: str) -> dict[str, list[int]]:
    """Every committed copy on every tier loads bit-identical; memory holds the newest
    commit the trainer saw (``evs``; None when the memory tier was lost)."""
    mdir = os.path.join(spec["memdir"], run_key(spec["local"], None))
    tiers = {"memory": steps_in(mdir), "peer": steps_in(run_dir), "local": steps_in(spec["local"])}
    for name, where in (("memory", mdir), ("peer", run_dir), ("local", spec["local"])):
        for s in tiers[name]:
            load_copy(fam, os.path.join(where, step_name(s)), s, spec["scale"], f"{what}: {name}")
    if evs is not None:
        newest = last(evs, "committed")
        fam.report.check(max(tiers["memory"], default=0) >= newest,
                         f"{what}: step {newest} committed in memory, but memory holds {tiers['memory']}")
    return tiers


def restore(fam: Family, spec: dict, reach: dict[str, list[int]], run_dir: str, peer_up: bool,
            what: str) -> None:
    """A fresh process resumes; the oracle on what it loads and on what close() leaves."""
    report = fam.report
    node = os.path.dirname(spec["events"])
    result = os.path.join(node, "restore.json")
    peer = fam.keeper.address if fam.keeper is not None else spec["peer"]
    pid = start(fam.server, dict(spec, role="loader", peer=peer, result=result,
                                 log=os.path.join(node, "loader.log")))
    try:
        status = fam.server.answer()["status"]
    except BaseException:  # the run is stopped here
        kill(pid, "group")
        raise
    try:
        with open(result) as f:
            got = json.load(f)
    except (OSError, ValueError):
        with open(os.path.join(node, "loader.log")) as f:
            report.fail(f"{what}: the restore process ended with {status}: {f.read()[-800:]}")
        return
    newest = max((s for v in reach.values() for s in v), default=None)
    tier = next((t for t in ("memory", "peer", "local") if newest in reach[t]), None)
    log.info("%s: reachable %s; restore: %s", what, reach,
             {k: v for k, v in got.items() if k in ("latest", "step", "tier", "error", "timings")})
    if "error" in got:
        kind = "a typed" if got["typed"] else "an untyped"
        report.check(newest is None and got["error"] == "CheckpointNotFoundError",
                     f"{what}: the restore raised {kind} {got['error']} (newest committed: step "
                     f"{newest} on {tier}): {got['message']} {got['trace'][-600:]}")
        report.add("memory_loaded_none")
    else:
        report.add(f"memory_loaded_{got['tier']}")
        report.check(got["latest"] == newest == got["step"] and got["tier"] == tier,
                     f"{what}: latest() {got['latest']}, loaded step {got['step']} from "
                     f"{got['tier']}; newest committed: {newest} on {tier} (reachable: {reach})")
        report.check(got["step"] is not None and got["digest"] == fam.digest(got["step"], spec["scale"]),
                     f"{what}: the restored step {got['step']} from {got['tier']} is another state")
        report.check(not got["warnings"], f"{what}: the restore fell back: {got['warnings']}")
    report.check("close_error" not in got, f"{what}: close() after the restore raised "
                                           f"{got.get('close_error')}")
    after_close(report, spec["memdir"], run_dir if peer_up else None, spec["local"], newest,
                peer_up, what)


def after_close(report: Report, memdir: str, run_dir: str | None, local: str, step: int | None,
                peer_up: bool, what: str) -> None:
    """A clean close left nothing in the memory parent, dropped the peer's copies and
    keeps ``step`` on local disk."""
    left = os.listdir(memdir) if os.path.isdir(memdir) else []
    report.check(not left, f"{what}: close() left {left[:5]} in the memory dir")
    if run_dir is not None and peer_up:
        held = steps_in(run_dir)
        report.check(not held, f"{what}: close() left steps {held} on the buddy")
    if step is not None:
        report.check(step in steps_in(local), f"{what}: after close() local disk lacks step {step}")


COUNTER = dict(commit="memory_commit_kills", push="memory_push_kills", buddy="memory_buddy_kills",
               clean="memory_clean_runs")


def schedule(report: Report, budget: Budget, iterations: int | None):
    """The faults in turn until the budget is out (at least one iteration); with
    ``iterations``: that many, then (up to 3x as many in all) each fault whose kill
    never landed in its window."""
    i = 0
    while iterations is None and (i == 0 or not budget.out()) or i < (iterations or 0):
        yield i, FAULTS[i % len(FAULTS)]
        i += 1
    while iterations is not None and i < 3 * iterations:
        missing = [f for f in FAULTS if not report.counts.get(COUNTER[f])]
        if not missing:
            return
        yield i, missing[0]
        i += 1


def run(report: Report, budget: Budget, *, seed: int = 0, iterations: int | None = None) -> None:
    """Iterations (see :func:`schedule`), each checked against the oracle."""
    rng = random.Random(seed)
    for key in ("kills", *COUNTER.values()):
        report.add(key, 0)
    tmp = tempfile.mkdtemp(prefix="fuzz-memory-")
    fam = Family(report, tmp, rng)
    try:
        for i, fault in schedule(report, budget, iterations):
            iteration(fam, i, fault)
            report.add("memory_iterations")
    finally:
        fam.close()
        shutil.rmtree(tmp, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m fuzz.memory", description=__doc__.split("\n")[0])
    p.add_argument("--iterations", type=int, default=8)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", metavar="OUT", help="also write the counts to this file")
    p.add_argument("-v", "--verbose", action="store_true", help="log each iteration to stderr")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.CRITICAL)
    log.setLevel(logging.INFO if args.verbose else logging.CRITICAL)
    report = Report()
    run(report, Budget(0), seed=args.seed, iterations=args.iterations)
    payload = dict(family="memory", iterations=args.iterations, seed=args.seed, **report.to_json())
    json.dump(payload, sys.stdout, indent=2)
    sys.stdout.write("\n")
    write_json(args.json, payload)
    return 1 if payload["failures"] else 0


if __name__ == "__main__":
    sys.exit(main())
