"""Parser fuzzing with Hypothesis: manifest bytes and structure, safetensors headers,
compressed frames, CLI arguments. Only CkptError subclasses may escape, and memory
stays bounded (the process high-water mark may not grow by more than MAX_GROWTH).

Each target is a Hypothesis test run in rounds of ``ROUND`` examples until the
budget is spent. Structured manifests are mutated as JSON trees and re-sealed with
a valid checksum, so the fuzzer gets past the checksum into validation, the state
tree and the verified reads of ``load`` and ``fsck``.
"""
from __future__ import annotations

import contextlib
import io
import json
import os
import random
import resource
import shutil
import tempfile
from typing import Any, Callable

import lz4.block
import zstandard
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import ckptstore
from ckptstore import manifest as fmt
from ckptstore.pipeline.codec import CODECS, decode_planes, hash_bytes
from ckptstore.errors import CkptError
from ckptstore.storage import LocalStorage
from ckptstore.verify.fsck import fsck

from .common import SMALL, Budget, Report, make_state

ROUND = 40
MAX_GROWTH = 512 << 20  #: bytes the max RSS may grow over a whole parsers run


def seal(obj: dict) -> bytes:
    """Encode a manifest object the way format.encode does, with a valid checksum."""
    obj = {k: v for k, v in obj.items() if k != "manifest_checksum"}
    text = json.dumps(obj, separators=(",", ":"), ensure_ascii=True).encode()
    prefix = text[:-1]
    return prefix + b',"manifest_checksum":"' + hash_bytes(prefix).encode() + b'"}\n'


json_values = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(-2**70, 2**70),
              st.sampled_from([0, 1, -1, 2**63, 2**64, 2**50, 2**50 + 1, 1 << 48]),
              st.floats(allow_nan=False, allow_infinity=False), st.text(max_size=12),
              st.sampled_from(["../x", "/etc/passwd", "manifest.json", "a/../../b", "", ".",
                               "zstd", "lz4", "raw", "torch", "numpy", "float32", "object",
                               "O", "<f8", "tensor", "dict", "list"])),
    lambda kids: st.one_of(st.lists(kids, max_size=4),
                           st.dictionaries(st.text(max_size=6), kids, max_size=4)),
    max_leaves=10)


def _paths(obj: Any, prefix: tuple = ()) -> list[tuple]:
    out = [prefix]
    if isinstance(obj, dict):
        for k, v in obj.items():
            out += _paths(v, prefix + (k,))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            out += _paths(v, prefix + (i,))
    return out


def _replace(obj: Any, path: tuple, value: Any, delete: bool) -> Any:
    if not path:
        return value
    head, rest = path[0], path[1:]
    if isinstance(obj, dict):
        obj = dict(obj)
        if delete and not rest:
            obj.pop(head, None)
        else:
            obj[head] = _replace(obj[head], rest, value, delete)
    else:
        obj = list(obj)
        if delete and not rest:
            del obj[head]
        else:
            obj[head] = _replace(obj[head], rest, value, delete)
    return obj


