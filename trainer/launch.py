"""Start trainer processes and kill them mid-run: shared by ``trainer demo`` and the tests."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

_STEP = re.compile(r"^step\s+(\d+) \|")
REPO_ROOT = Path(__file__).resolve().parent.parent


def command(args: list[str], nproc: int = 1) -> list[str]:
    """``python -m trainer ARGS`` or its ``torchrun --standalone --nproc_per_node N`` form."""
    if nproc == 1:
        return [sys.executable, "-m", "trainer", *args]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
            "-m", "trainer", *args]


def start(args: list[str], nproc: int = 1) -> subprocess.Popen:
    """Start a run in its own session (so the whole group can be killed, like a lost node)."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    return subprocess.Popen(command(args, nproc), cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)


def kill_tree(pid: int, sig: int) -> None:
    """Signal a process and all its descendants (torchrun puts each worker in its own session,
    so a process-group kill would miss them). Children first, so none is re-parented unseen."""
    import psutil

    try:
        root = psutil.Process(pid)
        victims = root.children(recursive=True) + [root]
    except psutil.NoSuchProcess:
        return
    for p in victims:
        try:
            p.send_signal(sig)
        except psutil.NoSuchProcess:
            pass


def signal_at_step(proc: subprocess.Popen, step: int, sig: int, *, whole_group: bool,
                   timeout: float = 300.0, echo: bool = False) -> tuple[int | None, list[str]]:
    """Read the run's output until it logs ``step`` or later, then send ``sig``.

    Returns (the step last seen before the signal, or None if the run ended first; all output).
    """
    lines: list[str] = []
    seen = None
    deadline = time.monotonic() + timeout
    assert proc.stdout is not None
    for line in proc.stdout:
        lines.append(line)
        if echo:
            print(line, end="", flush=True)
        m = _STEP.match(line)
        if m:
            seen = int(m.group(1))
            if seen >= step:
                if whole_group:
                    kill_tree(proc.pid, sig)
                else:
                    proc.send_signal(sig)
                break
        if time.monotonic() > deadline:
            kill_tree(proc.pid, signal.SIGKILL)
            raise TimeoutError(f"no step {step} within {timeout}s:\n" + "".join(lines[-30:]))
    else:
        seen = None  # the run finished before reaching the step
    rest, _ = proc.communicate(timeout=timeout)
    if echo:
        print(rest, end="", flush=True)
    lines.extend(rest.splitlines(keepends=True))
    return seen, lines


def run(args: list[str], nproc: int = 1, timeout: float = 300.0, echo: bool = False
        ) -> tuple[int, str]:
    """Run to completion; return (exit code, output)."""
    proc = start(args, nproc)
    assert proc.stdout is not None
    out = []
    for line in proc.stdout:
        out.append(line)
        if echo:
            print(line, end="", flush=True)
    return proc.wait(timeout=timeout), "".join(out)
