"""``python -m fuzz crash|power|errors|corrupt|parsers|malicious|all --budget SECONDS``."""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time

STARTED = time.monotonic()  #: before torch and the families are imported

FAMILIES = ("crash", "power", "errors", "corrupt", "parsers", "malicious", "hostile", "resources", "skew",
            "enospc", "groupkill", "memory")
#: families whose module has ``run(report, budget, *, seed)`` and nothing else to set up
SIMPLE = ("hostile", "resources", "skew", "enospc", "groupkill", "memory")
#: crash sweep tiers: local files, S3 (moto), GCS (fake-gcs-server), a 2-rank save
TIERS = ("local", "s3", "gcs", "dist")
#: what ``all`` sweeps when no --tier is given
ALL_TIERS = ("local", "s3", "gcs", "dist")
#: least wall time (s) of each piece of ``all`` even with no budget left: server and
#: child start-ups and the first case a piece always runs (measured on a busy 2-core
#: machine). ``all`` leaves out the costliest pieces until the floors fit (:func:`plan`).
FLOOR = {"crash:local": 10.0, "crash:s3": 60.0, "crash:gcs": 60.0, "crash:dist": 25.0,
         "crash:kills": 10.0, "power": 3.0, "errors": 6.0, "corrupt": 3.0, "parsers": 8.0,
         "malicious": 3.0, "hostile": 6.0, "resources": 8.0, "skew": 4.0, "enospc": 6.0,
         "groupkill": 12.0,  # one life of a group kill: 8-16 s measured
         "memory": 10.0}  # fork server, keeper, one kill and restore: 6-8 s measured
#: the hard stop of ``all`` comes this share of the budget after its deadline,
#: leaving the rest of the 10% slack for the cut piece's clean-up
GRACE = 0.03


def exit_reserve(budget: float) -> float:
    """Seconds ``python -m fuzz all`` keeps for interpreter exit (writer pools, temp dirs)."""
    return min(max(0.05 * budget, 2.0), 5.0)


#: the share of the budget the floors of the chosen pieces may take (the rest is fuzzing)
FLOORS_SHARE = 0.8


def plan(pieces: list[str], seconds: float) -> tuple[list[str], list[str]]:
    """(pieces to run, pieces left out): the costliest pieces go first until the
    floors of those left fit in ``FLOORS_SHARE`` of ``seconds``."""
    chosen = list(pieces)
    while chosen and sum(FLOOR.get(p, 1.0) for p in chosen) > FLOORS_SHARE * seconds:
        chosen.remove(max(reversed(chosen), key=lambda p: FLOOR.get(p, 1.0)))  # ties: the later
    return chosen, [p for p in pieces if p not in chosen]


def share(total, rest: list[str]) -> float:
    """Seconds for ``rest[0]``: its floor plus an equal part of what the floors of
    ``rest`` leave of the time left (never more than is left)."""
    slack = max(total.left() - sum(FLOOR.get(p, 1.0) for p in rest), 0.0)
    return min(FLOOR.get(rest[0], 1.0) + slack / len(rest), max(total.left(), 0.0))


def run_all(budget: float, *, kills: int = 0, seed: int = 0, tiers: tuple = ALL_TIERS,
            report=None):
    """Every family and crash tier within ONE deadline ``budget`` seconds from now,
    setup included: pieces whose least cost does not fit their share are left out
    (``report.skipped`` names them), each piece gets its floor and an equal part of
    the slack left when it starts, and a piece still running past the deadline is
    stopped there (its clean-up runs; it is named in ``report.skipped``)."""
    from .common import Budget, BudgetSpent, Report, hard_stop

    report = report if report is not None else Report()
    total = Budget(budget)
    pieces = [f"crash:{t}" for t in tiers] + (["crash:kills"] if kills else [])
    pieces += [f for f in FAMILIES if f != "crash"]
    chosen, left_out = plan(pieces, budget)
    report.skipped.extend(f"{p}: its least cost ({FLOOR.get(p, 1.0):g} s) does not fit in "
                          f"{budget:.1f} s with the cheaper pieces" for p in left_out)
    current = ""
    try:
        with hard_stop(total.deadline + GRACE * budget):
            for i, piece in enumerate(chosen):
                if not total.afford(FLOOR.get(piece, 1.0) * 0.5):
                    report.skipped.extend(f"{p}: budget spent" for p in chosen[i:])
                    break
                current = piece
                b = Budget(share(total, chosen[i:]), within=total)
                family, _, tier = piece.partition(":")
                if piece == "crash:kills":
                    from . import crash

                    crash.blackbox(report, b, kills, seed=seed)
                else:
                    run(family, b.left(), seed=seed, tiers=(tier,) if tier else None, report=report)
    except BudgetSpent:
        report.skipped.append(f"{current}: stopped at the deadline")
        report.add("budget_stops")
    return report


