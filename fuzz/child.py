"""A saving process for crash sweeps: ``python -m fuzz.child SPEC_JSON``.

Saves ``make_state(seed)`` through a FaultyStorage that SIGKILLs the process group
at the requested call. Exit codes: 0 committed, 3 a typed ckptstore error (its name
on stdout), anything else a harness failure; -9 when killed.
"""
from __future__ import annotations

import json
import os
import sys
import time


def main(spec: dict) -> int:
    import ckptstore
    from ckptstore.storage import open_storage
    from ckptstore.storage.faulty import FaultyStorage

    from .common import SMALL, make_state

    inner = open_storage(spec["target"], spec.get("options"))
    if spec.get("plain"):
        storage = inner
    else:
        storage = FaultyStorage(inner, kill_at=spec.get("kill_at"),
                                kill_when=spec.get("kill_when", "before"),
                                kill_scope=spec.get("kill_scope", "group"), ledger=spec["ledger"])
    state = make_state(spec["seed"], spec.get("scale", 1))
    try:
        if spec.get("fsize"):  # a real RLIMIT_FSIZE on the writers and/or this process
            _limit_file_size(spec)
        if spec.get("barrier"):  # start two savers together
            open(spec["barrier"] + f".ready-{os.getpid()}", "w").close()
            while not os.path.exists(spec["barrier"]):
                time.sleep(0.005)
        ckptstore.save(state, storage, compression=spec["mode"],
                       blocking=True, overwrite=spec.get("overwrite", False), **SMALL)
    except ckptstore.StorageError as e:  # an I/O error, typed: still an OSError with errno
        print(json.dumps({"error": type(e).__name__, "errno": e.errno, "message": str(e)}))
        return 4
    except ckptstore.CkptError as e:
        print(json.dumps({"error": type(e).__name__, "message": str(e)}))
        return 3
    except OSError as e:
        print(json.dumps({"error": type(e).__name__, "errno": e.errno, "message": str(e)}))
        return 4
    return 0


def _limit_file_size(spec: dict) -> None:
    import resource

    import ckptstore
    from ckptstore.pipeline.engine import engine

    from .common import SMALL, make_state

    # Start the writers and size the staging arena first: RLIMIT_FSIZE also bounds
    # the staging memfd, and only the shard or manifest writes should hit it.
    ckptstore.save(make_state(0, spec.get("scale", 1)), spec["warm"], compression=spec["mode"],
                   blocking=True, **SMALL)
    limit = int(spec["fsize"])
    pids = list(engine().writers.pids()) if spec.get("limit_writers", True) else []
    for pid in pids + ([os.getpid()] if spec.get("limit_self", True) else []):
        resource.prlimit(pid, resource.RLIMIT_FSIZE, (limit, limit))


def _reap(pid: int, blackbox: dict | None) -> int:
    """Wait for the saving child; for a blackbox kill, first SIGKILL the trainer, a
    writer or the whole group after ``delay`` seconds. Returns the exit status."""
    import signal

    if blackbox:
        deadline = time.monotonic() + blackbox["delay"]
        while time.monotonic() < deadline:
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                return os.waitstatus_to_exitcode(status)
            time.sleep(0.002)
        victim = blackbox["victim"]
        if victim == "group":
            os.killpg(pid, signal.SIGKILL)
        elif victim == "trainer":
            os.kill(pid, signal.SIGKILL)
        else:
            import psutil

            writers = [p for p in psutil.Process(pid).children()
                       if "spawn_main" in " ".join(p.cmdline())
                       and "resource_tracker" not in " ".join(p.cmdline())]
            if writers:
                writers[0].kill()
    _, status = os.waitpid(pid, 0)
    if blackbox and blackbox["victim"] != "writer":
        deadline = time.monotonic() + 10  # orphaned writers notice within 0.5 s
        while time.monotonic() < deadline:
            try:
                os.killpg(pid, 0)
            except ProcessLookupError:
                break
            time.sleep(0.01)
    return os.waitstatus_to_exitcode(status)


def serve() -> int:
    """Fork server: import torch and ckptstore once, then fork one saving child per
    spec line on stdin (each in its own session, so a group kill takes only it and
    its writers) and answer each line with the child's exit status."""
    import ckptstore.api.save

    from .common import make_state

    make_state(0)
    for line in sys.stdin:
        spec = json.loads(line)
        sys.stdout.flush()
        pid = os.fork()
        if pid == 0:  # the child: never returns into the server loop
            code = 70
            try:
                os.setsid()
                with open(spec["result"], "w") as out:
                    sys.stdout = out
                    code = main(spec)
                    out.flush()
            finally:
                os._exit(code)
        code = _reap(pid, spec.get("blackbox"))
        sys.stdout.write(json.dumps({"status": code}) + "\n")
        sys.stdout.flush()
    return 0


if __name__ == "__main__":
    if sys.argv[1:] == ["--serve"]:
        sys.exit(serve())
    sys.exit(main(json.loads(sys.argv[1])))