class Targets:
    """The fuzz targets, sharing a tiny checkpoint per compression mode."""

    def __init__(self, tmp: str, report: Report) -> None:
        self.tmp = tmp
        self.report = report
        self.ckpts = {}
        for mode in ("none", "zstd"):
            path = os.path.join(tmp, f"ckpt-{mode}")
            ckptstore.save(make_state(1), path, compression=mode, blocking=True, **SMALL)
            with open(os.path.join(path, fmt.MANIFEST_NAME), "rb") as f:
                raw = f.read()
            self.ckpts[mode] = (path, raw, json.loads(raw))
        self.work = os.path.join(tmp, "work")
        self.sandbox = os.path.join(tmp, "sandbox")
        os.makedirs(self.sandbox)
        shutil.copytree(self.ckpts["zstd"][0], os.path.join(self.sandbox, "ckpt"))
        plain = zstandard.ZstdCompressor().compress(bytes(4096))
        self.samples = [plain, lz4.block.compress(bytes(4096), store_size=False),
                       zstandard.ZstdCompressor().compress(os.urandom(256)),
                       _zstd_bomb()]

    def guard(self, what: str, fn: Callable[[], Any]) -> None:
        """Run ``fn``; anything but a CkptError escaping is a failure."""
        self.report.add("fuzz_inputs")
        try:
            fn()
        except CkptError:
            pass
        except Exception as e:  # noqa: BLE001 — the point of the fuzzer
            self.report.fail(f"{what}: {type(e).__name__}: {e}"[:400])

    def _with_manifest(self, mode: str, data: bytes, files: dict | None = None) -> None:
        """Install manifest bytes in a copy of the checkpoint; decode, load and fsck."""
        shutil.rmtree(self.work, ignore_errors=True)
        shutil.copytree(self.ckpts[mode][0], self.work)
        for name, content in (files or {}).items():
            with open(os.path.join(self.work, name), "wb") as f:
                f.write(content)
        with open(os.path.join(self.work, fmt.MANIFEST_NAME), "wb") as f:
            f.write(data)
        try:
            fmt.decode(data)
        except CkptError:
            return
        self.report.add("manifests_accepted")  # got past validation into load and fsck
        for fn in (lambda: ckptstore.load(self.work), lambda: fsck(LocalStorage(self.work)),
                   lambda: fsck(LocalStorage(self.work), deep=True)):
            try:
                fn()
            except CkptError:
                pass

    # -- targets ------------------------------------------------------------
    def manifest_bytes(self, budget: Budget) -> None:
        @settings(max_examples=ROUND, deadline=None, database=None,
                  suppress_health_check=list(HealthCheck))
        @given(st.binary(max_size=512), st.sampled_from(["none", "zstd"]), st.data())
        def t(junk: bytes, mode: str, data) -> None:
            raw = self.ckpts[mode][1]
            kind = data.draw(st.sampled_from(["junk", "flip", "splice", "cut"]))
            if kind == "junk":
                b = junk
            elif kind == "flip":
                i = data.draw(st.integers(0, len(raw) - 1))
                b = raw[:i] + bytes([raw[i] ^ data.draw(st.integers(1, 255))]) + raw[i + 1:]
            elif kind == "splice":
                i = data.draw(st.integers(0, len(raw)))
                b = raw[:i] + junk + raw[i:]
            else:
                b = raw[:data.draw(st.integers(0, len(raw)))]
            self.guard(f"manifest bytes ({kind})", lambda: fmt.decode(b))

        _rounds(budget, t)

    def manifest_structure(self, budget: Budget) -> None:
        @settings(max_examples=ROUND, deadline=None, database=None,
                  suppress_health_check=list(HealthCheck))
        @given(st.sampled_from(["none", "zstd"]), json_values, st.booleans(), st.data())
        def t(mode: str, value: Any, delete: bool, data) -> None:
            obj = self.ckpts[mode][2]
            paths = [p for p in _paths(obj) if p and p[0] != "manifest_checksum"]
            path = data.draw(st.sampled_from(paths))
            mutated = _replace(obj, path, value, delete)
            if not isinstance(mutated, dict):
                return
            self.guard(f"manifest {'without' if delete else 'with'} {path}={value!r}"[:200],
                       lambda: self._with_manifest(mode, seal(mutated)))

        _rounds(budget, t)

    def safetensors_header(self, budget: Budget) -> None:
        path, raw, obj = self.ckpts["none"]
        name = obj["files"][0]["name"]
        with open(os.path.join(path, name), "rb") as f:
            shard = f.read()
        hlen = obj["files"][0]["header_length"]

        @settings(max_examples=ROUND, deadline=None, database=None,
                  suppress_health_check=list(HealthCheck))
        @given(st.one_of(st.binary(max_size=hlen), json_values.map(
            lambda v: json.dumps(v).encode())), st.booleans())
        def t(header: bytes, keep_prefix: bool) -> None:
            if keep_prefix:  # a valid length prefix, any header text, padded in place
                header = (len(header).to_bytes(8, "little") + header)[:hlen]
            header = header.ljust(hlen, b" ")
            files = {name: header + shard[hlen:]}
            m = json.loads(raw)
            m["files"][0]["header_hash"] = hash_bytes(header)
            self.guard("safetensors header", lambda: self._with_manifest("none", seal(m), files))

        _rounds(budget, t)

    def frames(self, budget: Budget) -> None:
        @settings(max_examples=ROUND, deadline=None, database=None,
                  suppress_health_check=list(HealthCheck))
        @given(st.integers(0, len(self.samples) - 1), st.binary(max_size=64),
               st.integers(0, 64), st.sampled_from([1, 2, 4, 8, 3]),
               st.lists(st.tuples(st.sampled_from(CODECS + ("gzip", "")), st.integers(0, 5000)),
                        min_size=1, max_size=8),
               st.sampled_from([0, 1, 64, 4096, 4097, 1 << 20]))
        def t(which: int, junk: bytes, cut: int, group: int, planes: list, raw_len: int) -> None:
            stored = self.samples[which]
            stored = stored[:max(0, len(stored) - cut)] + junk
            out = memoryview(bytearray(raw_len))
            self.guard(f"frames {which} group {group} planes {planes} raw {raw_len}",
                       lambda: decode_planes(memoryview(stored), planes, group, out))

        _rounds(budget, t)

    def cli(self, budget: Budget) -> None:
        from ckptstore.cli.main import COMMANDS, build_parser, main

        build_parser()
        words = sorted(COMMANDS) + ["--json", "--deep", "-v", "--help", "--keep", "--dry-run",
                                    "--to", "--storage-option", "ckpt", "nothing", ".", "x=y",
                                    "out.safetensors", "-", "--", "0", "-1"]
        token = st.one_of(st.sampled_from(words),
                          st.text("abcdefghijklmnopqrstuvwxyz0123456789-=_.", max_size=8)
                          .filter(lambda s: ".." not in s))

        @settings(max_examples=ROUND, deadline=None, database=None,
                  suppress_health_check=list(HealthCheck))
        @given(st.lists(token, max_size=6))
        def t(argv: list) -> None:
            def call() -> None:
                with contextlib.redirect_stdout(io.StringIO()), \
                        contextlib.redirect_stderr(io.StringIO()):
                    code = main(argv)
                if not isinstance(code, int):
                    raise AssertionError(f"main returned {code!r}")

            self.guard(f"cli {argv}", call)

        cwd = os.getcwd()
        os.chdir(self.sandbox)  # every relative path the fuzzer names stays in here
        try:
            _rounds(budget, t)
        finally:
            os.chdir(cwd)


