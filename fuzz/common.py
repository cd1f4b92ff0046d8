"""Shared pieces of the fuzz harness: reports, deterministic states, the oracle."""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

import ckptstore
from ckptstore.errors import CheckpointNotFoundError, CkptError

# Before anything starts a writer pool: writer processes live across families and
# keep the environment they started with, and with gcsfs's default (on) every GCS
# operation of a writer against fake-gcs-server first spends 60 s failing a gRPC
# bucket-layout lookup (the GCS tier took minutes at any budget).
os.environ.setdefault("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")

MODES = ("none", "zstd", "lz4")
#: small chunks and shards so a tiny state still has several files and chunks
SMALL = dict(chunk_size=1024, shard_size=2048)

COUNTERS = ("crash_points", "kills", "crash_states", "faults_injected", "corruptions",
            "fuzz_inputs", "malicious_cases", "failures")


@dataclass
class Report:
    """Counts of one harness run; ``failures`` must stay 0."""

    counts: dict = field(default_factory=lambda: {k: 0 for k in COUNTERS})
    details: list = field(default_factory=list)
    started: float = field(default_factory=time.monotonic)
    #: what a budgeted run left out or cut short, and why (not failures)
    skipped: list = field(default_factory=list)

    def add(self, key: str, n: int = 1) -> None:
        self.counts[key] = self.counts.get(key, 0) + n

    def fail(self, what: str) -> None:
        self.counts["failures"] += 1
        if len(self.details) < 50:
            self.details.append(what)

    def check(self, ok: bool, what: str) -> bool:
        if not ok:
            self.fail(what)
        return ok

    def merge(self, other: "Report") -> None:
        for k, v in other.counts.items():
            self.add(k, v)
        self.details.extend(other.details[: 50 - len(self.details)])
        self.skipped.extend(other.skipped)

    def to_json(self) -> dict:
        return dict(self.counts, seconds=round(time.monotonic() - self.started, 2),
                    failure_details=self.details, skipped=self.skipped)


class Budget:
    """A wall-clock budget; ``left()`` is what remains. ``within`` caps it by an
    enclosing budget (``python -m fuzz all``: one deadline for the whole run)."""

    def __init__(self, seconds: float, within: "Budget | None" = None) -> None:
        self.deadline = time.monotonic() + max(seconds, 0.0)
        if within is not None:
            self.deadline = min(self.deadline, within.deadline)

    def left(self) -> float:
        return self.deadline - time.monotonic()

    def out(self) -> bool:
        return self.left() <= 0

    def afford(self, seconds: float) -> bool:
        """Whether ``seconds`` of setup (servers, child start-ups) fit in what is left."""
        return self.left() >= seconds


class BudgetSpent(BaseException):
    """Raised in the main thread by :func:`hard_stop` at its deadline. A BaseException,
    so that a family's ``except Exception`` does not count it as a failure; its
    ``finally`` blocks and context managers (servers, fork servers, temp dirs) run."""


@contextlib.contextmanager
def hard_stop(deadline: float) -> Iterator[None]:
    """Raise :class:`BudgetSpent` in the main thread at ``deadline`` (monotonic), even
    inside a blocking call: a watchdog thread sends the main thread SIGUSR2. Not
    SIGALRM: a family uses that timer itself. A no-op outside the main thread."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    fired = threading.Event()
    done = threading.Event()

    def on_signal(signum: int, frame: Any) -> None:
        if fired.is_set() and not done.is_set():
            done.set()
            raise BudgetSpent()

    def watchdog() -> None:
        if not done.wait(max(deadline - time.monotonic(), 0.0)):
            fired.set()
            while not done.is_set():  # until the main thread has taken it
                signal.pthread_kill(main, signal.SIGUSR2)
                done.wait(0.2)

    main = threading.main_thread().ident or 0
    old = signal.signal(signal.SIGUSR2, on_signal)
    dog = threading.Thread(target=watchdog, name="fuzz-hard-stop", daemon=True)
    dog.start()
    try:
        yield
    finally:
        done.set()
        dog.join()
        signal.signal(signal.SIGUSR2, old)


def make_state(seed: int, scale: int = 1) -> dict:
    """A small training-like state; equal seeds give bit-identical states."""
    g = torch.Generator().manual_seed(seed)
    return {
        "model": {"w": torch.randn(48 * scale, 16, generator=g),
                  "b": torch.randn(40, generator=g).to(torch.bfloat16),
                  "idx": torch.arange(seed, seed + 33, dtype=torch.int64)},
        "optim": {"m": torch.randn(3, 5, 7, generator=g, dtype=torch.float64)},
        "np": np.arange(seed, seed + 20, dtype=np.int32),
        "step": seed, "config": {"lr": 0.25 * seed, "name": f"run-{seed}"},
    }


def tree_digest(tree: Any) -> str:
    """A hash of a state tree's structure, types and exact bytes."""
    h = hashlib.sha256()

    def walk(x: Any) -> None:
        if isinstance(x, torch.Tensor):
            t = x.detach().contiguous().cpu()
            h.update(f"T{t.dtype}{tuple(t.shape)}".encode())
            if t.numel():
                h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
        elif isinstance(x, np.ndarray):
            h.update(f"N{x.dtype}{x.shape}".encode() + x.tobytes())
        elif isinstance(x, dict):
            h.update(f"D{type(x).__name__}{len(x)}".encode())
            for k, v in x.items():
                h.update(repr(k).encode())
                walk(v)
        elif isinstance(x, (list, tuple)):
            h.update(f"L{type(x).__name__}{len(x)}".encode())
            for v in x:
                walk(v)
        else:
            h.update(f"V{type(x).__name__}{x!r}".encode())

    walk(tree)
    return h.hexdigest()


