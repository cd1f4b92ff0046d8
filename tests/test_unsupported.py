"""Requests that are valid but unsupported raise a CkptError, not a bare builtin."""
from __future__ import annotations

import json

import pytest
import torch

import ckptstore
from ckptstore import manifest as fmt


def _as_sharded(path) -> None:
    """Mark tensor ``w`` (8x8 fp32, two 128-byte chunks) as saved in two dim-0 blocks,
    as a 2-rank FSDP2 save records it (the bytes are laid out the same way)."""
    obj = json.loads((path / "manifest.json").read_bytes())
    obj.pop("manifest_checksum")
    (rec,) = [t for t in obj["tensors"] if t["name"] == "w"]
    rec["shards"] = [[[0, 0], [4, 8], 1], [[4, 0], [4, 8], 1]]
    body = json.dumps(obj, separators=(",", ":")).encode()[:-1]
    (path / "manifest.json").write_bytes(
        body + b',"manifest_checksum":"' + fmt.hash_bytes(body).encode() + b'"}\n')


def test_rename_and_lazy_open_of_sharded_checkpoint_raise_typed_error(tmp_path):
    w = torch.arange(64.0).reshape(8, 8)
    ckptstore.save({"w": w}, tmp_path / "c", compression="none", chunk_size=128).wait()
    _as_sharded(tmp_path / "c")
    assert torch.equal(ckptstore.load(tmp_path / "c")["w"], w)  # resharded load works
    for call in (lambda: ckptstore.load(tmp_path / "c", rename={"w": "v"}),
                 lambda: ckptstore.open(tmp_path / "c")):
        with pytest.raises(ckptstore.UnsupportedOperationError) as e:
            call()
        assert isinstance(e.value, ckptstore.CkptError) and isinstance(e.value, NotImplementedError)


def test_a_shard_smaller_than_a_chunk_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="shard_size"):
        ckptstore.save({"x": torch.ones(4)}, tmp_path / "s", shard_size=1 << 10, chunk_size=1 << 20)
