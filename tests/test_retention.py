"""Retention: the pure selection, and a property test over random runs with saves,
crashes in the middle of retention, torn saves and restarts."""
from __future__ import annotations

import os
import time

import pytest
import torch
from hypothesis import HealthCheck, given, settings, strategies as st

import ckptstore
from ckptstore.runs.layout import step_name
from ckptstore.runs.retention import Best, Policy, select_keep
from ckptstore.storage import LocalStorage
from ckptstore.verify.checks import check_quick
from tests.conftest import assert_same_tree

policies = st.builds(
    Policy,
    keep_last=st.none() | st.integers(1, 4),
    keep_every=st.none() | st.integers(2, 5),
    keep_best=st.none() | st.builds(Best, st.just("loss"), st.sampled_from(["min", "max"]),
                                    st.integers(1, 2)))


@given(steps=st.dictionaries(st.integers(0, 60), st.floats(0, 10) | st.none(), max_size=20),
       policy=policies, protected=st.sets(st.integers(0, 60), max_size=4))
def test_select_keep_keeps_what_the_policy_names(steps, policy, protected):
    metrics = {s: (None if v is None else {"loss": v}) for s, v in steps.items()}
    keep = select_keep(metrics, policy, protected)
    assert keep <= set(steps)
    if not steps:
        return
    order = sorted(steps)
    assert order[-1] in keep
    assert set(protected) & set(steps) <= keep
    if policy.keeps_all:
        assert keep == set(steps)
    if policy.keep_last:
        assert set(order[-policy.keep_last:]) <= keep
    if policy.keep_every:
        assert {s for s in order if s % policy.keep_every == 0} <= keep
    b = policy.keep_best
    if b is not None:
        scored = [v for v in steps.values() if v is not None]
        if scored:
            target = min(scored) if b.mode == "min" else max(scored)
            assert any(steps[s] == target for s in keep)


class Crash(Exception):
    """A simulated process death in the middle of retention."""


class CrashingStorage(LocalStorage):
    """Local storage that dies after ``budget[0]`` more deletions."""

    def __init__(self, root, budget: list) -> None:
        super().__init__(root)
        self.budget = budget

    def child(self, name: str) -> "CrashingStorage":
        return CrashingStorage(self.path(name), self.budget)

    def remove(self, name: str) -> None:
        self.budget[0] -= 1
        if self.budget[0] < 0:
            raise Crash(f"crash while removing {name}")
        super().remove(name)


ops = st.lists(st.one_of(
    st.tuples(st.just("save"), st.floats(0, 10)),
    st.tuples(st.just("crashy_save"), st.floats(0, 10), st.integers(0, 3)),
    st.tuples(st.just("torn"), st.just(0)),
    st.tuples(st.just("restart"), st.just(0)),
), min_size=1, max_size=8)


@pytest.mark.timeout(600)
@settings(max_examples=12, deadline=None, suppress_health_check=list(HealthCheck))
@given(plan=ops, keep_last=st.integers(1, 3), keep_every=st.none() | st.integers(2, 4),
       best=st.booleans())
def test_random_runs_never_lose_a_kept_checkpoint(tmp_path_factory, plan, keep_last,
                                                  keep_every, best):
    root = tmp_path_factory.mktemp("run")
    frozen = torch.arange(4096, dtype=torch.float32)
    budget = [10 ** 9]
    kw = dict(keep_last=keep_last, keep_every=keep_every,
              keep_best=("loss", "min", 1) if best else None)
    ck = ckptstore.Checkpointer(CrashingStorage(root, budget), **kw)
    saved: dict[int, float] = {}
    step = 0
    for op in plan:
        if op[0] in ("save", "crashy_save"):
            step += 1
            budget[0] = op[2] if op[0] == "crashy_save" else 10 ** 9
            ck.save(step, {"frozen": frozen, "w": torch.full((64,), float(step))},
                    metrics={"loss": op[1]})
            try:
                ck.wait()
            except Crash:  # the process died during retention: start over
                ck = ckptstore.Checkpointer(CrashingStorage(root, budget), **kw)
            budget[0] = 10 ** 9
            saved[step] = op[1]
        elif op[0] == "torn":  # a save that died before its manifest
            step += 1
            os.makedirs(root / step_name(step), exist_ok=True)
            (root / step_name(step) / "shard-00000-0123456789ab.chunks").write_bytes(b"torn")
        else:
            ck.close()
            ck = ckptstore.Checkpointer(CrashingStorage(root, budget), **kw)
        order = sorted(saved)
        must = set(order[-keep_last:])
        if keep_every:
            must |= {s for s in order if s % keep_every == 0}
        if best and saved:
            low = min(saved.values())
            must |= {max(s for s in saved if saved[s] == low)}
        for s in must:
            where = LocalStorage(root / step_name(s))
            assert check_quick(where) is None, (s, plan)
            out = ckptstore.load(where)
            assert out["w"][0].item() == float(s) and torch.equal(out["frozen"], frozen)
        if saved:
            assert ck.latest() == max(saved)
    ck.close()


