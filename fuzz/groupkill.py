"""Whole-group SIGKILLs of Checkpointer runs with retention and promotion to S3.

An *episode* is one run: a local directory and a prefix in a bucket of a moto S3
server started here (``fuzz/servers.py``), with a random policy (``keep_last`` 1-3,
``remote_keep_last`` None or 1-3, compression, incremental or not, ``full_every``).
It lives 2-4 *lives*: each is a process in a session of its own (a fork of a server
that imported torch once, then ``os.setsid``) that opens a Checkpointer on the run
(one writer process, promotion in a spawned process), resumes after
``latest()`` and saves deterministic states (``make_state(step)``) step after step,
calling ``wait()`` after every 1-3 saves; after each ``wait()`` that returned it
appends the steps it covered to a record file (fsynced). At a random moment the
parent SIGKILLs the whole process group (``os.killpg``): the trainer, its writer
processes and the promotion process, like a lost node.

Oracle after each kill, in the parent, on the same directories (R: the newest step
recorded as returned):

- ``latest()`` of a Checkpointer on both tiers, of one on the local tier alone and of
  one on the remote tier alone is >= R (a step whose ``wait()`` returned was committed
  locally and promoted; retention never drops the newest);
- every committed step on either tier loads bit-identical to ``make_state(step)``
  (no torn step, no step holding another's data);
- no step is committed beyond what the lives saved: at most the saves of one
  ``wait()`` past the record (killed before the record was written).

At the end of an episode ``gc`` (grace 0) runs on both tiers: it must leave no temp
file, no data file that no committed manifest names and no uncommitted step, and
every committed step still loads. Counters: ``kills``, ``groupkill_lives``,
``groupkill_checked_steps`` (committed step copies loaded and compared),
``groupkill_returned`` (steps recorded as returned).
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import random
import shutil
import signal
import sys
import tempfile
import time

from .common import MODES, SMALL, Budget, ForkServer, Report, make_state, outcome, serve_forks, tree_digest

#: seconds a child may take to import torch and open its Checkpointer
START_LIMIT = 120.0


def child(spec: dict) -> int:
    """One life of a run (runs in the killed process group)."""
    logging.basicConfig(level=logging.CRITICAL)
    import ckptstore

    from .servers import tier_env

    tier_env()
    ck = ckptstore.Checkpointer(spec["local"], spec["remote"], storage_options=spec["options"],
                                **spec["policy"], save_options=SMALL)
    start = (ck.latest() or 0) + 1
    open(spec["ready"], "w").close()
    pending: list[int] = []
    t0 = time.monotonic()
    for step in range(start, start + spec["max_steps"]):
        ck.save(step, make_state(step, spec["scale"]))
        pending.append(step)
        print(f"{time.monotonic() - t0:.3f} saved {step}", flush=True)  # the life's log
        if len(pending) >= spec["wait_every"]:
            ck.wait()
            _record(spec["record"], pending)
            print(f"{time.monotonic() - t0:.3f} returned {pending}", flush=True)
            pending = []
    ck.close()
    _record(spec["record"], pending)
    return 0


def _record(path: str, steps: list[int]) -> None:
    if not steps:
        return
    with open(path, "a") as f:
        f.write(" ".join(map(str, steps)) + "\n")
        f.flush()
        os.fsync(f.fileno())


def recorded(path: str) -> list[int]:
    """Steps recorded as returned (complete lines only)."""
    try:
        with open(path) as f:
            text = f.read()
    except FileNotFoundError:
        return []
    return [int(x) for line in text.split("\n")[:-1] for x in line.split()]


class Episode:
    """One run: its directories, policy and the storage that reaches it."""

    def __init__(self, tmp: str, store, bucket: str, i: int, rng: random.Random) -> None:
        self.i = i
        self.local = os.path.join(tmp, f"ep-{i}", "local")
        self.remote = store.url(f"{bucket}/ep-{i}")
        self.options = store.direct
        self.record = os.path.join(tmp, f"ep-{i}", "record")
        incremental = rng.random() < 0.7
        self.policy = dict(keep_last=rng.randint(1, 3),
                           remote_keep_last=rng.choice((None, 1, 2, 3)),
                           compression=rng.choice(("zstd", "lz4") if incremental else MODES),
                           incremental=incremental, full_every=rng.choice((None, 2, 3)))
        self.scale = rng.choice((1, 4))
        self.wait_every = rng.randint(1, 3)
        os.makedirs(os.path.dirname(self.record))
        self.digests: dict[int, str] = {}
        self.top = 0  #: the newest step committed on either tier at the last check
        self.seen = 0  #: steps of the record counted so far

    def what(self) -> str:
        p = self.policy
        return (f"groupkill #{self.i} keep_last={p['keep_last']} remote_keep_last="
                f"{p['remote_keep_last']} {p['compression']} incremental={p['incremental']} "
                f"full_every={p['full_every']} wait_every={self.wait_every} scale={self.scale}")

    def digest(self, step: int) -> str:
        if step not in self.digests:
            self.digests[step] = tree_digest(make_state(step, self.scale))
        return self.digests[step]

    def spec(self, ready: str) -> dict:
        return dict(local=self.local, remote=self.remote, options=self.options, policy=self.policy,
                    scale=self.scale, wait_every=self.wait_every, record=self.record, ready=ready,
                    max_steps=10 ** 6)

    def storages(self):
        from ckptstore.storage import open_storage

        return open_storage(self.local), open_storage(self.remote, self.options)


def _gone(pgid: int, limit: float = 10.0) -> None:
    """Wait (a little) until no process of group ``pgid`` is left."""
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.01)


class Server(ForkServer):
    """A fork server (``python -m fuzz.groupkill --serve``): torch and ckptstore are
    imported once, each life is a fork of it in a session of its own (so a group kill
    takes the life, its writers and its promoter, never the server)."""

    def __init__(self, tmp: str) -> None:
        super().__init__("fuzz.groupkill", tmp, "server.log")

    def start(self, spec: dict) -> int:
        """Fork a life running ``spec``; its pid (= its process group)."""
        self.send(spec)
        return int(self.answer()["pid"])

    def status(self) -> int:
        """The exit status of the life started last (blocks until it ended)."""
        return int(self.answer()["status"])


def serve() -> int:
    """The fork server's loop (see :class:`Server`)."""
    import ckptstore.api.checkpointer  # noqa: F401 - imported once, before the forks

    from .servers import tier_env

    tier_env()
    make_state(0)
    return serve_forks(child)


