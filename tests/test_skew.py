"""The ``skew`` fuzz family (steps written by a newer schema in a run this version
reads), and ``python -m fuzz all --budget`` bounding the whole run."""
from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
import sys
import time

import pytest

from fuzz import skew
from fuzz.__main__ import FLOOR, main as fuzz_main, plan, run_all
from fuzz.common import BudgetSpent, Report, hard_stop

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.timeout(180)
def test_skew_family_short_run(tmp_path):
    out = tmp_path / "skew.json"
    assert fuzz_main(["skew", "--budget", "4", "--json", str(out)]) == 0
    counts = json.loads(out.read_text())
    assert counts["failures"] == 0, counts["failure_details"]
    assert counts["skew_cases"] >= 1 and counts["skew_newer_steps"] >= counts["skew_cases"], counts
    assert counts["skew_golden"] >= 2 and counts["skew_checks"] > 10 * counts["skew_cases"], counts


def _case(tmp_path, seed: int) -> skew.Case:
    case = skew.Case(str(tmp_path / f"run-{seed}"), random.Random(seed))
    case.build()
    return case


@pytest.mark.timeout(120)
def test_skew_oracle_catches_a_deleted_or_changed_newer_step(tmp_path, monkeypatch):
    """A retention/gc that removed a newer step (the old data-loss bug) or rewrote a
    readable one must be reported."""
    case = _case(tmp_path, 3)
    victim = sorted(case.newer)[0]

    def bad_gc(storage, grace):  # deletes what it cannot read
        shutil.rmtree(os.path.join(case.root, skew.step_name(victim)))
        return []

    monkeypatch.setattr(skew, "gc", bad_gc)
    report = Report()
    skew.check_case(report, case, "deleted")
    assert report.counts["failures"] >= 2, report.details  # changed on disk + no longer loads
    assert any(f"newer step {victim}" in d for d in report.details), report.details
    monkeypatch.undo()
    clean = Report()
    skew.check_case(clean, _case(tmp_path, 4), "clean")
    assert clean.counts["failures"] == 0, clean.details


def test_plan_leaves_out_the_costliest_pieces_first():
    pieces = ["crash:local", "crash:s3", "power", "skew"]
    chosen, left = plan(pieces, 40)
    assert left == ["crash:s3"] and chosen == ["crash:local", "power", "skew"]  # 60 s of setup
    assert sum(FLOOR[p] for p in chosen) <= 0.8 * 40
    assert plan(pieces, 10_000) == (pieces, [])
    assert plan(pieces, 0.5) == ([], pieces)


def test_hard_stop_interrupts_a_blocking_call_and_runs_cleanup():
    cleaned = []
    t = time.monotonic()
    with pytest.raises(BudgetSpent):
        with hard_stop(time.monotonic() + 0.5):
            try:
                subprocess.run([sys.executable, "-c", "import time; time.sleep(60)"])
            finally:
                cleaned.append(time.monotonic() - t)
    assert cleaned and 0.4 < cleaned[0] < 5, cleaned
    with hard_stop(time.monotonic() + 5):  # a body that ends in time is not disturbed
        time.sleep(0.05)


def test_run_all_stops_a_piece_that_overruns_the_deadline(monkeypatch):
    """One deadline for ``all``: a piece that ignores its budget (setup that never
    ends) is cut at the deadline + grace, and the rest are reported as skipped."""
    import fuzz.__main__ as fm

    calls = []

    def slow_run(family, budget, **kw):
        calls.append((family, round(budget, 1)))
        if family == "power":
            time.sleep(60)  # a server start-up that hangs

    monkeypatch.setattr(fm, "run", slow_run)
    monkeypatch.setattr(fm, "FLOOR", {})  # every piece costs 1 s: the first 4 fit 0.8 * 6 s
    t = time.monotonic()
    report = run_all(6.0, tiers=())
    took = time.monotonic() - t
    assert took < 6.0 * 1.1, took
    assert [c[0] for c in calls] == ["power"] and 1.0 <= calls[0][1] <= 1.5, calls  # 1 + 2/4
    assert report.counts["budget_stops"] == 1
    assert any(s.startswith("power: stopped at the deadline") for s in report.skipped), report.skipped
    assert report.counts["failures"] == 0


@pytest.mark.timeout(120)
def test_fuzz_all_finishes_within_its_budget():
    """``python -m fuzz all --budget B``, interpreter start-up included, within B + 10%
    (it ran for minutes: server start-ups, per-family minimum work, a 60 s gcsfs lookup
    per GCS operation)."""
    budget = 24.0
    t = time.monotonic()
    r = subprocess.run([sys.executable, "-m", "fuzz", "all", "--budget", str(budget)], cwd=ROOT,
                       capture_output=True, text=True, timeout=budget * 4)
    took = time.monotonic() - t
    payload = json.loads(r.stdout)
    assert took <= budget * 1.1, (took, payload["skipped"])
    assert payload["failures"] == 0, payload["failure_details"]
    assert sum(v for k, v in payload.items() if isinstance(v, int) and k != "failures") > 0
    assert payload["skipped"], payload  # the costly tiers do not fit 24 s: said, not silently dropped
