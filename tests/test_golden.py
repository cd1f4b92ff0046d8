"""Golden checkpoints of every schema version keep loading; schema changes need a version."""
from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest
import torch

import ckptstore
from ckptstore import manifest as fmt
from ckptstore.manifest import migrations, records
from ckptstore.pipeline.codec import hash_bytes
from ckptstore.errors import SchemaVersionError
from ckptstore.storage import open_storage
from conftest import assert_same_tree

GOLDEN = Path(__file__).resolve().parent / "golden"
sys.path.insert(0, str(GOLDEN))
import make_golden  # noqa: E402

GOLDEN_DIRS = sorted(p for p in GOLDEN.iterdir() if p.is_dir() and p.name.startswith("v"))


def write_manifest_obj(path: Path, obj: dict) -> None:
    """Write a manifest object with a valid checksum (as the writer does)."""
    body = {k: v for k, v in obj.items() if k != "manifest_checksum"}
    prefix = json.dumps(body, separators=(",", ":")).encode()[:-1]
    (path / fmt.MANIFEST_NAME).write_bytes(
        prefix + b',"manifest_checksum":"' + hash_bytes(prefix).encode() + b'"}\n')


def manifest_obj(path: Path) -> dict:
    return json.loads((path / fmt.MANIFEST_NAME).read_text())


def test_every_version_has_golden_files():
    assert len(GOLDEN_DIRS) >= 2
    for v in range(1, fmt.SCHEMA_VERSION + 1):
        assert (GOLDEN / f"schema-v{v}.json").is_file(), f"no schema description for v{v}"
        for mode in make_golden.MODES:
            assert (GOLDEN / f"v{v}-{mode}" / fmt.MANIFEST_NAME).is_file(), f"no golden v{v}-{mode}"


@pytest.mark.parametrize("path", GOLDEN_DIRS, ids=lambda p: p.name)
def test_golden_loads_bit_exact(path):
    state = ckptstore.load(path)
    assert_same_tree(make_golden.golden_state(), state)
    assert state["tied"] is state["model"]["encoder.0.weight"]  # the alias survives
    assert ckptstore.fsck(open_storage(path), deep=True).ok


@pytest.mark.parametrize("path", GOLDEN_DIRS, ids=lambda p: p.name)
def test_golden_loads_with_rename_rules(path):
    expected = make_golden.golden_state()["model"]
    rules = [(r"^model\.encoder\.(\d+)\.", r"model.blocks.\1."), (r"^model\.head\.", "model.out.")]
    state = ckptstore.load(path, rename=rules)
    assert sorted(state["model"]) == ["blocks.0.bias", "blocks.0.weight", "out.bias", "out.weight"]
    assert torch.equal(state["model"]["blocks.0.weight"], expected["encoder.0.weight"])
    target = {"blocks.0.weight": torch.zeros(6, 8), "blocks.0.bias": torch.zeros(6),
              "out.weight": torch.zeros(2, 6, dtype=torch.bfloat16),
              "out.bias": torch.zeros(2, dtype=torch.float16)}
    report = ckptstore.load(path, into=target, keys="model.",
                            rename={"model.encoder.": "blocks.", "model.head.": "out."})
    assert report.ok and len(report.loaded) == 4
    assert torch.equal(target["out.weight"], expected["head.weight"])


def test_writer_schema_matches_recorded_version(tmp_path):
    """Fails when the writer's output changes without a new SCHEMA_VERSION: bump it,
    add a migration, and run tests/golden/make_golden.py (docs/compat.md)."""
    paths = make_golden.write_version(tmp_path, fmt.SCHEMA_VERSION)
    recorded = json.loads((GOLDEN / f"schema-v{fmt.SCHEMA_VERSION}.json").read_text())
    current = make_golden.schema_description(paths)
    added = sorted(set(current) - set(recorded))
    removed = sorted(set(recorded) - set(current))
    assert not added and not removed, (
        f"the manifest schema changed without a new schema version: added {added}, "
        f"removed {removed}")


@pytest.mark.parametrize("path", GOLDEN_DIRS, ids=lambda p: p.name)
def test_golden_files_match_their_recorded_schema(path):
    version = int(path.name[1:].split("-")[0])
    recorded = set(json.loads((GOLDEN / f"schema-v{version}.json").read_text()))
    assert set(make_golden.describe_checkpoint(path)) <= recorded


def test_newer_schema_refused_naming_the_version(tmp_path):
    dst = tmp_path / "future"
    shutil.copytree(GOLDEN / "v1-none", dst)
    obj = manifest_obj(dst)
    obj["schema_version"] = fmt.SCHEMA_VERSION + 1
    obj["writer"]["version"] = "9.4.0"
    write_manifest_obj(dst, obj)
    with pytest.raises(SchemaVersionError, match=r"9\.4\.0") as exc:
        ckptstore.load(dst)
    assert f"schema version {fmt.SCHEMA_VERSION + 1}" in str(exc.value)
    with pytest.raises(SchemaVersionError):
        ckptstore.open(dst)