def _alive(pid: int) -> bool:
    """Whether ``pid`` still runs (the server reaps it at once when it ends)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def life(report: Report, ep: Episode, server: Server, tmp: str, rng: random.Random, n: int,
         max_delay: float) -> bool:
    """Start one life, SIGKILL its group at a random moment, check the oracle.
    Returns False when the life ended by itself (a failure)."""
    ready = os.path.join(tmp, f"ready-{ep.i}-{n}")
    log_path = os.path.join(tmp, f"child-{ep.i}-{n}.log")
    pid = server.start(dict(ep.spec(ready), log=log_path))
    what = f"{ep.what()} life {n}"
    try:
        deadline = time.monotonic() + START_LIMIT
        while not os.path.exists(ready) and _alive(pid) and time.monotonic() < deadline:
            time.sleep(0.01)
        if os.path.exists(ready):
            deadline = time.monotonic() + rng.uniform(0, max_delay)
            while _alive(pid) and time.monotonic() < deadline:
                time.sleep(0.002)
    finally:  # also when the run is stopped here (BudgetSpent): never leave a life running
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pid, signal.SIGKILL)  # the trainer, its writers, its promoter
    status = server.status()
    _gone(pid)
    if status != -signal.SIGKILL:
        with open(log_path) as f:
            tail = f.read()[-600:]
        report.fail(f"{what}: the life ended by itself with status {status}: {tail}")
        return False
    report.add("kills")
    report.add("groupkill_lives")
    check(report, ep, what)
    return True


def check(report: Report, ep: Episode, what: str) -> None:
    """The oracle after a kill (see the module docstring)."""
    import ckptstore
    from ckptstore.runs.layout import committed_steps, step_name

    steps = recorded(ep.record)
    newest = max(steps, default=0)
    report.add("groupkill_returned", len(steps) - ep.seen)
    ep.seen = len(steps)
    local, remote = ep.storages()
    found: dict[str, list[int]] = {}
    for name, root in (("local", local), ("remote", remote)):
        for s in committed_steps(root):
            got = outcome(root.child(step_name(s)))
            report.add("groupkill_checked_steps")
            shown = got if got == "absent" or got.startswith("error:") else "another state"
            report.check(got == ep.digest(s), f"{what}: {name} step {s} loads as {shown}")
            found.setdefault(name, []).append(s)
    for label, kw in (("both tiers", dict(local_dir=ep.local, remote=ep.remote)),
                      ("local tier", dict(local_dir=ep.local)),
                      ("remote tier", dict(local_dir=None, remote=ep.remote))):
        ck = ckptstore.Checkpointer(storage_options=ep.options, **kw)
        latest = ck.latest()
        ck.close()
        report.check((latest or 0) >= newest, f"{what}: latest() on the {label} is {latest}, "
                                              f"but step {newest} returned from wait() "
                                              f"(committed: {found})")
    top = max((max(v) for v in found.values()), default=0)
    # a life resumes after the newest committed step; what it committed beyond its
    # record is at most the saves of one wait() (killed before the record was written)
    report.check(top <= max(newest, ep.top) + ep.wait_every,
                 f"{what}: step {top} committed, but only up to {max(newest, ep.top)} returned "
                 f"and wait() covers {ep.wait_every} saves")
    ep.top = max(ep.top, top)


def finish(report: Report, ep: Episode, what: str) -> None:
    """gc (grace 0) on both tiers leaves no debris; every committed step still loads."""
    from ckptstore.runs.gc import gc
    from ckptstore.runs.layout import committed_steps, step_name

    from .enospc import debris

    for name, root in zip(("local", "remote"), ep.storages()):
        gc(root, grace=0)
        left = debris(root)
        report.check(not left, f"{what}: gc of the {name} tier left {left[:5]}")
        for s in committed_steps(root):
            got = outcome(root.child(step_name(s)))
            report.check(got == ep.digest(s), f"{what}: after gc, {name} step {s} loads as {got}")


def run(report: Report, budget: Budget, *, seed: int = 0, max_delay: float = 5.0,
        lives: tuple[int, int] = (2, 4), min_lives: int = 1) -> None:
    """Episodes of 2-4 killed lives each until the budget is out (at least
    ``min_lives`` lives, in the first episode)."""
    from .servers import ObjectStore

    rng = random.Random(seed)
    for key in ("kills", "groupkill_lives", "groupkill_returned", "groupkill_checked_steps"):
        report.add(key, 0)
    tmp = tempfile.mkdtemp(prefix="fuzz-groupkill-")
    store = ObjectStore("s3")  # sets the environment the server's lives need
    server = Server(tmp)
    try:
        bucket = f"groupkill-{os.getpid()}-{seed}"
        store.fs.mkdir(bucket)
        i = 0
        def more() -> bool:  # a failing life adds no life: then the budget decides
            short = report.counts.get("groupkill_lives", 0) < min_lives and not report.counts["failures"]
            return not budget.out() or short

        while more():
            i += 1
            ep = Episode(tmp, store, bucket, i, rng)
            for n in range(max(rng.randint(*lives), min_lives if i == 1 else 0)):
                if not more():
                    break
                if not life(report, ep, server, tmp, rng, n, max_delay):
                    break
            finish(report, ep, ep.what())
            shutil.rmtree(os.path.dirname(ep.record), ignore_errors=True)
    finally:
        server.close()
        store.close()
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(serve() if sys.argv[1:] == ["--serve"] else child(json.loads(sys.argv[1])))
