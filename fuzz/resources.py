"""Resource counts: open fds, threads, child processes and ``/dev/shm`` entries of this
process before and after many small saves and loads, and the ``/dev/shm`` entries a
SIGKILLed saving process group leaves (``python -m fuzz resources --budget S``).

Oracle: after warm-up, no count grows beyond a small constant over the saves; every
load is bit-identical; a killed group leaves no ``/dev/shm`` entry once the next
engine start has run (and none at all when it was killed after its writers started).

Entries are attributed exactly: the semaphores of this run (and of each child) get a
name prefix of their own, and staging files carry their creator's pid; nothing in
``/dev/shm`` that this run did not create is counted or removed.
"""
from __future__ import annotations

import contextlib
import json
import os
import random
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from multiprocessing import process

from .common import MODES, Budget, Report, make_state, tree_digest

#: growth allowed over the saves (an fd or a thread of a lazily started helper)
SLACK = 4
#: the counts of the last run, for the report and the docs
last: dict = {}


def shm_names() -> set[str]:
    try:
        return set(os.listdir("/dev/shm"))
    except OSError:
        return set()


def children(pid: int | str = "self") -> list[int]:
    """The live child processes of ``pid`` (every thread's children)."""
    out: list[int] = []
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return out
    for t in tasks:
        try:
            with open(f"/proc/{pid}/task/{t}/children") as f:
                out += [int(x) for x in f.read().split()]
        except OSError:
            pass
    return out


def counts(tag: str) -> dict:
    """This process's fds, threads, children, and ``/dev/shm`` entries it created."""
    pid = os.getpid()
    return dict(fds=len(os.listdir("/proc/self/fd")), threads=len(os.listdir("/proc/self/task")),
                children=len(children()), shm=len(mine(shm_names(), tag, {pid})))


def mine(names: set[str], tag: str, pids: set[int]) -> set[str]:
    """The entries of ``names`` created by a process using semaphore prefix ``tag``
    or by one of ``pids`` (staging fallback files are named after their creator)."""
    return {n for n in names if n.startswith(f"sem.mp-{tag}")
            or any(n.startswith(f"ckptstore-{p}-") for p in pids)}


@contextlib.contextmanager
def sem_prefix(tag: str) -> Iterator[None]:
    """Name this process's new semaphores ``/mp-<tag>-*`` while inside."""
    cfg = process.current_process()._config
    old = cfg.get("semprefix", "/mp")
    cfg["semprefix"] = f"/mp-{tag}"
    try:
        yield
    finally:
        cfg["semprefix"] = old


def saves(report: Report, budget: Budget, root: str, *, n: int, seed: int) -> dict:
    """``n`` small saves (a load of every fifth one, checked bit-identical); the
    counts before (after one warm-up save) and after."""
    import ckptstore

    rng = random.Random(seed)
    tag = "r" + secrets.token_hex(4)
    with sem_prefix(tag):
        ckptstore.save(make_state(seed), os.path.join(root, "warm"), blocking=True)
        before = counts(tag)
        done = loads = 0
        for i in range(n):
            if budget.out():
                break
            path = os.path.join(root, f"s{i % 4}")
            shutil.rmtree(path, ignore_errors=True)
            state = make_state(seed + i)
            ckptstore.save(state, path, blocking=True, compression=rng.choice(MODES))
            done += 1
            if i % 5 == 0:
                got = ckptstore.load(path)
                report.check(tree_digest(got) == tree_digest(state), f"load of save {i} differs")
                del got
                loads += 1
        after = counts(tag)
    report.add("resource_saves", done)
    report.add("resource_loads", loads)
    for k in ("fds", "threads", "children", "shm"):  # the counts, in the CLI's JSON
        report.add(f"resource_{k}_before", before[k])
        report.add(f"resource_{k}_after", after[k])
    for k in ("fds", "threads"):
        report.check(after[k] - before[k] <= SLACK,
                     f"{k} grew from {before[k]} to {after[k]} over {done} saves")
    report.check(after["children"] == before["children"],
                 f"child processes went from {before['children']} to {after['children']}")
    report.check(after["shm"] == 0, f"{after['shm']} /dev/shm entries created by the saves remain")
    return dict(saves=done, loads=loads, before=before, after=after)


def child_script(spec: dict) -> list[str]:
    return [sys.executable, "-m", "fuzz.resources", json.dumps(spec)]