def test_unknown_optional_fields_are_ignored(tmp_path):
    dst = tmp_path / "extra"
    shutil.copytree(GOLDEN / "v1-zstd", dst)
    obj = manifest_obj(dst)
    obj["some_future_hint"] = {"x": [1, 2]}
    obj["tensors"][0]["future_stat"] = 3.5
    obj["files"][0]["future_flag"] = True
    obj["writer"]["host_kind"] = "test"
    write_manifest_obj(dst, obj)
    assert_same_tree(make_golden.golden_state(), ckptstore.load(dst))


# -- migrations ----------------------------------------------------------------

def _legacy(obj: dict) -> dict:
    """A synthetic older layout (as a version-1 manifest of a library whose current
    version is 3): chunk records are objects, tensors have no digest, and the chunk
    size is called chunk_bytes."""
    old = json.loads(json.dumps(obj))
    old["schema_version"] = 1
    old["chunk_bytes"] = old.pop("chunk_size")
    keys = ["file", "offset", "length", "raw_length", "group", "planes", "hash", "raw_hash"]
    for t in old["tensors"]:
        del t["digest"]
        t["chunks"] = [dict(zip(keys, c)) for c in t["chunks"]]
    return old


def _v1_to_v2(obj: dict) -> dict:
    keys = ["file", "offset", "length", "raw_length", "group", "planes", "hash", "raw_hash"]
    for t in obj["tensors"]:
        t["chunks"] = [[c[k] for k in keys] for c in t["chunks"]]
    obj["schema_version"] = 2
    return obj


def _v2_to_v3(obj: dict) -> dict:
    obj["chunk_size"] = obj.pop("chunk_bytes")
    for t in obj["tensors"]:
        t["digest"] = fmt.digest_of([c[7] for c in t["chunks"]])
    obj["schema_version"] = 3
    return obj


@pytest.fixture
def future_library(monkeypatch):
    """Pretend the library is at schema version 3 with a test-only migration chain."""
    registry: dict = {}
    calls: list[str] = []

    def traced(fn):
        def step(obj):
            calls.append(fn.__name__)
            return fn(obj)
        step.__name__ = fn.__name__
        return step

    migrations.register(1, registry)(traced(_v1_to_v2))
    migrations.register(2, registry)(traced(_v2_to_v3))
    monkeypatch.setattr(records, "SCHEMA_VERSION", 3)
    monkeypatch.setattr(migrations, "MIGRATIONS", registry)
    return calls


@pytest.mark.parametrize("mode", make_golden.MODES)
def test_migration_chain_loads_older_manifest(tmp_path, future_library, mode):
    dst = tmp_path / "old"
    shutil.copytree(GOLDEN / f"v1-{mode}", dst)
    original = manifest_obj(dst)
    write_manifest_obj(dst, _legacy(original))
    state = ckptstore.load(dst)
    assert future_library == ["_v1_to_v2", "_v2_to_v3"]  # in order, each once
    assert_same_tree(make_golden.golden_state(), state)
    ckpt = ckptstore.open(dst)
    assert ckpt.manifest.schema_version == 3
    assert ckpt.info("model.head.bias").digest == original["tensors"][3]["digest"]


def test_missing_migration_step_is_refused(tmp_path, future_library, monkeypatch):
    dst = tmp_path / "old"
    shutil.copytree(GOLDEN / "v1-none", dst)
    write_manifest_obj(dst, _legacy(manifest_obj(dst)))
    monkeypatch.setattr(migrations, "MIGRATIONS", {1: migrations.MIGRATIONS[1]})
    with pytest.raises(SchemaVersionError, match="no migration from it to version 3"):
        ckptstore.load(dst)


def test_migrate_unit():
    registry: dict = {}

    @migrations.register(1, registry)
    def bad(obj):
        return dict(obj)  # forgets to bump schema_version

    with pytest.raises(ValueError, match="already registered"):
        migrations.register(1, registry)(bad)
    src = {"schema_version": 1}
    with pytest.raises(SchemaVersionError, match="did not produce a version 2"):
        migrations.migrate(src, target=2, registry=registry)
    with pytest.raises(SchemaVersionError, match="down"):
        migrations.migrate({"schema_version": 3}, target=2, registry=registry)
    assert migrations.migrate(src, target=1, registry=registry) == src
    registry[1] = lambda o: {**o, "schema_version": 2, "n": 1}
    out = migrations.migrate(src, target=2, registry=registry)
    assert out == {"schema_version": 2, "n": 1} and src == {"schema_version": 1}
    assert sorted(migrations.MIGRATIONS) == list(range(1, fmt.SCHEMA_VERSION))


def test_v1_manifest_migrates_to_v2_without_indexes():
    obj = {"schema_version": 1, "tensors": [], "files": []}
    out = migrations.migrate(obj)
    assert out["schema_version"] == fmt.SCHEMA_VERSION and out["indexes"] == []
    assert obj == {"schema_version": 1, "tensors": [], "files": []}