def outcome(path: str) -> str:
    """What a load of ``path`` gives: a tree digest, ``"absent"`` (not committed)
    or ``"error:<Type>"`` for a typed error; other exceptions propagate."""
    try:
        return tree_digest(ckptstore.load(path))
    except CheckpointNotFoundError:
        return "absent"
    except CkptError as e:
        return f"error:{type(e).__name__}"


def fsck_code(path: str, deep: bool = False) -> int:
    """Exit code of ``ckptstore fsck PATH`` (0 clean, 1 damaged, 2 not a checkpoint)."""
    import contextlib
    import io

    from ckptstore.cli.main import main

    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        return main(["fsck", path] + (["--deep"] if deep else []))


def dir_snapshot(root: str) -> dict[str, str]:
    """Relative path -> content hash (or link target) of everything below ``root``."""
    out = {}
    for d, dirs, files in os.walk(root):
        for n in dirs + files:
            p = os.path.join(d, n)
            rel = os.path.relpath(p, root)
            if os.path.islink(p):
                out[rel] = "link:" + os.readlink(p)
            elif os.path.isfile(p):
                with open(p, "rb") as f:
                    out[rel] = hashlib.sha256(f.read()).hexdigest()
            else:
                out[rel] = "dir"
    return out


def write_json(path: str | None, payload: dict) -> None:
    if path:
        with open(path, "w") as f:
            json.dump(payload, f, indent=2)
            f.write("\n")


class ForkServer:
    """The client side of a fork server (``python -m MODULE --serve``): torch is imported
    once by the server and every child is a fork of it. One JSON line per request and
    per answer; the server's stderr goes to ``LOGNAME`` in ``tmp``."""

    def __init__(self, module: str, tmp: str, logname: str) -> None:
        self.tmp, self.logname = tmp, logname
        self.log = open(os.path.join(tmp, logname), "w")
        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        self.proc = subprocess.Popen([sys.executable, "-m", module, "--serve"], cwd=root,
                                     env=dict(os.environ, CKPTSTORE_WRITERS="1"),
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=self.log, text=True)

    def send(self, spec: dict) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps(spec) + "\n")
        self.proc.stdin.flush()

    def answer(self) -> dict:
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"the fork server died; see {self.logname}")
        return json.loads(line)

    def close(self) -> None:
        if self.proc.stdin:
            self.proc.stdin.close()
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.log.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def serve_forks(child: Callable[[dict], int], *, truncate_log: bool = True) -> int:
    """The loop of a fork server (the other side of :class:`ForkServer`): for each JSON
    spec line on stdin, fork a child in a session of its own, its stdout and stderr to
    ``spec["log"]``, running ``child(spec)`` (its return value is the exit code; an
    exception is printed, code 70); answer ``{"pid"}`` at once and ``{"status"}`` when
    the child ended."""
    import traceback

    flags = os.O_WRONLY | os.O_CREAT | (os.O_TRUNC if truncate_log else os.O_APPEND)
    for line in sys.stdin:
        spec = json.loads(line)
        sys.stdout.flush()
        pid = os.fork()
        if pid == 0:  # the child: never returns into the loop
            code = 70
            try:
                os.setsid()
                fd = os.open(spec["log"], flags, 0o644)
                os.dup2(fd, 1)
                os.dup2(fd, 2)
                code = child(spec)
            except BaseException:
                traceback.print_exc()
            finally:
                os._exit(code)
        sys.stdout.write(json.dumps({"pid": pid}) + "\n")
        sys.stdout.flush()
        _, status = os.waitpid(pid, 0)
        sys.stdout.write(json.dumps({"status": os.waitstatus_to_exitcode(status)}) + "\n")
        sys.stdout.flush()
    return 0
