"""``python -m fuzz crash|power|errors|corrupt|parsers|malicious|all --budget SECONDS``."""
from __future__ import annotations

import argparse
import json
import logging
import sys

FAMILIES = ("crash", "power", "errors", "corrupt", "parsers", "malicious")
#: crash sweep tiers: local files, S3 (moto), GCS (fake-gcs-server), a 2-rank save
TIERS = ("local", "s3", "gcs", "dist")
#: what ``all`` sweeps when no --tier is given
ALL_TIERS = ("local", "s3", "gcs", "dist")


def run(family: str, budget: float, *, kills: int = 0, seed: int = 0,
        tiers: tuple | None = None):
    """Run one family (or ``all``, splitting the budget) and return its Report."""
    from .common import Budget, Report

    report = Report()
    if family == "all":
        for f in FAMILIES:
            report.merge(run(f, budget / len(FAMILIES), kills=kills, seed=seed,
                             tiers=tiers or ALL_TIERS))
        return report
    tiers = tiers or ("local",)
    b = Budget(budget)
    if family == "crash":
        from . import crash

        share = budget / (len(tiers) + (1 if kills else 0))
        for tier in tiers:
            if tier == "dist":  # a 2-rank distributed save (fuzz/dist.py)
                from . import dist

                dist.sweep(report, Budget(share), seed=seed)
            elif tier in ("s3", "gcs"):  # kill points, then network faults and kills
                from . import objstore  # (fuzz/objstore.py)

                crash.sweep(report, Budget(share / 2), seed=seed, tier=tier)
                objstore.run(report, Budget(share / 2), seed=seed, kind=tier)
            else:
                crash.sweep(report, Budget(share), seed=seed, tier=tier)
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
    else:
        raise ValueError(f"unknown family {family!r}")
    return report


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m fuzz", description=__doc__)
    p.add_argument("family", choices=FAMILIES + ("all",))
    p.add_argument("--budget", type=float, default=60.0, help="seconds (split over families for all)")
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

    report = run(args.family, args.budget, kills=args.kills, seed=args.seed,
                 tiers=tuple(args.tier) if args.tier else None)
    payload = dict(family=args.family, budget=args.budget, seed=args.seed, **report.to_json())
    json.dump(payload, sys.stdout, indent=2)
    sys.stdout.write("\n")
    write_json(args.json, payload)
    return 1 if payload["failures"] else 0


if __name__ == "__main__":
    sys.exit(main())
