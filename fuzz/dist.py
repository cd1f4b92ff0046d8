"""Crash injection in a 2-rank distributed save (``python -m fuzz crash --tier dist``).

Two rank processes (gloo over a FileStore, ``CKPTSTORE_WRITERS=1``) save a small
state: a DTensor sharded over a 1-D mesh (``Shard(0)``), a plain tensor and a step
counter. A clean save is run once with every rank's storage counting its mutating
calls (one ledger per rank). Two scenarios per mode: a new step next to a committed
one, and ``overwrite=True`` over it. Then, for sampled points (rank r, call k, before/after),
both ranks save again and rank r's :class:`~ckptstore.storage.faulty.FaultyStorage`
SIGKILLs that rank and its writers at its k-th call; rank 0's manifest link is always
among the points (before and after). The surviving rank must end on its own within
the collective timeout (``CKPTSTORE_DIST_TIMEOUT``), with a typed error or success.

Oracle (loads at world size 1, which reshards): the committed ``step-1`` next to the
new step loads bit-identical; the new step loads bit-identical or is absent
(``CheckpointNotFoundError``, ``fsck`` exits 2), never torn; a kill of rank 1 (it
dies before its vote) leaves it absent; a kill of rank 0 after its manifest link
leaves it committed. For an overwrite, the step loads as the old or the new state,
never a mix and never absent: the old one if rank 1 died, the new one once rank 0's
manifest replace has run; and a plain save to the same path then succeeds over the debris.

A rank process: ``python -m fuzz.dist SPEC_JSON RANK``; exit 0 committed, 3 a typed
ckptstore error, -9 killed.
"""
from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid

from .common import SMALL, Budget, Report, fsck_code, outcome, tree_digest

OLD_SEED, NEW_SEED = 1, 2
WORLD = 2
#: collective timeout inside the ranks; a survivor must end within this plus slack
TIMEOUT = 20.0
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def full_state(seed: int) -> dict:
    """The state as one process sees it: what a world-size-1 load must return."""
    import torch

    g = torch.Generator().manual_seed(seed)
    return {"w": torch.randn(64, 24, generator=g),
            "emb": torch.randn(32, 20, generator=g).to(torch.bfloat16),
            "bias": torch.arange(seed, seed + 40, dtype=torch.int64),
            "step": seed}


def rank_main(spec: dict, rank: int) -> int:
    """One rank of the save (runs in its own session: a group kill takes it and its
    writers only)."""
    os.environ["CKPTSTORE_WRITERS"] = "1"
    os.environ["CKPTSTORE_DIST_TIMEOUT"] = str(spec.get("timeout", TIMEOUT))
    import torch
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    import ckptstore
    from ckptstore.pipeline import engine as saver
    from ckptstore.storage import open_storage
    from ckptstore.storage.faulty import FaultyStorage

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method="file://" + spec["store"], rank=rank,
                            world_size=WORLD)
    try:
        mesh = init_device_mesh("cpu", (WORLD,))
        full = full_state(spec["seed"])
        state = {"w": distribute_tensor(full["w"], mesh, [Shard(0)]),
                 "emb": distribute_tensor(full["emb"], mesh, [Shard(0)]),
                 "bias": full["bias"], "step": full["step"]}
        kill = spec.get("kill") or {}
        storage = FaultyStorage(open_storage(spec["target"]),
                                kill_at=kill.get("k") if kill.get("rank") == rank else None,
                                kill_when=kill.get("when", "before"),
                                ledger=f"{spec['ledger']}-r{rank}")
        try:
            ckptstore.save(state, storage, compression=spec["mode"], blocking=True,
                           overwrite=spec.get("overwrite", False), **SMALL)
        except ckptstore.CkptError as e:
            print(json.dumps({"error": type(e).__name__, "message": str(e)[:500]}), flush=True)
            return 3
        return 0
    finally:
        saver.shutdown()  # stop the writers before the rank exits


def _commit_index(journal: list) -> int:
    for r, _ in journal:
        if r.get("op") in ("link_exclusive", "rename", "put_exclusive") and \
                r.get("dst", r.get("name", "")).rpartition("/")[2] == "manifest.json":
            return r["index"]
    return 0