def run(family: str, budget: float, *, kills: int = 0, seed: int = 0,
        tiers: tuple | None = None, report=None):
    """Run one family (or ``all``: :func:`run_all`) and return its Report."""
    from .common import Budget, Report

    report = report if report is not None else Report()
    if family == "all":
        return run_all(budget, kills=kills, seed=seed, tiers=tiers or ALL_TIERS, report=report)
    tiers = tiers or ("local",)
    b = Budget(budget)
    if family == "crash":
        from . import crash

        for i, tier in enumerate(tiers):  # an equal share of what is left, setup included
            share = max(b.left(), 0.0) / (len(tiers) - i + (1 if kills else 0))
            if tier == "dist":  # a 2-rank distributed save (fuzz/dist.py)
                from . import dist

                dist.sweep(report, Budget(share, within=b), seed=seed)
            elif tier in ("s3", "gcs"):  # kill points, then network faults and kills
                from . import objstore  # (fuzz/objstore.py)

                whole = Budget(share, within=b)
                crash.sweep(report, Budget(share / 2, within=whole), seed=seed, tier=tier)
                objstore.run(report, whole, seed=seed, kind=tier)  # the rest of the share
            else:
                crash.sweep(report, Budget(share, within=b), seed=seed, tier=tier)
        if kills:
            crash.blackbox(report, b, kills, seed=seed)
    elif family == "power":
        from . import power

        power.run(report, b, seed=seed)
    elif family == "errors":
        from . import errors

        errors.run(report, b, seed=seed)
    elif family == "corrupt":
        from . import corrupt

        corrupt.run(report, b, seed=seed)
    elif family == "parsers":
        from . import parsers

        parsers.run(report, b, seed=seed)
    elif family == "malicious":
        from . import malicious

        malicious.run(report, b)
    elif family in SIMPLE:
        import importlib

        importlib.import_module(f".{family}", __package__).run(report, b, seed=seed)
    else:
        raise ValueError(f"unknown family {family!r}")
    return report


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m fuzz", description=__doc__)
    p.add_argument("family", choices=FAMILIES + ("all",))
    p.add_argument("--budget", type=float, default=60.0,
                   help="seconds for the whole run, setup included (all: one deadline, split over families)")
    p.add_argument("--kills", type=int, default=0, help="blackbox kills after the sweep (crash)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tier", action="append", choices=TIERS,
                   help="crash sweep tiers (repeatable; default local, for all every tier; "
                        "s3/gcs: kill points, then 503s/resets/delays/kills through a fault "
                        "proxy in front of moto / fake-gcs-server; dist: a 2-rank gloo save)")
    p.add_argument("--json", metavar="OUT", help="also write the counts to this file")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.CRITICAL)  # expected failures log errors by design
    from .common import write_json

    budget = args.budget
    if args.family == "all":  # the whole run: start-up so far and exit included
        budget = max(budget - (time.monotonic() - STARTED) - exit_reserve(budget), 0.0)
    report = run(args.family, budget, kills=args.kills, seed=args.seed,
                 tiers=tuple(args.tier) if args.tier else None)
    payload = dict(family=args.family, budget=args.budget, seed=args.seed, **report.to_json())
    json.dump(payload, sys.stdout, indent=2)
    sys.stdout.write("\n")
    write_json(args.json, payload)
    code = 1 if payload["failures"] else 0
    if report.counts.get("budget_stops"):  # a piece was cut at the deadline: do not wait
        sys.stdout.flush()                 # at exit for threads or children it left
        logging.shutdown()
        os._exit(code)
    return code


if __name__ == "__main__":
    sys.exit(main())
