"""Object-store faults (the second half of ``python -m fuzz crash --tier s3|gcs``).

A moto S3 server or fake-gcs-server sits behind :class:`~fuzz.proxy.FaultProxy`; the
library talks to the proxy (the client's own retries off, so every fault reaches
ckptstore's retry table) and the oracle reads the server directly.

- *Network faults during a save and during a Checkpointer promotion*: a random
  sample of requests (PUT, GET/HEAD, or any) answered with 503 SlowDown, a
  connection reset, or a delay; sometimes transient (a few), sometimes persistent.
  Oracle: the save or promotion commits and loads bit-identical, or it raises a
  typed ``CkptError`` and the step is not committed (``load`` ->
  ``CheckpointNotFoundError``); the committed step next to it always loads
  bit-identical; the local copy of a failed promotion is kept and loads.
- *Kill between data objects and manifest*: the manifest PUT is held at the proxy,
  the saving process group is SIGKILLed -> not committed, data objects left over,
  ``ckptstore gc --grace 0`` removes them and spares the committed step.
- *Kill between multipart parts and completion* (S3 only): a >= 10 MiB shard is uploaded in
  5 MiB parts (the harness storage passes s3fs a small ``chunksize``); the
  CompleteMultipartUpload request is held, the group SIGKILLed -> not committed, an
  incomplete upload is left, and ``ckptstore gc --grace 0`` aborts it.
"""
from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time

from ckptstore.runs.layout import step_name
from ckptstore.storage.fsspec_backend import FsspecStorage

from .common import MODES, SMALL, Budget, Report, make_state, outcome, tree_digest

OLD_SEED, NEW_SEED = 1, 2
#: s3fs part size for the multipart case (S3's smallest non-final part)
PART = 5 * 2 ** 20
#: step directories as a Checkpointer and ``ckptstore gc`` name them
S1, S2 = step_name(1), step_name(2)
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class _Chunked:
    """An s3fs filesystem whose ``pipe_file`` uploads in ``PART``-sized parts."""

    def __init__(self, fs) -> None:
        self._fs = fs

    def __getattr__(self, name: str):
        return getattr(self._fs, name)

    def pipe_file(self, path, data, **kwargs):
        return self._fs.pipe_file(path, data, chunksize=PART, **kwargs)


class MultipartS3Storage(FsspecStorage):
    """Harness storage: s3fs switches to multipart uploads at ``2 * chunksize``
    (100 MiB by default, not a storage option), so this one lowers it to force
    multipart on a small shard. Pickles to the writer processes like its base."""

    @property
    def fs(self):
        if not isinstance(self._fs, _Chunked):
            self._fs = _Chunked(FsspecStorage.fs.fget(self))
        return self._fs

    def child(self, name: str) -> "MultipartS3Storage":
        return MultipartS3Storage(super().child(name).url, self.options)

    def sibling(self, name: str) -> "MultipartS3Storage":
        return MultipartS3Storage(super().sibling(name).url, self.options)


class StoreEnv:
    """An S3 (moto) or GCS (fake-gcs-server) server on a free port, a FaultProxy in
    front of it, one bucket per case."""

    def __init__(self, kind: str = "s3") -> None:
        from .servers import ObjectStore

        os.environ.setdefault("CKPTSTORE_RETRIES", "5")
        self.kind = kind
        self.store = ObjectStore(kind)
        self.proxy = self.store.proxy
        self.direct, self.faulty, self.fs = self.store.direct, self.store.faulty, self.store.fs
        self.n = 0

    def bucket(self, mode: str = "zstd") -> str:
        """A fresh bucket whose run ``B/run`` holds a committed step 1."""
        import ckptstore
        from ckptstore.storage import open_storage

        self.n += 1
        # moto's backend is per process, shared by every server started in it
        name = f"fuzz-{os.getpid()}-{id(self) % 10 ** 6}-{self.n}"
        self.fs.mkdir(name)
        run = self.store.url(f"{name}/run")
        ckptstore.save(make_state(OLD_SEED), open_storage(f"{run}/{S1}", self.direct),
                       compression=mode, blocking=True, **SMALL)
        return run

    def look(self, url: str) -> str:
        from ckptstore.storage import open_storage

        return outcome(open_storage(url, self.direct))

    def close(self) -> None:
        self.store.close()


_FAULTS = ("503", "reset", "delay")


