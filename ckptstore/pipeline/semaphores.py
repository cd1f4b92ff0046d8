"""The writer pool's named POSIX semaphores: none left in ``/dev/shm`` after a SIGKILL.

A process pool of the ``spawn`` start method shares its two queues through named
POSIX semaphores, five per pool: the call queue's read lock, write lock and bounded
semaphore, and the result queue's read and write locks (``/dev/shm/sem.mp-*`` on
Linux). CPython unlinks them from its resource-tracker process, which a SIGKILL of
the whole process group kills too: every killed group used to leave five names that
nothing removed (``fork`` unlinks at creation, but writers must not be forked from a
process that may hold CUDA state).

A name is needed only until every writer has opened it (a spawned child opens each
semaphore by name while it unpickles its arguments, and a started pool never spawns
again: a dead writer breaks it and a new pool is made). So once every writer maps
all five, :func:`release` unlinks them: the semaphores work on while mapped and
vanish with the last process that maps them, SIGKILL or not.

For the second or so while the writers start, :func:`record` keeps the names in a
file of this process under ``<tempdir>/ckptstore-<uid>/sem-<pid namespace>/``; the
next pool start of any process (:func:`clean_stale`) unlinks the recorded names of
owners that are dead, and never a name that a live process still maps.

This module must not import torch (writer processes import the pipeline).
"""
from __future__ import annotations

import contextlib
import itertools
import logging
import os
import re
import tempfile
import time
from multiprocessing import resource_tracker, util
from multiprocessing.synchronize import SemLock
from pathlib import Path
from typing import Any

log = logging.getLogger("ckptstore.writer")

SHM = "/dev/shm"
#: what a recorded name may look like (never a path: nothing else is ever unlinked)
_NAME = re.compile(r"^/[A-Za-z0-9_.-]{1,200}$")
_seq = itertools.count()


def supported() -> bool:
    """Where names can be checked against the processes mapping them (Linux)."""
    return os.path.isdir(SHM) and os.path.exists("/proc/self/maps")


def shm_file(name: str) -> str:
    """The ``/dev/shm`` file of a semaphore name (glibc: ``/x`` -> ``sem.x``)."""
    return f"{SHM}/sem.{name.lstrip('/')}"


def pool_locks(pool: Any) -> list[SemLock]:
    """Every named semaphore a process pool holds (its queues' locks), found by type."""
    out: list[SemLock] = []
    for value in vars(pool).values():
        inner = vars(value).values() if hasattr(value, "__dict__") else ()
        for x in (value, *inner):
            if isinstance(x, SemLock) and x not in out:
                out.append(x)
    return [x for x in out if _name(x) is not None]


def pool_names(pool: Any) -> list[str]:
    """The names of :func:`pool_locks`."""
    return [str(_name(x)) for x in pool_locks(pool)]


def _name(lock: SemLock) -> str | None:
    inner = getattr(lock, "_semlock", None)  # the C object; its name is None if unlinked at creation
    return getattr(inner, "name", None)


Ident = tuple[int, int, int]  #: (device major, device minor, inode) of a file


def mapped(pid: int | str) -> set[Ident]:
    """The ``/dev/shm`` files that process ``pid`` maps, by device and inode (the
    creator of a semaphore maps it under glibc's temporary name, since unlinked)."""
    try:
        with open(f"/proc/{pid}/maps", encoding="utf-8", errors="replace") as f:
            lines = f.read().splitlines()
    except OSError:
        return set()
    out = set()
    for line in lines:
        if f" {SHM}/" not in line:
            continue
        fields = line.split(maxsplit=5)
        try:
            major, minor = (int(x, 16) for x in fields[3].split(":"))
            out.add((major, minor, int(fields[4])))
        except (IndexError, ValueError):
            continue
    return out