def kill_group(report: Report, root: str, *, seed: int, when: str, delay: float = 0.0,
               next_start: bool = True) -> dict:
    """Start a saving process group, SIGKILL it (``when``: ``idle`` after a save,
    ``busy`` during saves, ``startup`` while its writers start) and count the
    ``/dev/shm`` entries it left, then after the next engine start."""
    tag = "k" + secrets.token_hex(4)
    tmp = os.path.join(root, f"tmp-{tag}")
    os.makedirs(tmp)
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, TMPDIR=tmp,
               PYTHONPATH=os.pathsep.join(p for p in (repo, os.environ.get("PYTHONPATH")) if p))
    before = shm_names()
    spec = dict(target=os.path.join(root, f"c-{tag}"), tag=tag, when=when, seed=seed)
    proc = subprocess.Popen(child_script(spec), stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                            env=env, start_new_session=True)
    group: set[int] = {proc.pid}
    try:
        line = proc.stdout.readline() if proc.stdout else b""
        group |= {int(x) for x in line.split()[1:]}
        time.sleep(delay)
        group |= set(children(proc.pid))
        os.killpg(proc.pid, signal.SIGKILL)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        if proc.stdout:
            proc.stdout.close()
    report.add("kills")
    _wait_group_gone(proc.pid)
    left = mine(shm_names() - before, tag, group)
    if when != "startup":  # the writers had started: nothing may be left even before a restart
        report.check(not left, f"SIGKILL ({when}) left {sorted(left)} in /dev/shm")
    cleaned = 0
    if next_start:
        r = subprocess.run(child_script(dict(spec, when="start")), env=env, capture_output=True,
                           timeout=120)
        report.check(r.returncode == 0, f"next start after a kill failed: {r.stderr[-400:]!r}")
        cleaned = len(left) - len(mine(shm_names() - before, tag, group))
    remaining = mine(shm_names() - before, tag, group)
    report.check(not remaining, f"SIGKILL ({when}) left {sorted(remaining)} in /dev/shm")
    for n in remaining:  # only what this child created
        with contextlib.suppress(OSError):
            os.unlink(os.path.join("/dev/shm", n))
    return dict(when=when, left_by_kill=len(left), cleaned_at_next_start=cleaned, remaining=len(remaining))


def _wait_group_gone(pgid: int, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.02)


def run(report: Report, budget: Budget, *, seed: int = 0, n: int = 200, kills: int = 3) -> Report:
    """``n`` saves in this process, then SIGKILLs of saving groups, within ``budget``."""
    global last
    root = tempfile.mkdtemp(prefix="ckpt-resources-")
    try:
        out: dict = dict(saves=saves(report, budget, root, n=n, seed=seed), kills=[])
        rng = random.Random(seed)
        plan = ["idle", "startup", "busy"]
        for k in range(kills):
            if k and budget.out():
                break
            when = plan[k % len(plan)]
            out["kills"].append(kill_group(report, root, seed=seed + k, when=when,
                                           delay=rng.uniform(0.0, 0.3) if when == "busy" else 0.0))
        end = counts("-")
        mid = out["saves"]["after"]
        for k in ("fds", "children"):  # the kills cost this process nothing either
            report.check(end[k] - mid[k] <= SLACK, f"{k} went from {mid[k]} to {end[k]} over the kills")
        out["after_kills"] = end
        last = out
        report.add("resource_shm_left_by_kills", sum(x["left_by_kill"] for x in out["kills"]))
        report.add("resource_shm_cleaned_at_next_start", sum(x["cleaned_at_next_start"] for x in out["kills"]))
        report.add("resource_shm_remaining", sum(x["remaining"] for x in out["kills"]))
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return report


def child(spec: dict) -> int:
    """A saving process of :func:`kill_group`; prints ``ready <writer pids>`` when it
    is to be killed, then waits (``idle``), keeps saving (``busy``), or stays inside
    the writers' start (``startup``: the pool's names recorded, not yet unlinked).
    ``start`` is the next engine start: one save, then a normal exit."""
    import ckptstore
    from ckptstore.pipeline import semaphores
    from ckptstore.pipeline.engine import engine

    process.current_process()._config["semprefix"] = f"/mp-{spec['tag']}"
    state = make_state(spec["seed"])
    when = spec["when"]
    if when == "startup":
        def hold(*_a: object, **_k: object) -> int:
            print("ready", flush=True)
            time.sleep(120)
            return 0

        semaphores.release = hold  # type: ignore[assignment]
    ckptstore.save(state, spec["target"] + ("-next" if when == "start" else ""), blocking=True)
    if when == "start":
        return 0
    print("ready", *engine().writers.pids(), flush=True)
    i = 0
    while True:
        if when == "busy":
            ckptstore.save(make_state(i), spec["target"] + f"-{i % 2}", blocking=True, overwrite=True)
            i += 1
        else:
            time.sleep(1)


if __name__ == "__main__":
    sys.exit(child(json.loads(sys.argv[1])))
