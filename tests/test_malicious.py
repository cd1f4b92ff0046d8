"""The malicious corpus (fuzz/corpus): every case refused with its typed error,
without reading or writing outside the checkpoint."""
from __future__ import annotations

import json
import os

import pytest

from fuzz import malicious
from fuzz.common import Report

with open(os.path.join(malicious.CORPUS, "cases.json")) as _f:
    CASES = json.load(_f)


@pytest.fixture(scope="module")
def box(tmp_path_factory):
    return malicious.Sandbox(str(tmp_path_factory.mktemp("malicious")))


def test_corpus_covers_the_checklist():
    needed = {"pickle_manifest", "dotdot_file", "absolute_file", "size_2_63",
              "overlapping_offsets", "zstd_bomb", "deeply_nested", "duplicate_key", "schema_99"}
    assert needed <= set(CASES)


@pytest.mark.parametrize("name", sorted(CASES))
def test_corpus_case_refused(box, name):
    box.reset()
    case = CASES[name]
    with open(os.path.join(malicious.CORPUS, f"{name}.manifest"), "rb") as src:
        data = src.read()
    with open(os.path.join(box.ckpt, "manifest.json"), "wb") as dst:
        dst.write(data)
    for extra in case["extra"]:
        with open(os.path.join(malicious.CORPUS, f"{name}.extra.{extra}"), "rb") as src, \
                open(os.path.join(box.ckpt, extra), "wb") as dst:
            dst.write(src.read())
    report = Report()
    malicious.check_case(report, box, name, case["expect"], case.get("deep_only", False))
    assert report.counts["failures"] == 0, report.details


@pytest.mark.timeout(120)
@pytest.mark.parametrize("index", range(7))
def test_runtime_case_refused(box, index):
    cases = malicious._runtime_cases(box)
    name, expect, setup = cases[index]
    box.reset()
    setup()
    report = Report()
    malicious.check_case(report, box, name, expect)
    assert report.counts["failures"] == 0, report.details


def test_oracle_notices_a_loadable_case(box):
    """The oracle can fail: an untouched, valid checkpoint is not 'refused'."""
    box.reset()
    report = Report()
    malicious.check_case(report, box, "valid", "CkptError")
    assert report.counts["failures"] > 0


@pytest.mark.parametrize("planes, group, raw_len", [
    ([("raw", 0)] * 3, 2, 0),       # more planes than the group has bytes (was IndexError)
    ([("raw", 2)], 2, 4),           # fewer planes than the group: half the output unset
    ([("raw", 2), ("raw", 2)], 2, 4),  # stored bytes left over after the planes
])
def test_decoder_refuses_an_inconsistent_plane_table(planes, group, raw_len):
    """codec.decode_planes is a parser too: a plane table that does not match the group
    and the stored bytes is corruption (found while writing the libFuzzer target)."""
    from ckptstore.pipeline.codec import decode_planes
    from ckptstore.errors import CorruptCheckpointError

    with pytest.raises(CorruptCheckpointError):
        decode_planes(memoryview(b"abcdef"), planes, group, memoryview(bytearray(raw_len)))


@pytest.mark.parametrize("dtype", ["<i3", "<i5", "<f3", "|b9"])
def test_numpy_dtype_string_numpy_cannot_parse_is_refused(dtype):
    """A dtype string that passes the allow-list's shape but that numpy rejects raised
    TypeError out of fsck (found by the libFuzzer target): it must be a CkptError."""
    from ckptstore.errors import UnsafeCheckpointError
    from ckptstore.plan.tree import safe_numpy_dtype

    with pytest.raises(UnsafeCheckpointError):
        safe_numpy_dtype(dtype)
