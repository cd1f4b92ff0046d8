"""``python -m trainer demo``: train on N CPU ranks, SIGKILL the whole job mid-run, resume it
with ``--resume auto``, run ``ckptstore fsck`` on the newest checkpoint and plot the loss curve.
With ``--memory`` checkpoints commit to the memory tier first and the resume after
the kill comes from memory, on a bigger model (``configs/demo-memory.toml``: a ~300 MB
training state). Before that resume, the same ranks restore the newest step on the local
disk with its files dropped from the page cache (a restart without the memory tier), and
the demo prints both restore times.
"""

from __future__ import annotations

import argparse
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

from .launch import REPO_ROOT, run, signal_at_step, start

DEMO_CONFIG = Path(__file__).resolve().parent / "configs" / "demo.toml"
MEMORY_CONFIG = DEMO_CONFIG.with_name("demo-memory.toml")
_SOURCE = re.compile(r"resume source: (\w+) in ([0-9.]+) s")


def main(argv: list[str]) -> int:
    """Run the demo; return a process exit code (0 only if every stage succeeded)."""
    parser = argparse.ArgumentParser(prog="python -m trainer demo", description=__doc__)
    parser.add_argument("--nproc", type=int, default=None,
                        help="ranks (torchrun) (default 2)")
    parser.add_argument("--kill-at", type=int, default=None,
                        help="SIGKILL once this step is logged (default 33; 13 with --memory)")
    parser.add_argument("--out-dir", default="runs/demo")
    parser.add_argument("--overwrite", action="store_true", help="delete OUT_DIR first")
    parser.add_argument("--memory", action="store_true",
                        help="checkpoint to the memory tier first (node-local tmpfs, shared by the ranks)")
    args, extra = parser.parse_known_args(argv)  # anything else goes to the trainer
    args.nproc = args.nproc or 2
    args.kill_at = args.kill_at or (13 if args.memory else 33)
    out = Path(args.out_dir)
    if not out.is_absolute():
        out = REPO_ROOT / out
    if out.exists():
        if not args.overwrite:
            print(f"{out} exists; pass --overwrite to start the demo from scratch", file=sys.stderr)
            return 2
        shutil.rmtree(out)
        _drop_memory_tier(out / "checkpoints")
    config = MEMORY_CONFIG if args.memory else DEMO_CONFIG
    train_args = ["--config", str(config), "--out-dir", str(out), *extra]
    if args.memory:
        train_args.append("--memory")

    print(f"== 1. train on {args.nproc} rank(s), SIGKILL everything at step {args.kill_at}", flush=True)
    proc = start(train_args, args.nproc)
    seen, _ = signal_at_step(proc, args.kill_at, signal.SIGKILL, whole_group=True, echo=True)
    if seen is None:
        print("the run finished before it could be killed; try a smaller --kill-at", file=sys.stderr)
        return 1
    print(f"== killed after step {seen} (exit {proc.returncode})", flush=True)

    cold = _restore_from_cold_disk(config, out, extra, args.nproc) if args.memory else None
    print("== 2. resume with --resume auto", flush=True)
    rc, output = run([*train_args, "--resume", "auto"], args.nproc, echo=True)
    if rc != 0:
        return rc
    source = _SOURCE.search(output)
    if source:
        print(f"== the resume came from {source[1]}: state restored in {source[2]} s", flush=True)
    if source and cold:
        fast, slow = float(source[2]), cold[1]
        print(f"== restore from {source[1]}: {fast:.2f} s; step {cold[0]} from the local disk with "
              f"a cold page cache: {slow:.2f} s ({slow / fast:.1f}x the time)", flush=True)

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


def _restore_from_cold_disk(config: Path, out: Path, extra: list[str], nproc: int
                            ) -> tuple[int, float] | None:
    """(step, seconds) of restoring the newest step on the run's local disk, its files
    dropped from the page cache, by the same ranks without the memory tier: what the
    resume would cost without it. The trainer runs with ``--steps`` at that step, so it
    restores and stops; its own run directory (whose checkpoints are the run's) keeps
    its log out of the run's."""
    from ckptstore.runs.layout import committed_steps, step_name
    from ckptstore.storage import LocalStorage
    from ckptstore.storage.direct import drop_cached

    ckpt = out / "checkpoints"
    steps = committed_steps(LocalStorage(ckpt))
    if not steps:
        print("== no step reached the local disk before the kill: nothing to compare the "
              "memory restore with (kill later with --kill-at)", flush=True)
        return None
    step = steps[-1]
    drop_cached(ckpt / step_name(step))
    probe = out / "cold-disk-restore"
    probe.mkdir(exist_ok=True)
    link = probe / "checkpoints"
    if not link.exists():
        link.symlink_to(ckpt, target_is_directory=True)
    print(f"== 2a. for comparison: restore step {step} from the local disk, page cache dropped, "
          "without the memory tier", flush=True)
    rc, output = run(["--config", str(config), "--out-dir", str(probe), *extra,
                      "--resume", str(step), "--steps", str(step), "--val-every", "0"], nproc)
    found = _SOURCE.search(output)
    if rc != 0 or not found:
        print(f"the comparison restore failed (exit {rc}); its output:\n{output[-2000:]}",
              file=sys.stderr)
        return None
    return step, float(found[2])


def _drop_memory_tier(ckpt_dir: Path) -> None:
    """A memory tier an earlier, killed demo left for this run directory belongs to the run
    just deleted: remove it, or the new run would resume from it."""
    from ckptstore.runs import memory

    where = memory.memory_dir(True, ckpt_dir, None)
    if where.exists() and not memory.owner_alive(where):
        memory.release(where)