def _zstd_bomb() -> bytes:
    """A 200-byte zstd frame that declares and expands to 64 MiB of zeros."""
    return zstandard.ZstdCompressor(level=19).compress(bytes(64 << 20))


def _rounds(budget: Budget, test: Callable[[], None]) -> None:
    while not budget.out():
        test()


def run(report: Report, budget: Budget, *, seed: int = 0, libfuzzer: bool | None = None) -> None:
    """Split the budget over the targets: the Hypothesis ones, then (where atheris
    imports, or when ``libfuzzer`` is True) a coverage-guided libFuzzer run of
    :mod:`fuzz.libfuzzer` with a third of the budget."""
    from . import libfuzzer as lf

    random.seed(seed)
    use_lf = lf.available() if libfuzzer is None else libfuzzer
    total = max(budget.left(), 0)
    lf_share = total / 3 if use_lf else 0.0
    start = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    with tempfile.TemporaryDirectory(prefix="fuzz-parsers-") as tmp:
        targets = Targets(tmp, report)
        names = ["manifest_bytes", "manifest_structure", "safetensors_header", "frames", "cli"]
        for i, name in enumerate(names):
            share = max(budget.left() - lf_share, 0) / (len(names) - i)
            getattr(targets, name)(Budget(share))
    grown = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - start
    report.check(grown < MAX_GROWTH, f"parsers: peak memory grew by {grown >> 20} MiB")
    if use_lf:
        res = lf.run(max(budget.left(), 5.0), rss_limit_mb=(MAX_GROWTH >> 20) + 1536)
        report.add("fuzz_inputs", res["runs"])
        report.add("libfuzzer_inputs", res["runs"])
        report.check(not res["crashed"] and res["runs"] > 0,
                     f"libFuzzer: crash or no run (input kept in {res['artifacts']})\n"
                     f"{res['output']}")
