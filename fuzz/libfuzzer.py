"""Coverage-guided parser fuzzing with atheris (libFuzzer), where atheris installs.

``python -m fuzz parsers`` runs this after its Hypothesis targets when ``atheris``
imports (the ``dev`` extra installs it on Linux x86-64). It starts
``python -m fuzz.libfuzzer`` with libFuzzer's own bounds, and a crash is any
exception other than a ``CkptError``, an input that runs past ``-timeout`` seconds,
or a process that grows past ``-rss_limit_mb``; libFuzzer then writes the input
that did it under ``-artifact_prefix``.

An input's first byte picks the target; the rest is its payload:

- 0: manifest bytes, through ``format.decode``;
- 1: a manifest as JSON: an object is re-sealed with a valid checksum and installed
  in a copy of a small checkpoint, then ``decode``, ``load``, ``fsck`` and
  ``fsck --deep`` run on it;
- 2: the safetensors header of an uncompressed shard (its manifest hash fixed up to
  match, so the bytes reach the header parser);
- 3: a compressed frame and its plane table, through ``codec.decode_planes``.

The seed corpus is the valid form of each (written at start-up), so mutations start
from inputs that get past the first checks. Only ``ckptstore`` is instrumented for
coverage, not torch.
"""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TARGETS = ("manifest_bytes", "manifest_json", "safetensors_header", "frame")
#: what each plane-table byte can name (decode_planes must refuse the unknown ones)
_CODECS = ("zstd", "lz4", "raw", "gzip", "")
_GROUPS = (1, 2, 3, 4, 8)
_RAW_LENS = (0, 1, 64, 4096, 4097, 1 << 20)


def available() -> bool:
    """Whether atheris imports here."""
    import importlib.util

    return importlib.util.find_spec("atheris") is not None


def fresh_rss(cmd: list[str]) -> list[str]:
    """``cmd`` started through a shell that forks it (not execs it). libFuzzer's
    ``-rss_limit_mb`` checks the process's peak RSS, and Linux starts a forked and
    exec'd child's peak at its parent's RSS at the fork: run from a test runner
    holding 3 GB, the fuzzer would be "out of memory" before its first input. A
    small shell in between is the parent whose RSS is inherited."""
    return ["/bin/sh", "-c", '"$@"; status=$?; exit $status', "sh", *cmd]


def run(budget_s: float, *, rss_limit_mb: int = 2048, timeout_s: int = 30,
        env: dict | None = None) -> dict:
    """Fuzz for ``budget_s`` seconds in a child process. Returns ``{"runs": N,
    "crashed": bool, "output": tail of libFuzzer's output, "artifacts": a kept
    directory holding the crashing input, or None}``."""
    artifacts = tempfile.mkdtemp(prefix="ckptstore-libfuzzer-crash-")
    with tempfile.TemporaryDirectory(prefix="fuzz-libfuzzer-") as tmp:
        corpus = os.path.join(tmp, "corpus")
        os.makedirs(corpus)
        cmd = [sys.executable, "-m", "fuzz.libfuzzer", f"-max_total_time={max(1, int(budget_s))}",
               f"-rss_limit_mb={rss_limit_mb}", f"-timeout={timeout_s}",
               f"-artifact_prefix={artifacts}/", "-print_final_stats=1", corpus]
        proc = subprocess.Popen(fresh_rss(cmd), cwd=ROOT, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True, start_new_session=True,
                                env={**os.environ, **(env or {})})
        try:
            out, _ = proc.communicate(timeout=budget_s + 180)
            code = proc.returncode
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            out, _ = proc.communicate()
            out, code = f"{out}\nlibFuzzer did not stop", -1
        runs = [int(n) for n in re.findall(r"Done (\d+) runs", out)]
        runs += [int(n) for n in re.findall(r"stat::number_of_executed_units:\s*(\d+)", out)]
    if not os.listdir(artifacts):
        os.rmdir(artifacts)
        artifacts = None
    at = out.find("Uncaught Python exception")  # atheris prints the traceback there
    text = out[at:at + 3000] + "\n...\n" + out[-800:] if at >= 0 else out[-3000:]
    return {"runs": max(runs, default=0), "crashed": code != 0, "output": text,
            "artifacts": artifacts}


