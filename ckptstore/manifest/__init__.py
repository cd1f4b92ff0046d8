"""The manifest layer: records, bytes, validation, schema migrations and reading.

``from ckptstore import manifest as fmt`` gives every name callers use:
``fmt.Manifest``, ``fmt.encode``, ``fmt.decode``, ``fmt.MANIFEST_NAME``,
``fmt.SCHEMA_VERSION``, ``fmt.read_manifest``... Each module owns one thing:

* :mod:`.records`: the frozen records and the format's constants;
* :mod:`.jsonio`: encoding with a self-checksum, strict decoding;
* :mod:`.validate`: structural checks of a decoded manifest;
* :mod:`.migrations`: upgrades of older schema versions;
* :mod:`.rle`: run-length forms of a distributed save's grids;
* :mod:`.ranked`: rank indexes of a distributed save, and resolving them;
* :mod:`.io`: reading a committed manifest from storage (every layer uses it).

``SCHEMA_VERSION`` forwards to ``records.SCHEMA_VERSION``, the one the library reads
at call time: patch that attribute to simulate a newer library. This package imports
nothing above it (api, read, verify, runs) and no torch.
"""
from __future__ import annotations

from typing import Any

from ckptstore.manifest import records
from ckptstore.manifest.io import read_catalog, read_manifest, read_manifest_bytes
from ckptstore.manifest.jsonio import check_checksum, decode, encode, parse_json
from ckptstore.manifest.ranked import resolve
from ckptstore.manifest.records import (
    BASE_RE,
    FORMAT_NAME,
    INDEX_FORMAT,
    MANIFEST_NAME,
    MAX_MANIFEST_BYTES,
    MAX_SIZE,
    ChunkRecord,
    FileRecord,
    Grid,
    Manifest,
    ShardRecord,
    TensorRecord,
    check_base,
    digest_of,
)
from ckptstore.manifest.validate import validate, validate_shards
from ckptstore.pipeline.codec import hash_bytes

__all__ = [
    "BASE_RE", "FORMAT_NAME", "MANIFEST_NAME", "MAX_MANIFEST_BYTES", "MAX_SIZE", "SCHEMA_VERSION",
    "ChunkRecord", "FileRecord", "Grid", "INDEX_FORMAT", "Manifest", "ShardRecord", "TensorRecord", "check_base",
    "check_checksum", "decode", "digest_of", "encode", "hash_bytes", "parse_json",
    "read_catalog", "read_manifest", "read_manifest_bytes", "resolve", "validate", "validate_shards",
]


def __getattr__(name: str) -> Any:
    if name == "SCHEMA_VERSION":  # live, not a copy: records.SCHEMA_VERSION may be patched
        return records.SCHEMA_VERSION
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
