"""A save refuses, before committing, a manifest its reader would refuse.

The reader refuses manifests over ``MAX_MANIFEST_BYTES`` and those whose estimated
parse memory is over ``CKPTSTORE_MAX_MANIFEST_MEMORY``. With that limit set low, a save
of a few thousand small tensors raises the reader's typed error, writes no manifest,
leaves none of its data files and keeps the previous checkpoint; with the limit
restored the same state commits and loads.
"""
from __future__ import annotations

import os
import warnings

import pytest
import torch
from conftest import assert_same_tree

import ckptstore
from ckptstore.commit.atomic import check_readable
from ckptstore.errors import UnsafeCheckpointError
from ckptstore.manifest import records
from ckptstore.manifest.jsonio import PARSE_LIMIT_ENV

pytestmark = pytest.mark.timeout(300)

LIMIT = 2 << 20  #: a small state's manifest reads under it; 3,000 tensors' does not


def _small() -> dict:
    g = torch.Generator().manual_seed(0)
    return {"w": torch.randn(32, 8, generator=g), "step": 1}


def _many(n: int = 3000) -> dict:
    g = torch.Generator().manual_seed(1)
    return {"layers": {f"t{i}": torch.randn(4, generator=g) for i in range(n)}, "step": 2}


def _snapshot(path) -> tuple[list[str], bytes]:
    return sorted(os.listdir(path)), (path / "manifest.json").read_bytes()


def test_save_refuses_a_manifest_the_reader_would_refuse(tmp_path, monkeypatch):
    path = tmp_path / "ckpt"
    ckptstore.save(_small(), path, blocking=True)
    before = _snapshot(path)
    monkeypatch.setenv(PARSE_LIMIT_ENV, str(LIMIT))
    assert_same_tree(_small(), ckptstore.load(path))  # the previous one reads under the limit
    with pytest.raises(UnsafeCheckpointError) as info:
        ckptstore.save(_many(), path, overwrite=True, blocking=True)
    msg = str(info.value)
    assert PARSE_LIMIT_ENV in msg and "fewer tensors" in msg and "chunk" in msg, msg
    assert _snapshot(path) == before  # no manifest, no data file of the refused save
    assert_same_tree(_small(), ckptstore.load(path))
    monkeypatch.delenv(PARSE_LIMIT_ENV)
    ckptstore.save(_many(), path, overwrite=True, blocking=True)
    assert_same_tree(_many(), ckptstore.load(path))


def test_dcp_save_refuses_it_too_and_leaves_no_file(tmp_path, monkeypatch):
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.api import CheckpointException

    from ckptstore.distributed.dcp import CkptStoreWriter

    path = tmp_path / "ckpt"
    ckptstore.save(_small(), path, blocking=True)
    before = _snapshot(path)
    monkeypatch.setenv(PARSE_LIMIT_ENV, str(LIMIT))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # torch.distributed is disabled
        with pytest.raises(CheckpointException) as info:  # DCP wraps the writer's error
            dcp.save(_many(), storage_writer=CkptStoreWriter(str(path), overwrite=True))
    assert "UnsafeCheckpointError" in str(info.value) and PARSE_LIMIT_ENV in str(info.value)
    assert _snapshot(path) == before
    assert_same_tree(_small(), ckptstore.load(path))


def test_check_readable_refuses_what_the_reader_refuses(monkeypatch):
    data = b'{"a":[' + b"1," * 5000 + b'1]}'
    check_readable(data, "a manifest")  # under both limits
    monkeypatch.setenv(PARSE_LIMIT_ENV, "20000")
    with pytest.raises(UnsafeCheckpointError, match=PARSE_LIMIT_ENV):
        check_readable(data, "a manifest")
    with pytest.raises(UnsafeCheckpointError):
        ckptstore.manifest.parse_json(data)  # the reader agrees
    monkeypatch.delenv(PARSE_LIMIT_ENV)
    monkeypatch.setattr(records, "MAX_MANIFEST_BYTES", 1000)
    with pytest.raises(UnsafeCheckpointError, match="fewer tensors"):
        check_readable(data, "rank 3's index")