def ident(path: str) -> Ident | None:
    """``path``'s device and inode, as :func:`mapped` gives them; None if absent."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return os.major(st.st_dev), os.minor(st.st_dev), st.st_ino


def start_time(pid: int | str) -> str | None:
    """The start time of ``pid`` in clock ticks since boot (tells a reused pid apart)."""
    try:
        with open(f"/proc/{pid}/stat", encoding="utf-8", errors="replace") as f:
            stat = f.read()
    except OSError:
        return None
    fields = stat[stat.rfind(")") + 2:].split()
    return fields[19] if len(fields) > 19 else None


def registry() -> Path | None:
    """This user's and pid namespace's record directory, or None where it is unsafe
    (someone else owns it, or it is a link)."""
    try:
        ns = re.sub(r"\D", "", os.readlink("/proc/self/ns/pid"))
    except OSError:
        ns = "0"
    top = Path(tempfile.gettempdir()) / f"ckptstore-{os.getuid()}"
    d = top / f"sem-{ns}"
    try:
        for p in (top, d):
            p.mkdir(mode=0o700, exist_ok=True)
            st = os.lstat(p)
            if st.st_uid != os.getuid() or not p.is_dir() or p.is_symlink():
                log.debug("not recording semaphore names: %s is not this user's directory", p)
                return None
    except OSError as e:
        log.debug("not recording semaphore names: %s", e)
        return None
    return d


def record(names: list[str]) -> Path | None:
    """Write ``names`` to a new record file of this process; its path, or None."""
    d = registry() if names and supported() else None
    if d is None:
        return None
    path = d / f"{os.getpid()}-{start_time('self')}-{next(_seq)}"
    try:
        tmp = path.with_suffix(".tmp")
        tmp.write_text("".join(n + "\n" for n in names))
        tmp.replace(path)
    except OSError as e:
        log.debug("could not record semaphore names in %s: %s", d, e)
        return None
    return path


def release(pool: Any, pids: list[int], rec: Path | None, *, timeout: float = 10.0) -> int:
    """Unlink the names of ``pool``'s semaphores once every process of ``pids`` maps
    them all; CPython's own unlink of them (finalizer, resource tracker) is taken
    back. Returns how many were unlinked (0 where the writers did not all map them
    in ``timeout`` seconds: the names stay recorded for a later clean-up)."""
    locks = pool_locks(pool)
    if not locks or not supported():
        return 0
    names = [n for n in map(_name, locks) if n is not None]
    files = {ident(shm_file(n)) for n in names}
    if None in files:  # a name already gone: nothing to check it by
        return 0
    deadline = time.monotonic() + timeout
    while not all(files <= mapped(p) for p in pids):
        if time.monotonic() > deadline:
            log.debug("writers %s did not map every pool semaphore; names kept", pids)
            return 0
        time.sleep(0.01)
    from _multiprocessing import sem_unlink

    done = 0
    for name in names:
        try:
            sem_unlink(name)
            done += 1
        except FileNotFoundError:
            pass
        except OSError as e:
            log.debug("could not unlink semaphore %s: %s", name, e)
            continue
        _forget(name)
    if rec is not None and done == len(names):
        with contextlib.suppress(OSError):
            rec.unlink(missing_ok=True)
    return done


def _forget(name: str) -> None:
    """Take back CPython's unlink of ``name`` at collection or exit (it would raise
    on the missing name, or remove a later semaphore that reused it)."""
    resource_tracker.unregister(name, "semaphore")
    cleanup = getattr(SemLock, "_cleanup", ())
    for fin in list(getattr(util, "_finalizer_registry", {}).values()):
        if getattr(fin, "_callback", None) is cleanup and getattr(fin, "_args", None) == (name,):
            fin.cancel()


def clean_stale() -> int:
    """Unlink the recorded names of owners that are dead (their pid gone, or reused
    by a process started at another time), unless a live process maps the name;
    remove their record files. Returns how many names were unlinked."""
    d = registry() if supported() else None
    if d is None:
        return 0
    try:
        stale = [p for p in d.iterdir() if _owner_dead(p.name)]
    except OSError:
        return 0
    if not stale:
        return 0
    in_use: set[Ident] | None = None
    done = 0
    uid = os.getuid()
    for rec in stale:
        try:
            names = [n for n in rec.read_text().split() if _NAME.match(n)] if rec.suffix != ".tmp" else []
        except OSError:
            continue
        keep = False
        for name in names:
            f = shm_file(name)
            try:
                if os.lstat(f).st_uid != uid:
                    continue
            except FileNotFoundError:
                continue
            if in_use is None:
                in_use = _all_mapped()
            if ident(f) in in_use:
                keep = True
                continue
            try:
                os.unlink(f)
                done += 1
            except OSError as e:  # gone meanwhile, or not ours to remove: never fail a start
                log.debug("could not remove %s: %s", f, e)
        if not keep:
            with contextlib.suppress(OSError):
                rec.unlink(missing_ok=True)
    if done:
        log.info("removed %d semaphore names left in %s by killed processes", done, SHM)
    return done


def _owner_dead(rec: str) -> bool:
    """Whether the process that wrote record ``rec`` (``<pid>-<start time>-<n>``) is gone."""
    parts = rec.split(".")[0].split("-")
    if len(parts) < 2 or not parts[0].isdigit():
        return False
    return start_time(parts[0]) != parts[1]


def _all_mapped() -> set[Ident]:
    out: set[Ident] = set()
    for pid in os.listdir("/proc"):
        if pid.isdigit():
            out |= mapped(pid)
    return out