# -- the child: python -m fuzz.libfuzzer [libFuzzer flags] CORPUS ----------------
class _Child:
    def __init__(self, tmp: str) -> None:
        from fuzz.common import Report
        from fuzz.parsers import Targets

        self.t = Targets(tmp, Report())
        path, raw, obj = self.t.ckpts["none"]
        self.raw_none, self.obj_none = raw, obj
        self.shard = obj["files"][0]["name"]
        with open(os.path.join(path, self.shard), "rb") as f:
            self.shard_bytes = f.read()
        self.hlen = obj["files"][0]["header_length"]

    def seeds(self, corpus: str) -> None:
        """The valid form of every target, as the first inputs."""
        import zstandard

        zraw = self.t.ckpts["zstd"][1]
        frame = zstandard.ZstdCompressor().compress(bytes(range(256)) * 16)
        seeds = [b"\x00" + zraw, b"\x00" + self.raw_none, b"\x01" + zraw, b"\x01" + self.raw_none,
                 b"\x02" + self.shard_bytes[:self.hlen],
                 b"\x03" + bytes([0, 1, 0]) + len(frame).to_bytes(2, "little") + bytes([3])
                 + frame]
        for i, s in enumerate(seeds):
            with open(os.path.join(corpus, f"seed-{i}"), "wb") as f:
                f.write(s)

    def one(self, data: bytes) -> None:
        """One input; only a CkptError may escape (the others are crashes)."""
        from ckptstore import manifest as fmt
        from ckptstore.errors import CkptError

        if not data:
            return
        which, payload = data[0] % len(TARGETS), data[1:]
        if os.environ.get("FUZZ_LIBFUZZER_PLANT") and which == 0 and payload[:1] == b"{":
            raise AssertionError("planted failure")  # the harness's own test
        try:
            if which == 0:
                fmt.decode(payload)
            elif which == 1:
                self._manifest_json(payload)
            elif which == 2:
                self._header(payload)
            else:
                self._frame(payload)
        except CkptError:
            pass

    def _manifest_json(self, payload: bytes) -> None:
        from fuzz.parsers import seal

        try:
            obj = json.loads(payload)
        except (ValueError, RecursionError):
            return  # not JSON: target 0 covers bytes
        if isinstance(obj, dict):
            self.t._with_manifest("zstd", seal(obj))

    def _header(self, payload: bytes) -> None:
        from ckptstore.pipeline.codec import hash_bytes
        from fuzz.parsers import seal

        header = payload[:self.hlen].ljust(self.hlen, b" ")
        m = json.loads(self.raw_none)
        m["files"][0]["header_hash"] = hash_bytes(header)
        self.t._with_manifest("none", seal(m), {self.shard: header + self.shard_bytes[self.hlen:]})

    def _frame(self, payload: bytes) -> None:
        from ckptstore.pipeline.codec import decode_planes

        if len(payload) < 2:
            return
        group, n = _GROUPS[payload[0] % len(_GROUPS)], 1 + payload[1] % 8
        table, rest = payload[2:2 + 3 * n], payload[2 + 3 * n:]
        planes = [(_CODECS[table[i] % len(_CODECS)], int.from_bytes(table[i + 1:i + 3], "little"))
                  for i in range(0, len(table) - 2, 3)]
        if not planes or not rest:
            return
        raw_len = _RAW_LENS[rest[0] % len(_RAW_LENS)]
        decode_planes(memoryview(rest[1:]), planes, group, memoryview(bytearray(raw_len)))


def main(argv: list[str]) -> None:
    import atheris

    import importlib
    import logging

    with atheris.instrument_imports(include=["ckptstore"]):
        for name in ("pipeline.codec", "manifest.records", "manifest.jsonio", "manifest.validate",
                     "manifest.migrations", "manifest.io", "plan.tree", "read.reader", "api.load",
                     "verify.checks", "verify.fsck"):
            importlib.import_module(f"ckptstore.{name}")

    logging.disable(logging.CRITICAL)
    tmp = tempfile.mkdtemp(prefix="fuzz-libfuzzer-child-")
    child = _Child(tmp)
    corpus = [a for a in argv[1:] if not a.startswith("-")]
    if corpus:
        child.seeds(corpus[0])
    atheris.Setup(argv, child.one)
    atheris.Fuzz()


if __name__ == "__main__":
    main(sys.argv)