def _committed_steps_all_load(root) -> list[int]:
    bad = []
    for d in sorted(os.listdir(root)):
        where = LocalStorage(root / d)
        if not where.exists("manifest.json"):
            continue
        try:
            ckptstore.load(where)
        except Exception:  # noqa: BLE001 - any failure to load is the finding
            bad.append(d)
    return bad


@pytest.mark.parametrize("kill_at", range(0, 16))
def test_a_kill_at_any_point_of_a_multi_step_round_tears_no_committed_step(tmp_path, kill_at):
    """Five incremental steps sharing files dropped in one round, killed after
    ``kill_at`` deletions: every step whose manifest is still there must load."""
    root = tmp_path / "run"
    frozen = torch.arange(1 << 16, dtype=torch.float32)
    ck = ckptstore.Checkpointer(root)  # keeps everything
    def state(step: int) -> dict:  # "slow" changes at steps 1, 3 and 6 only
        slow = 1.0 if step < 3 else (3.0 if step < 6 else 6.0)
        return {"frozen": frozen, "slow": torch.full((4096,), slow),
                "w": torch.full((64,), float(step))}
    for step in range(1, 6):
        ck.save(step, state(step))
        ck.wait()
    ck.close()
    budget = [kill_at]
    ck = ckptstore.Checkpointer(CrashingStorage(root, budget), keep_last=1)
    ck.save(6, state(6))
    try:
        ck.wait()
    except Crash:
        pass
    ck.close()
    assert _committed_steps_all_load(root) == []
    budget[0] = 10 ** 9
    ck = ckptstore.Checkpointer(CrashingStorage(root, budget), keep_last=1)
    ck.save(7, state(7))  # the next round finishes
    ck.wait()
    ck.close()
    assert _committed_steps_all_load(root) == []
    assert ckptstore.load(LocalStorage(root / step_name(7)))["w"][0].item() == 7.0


def test_a_step_written_by_a_newer_ckptstore_is_never_deleted(tmp_path, monkeypatch):
    """A reader that cannot read a newer schema must skip the step, say why, and
    never retire, drop or gc it (it used to delete it as 'damaged')."""
    import warnings

    from ckptstore.manifest import records
    from ckptstore.runs.gc import gc

    root = tmp_path / "run"
    with ckptstore.Checkpointer(root) as ck:
        ck.save(1, {"w": torch.full((64,), 1.0)}).wait()
        monkeypatch.setattr(records, "SCHEMA_VERSION", records.SCHEMA_VERSION + 1)
        ck.save(2, {"w": torch.full((64,), 2.0)}).wait()  # "a newer ckptstore on another node"
    monkeypatch.setattr(records, "SCHEMA_VERSION", records.SCHEMA_VERSION - 1)
    newer = (root / step_name(2) / "manifest.json").read_bytes()
    with ckptstore.Checkpointer(root, keep_last=1) as ck:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            assert ck.latest() == 1
        assert any("step 2" in str(w.message) and "schema version" in str(w.message) for w in caught)
        with pytest.raises(ckptstore.CheckpointExistsError, match="newer"):
            ck.save(2, {"w": torch.full((64,), 20.0)}).wait()
        ck.save(3, {"w": torch.full((64,), 3.0)}).wait()  # retention round: keep_last=1
        ck.wait()
    assert (root / step_name(2) / "manifest.json").read_bytes() == newer
    gc(LocalStorage(root), grace=0)
    assert (root / step_name(2) / "manifest.json").read_bytes() == newer
    assert [f for f in os.listdir(root / step_name(2)) if f.startswith("shard-")]


def test_retention_reclaims_files_that_only_dropped_steps_referenced(tmp_path):
    """keep_last=2 and a tensor that changes now and then: its old shard stays while
    a kept step references it, and must go once none does (it used to stay until a
    manual ``ckptstore gc``)."""
    from ckptstore.runs.retention import referenced_files
    from ckptstore.runs.layout import read_step

    root = tmp_path / "run"
    frozen = torch.arange(1 << 14, dtype=torch.float32)

    def state(step: int) -> dict:
        return {"frozen": frozen, "slow": torch.full((4096,), float(step // 5)),
                "w": torch.full((64,), float(step))}

    def age_everything() -> None:  # as if the run had been going for hours
        old = time.time() - 7200
        for d, _, files in os.walk(root):
            for f in files:
                os.utime(os.path.join(d, f), (old, old))

    with ckptstore.Checkpointer(root, keep_last=2) as ck:
        for step in range(1, 21):
            ck.save(step, state(step)).wait()
            ck.wait()
            age_everything()
        committed = ck.steps()
    assert committed == [19, 20]
    store = LocalStorage(root)
    refs = referenced_files(store, {step_name(s): read_step(store, s) for s in committed})
    on_disk = {(d, f) for d in os.listdir(root) for f in os.listdir(root / d)
               if f != "manifest.json"}
    assert on_disk == refs  # nothing that no committed manifest names
    for s in committed:
        assert_same_tree(ckptstore.load(root / step_name(s)), state(s))
