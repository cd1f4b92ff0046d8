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


def test_rename_keys_and_lazy_open_of_a_sharded_checkpoint_work(tmp_path):
    """They raised UnsupportedOperationError; they read sharded tensors now."""
    w = torch.arange(64.0).reshape(8, 8)
    ckptstore.save({"w": w, "b": torch.ones(3)}, tmp_path / "c", compression="none",
                   chunk_size=128).wait()
    _as_sharded(tmp_path / "c")
    assert torch.equal(ckptstore.load(tmp_path / "c")["w"], w)  # resharded load works
    assert torch.equal(ckptstore.load(tmp_path / "c", rename={"w": "v"})["v"], w)
    assert list(ckptstore.load(tmp_path / "c", keys=["w"])) == ["w"]
    ckpt = ckptstore.open(tmp_path / "c")
    assert torch.equal(ckpt["w"], w) and ckpt.info("w").shape == (8, 8)


def test_a_shard_smaller_than_a_chunk_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="shard_size"):
        ckptstore.save({"x": torch.ones(4)}, tmp_path / "s", shard_size=1 << 10, chunk_size=1 << 20)
