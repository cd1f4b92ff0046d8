"""Real ENOSPC: saves and Checkpointer runs on a small tmpfs mount that fills up.

A tmpfs of :data:`SIZE` bytes and :data:`INODES` inodes is mounted on a temp
directory (root with CAP_SYS_ADMIN; elsewhere the family is skipped and says why,
counted as ``enospc_skipped`` and named in ``report.skipped``). Nothing is injected: the kernel itself answers
ENOSPC, either because the blocks are gone (``space``) or the inodes are
(``inodes``). A filler file (or a directory of empty files) outside the checkpoints
leaves exactly the free pages or inodes a case wants. Whether the mount takes
O_DIRECT depends on the kernel (tmpfs accepts it since Linux 6.6); the run counts
``enospc_o_direct`` (1 when it did), so either the direct path or its buffered
fallback is the one exercised.

Cases, visited round-robin so that a short budget still samples each:

- *one save* with compression none, zstd or lz4, as a new step next to a committed
  one or ``overwrite=True`` over it, with 0 .. (what the save needs + 1) pages or
  inodes left, so it runs out at every point of the save (a shard, a temp file, the
  manifest, the step directory itself);
- *a Checkpointer run* (``keep_last`` 1-3, incremental or not, ``full_every``
  random) saving step after step while the filler grows by a random amount after
  each, until a save runs out.

Oracle: the failing save raises :class:`~ckptstore.errors.StorageError` with errno
ENOSPC kept; nothing half-committed (the failed step is absent, ``fsck`` exits 2; an
overwrite leaves the old state); every step committed before still loads
bit-identical to what it held, and none that retention must keep is gone;
``latest()`` is the newest step whose ``wait()`` returned; a failed save leaves no
temp file and no unreferenced shard; after the filler is deleted the same save
succeeds (the Checkpointer run goes on one more step, sometimes in a new
Checkpointer); then ``gc`` (grace 0) leaves no temp file, no shard that no committed
manifest names and no uncommitted step directory, and every committed step still
loads. Counters: ``enospc_cases``, ``enospc_hits`` (cases where the disk did run
out), ``enospc_at_<where>`` (which write ran out, from the error's file name:
``shard``, ``manifest``, the step ``directory``, or ``write`` for a data write whose
error names no file), ``enospc_ckpt_steps`` (Checkpointer steps committed and checked).
"""
from __future__ import annotations

import contextlib
import errno
import gc as pygc
import os
import random
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator

import ckptstore
from ckptstore import manifest as fmt
from ckptstore.commit.atomic import is_temp_name
from ckptstore.errors import CkptError, StorageError
from ckptstore.runs.gc import gc
from ckptstore.runs.layout import committed_steps, parse_step, step_name
from ckptstore.runs.retention import referenced_files
from ckptstore.storage import Storage, open_storage

from .common import MODES, SMALL, Budget, Report, fsck_code, make_state, outcome, tree_digest

SIZE = 8 * 2 ** 20
INODES = 4096
PAGE = 4096
KINDS = ("space", "inodes")


class MountRefused(RuntimeError):
    """The machine does not let this process mount a tmpfs."""


@contextlib.contextmanager
def tmpfs(size: int = SIZE, inodes: int = INODES) -> Iterator[str]:
    """A fresh tmpfs mounted on a temp directory, unmounted on exit; raises
    :class:`MountRefused` (saying why) where mounting is not allowed."""
    if sys.platform != "linux":
        raise MountRefused(f"tmpfs mounts need Linux, not {sys.platform}")
    if os.geteuid() != 0:
        raise MountRefused("mounting a tmpfs needs root (CAP_SYS_ADMIN)")
    if shutil.which("mount") is None:
        raise MountRefused("no mount command on this machine")
    where = tempfile.mkdtemp(prefix="fuzz-enospc-")
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size},nr_inodes={inodes},mode=0700",
                        "tmpfs", where], capture_output=True, text=True)
    if r.returncode != 0:
        os.rmdir(where)
        raise MountRefused(f"mount -t tmpfs refused: {(r.stderr or r.stdout).strip()}")
    try:
        yield where
    finally:
        if subprocess.run(["umount", where], capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", where], capture_output=True)
        with contextlib.suppress(OSError):
            os.rmdir(where)


def mount_refusal() -> str | None:
    """Why a tmpfs cannot be mounted here, or None when it can (mounts and unmounts one)."""
    try:
        with tmpfs(1 << 20, 64):
            return None
    except MountRefused as e:
        return str(e)


def o_direct_accepted(where: str) -> bool:
    path = os.path.join(where, ".probe")
    try:
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT | getattr(os, "O_DIRECT", 0), 0o644))
        return hasattr(os, "O_DIRECT")
    except OSError:
        return False
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)


