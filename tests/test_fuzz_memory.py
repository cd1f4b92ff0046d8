"""A short run of the ``memory`` fuzz family (SIGKILLs of a trainer with a memory
tier and a peer replica, and of its buddy's keeper): no failure, every fault landed."""
from __future__ import annotations

import pytest

from fuzz import memory
from fuzz.common import Budget, Report


@pytest.mark.timeout(300)
def test_memory_family_short_run():
    report = Report()
    memory.run(report, Budget(0), seed=3, iterations=4)  # each fault once (more if one missed)
    assert report.counts["failures"] == 0 and not report.details, report.details
    for fault, key in memory.COUNTER.items():
        assert report.counts[key] > 0, (fault, report.counts)
    assert report.counts["kills"] >= 4 and report.counts["memory_checked_copies"] > 0, report.counts
    restored = sum(report.counts.get(f"memory_loaded_{t}", 0) for t in ("memory", "peer", "local"))
    assert restored > 0, report.counts


def test_memory_oracle_notices_a_wrong_copy_and_a_lost_commit(tmp_path):
    """A committed copy holding another step's state, and a commit the trainer saw
    that memory no longer holds, must both fail the oracle."""
    import types

    import ckptstore
    from ckptstore.runs.layout import step_name
    from fuzz.common import tree_digest

    local = tmp_path / "local"
    for step, seed in ((1, 2), (2, 2)):  # step 1 holds step 2's state
        ckptstore.save(memory.step_state(seed), local / step_name(step), blocking=True)
    report = Report()
    fam = types.SimpleNamespace(report=report, digest=lambda s, k: tree_digest(memory.step_state(s, k)))
    spec = dict(memdir=str(tmp_path / "shm"), local=str(local), scale=1)
    tiers = memory.check_copies(fam, spec, str(tmp_path / "buddy"), [("committed", 3, 0.0)], "t")
    assert tiers == {"memory": [], "peer": [], "local": [1, 2]}
    assert report.counts["failures"] == 2, report.details
    assert "step-000000000001 loads as another state" in report.details[0], report.details
    assert "memory holds []" in report.details[1], report.details
