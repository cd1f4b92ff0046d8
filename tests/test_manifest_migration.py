"""After a schema bump, every reader of manifests sees older steps migrated.

A newer library is simulated: ``SCHEMA_VERSION`` is one more than today's (N+1) and
the registry holds an N -> N+1 migration. The steps on disk were written by the
"older" library in a synthetic version-N layout the version-N+1 parser cannot read (chunk records are
objects, the chunk size is called ``chunk_bytes``, the metrics are ``scores``).
``Checkpointer.latest()``/``metadata()``, retention with ``keep_best``, ``ckptstore
ls``, ``gc``, promotion, overwrite, ``fsck`` and ``load`` must all read them through
the migration, as ``load`` always did.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from conftest import assert_same_tree, step_state

import ckptstore
from ckptstore import manifest as fmt
from ckptstore.cli.main import main as cli
from ckptstore.manifest import migrations, records
from ckptstore.pipeline.codec import hash_bytes

CURRENT = records.SCHEMA_VERSION  #: the version this library writes: the "older" one
CHUNK_KEYS = ["file", "offset", "length", "raw_length", "group", "planes", "hash", "raw_hash"]


def step_dir(root: Path, step: int) -> Path:
    return root / f"step-{step:012d}"


def make_legacy(path: Path) -> bytes:
    """Rewrite the manifest at ``path`` in the synthetic version-1 layout (with a
    valid checksum, as the older library wrote it); returns the bytes written."""
    obj = json.loads((path / fmt.MANIFEST_NAME).read_text())
    del obj["manifest_checksum"]
    obj["schema_version"] = CURRENT
    obj["chunk_bytes"] = obj.pop("chunk_size")
    for t in obj["tensors"]:
        t["chunks"] = [dict(zip(CHUNK_KEYS, c)) for c in t["chunks"]]
    meta = obj.get("metadata")
    if isinstance(meta, dict) and "metrics" in meta:
        meta["scores"] = meta.pop("metrics")
    prefix = json.dumps(obj, separators=(",", ":")).encode()[:-1]
    data = prefix + b',"manifest_checksum":"' + hash_bytes(prefix).encode() + b'"}\n'
    (path / fmt.MANIFEST_NAME).write_bytes(data)
    return data


@pytest.fixture
def newer_library(monkeypatch):
    """The library at schema version N+1, with the N -> N+1 step registered; returns
    the list of calls to the step."""
    assert fmt.SCHEMA_VERSION == CURRENT
    calls: list[str] = []
    registry: dict = dict(migrations.MIGRATIONS)

    @migrations.register(CURRENT, registry)
    def next_version(obj: dict) -> dict:
        calls.append(obj["save_id"])
        obj["chunk_size"] = obj.pop("chunk_bytes")
        for t in obj["tensors"]:
            t["chunks"] = [[c[k] for k in CHUNK_KEYS] for c in t["chunks"]]
        meta = obj.get("metadata")
        if isinstance(meta, dict) and "scores" in meta:
            meta["metrics"] = meta.pop("scores")
        obj["schema_version"] = CURRENT + 1
        return obj

    monkeypatch.setattr(records, "SCHEMA_VERSION", CURRENT + 1)
    monkeypatch.setattr(migrations, "MIGRATIONS", registry)
    assert fmt.SCHEMA_VERSION == CURRENT + 1  # the writer reads it through the package
    return calls


def test_legacy_layout_needs_the_migration(tmp_path, frozen, newer_library):
    ckptstore.save(step_state(1, frozen), tmp_path / "c", blocking=True)
    data = make_legacy(tmp_path / "c")
    with pytest.raises(ckptstore.CorruptCheckpointError):
        fmt.decode(data, migrate=lambda obj: obj)  # the v2 parser cannot read v1 as it is
    assert fmt.decode(data).chunk_size > 0 and newer_library


def _legacy_run(root: Path, frozen: torch.Tensor, losses: dict) -> None:
    with ckptstore.Checkpointer(root, keep_last=None) as ck:
        for s, loss in losses.items():
            ck.save(s, step_state(s, frozen), metrics={"loss": loss})
    for s in losses:
        make_legacy(step_dir(root, s))


def test_latest_and_metadata_migrate(tmp_path, frozen, newer_library):
    _legacy_run(tmp_path, frozen, {1: 5.0, 2: 1.0})
    with ckptstore.Checkpointer(tmp_path, keep_last=None) as ck:
        assert ck.latest() == 2
        assert ck.metadata(1) == {"step": 1, "metrics": {"loss": 5.0}}
        assert_same_tree(ck.load(), step_state(2, frozen))
        assert ck.loaded_step == 2


def test_retention_reads_metrics_through_the_migration(tmp_path, frozen, newer_library):
    _legacy_run(tmp_path, frozen, {1: 5.0, 2: 1.0, 3: 4.0, 4: 3.0})
    with ckptstore.Checkpointer(tmp_path, keep_last=1, keep_best=("loss", "min", 1)) as ck:
        ck.save(5, step_state(5, frozen), metrics={"loss": 6.0})
        ck.wait()
        assert ck.steps() == [2, 5]  # the best step is kept, the others dropped
        assert_same_tree(ck.load(2), step_state(2, frozen))


def test_fsck_and_load_migrate(tmp_path, frozen, newer_library):
    ckptstore.save(step_state(1, frozen), tmp_path / "c", blocking=True)
    make_legacy(tmp_path / "c")
    report = ckptstore.fsck(tmp_path / "c", deep=True)
    assert report.ok, report.damage
    assert_same_tree(ckptstore.load(tmp_path / "c"), step_state(1, frozen))
    assert newer_library  # the step ran


def test_ls_lists_migrated_steps(tmp_path, frozen, newer_library, capsys):
    for s in (1, 2):
        ckptstore.save(step_state(s, frozen), step_dir(tmp_path, s), blocking=True)
        make_legacy(step_dir(tmp_path, s))
    capsys.readouterr()
    assert cli(["ls", str(tmp_path), "--json"]) == 0
    steps = json.loads(capsys.readouterr().out)["steps"]
    assert [(s["step"], s["committed"], s["problem"]) for s in steps] == [(1, True, None),
                                                                       (2, True, None)]
    assert all(s["logical_bytes"] > 0 for s in steps)


def test_gc_keeps_files_a_migrated_step_references(tmp_path, frozen, newer_library):
    with ckptstore.Checkpointer(tmp_path, keep_last=None) as ck:
        for s in (1, 2):
            ck.save(s, step_state(s, frozen))
    bases = {f["base"] for f in json.loads((step_dir(tmp_path, 2) / fmt.MANIFEST_NAME).read_text())
             ["files"] if "base" in f}
    assert bases == {step_dir(tmp_path, 1).name}  # step 2 reads step 1's file
    make_legacy(step_dir(tmp_path, 2))
    os.remove(step_dir(tmp_path, 1) / fmt.MANIFEST_NAME)  # step 1 is retired
    assert cli(["gc", str(tmp_path), "--grace", "0"]) == 0
    assert_same_tree(ckptstore.load(step_dir(tmp_path, 2)), step_state(2, frozen))


def test_promotion_decides_on_the_migrated_manifest_and_copies_the_bytes(
        tmp_path, frozen, newer_library):
    src, dst = tmp_path / "local", tmp_path / "remote"
    ckptstore.save(step_state(1, frozen), step_dir(src, 1), blocking=True)
    legacy = make_legacy(step_dir(src, 1))
    assert cli(["promote", str(src), str(dst)]) == 0
    assert (step_dir(dst, 1) / fmt.MANIFEST_NAME).read_bytes() == legacy  # copied unchanged
    assert cli(["promote", str(src), str(dst)]) == 0  # already there: same save_id
    assert_same_tree(ckptstore.load(step_dir(dst, 1)), step_state(1, frozen))
    assert ckptstore.fsck(step_dir(dst, 1)).ok


def test_overwrite_removes_the_files_of_a_migrated_manifest(tmp_path, frozen, newer_library):
    where = tmp_path / "c"
    ckptstore.save(step_state(1, frozen), where, blocking=True)
    make_legacy(where)
    old = {p.name for p in where.iterdir()} - {fmt.MANIFEST_NAME}
    ckptstore.save(step_state(2, frozen), where, overwrite=True, blocking=True)
    assert not old & {p.name for p in where.iterdir()}
    assert_same_tree(ckptstore.load(where), step_state(2, frozen))