class Filler:
    """Takes the mount's free pages (a preallocated file) or inodes (empty files),
    outside every checkpoint directory, to leave exactly what a case wants."""

    def __init__(self, mount: str) -> None:
        self.mount = mount
        self.file = os.path.join(mount, "filler")
        self.dir = os.path.join(mount, "filler-inodes")
        self.n = 0

    def free_pages(self) -> int:
        st = os.statvfs(self.mount)
        return st.f_bavail * st.f_frsize // PAGE

    def free_inodes(self) -> int:
        return os.statvfs(self.mount).f_favail

    def hidden(self) -> bool:
        """Whether deleted files still hold pages or inodes of the mount (maps or
        descriptors of some process keep them)."""
        st = os.statvfs(self.mount)
        pages, inodes = 0, 1  # the root directory's inode
        for d, dirs, files in os.walk(self.mount):
            inodes += len(dirs) + len(files)
            pages += sum(os.lstat(os.path.join(d, f)).st_blocks * 512 // PAGE for f in files)
        return ((st.f_blocks - st.f_bfree) * st.f_frsize // PAGE > pages
                or st.f_files - st.f_ffree > inodes)

    def free(self, kind: str) -> int:
        return self.free_pages() if kind == "space" else self.free_inodes()

    def leave(self, kind: str, n: int, collect: bool = True) -> None:
        """Leave ``n`` free pages (``space``) or inodes (``inodes``). ``collect``:
        first free what only garbage holds: trees the oracle loaded map files of
        deleted steps until the cyclic gc runs, which would free their pages later."""
        if collect and self.hidden():
            pygc.collect()
        if kind == "space":
            size = os.path.getsize(self.file) if os.path.exists(self.file) else 0
            size = max(0, size + (self.free_pages() - n) * PAGE)
            fd = os.open(self.file, os.O_RDWR | os.O_CREAT, 0o600)
            try:
                os.ftruncate(fd, min(size, os.fstat(fd).st_size))
                if size > os.fstat(fd).st_size:
                    os.posix_fallocate(fd, 0, size)
            finally:
                os.close(fd)
            return
        os.makedirs(self.dir, exist_ok=True)
        while self.free_inodes() > n:
            self.n += 1
            os.close(os.open(os.path.join(self.dir, str(self.n)), os.O_WRONLY | os.O_CREAT, 0o600))
        while self.free_inodes() < n and self.n > 0:
            os.unlink(os.path.join(self.dir, str(self.n)))
            self.n -= 1

    def take(self, kind: str, n: int) -> None:
        """Take ``n`` more pages or inodes (as far as there are any)."""
        self.leave(kind, max(0, self.free(kind) - n), collect=False)

    def clear(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.file)
        shutil.rmtree(self.dir, ignore_errors=True)
        self.n = 0


def debris(root: "Storage | str") -> list[str]:
    """Temp files, data files no committed manifest of run directory ``root`` names,
    and uncommitted step directories (any storage: local directory or bucket prefix)."""
    if isinstance(root, str):
        root = open_storage(root)
    out = []
    manifests = {}
    entries = sorted(root.listdir())
    for e in entries:
        if parse_step(e) is not None and root.child(e).exists(fmt.MANIFEST_NAME):
            manifests[e] = fmt.read_manifest(root.child(e))
    refs = referenced_files(root, manifests)
    for e in entries:
        if is_temp_name(e):
            out.append(e)
        if parse_step(e) is None:
            continue
        if e not in manifests:
            out.append(f"{e}/ (uncommitted)")
        for f in sorted(root.child(e).listdir()):
            if f != fmt.MANIFEST_NAME and (is_temp_name(f) or (e, f) not in refs):
                out.append(f"{e}/{f}")
    return out


def where_out(e: BaseException) -> str:
    """Which write ran out: a shard, the manifest, the step directory, or a write
    whose error names no file."""
    name = os.path.basename(str(getattr(e, "filename", None) or ""))
    if "manifest" in name:
        return "manifest"
    if "shard-" in name:
        return "shard"
    return "directory" if parse_step(name) is not None else "write"


def _typed_enospc(report: Report, e: BaseException, what: str) -> bool:
    """The oracle on the error itself: a StorageError that kept ENOSPC."""
    report.add(f"enospc_at_{where_out(e)}")
    if not isinstance(e, StorageError):
        report.fail(f"{what}: {type(e).__name__} ({str(e)[:200]}) is not a StorageError")
        return False
    return report.check(e.errno == errno.ENOSPC, f"{what}: StorageError with errno {e.errno}, "
                                                 f"not ENOSPC ({str(e)[:200]})")


def _after_gc(report: Report, run: str, want: dict, what: str) -> None:
    """``gc --grace 0`` leaves no debris, and every step of ``want`` loads as recorded."""
    gc(open_storage(run), grace=0)
    left = debris(run)
    report.check(not left, f"{what}: gc left {left[:5]}")
    for s, digest in sorted(want.items()):
        got = outcome(os.path.join(run, step_name(s)))
        report.check(got == digest, f"{what}: after gc, step {s} loads as {got}")


class Need:
    """Pages and inodes one clean save of (mode, scale) takes, measured once."""

    def __init__(self, mount: str, filler: Filler) -> None:
        self.mount, self.filler = mount, filler
        self.cache: dict = {}

    def __call__(self, mode: str, scale: int, kind: str) -> int:
        if (mode, scale) not in self.cache:
            d = os.path.join(self.mount, "measure")
            shutil.rmtree(d, ignore_errors=True)
            os.makedirs(d)
            if self.filler.hidden():  # see Filler.leave
                pygc.collect()
            before = (self.filler.free_pages(), self.filler.free_inodes())
            ckptstore.save(make_state(0, scale), os.path.join(d, step_name(1)), compression=mode,
                           blocking=True, **SMALL)
            self.cache[mode, scale] = (before[0] - self.filler.free_pages(),
                                       before[1] - self.filler.free_inodes())
            shutil.rmtree(d)
        pages, inodes = self.cache[mode, scale]
        return max(1, pages if kind == "space" else inodes)


def save_case(report: Report, mount: str, filler: Filler, need: Need, rng: random.Random,
              i: int, mode: str, kind: str, scenario: str) -> None:
    """One save running out of pages or inodes (see the module docstring)."""
    run = os.path.join(mount, f"case-{i}")
    os.makedirs(run)
    scale = rng.choice((1, 3, 8))
    old_seed, new_seed = 2 * i + 1, 2 * i + 2
    old, new = (tree_digest(make_state(s, scale)) for s in (old_seed, new_seed))
    s1, s2 = os.path.join(run, step_name(1)), os.path.join(run, step_name(2))
    ckptstore.save(make_state(old_seed, scale), s1, compression=mode, blocking=True, **SMALL)
    target = s1 if scenario == "overwrite" else s2
    left = rng.randint(0, need(mode, scale, kind) + 1)
    what = f"enospc {mode}/{scenario} {kind} left={left} scale={scale} #{i}"
    filler.leave(kind, left)
    error: BaseException | None = None
    try:
        ckptstore.save(make_state(new_seed, scale), target, compression=mode, blocking=True,
                       overwrite=scenario == "overwrite", **SMALL)
    except Exception as e:  # noqa: BLE001 - the oracle judges it
        error = e
        _typed_enospc(report, e, what)
    report.add("enospc_cases")
    report.add("enospc_hits", error is not None)
    if scenario == "new":
        report.check(outcome(s1) == old, f"{what}: the committed step 1 changed")
        got = outcome(s2)
        report.check(got == ("absent" if error else new), f"{what}: step 2 loads as {got} "
                                                          f"(error {error!r})")
        code = fsck_code(s2)
        report.check(code == (2 if error else 0), f"{what}: fsck of step 2 exited {code}")
    else:
        got = outcome(s1)
        report.check(got == (old if error else new), f"{what}: the overwritten step loads as "
                                                     f"{'old' if got == old else got} (error {error!r})")
    if error is not None:
        left_over = [d for d in debris(run) if not d.endswith("(uncommitted)")]
        report.check(not left_over, f"{what}: the failed save left {left_over[:5]}")
    filler.clear()
    if error is not None:
        try:
            ckptstore.save(make_state(new_seed, scale), target, compression=mode, blocking=True,
                           overwrite=scenario == "overwrite", **SMALL)
        except CkptError as e:
            report.fail(f"{what}: the save after freeing space failed: {type(e).__name__}: {e}")
            shutil.rmtree(run)
            return
        report.check(outcome(target) == new, f"{what}: the save after freeing space does not load")
    want = {1: new} if scenario == "overwrite" else {1: old, 2: new}
    _after_gc(report, run, want, what)
    shutil.rmtree(run)


def checkpointer_case(report: Report, mount: str, filler: Filler, need: Need,
                      rng: random.Random, i: int, kind: str, max_steps: int = 40) -> None:
    """A Checkpointer run that fills the disk mid-run (see the module docstring)."""
    run = os.path.join(mount, f"run-{i}")
    keep = rng.randint(1, 3)
    incremental = rng.random() < 0.7
    mode = rng.choice(("zstd", "lz4") if incremental else MODES)
    full_every = rng.choice((None, 2, 3))
    scale = rng.choice((1, 3, 8))
    what = (f"enospc checkpointer {kind} {mode} keep_last={keep} incremental={incremental} "
            f"full_every={full_every} scale={scale} #{i}")
    per_step = need(mode, scale, kind)
    opts = dict(keep_last=keep, compression=mode, incremental=incremental, full_every=full_every,
                save_options=SMALL)
    ck = ckptstore.Checkpointer(run, **opts)
    record: dict[int, str] = {}  # steps whose wait() returned -> what they hold
    base = 1000 * (i + 1)  # distinct states per case
    error: BaseException | None = None
    step = 0
    # room for the kept steps and a few more; then less after every step
    filler.leave(kind, per_step * (keep + 1 + rng.randint(0, 3)) + rng.randint(0, per_step))
    while step < max_steps:
        step += 1
        filler.take(kind, rng.randint(0, per_step // 2))
        state = make_state(base + step, scale)
        try:
            ck.save(step, state)
            ck.wait()
        except Exception as e:  # noqa: BLE001 - the oracle judges it
            error = e
            break
        record[step] = tree_digest(state)
    report.add("enospc_cases")
    report.add("enospc_ckpt_steps", len(record))
    if error is None:  # the run never ran out (cannot happen with the filler growing)
        report.fail(f"{what}: {max_steps} steps saved without running out of {kind}")
        ck.close()
        filler.clear()
        shutil.rmtree(run)
        return
    report.add("enospc_hits")
    _typed_enospc(report, error, f"{what} step {step}")
    committed = committed_steps(open_storage(run))
    kept = sorted(record)[-keep:]
    report.check(set(kept) <= set(committed), f"{what}: committed steps {kept} lost "
                                              f"(on disk: {committed})")
    report.check(set(committed) <= set(record), f"{what}: steps {committed} committed, "
                                                f"only {sorted(record)} returned")
    for s in committed:
        got = outcome(os.path.join(run, step_name(s)))
        report.check(got == record.get(s), f"{what}: committed step {s} loads as {got}")
    got = outcome(os.path.join(run, step_name(step)))
    report.check(got == "absent", f"{what}: the failed step {step} loads as {got}")
    latest = ck.latest()
    report.check(latest == (max(record) if record else None),
                 f"{what}: latest() is {latest} after step {max(record, default=None)} returned")
    filler.clear()
    reopen = rng.random() < 0.5
    if reopen:  # a restart after the failure: close, then a new Checkpointer on the run
        try:
            ck.close()
        except Exception as e:  # noqa: BLE001 - wait() raised it already: once is the promise
            report.fail(f"{what}: close() raised again the error wait() raised: "
                        f"{type(e).__name__}: {str(e)[:120]}")
        ck = ckptstore.Checkpointer(run, **opts)
    try:
        for s in (step, step + 1):
            state = make_state(base + s, scale)
            ck.save(s, state)
            ck.wait()
            record[s] = tree_digest(state)
        ck.close()
    except Exception as e:  # noqa: BLE001
        report.fail(f"{what}: saving after freeing space failed: {type(e).__name__}: {e}")
        with contextlib.suppress(Exception):
            ck.close()
        shutil.rmtree(run)
        return
    report.add("enospc_ckpt_steps", 2)
    committed = committed_steps(open_storage(run))
    report.check(committed == sorted(record)[-keep:], f"{what}: after the retry, committed "
                                                     f"{committed}, kept should be {sorted(record)[-keep:]}")
    _after_gc(report, run, {s: record[s] for s in committed}, what)
    shutil.rmtree(run)


def run(report: Report, budget: Budget, *, seed: int = 0, modes=MODES,
        kinds=KINDS, checkpointer: bool = True) -> None:
    """The family: cases round-robin over (mode or Checkpointer) x kind x scenario
    until the budget is out (at least one round of each)."""
    rng = random.Random(seed)
    try:
        with tmpfs() as mount:
            report.add("enospc_o_direct", o_direct_accepted(mount))
            filler = Filler(mount)
            need = Need(mount, filler)
            combos: list[tuple] = [(m, k, s) for m in modes for k in kinds for s in ("new", "overwrite")]
            if checkpointer:
                combos += [("checkpointer", k, "") for k in kinds]
            rng.shuffle(combos)
            i = 0
            while i < len(combos) or not budget.out():
                mode, kind, scenario = combos[i % len(combos)]
                i += 1
                try:
                    if mode == "checkpointer":
                        checkpointer_case(report, mount, filler, need, rng, i, kind)
                    else:
                        save_case(report, mount, filler, need, rng, i, mode, kind, scenario)
                finally:
                    filler.clear()
                if i >= len(combos) and budget.out():
                    break
    except MountRefused as e:
        report.add("enospc_skipped")
        report.skipped.append(f"enospc: {e}")
