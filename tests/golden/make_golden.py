"""Golden checkpoints: tiny checkpoints of every schema version, committed to the repo.

Every later ckptstore must keep loading them bit-exactly (tests/test_golden.py).
Run this script only when ``SCHEMA_VERSION`` (ckptstore/manifest/records.py) is bumped::

    python tests/golden/make_golden.py

It writes ``v<N>-none/`` and ``v<N>-zstd/`` (the golden checkpoints) and
``schema-v<N>.json`` (a canonical description of what the writer of version N
emits) next to itself, and refuses to overwrite an existing version: a released
version's golden files are never regenerated.

The state is built from arithmetic only (no RNG), so the expected values can be
rebuilt by any later torch; it covers every node type of the state tree, an alias
(a tensor referenced twice), tensors of several chunks and several files.
"""
from __future__ import annotations

import dataclasses
import json
import sys
from collections import OrderedDict
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
MODES = ("none", "zstd")
CHUNK_SIZE = 64  # several chunks per tensor
SHARD_SIZE = 256  # several files


def golden_state() -> dict:
    """The state every golden checkpoint holds (same for all schema versions)."""
    w = torch.arange(48, dtype=torch.float32).reshape(6, 8) / 7 - 3
    model = OrderedDict([
        ("encoder.0.weight", w),
        ("encoder.0.bias", torch.arange(6, dtype=torch.float32) / 3),
        ("head.weight", (torch.arange(12).reshape(2, 6) % 5).to(torch.bfloat16)),
        ("head.bias", torch.tensor([0.5, -0.25], dtype=torch.float16)),
    ])
    optim = {"state": {0: {"step": torch.tensor(3.0), "exp_avg": w * 0.125}},
             "param_groups": [{"lr": 1e-3, "betas": (0.9, 0.999), "params": [0, 1]}]}
    return {
        "model": model, "optim": optim, "step": 3, "loss": 1.25, "name": "golden",
        "flag": True, "nothing": None, "blob": b"\x00\x01ckpt",
        "rng": np.arange(5, dtype=np.uint32), "npscalar": np.float64(0.5),
        "dtype": torch.bfloat16, "ints": torch.arange(-3, 3, dtype=torch.int64),
        "mask": torch.tensor([True, False, True]), "tied": w,
    }


# -- canonical schema description --------------------------------------------

def describe_manifest(obj: dict) -> list[str]:
    """What the writer emits, as sorted ``path: type`` lines. Lists of one kind of
    element use ``[]``; mixed (positional) arrays such as a chunk record use their
    indices. User metadata is not described; the state tree is described by its node
    tags and their keys."""
    out: set[str] = set()

    def kind(v) -> str:
        if v is None:
            return "null"
        return {bool: "bool", int: "int", float: "float", str: "str", list: "array",
                dict: "object"}[type(v)]

    def walk(v, path: str) -> None:
        out.add(f"{path}: {kind(v)}")
        if isinstance(v, dict):
            for k, x in v.items():
                if path == "" and k in ("metadata", "tree"):
                    out.add(f".{k}: present")
                    continue
                walk(x, f"{path}.{k}")
        elif isinstance(v, list):
            kinds = {kind(x) for x in v}
            positional = len(kinds) > 1 and all(kind(x) not in ("object",) for x in v)
            for i, x in enumerate(v):
                walk(x, f"{path}[{i}]" if positional else f"{path}[]")

    def tree(node) -> None:
        if isinstance(node, dict):
            out.add(f"tree node {node.get('T')!r}: {sorted(node)}")
            for x in node.values():
                tree(x)
        elif isinstance(node, list):
            for x in node:
                tree(x)

    walk(obj, "")
    tree(obj.get("tree"))
    return sorted(out)


def describe_records() -> list[str]:
    """Field names of the manifest's record dataclasses (a new field is a schema change)."""
    from ckptstore.manifest import records

    lines = []
    for name in sorted(vars(records)):
        cls = getattr(records, name)
        if isinstance(cls, type) and dataclasses.is_dataclass(cls) and cls.__module__ == records.__name__:
            lines.append(f"record {name}: {[f.name for f in dataclasses.fields(cls)]}")
    return lines


def describe_checkpoint(path: Path) -> list[str]:
    """Schema description of a checkpoint directory: manifest + safetensors headers."""
    from ckptstore import manifest as fmt

    obj = json.loads((path / fmt.MANIFEST_NAME).read_text())
    lines = set(describe_manifest(obj))
    for f in obj["files"]:
        if f["format"] == "safetensors":
            data = (path / f["name"]).read_bytes()
            n = int.from_bytes(data[:8], "little")
            header = json.loads(data[8:8 + n])
            lines.add(f"safetensors __metadata__: {sorted(header['__metadata__'])}")
            lines |= {f"safetensors entry: {sorted(v)}" for k, v in header.items()
                      if k != "__metadata__"}
    return sorted(lines)


def schema_description(paths: list[Path]) -> list[str]:
    lines: set[str] = set(describe_records())
    for p in paths:
        lines |= set(describe_checkpoint(p))
    return sorted(lines)


def write_version(root: Path, version: int) -> list[Path]:
    import ckptstore

    paths = []
    for mode in MODES:
        path = root / f"v{version}-{mode}"
        ckptstore.save(golden_state(), path, compression=mode, chunk_size=CHUNK_SIZE,
                       shard_size=SHARD_SIZE, metadata={"golden": version, "mode": mode},
                       blocking=True)
        paths.append(path)
    return paths


def main() -> int:
    from ckptstore import manifest as fmt

    version = fmt.SCHEMA_VERSION
    schema_file = HERE / f"schema-v{version}.json"
    if schema_file.exists() or any((HERE / f"v{version}-{m}").exists() for m in MODES):
        sys.stderr.write(f"golden files for schema version {version} already exist; a released "
                         "version is never regenerated: bump manifest.records.SCHEMA_VERSION first\n")
        return 1
    paths = write_version(HERE, version)
    schema_file.write_text(json.dumps(schema_description(paths), indent=1) + "\n")
    sys.stdout.write(f"wrote {', '.join(p.name for p in paths)} and {schema_file.name}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