def _inject(env: StoreEnv, rng: random.Random) -> tuple:
    kind = rng.choice(_FAULTS)
    method = rng.choice(("PUT", "GET", "HEAD", None))
    persistent = rng.random() < 0.3 and kind != "delay"
    rate = rng.choice((0.1, 0.3, 0.6, 1.0))
    count = 10 ** 6 if persistent else rng.randint(1, 4)
    fault = env.proxy.inject(kind, count, method=method, rate=rate, seed=rng.randrange(1 << 30),
                             delay=rng.uniform(0.05, 0.4))
    return fault, f"{kind} x{'inf' if persistent else count} on {method or 'any'} at p={rate}"


def fault_save(report: Report, env: StoreEnv, rng: random.Random, i: int) -> None:
    """One save to S3 under sampled network faults."""
    import ckptstore
    from ckptstore.storage import open_storage

    mode = rng.choice(MODES)
    run = env.bucket(mode)
    fault, what = _inject(env, rng)
    what = f"{env.kind} save #{i} {mode} ({what})"
    error = None
    try:
        ckptstore.save(make_state(NEW_SEED), open_storage(f"{run}/{S2}", env.faulty),
                       compression=mode, blocking=True, **SMALL)
    except ckptstore.CkptError as e:
        error = e
    except Exception as e:  # untyped: a failure of its own
        report.fail(f"{what}: untyped error {type(e).__name__}: {e}")
        error = e
    finally:
        env.proxy.clear()
    report.add("faults_injected", fault.hits)
    _check(report, env, run, S2, error, what)


def _check(report: Report, env: StoreEnv, run: str, step: str, error, what: str) -> None:
    new = tree_digest(make_state(NEW_SEED))
    report.check(env.look(f"{run}/{S1}") == tree_digest(make_state(OLD_SEED)),
                 f"{what}: the committed step-1 changed")
    got = env.look(f"{run}/{step}")
    if error is None:
        report.check(got == new, f"{what}: committed save loads as {got}")
    else:
        report.check(got == "absent", f"{what}: failed with {type(error).__name__} "
                                      f"({str(error)[:200]}) but the step loads as {got}")


def fault_promotion(report: Report, env: StoreEnv, rng: random.Random, i: int, tmp: str) -> None:
    """A Checkpointer save whose promotion to S3 meets sampled network faults."""
    import ckptstore
    from ckptstore.runs.layout import step_name

    mode = rng.choice(MODES)
    run = env.bucket(mode)
    local = os.path.join(tmp, f"local-{i}")
    fault, what = _inject(env, rng)
    what = f"{env.kind} promotion #{i} {mode} ({what})"
    state = make_state(NEW_SEED)
    error = None
    ck = ckptstore.Checkpointer(local, run, storage_options=env.faulty, compression=mode,
                                save_options=SMALL)
    try:
        ck.save(2, state)
        ck.wait()
    except ckptstore.CkptError as e:
        error = e
    except Exception as e:
        report.fail(f"{what}: untyped error {type(e).__name__}: {e}")
        error = e
    finally:
        env.proxy.clear()
        try:
            ck.close()
        except ckptstore.CkptError:
            pass  # a retried promotion in close(); its outcome is checked below
    report.add("faults_injected", fault.hits)
    report.check(outcome(os.path.join(local, step_name(2))) == tree_digest(state),
                 f"{what}: the local copy does not load")
    name = step_name(2)
    got = env.look(f"{run}/{name}")
    report.check(got in ({tree_digest(state)} if error is None else {tree_digest(state), "absent"}),
                 f"{what}: remote {name} loads as {got} (error {error!r})")
    report.check(env.look(f"{run}/{S1}") == tree_digest(make_state(OLD_SEED)),
                 f"{what}: the committed step-1 changed")


def _child_save(env: StoreEnv, url: str, spec: dict) -> subprocess.Popen:
    spec = dict(spec, url=url, options=env.faulty)
    return subprocess.Popen([sys.executable, "-m", "fuzz.objstore", json.dumps(spec)], cwd=ROOT,
                            env=dict(os.environ, CKPTSTORE_WRITERS="1"),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)


def _kill_when_held(report: Report, proc: subprocess.Popen, fault, what: str,
                    limit: float = 120) -> bool:
    deadline = time.monotonic() + limit
    while not fault.hits:
        if proc.poll() is not None or time.monotonic() > deadline:
            report.fail(f"{what}: the held request never came (status {proc.poll()})")
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            proc.wait()
            return False
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)  # the saving process and its writers
    proc.wait()
    report.add("kills")
    return True


def _gc(env: StoreEnv, run: str) -> int:
    import contextlib
    import io

    from ckptstore.cli.main import main

    args = ["gc", run, "--grace", "0", *env.store.gc_options()]
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        return main(args)


def _uploads(env: StoreEnv, run: str) -> list:
    if env.kind != "s3":
        return []
    bucket = env.store.path(run).partition("/")[0]
    return env.fs.call_s3("list_multipart_uploads", Bucket=bucket).get("Uploads", [])