class DistCase:
    """One compression mode: the base run (a committed ``step-1``) and each rank's
    call count for a clean 2-rank save of ``step-2``."""

    def __init__(self, tmp: str, mode: str, scenario: str = "new") -> None:
        import ckptstore
        from ckptstore.storage.faulty import Ledger, ops_of

        self.tmp, self.mode, self.scenario = tmp, mode, scenario
        self.old = tree_digest(full_state(OLD_SEED))
        self.new = tree_digest(full_state(NEW_SEED))
        self.base = os.path.join(tmp, f"dbase-{mode}")
        if not os.path.exists(self.base):
            ckptstore.save(full_state(OLD_SEED), os.path.join(self.base, "step-1"),
                           compression=mode, blocking=True, **SMALL)
        run = self.fresh("count")
        ledger = os.path.join(tmp, f"dledger-{mode}-{scenario}")
        statuses, answers, hung = self.run(run, ledger)
        if statuses != [0, 0]:
            raise RuntimeError(f"clean 2-rank save failed: {statuses} {answers} hung={hung}")
        self.total, self.commit_at = [], 0
        for r in range(WORLD):
            led = Ledger(f"{ledger}-r{r}")
            ops = ops_of(led.journal())
            self.total.append(len(ops))
            if r == 0:
                self.commit_at = _commit_index(led.journal())
            led.remove()
        if not self.commit_at:
            raise RuntimeError("rank 0's manifest link was not seen in the clean save")
        shutil.rmtree(run, ignore_errors=True)

    def fresh(self, tag: str) -> str:
        run = os.path.join(self.tmp, f"drun-{self.mode}-{self.scenario}-{tag}")
        shutil.rmtree(run, ignore_errors=True)
        shutil.copytree(self.base, run)
        return run

    def target(self, run: str) -> str:
        return os.path.join(run, "step-1" if self.scenario == "overwrite" else "step-2")

    def run(self, run: str, ledger: str, kill: dict | None = None,
            timeout: float = TIMEOUT) -> tuple[list, list, bool]:
        """Both ranks save; returns (exit statuses, JSON answers, whether a rank had
        to be killed because it outlived the collective timeout)."""
        spec = dict(target=self.target(run), mode=self.mode, seed=NEW_SEED, ledger=ledger,
                    overwrite=self.scenario == "overwrite", kill=kill, timeout=timeout,
                    store=os.path.join(self.tmp, f"store-{uuid.uuid4().hex[:8]}"))
        env = dict(os.environ, CKPTSTORE_WRITERS="1", OMP_NUM_THREADS="1")
        procs, outs = [], []
        for r in range(WORLD):
            out = open(os.path.join(self.tmp, f"rank{r}.out"), "w+")
            outs.append(out)
            procs.append(subprocess.Popen(
                [sys.executable, "-m", "fuzz.dist", json.dumps(spec), str(r)], cwd=ROOT, env=env,
                stdout=out, stderr=subprocess.STDOUT, start_new_session=True))
        # start-up (torch import, rendezvous) is not bounded by the collective timeout
        deadline = time.monotonic() + timeout + 60
        hung = False
        statuses = []
        for p in procs:
            try:
                statuses.append(p.wait(max(1.0, deadline - time.monotonic())))
            except subprocess.TimeoutExpired:
                hung = True
                statuses.append(None)
        for p in procs:  # the ranks' groups: a killed rank's writers, a hung survivor
            try:
                os.killpg(p.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
            p.wait()
        answers = []
        for out in outs:
            out.seek(0)
            text = out.read()
            lines = [ln for ln in text.splitlines() if ln.startswith("{")]
            answers.append(json.loads(lines[-1]) if lines else {"output": text[-600:]})
            out.close()
        for r in range(WORLD):
            try:
                os.unlink(spec["store"])
            except FileNotFoundError:
                pass
        return statuses, answers, hung

    def check(self, report: Report, run: str, kill: dict, statuses: list, answers: list,
              hung: bool, link: int) -> None:
        """The oracle; ``link``: the index of rank 0's manifest link in this run's
        journal (0 if it was not reached), which says whether the kill came after it."""
        import ckptstore

        what = f"dist {self.mode}/{self.scenario} kill rank {kill['rank']} {kill['when']} " \
               f"call {kill['k']}"
        victim, survivor = kill["rank"], 1 - kill["rank"]
        report.add("crash_points")
        if statuses[victim] == -signal.SIGKILL:
            report.add("kills")
        else:
            report.fail(f"{what}: the kill did not happen (status {statuses[victim]} "
                        f"{answers[victim]})")
        report.check(not hung, f"{what}: a rank outlived the collective timeout (hang)")
        report.check(statuses[survivor] in (0, 3, -signal.SIGKILL) and not (
            statuses[survivor] == 3 and answers[survivor].get("error") is None),
            f"{what}: surviving rank ended with {statuses[survivor]} {answers[survivor]}")
        target = self.target(run)
        got = outcome(target)
        committed = victim == 0 and link > 0 and (kill["k"] > link or (
            kill["k"] == link and kill["when"] == "after"))
        if self.scenario == "new":
            report.check(outcome(os.path.join(run, "step-1")) == self.old,
                         f"{what}: the committed step-1 changed")
            allowed = {self.new} if committed else (
                {"absent"} if victim == 1 else {self.new, "absent"})
        else:
            allowed = {self.new} if committed else (
                {self.old} if victim == 1 else {self.old, self.new})
        if not report.check(got in allowed, f"{what}: load gave {got}, allowed {sorted(allowed)}"):
            return
        code = fsck_code(target)
        report.check(code == (2 if got == "absent" else 0), f"{what}: fsck exited {code} ({got})")
        if got == self.new:
            return
        try:  # recovery over the debris (a plain save of the same state)
            ckptstore.save(full_state(NEW_SEED), target, compression=self.mode, blocking=True,
                           overwrite=self.scenario == "overwrite", **SMALL)
        except ckptstore.CkptError as e:
            report.fail(f"{what}: recovery save failed: {type(e).__name__}: {e}")
            return
        report.check(outcome(target) == self.new, f"{what}: recovery save does not load")


def sweep(report: Report, budget: Budget, *, modes=("zstd", "none"),
          scenarios=("new", "overwrite"),
          seed: int = 0) -> None:
    """Sampled kill points of a 2-rank save; the points at rank 0's manifest link come
    first, then a random sample over both ranks' calls while the budget lasts."""
    from ckptstore.storage.faulty import Ledger

    rng = random.Random(seed)
    with tempfile.TemporaryDirectory(prefix="fuzz-dist-") as tmp:
        queues = []
        done = 0
        pending = [(m, s) for m in modes for s in scenarios]
        rng.shuffle(pending)
        while pending or any(q for _, q in queues):
            if budget.out() and done:
                break
            if pending:
                c = DistCase(tmp, *pending.pop())
                must = [dict(rank=0, k=c.commit_at, when=w) for w in ("before", "after")]
                rest = [dict(rank=r, k=k, when=w) for r in range(WORLD)
                        for k in range(1, c.total[r] + 1) for w in ("before", "after")]
                rest = [p for p in rest if p not in must]
                rng.shuffle(rest)
                queues.append((c, rest + must[::-1]))  # popped from the end: must first
            for c, q in queues:
                if not q or (budget.out() and done):
                    continue
                kill = q.pop()
                run = c.fresh(f"{kill['rank']}-{kill['k']}-{kill['when']}")
                ledger = os.path.join(tmp, "dledger")
                statuses, answers, hung = c.run(run, ledger, kill)
                link = _commit_index(Ledger(f"{ledger}-r0").journal())
                for r in range(WORLD):
                    for suffix in ("", ".journal"):
                        try:
                            os.unlink(f"{ledger}-r{r}{suffix}")
                        except FileNotFoundError:
                            pass
                c.check(report, run, kill, statuses, answers, hung, link)
                shutil.rmtree(run, ignore_errors=True)
                done += 1


if __name__ == "__main__":
    sys.exit(rank_main(json.loads(sys.argv[1]), int(sys.argv[2])))
