"""``python -m trainer demo``: train on N CPU ranks, SIGKILL the whole job mid-run, resume it
with ``--resume auto``, run ``ckptstore fsck`` on the newest checkpoint and plot the loss curve.
With ``--memory`` checkpoints commit to the memory tier first and the resume after
the kill comes from memory; the demo prints where the resumed state came from and how long it took.
"""

from __future__ import annotations

import argparse
import shutil
import signal
import subprocess
import sys
from pathlib import Path

from .launch import REPO_ROOT, run, signal_at_step, start

DEMO_CONFIG = Path(__file__).resolve().parent / "configs" / "demo.toml"


def main(argv: list[str]) -> int:
    """Run the demo; return a process exit code (0 only if every stage succeeded)."""
    parser = argparse.ArgumentParser(prog="python -m trainer demo", description=__doc__)
    parser.add_argument("--nproc", type=int, default=None,
                        help="ranks (torchrun) (default 2)")
    parser.add_argument("--kill-at", type=int, default=33, help="SIGKILL once this step is logged")
    parser.add_argument("--out-dir", default="runs/demo")
    parser.add_argument("--overwrite", action="store_true", help="delete OUT_DIR first")
    parser.add_argument("--memory", action="store_true",
                        help="checkpoint to the memory tier first (node-local tmpfs, shared by the ranks)")
    args, extra = parser.parse_known_args(argv)  # anything else goes to the trainer
    args.nproc = args.nproc or 2
    extra = ["--memory", *extra] if args.memory else extra
    out = Path(args.out_dir)
    if not out.is_absolute():
        out = REPO_ROOT / out
    if out.exists():
        if not args.overwrite:
            print(f"{out} exists; pass --overwrite to start the demo from scratch", file=sys.stderr)
            return 2
        shutil.rmtree(out)
        _drop_memory_tier(out / "checkpoints")
    train_args = ["--config", str(DEMO_CONFIG), "--out-dir", str(out), *extra]

    print(f"== 1. train on {args.nproc} rank(s), SIGKILL everything at step {args.kill_at}", flush=True)
    proc = start(train_args, args.nproc)
    seen, _ = signal_at_step(proc, args.kill_at, signal.SIGKILL, whole_group=True, echo=True)
    if seen is None:
        print("the run finished before it could be killed; try a smaller --kill-at", file=sys.stderr)
        return 1
    print(f"== killed after step {seen} (exit {proc.returncode})", flush=True)

    print("== 2. resume with --resume auto", flush=True)
    rc, output = run([*train_args, "--resume", "auto"], args.nproc, echo=True)
    if rc != 0:
        return rc
    source = [line.split("resume source: ", 1)[1] for line in output.splitlines()
              if "resume source: " in line]
    if source:
        print(f"== the resume came from {source[0]}", flush=True)

    import ckptstore
    from ckptstore.runs.layout import step_name

    with ckptstore.Checkpointer(str(out / "checkpoints")) as ckpt:
        latest = ckpt.latest()
        print(f"== committed steps: {ckpt.steps()}, newest {latest}", flush=True)
    newest = out / "checkpoints" / step_name(latest)
    print(f"== 3. ckptstore fsck {newest}", flush=True)
    rc = subprocess.call([sys.executable, "-m", "ckptstore", "fsck", str(newest)], cwd=REPO_ROOT)
    from .plot import plot_run

    print(f"== 4. loss curve: {plot_run(str(out))}", flush=True)
    return rc


def _drop_memory_tier(ckpt_dir: Path) -> None:
    """A memory tier an earlier, killed demo left for this run directory belongs to the run
    just deleted: remove it, or the new run would resume from it."""
    from ckptstore.runs import memory

    where = memory.memory_dir(True, ckpt_dir, None)
    if where.exists() and not memory.owner_alive(where):
        memory.release(where)