def kill_before_manifest(report: Report, env: StoreEnv, i: int) -> None:
    run = env.bucket("zstd")
    what = f"{env.kind} kill before manifest #{i}"
    # s3fs PUTs the manifest by name; gcsfs POSTs an upload naming it in the body,
    # and only the manifest is created with ifGenerationMatch=0
    method, path = ("PUT", "manifest.json") if env.kind == "s3" else ("POST", "ifGenerationMatch=0")
    hold = env.proxy.inject("blackhole", 1, method=method, path=path, delay=120)
    _kill_held_save(report, env, run, what, hold, dict(mode="zstd", scale=1),
                    expect_uploads=False)


def kill_mid_multipart(report: Report, env: StoreEnv, i: int) -> None:
    run = env.bucket("none")
    what = f"s3 kill between multipart parts and completion #{i}"
    # CompleteMultipartUpload is the only POST carrying an uploadId
    hold = env.proxy.inject("blackhole", 1, method="POST", path="uploadId=", delay=120)
    _kill_held_save(report, env, run, what, hold, dict(mode="none", big=True),
                    expect_uploads=True)


def _kill_held_save(report: Report, env: StoreEnv, run: str, what: str, hold, spec: dict,
                    expect_uploads: bool) -> None:
    """Save step 2 in a child, SIGKILL it while ``hold`` keeps its request at the
    proxy, then check the leftovers and ``gc``."""
    proc = _child_save(env, f"{run}/{S2}", spec)
    ok = _kill_when_held(report, proc, hold, what)
    env.proxy.clear()
    report.add("crash_points")
    if ok:
        _after_kill(report, env, run, what, expect_uploads=expect_uploads)


def _after_kill(report: Report, env: StoreEnv, run: str, what: str, expect_uploads: bool) -> None:
    from ckptstore.storage import open_storage

    got = env.look(f"{run}/{S2}")
    report.check(got == "absent", f"{what}: the killed save loads as {got}")
    step = open_storage(f"{run}/{S2}", env.direct)
    leftovers = step.listdir()
    uploads = _uploads(env, run)
    if expect_uploads:
        report.check(len(uploads) >= 1, f"{what}: no incomplete multipart upload was left")
    else:
        report.check(bool(leftovers), f"{what}: no data objects before the manifest")
    code = _gc(env, run)
    report.check(code == 0, f"{what}: gc exited {code}")
    report.check(_uploads(env, run) == [], f"{what}: gc left incomplete uploads")
    report.check(step.listdir() == [], f"{what}: gc left {step.listdir()}")
    report.check(env.look(f"{run}/{S1}") == tree_digest(make_state(OLD_SEED)),
                 f"{what}: the committed step-1 changed")


def run(report: Report, budget: Budget, *, seed: int = 0, kind: str = "s3") -> None:
    """Kills at the network level first (one of each; the multipart one on S3 only),
    then faulted saves and promotions while the budget lasts. ``kind``: ``"s3"``
    (moto) or ``"gcs"`` (fake-gcs-server)."""
    rng = random.Random(seed)
    env = StoreEnv(kind)
    try:
        with tempfile.TemporaryDirectory(prefix=f"fuzz-{kind}-") as tmp:
            kill_before_manifest(report, env, 0)
            if kind == "s3":  # GCS has no multipart upload to leave behind
                kill_mid_multipart(report, env, 0)
            i = 0
            while not budget.out() or i < 2:
                (fault_save if i % 2 == 0 else
                 lambda r, e, g, n: fault_promotion(r, e, g, n, tmp))(report, env, rng, i)
                i += 1
    finally:
        env.close()


def child_main(spec: dict) -> int:
    """A saving process for the kill cases (killed by the parent)."""
    import torch

    import ckptstore

    if spec.get("big"):  # one 12 MiB tensor: an uncompressed shard of 3 parts
        state = {"w": torch.randn(3 * 2 ** 20, generator=torch.Generator().manual_seed(5))}
        storage = MultipartS3Storage(spec["url"], spec["options"])
        ckptstore.save(state, storage, compression="none", blocking=True)
    else:
        from ckptstore.storage import open_storage

        ckptstore.save(make_state(NEW_SEED), open_storage(spec["url"], spec["options"]),
                       compression=spec["mode"], blocking=True, **SMALL)
    return 0


if __name__ == "__main__":
    # through the module, so pickles name fuzz.objstore.MultipartS3Storage, not __main__
    from fuzz.objstore import child_main as _main

    sys.exit(_main(json.loads(sys.argv[1])))
