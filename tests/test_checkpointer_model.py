"""A stateful model of ``ckptstore.Checkpointer``: what must stay loadable, and where.

Hypothesis drives one run directory (plus, in most configurations, a second local
directory used as the remote tier through a ``file://`` URL) with random sequences of:
saves (each waited for); saves that crash part way (an injected EIO on a data write or
on the manifest link, an EIO reported *after* the manifest link succeeded, a killed
writer's debris: data files and a temp file but no manifest, or a trainer killed while
promoting a step it had committed: data objects on the remote, no manifest); restarts;
``ckptstore gc`` (the CLI, in a subprocess); single-byte damage to one chunk of one
tier's copy of a committed step; and loads of a given step.

The model keeps, per tier, the exact set of committed steps, and for each committed
copy the chunks its manifest named when it was first seen (physical directory, file,
byte range: incremental saves and promotions share files between steps). Damage is
recorded as (tier, directory, file, byte) and a copy is intact iff none of its
chunks covers a damaged byte, so damage to a shared file damages exactly the copies
that read it. State values are a pure function of the step, so every load is checked
bit for bit (a torn mix of two steps cannot pass).

Expectations, from README.md and docs/tiers.md:

* a save that ``wait()`` accepted is committed locally; a save that failed before its
  manifest link is not committed anywhere (and that step can be saved again over the
  debris); one whose link ran is committed even though ``wait()`` raised; a failed
  save runs no promotion or retention;
* after each good save, the background round is replayed on the model: promotion of
  every step the remote policy wants and the remote lacks (newest first; a copy that
  needs a damaged local chunk fails with ``CorruptCheckpointError`` and the round
  stops, so no retention runs), then local retention (``keep_last`` newest,
  ``keep_every`` multiples, the newest, and unpromoted wanted steps), then remote
  retention. The committed sets on disk must equal the model's, and manifests never
  change;
* every committed copy loads bit-identical if intact and raises
  ``CorruptCheckpointError`` if damaged;
* ``steps()`` is the union of the tiers, ``latest()`` (sizes only) the newest of it,
  and ``load("latest")`` the newest step with an intact copy on some tier, local
  copy first, with one ``CheckpointFallbackWarning`` per damaged copy passed over, or
  ``CheckpointNotFoundError``; ``load(step)`` tries that step's local then remote copy;
  a damaged local copy whose damaged files have an intact remote copy (same step, or
  the step holding the file) is repaired from it and loaded, with no warning;
* ``gc`` leaves no temp file, and no uncommitted step directory except for files a
  committed copy reads.

Because intactness is computed from each copy's own chunk references, the model also
accepts what the engine does today when a new copy is built on damaged bytes: an
incremental save whose base chunk is already damaged reuses it (the new step is damaged
from birth, and its promotion then fails on every later save), and a promotion keeps a
reference to a remote file it finds at the right size without checking its bytes. The
first was an engine bug, fixed (writers check a base chunk's stored bytes before
reusing it) and pinned by ``test_a_save_after_damage_to_its_base_loads``.
"""
from __future__ import annotations

import errno
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import warnings

import pytest
import torch
from hypothesis import HealthCheck, event, settings, strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

import ckptstore
from ckptstore.storage import LocalStorage
from ckptstore.storage.faulty import FaultyStorage

MANIFEST = "manifest.json"
STEP_RE = re.compile(r"^step-(\d{12})$")
#: several chunks per tensor and several files per save, so damage can hit one tensor
SAVE_OPTIONS = {"chunk_size": 1024, "shard_size": 2048}
FALLBACK = "CheckpointFallbackWarning"  # ckptstore's UserWarning subclass (not exported)


def step_name(step: int) -> str:
    return f"step-{step:012d}"


_FROZEN = torch.randn(512, generator=torch.Generator().manual_seed(1234))


def make_state(step: int) -> dict:
    """``frozen`` never changes (incremental saves keep reading the first step's file),
    ``slow`` changes every third step (its holder is an older step), ``w`` every step."""
    slow = torch.randn(256, generator=torch.Generator().manual_seed(10_000 + step // 3))
    w = torch.randn(256, generator=torch.Generator().manual_seed(step))
    w[0] = float(step)
    return {"frozen": _FROZEN, "slow": slow, "w": w, "step": step}


def assert_state(out, step: int, where: str) -> None:
    """``out`` is exactly ``make_state(step)``: same keys, dtypes, shapes and bits."""
    expected = make_state(step)
    assert isinstance(out, dict) and list(out) == list(expected), (where, out)
    assert type(out["step"]) is int and out["step"] == step, (where, out["step"])
    for key in ("frozen", "slow", "w"):
        a, b = out[key], expected[key]
        assert isinstance(a, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape, (where, key)
        assert torch.equal(a.contiguous().view(torch.int32), b.view(torch.int32)), \
            f"{where}: tensor {key!r} is not bit-identical to step {step}'s"


def select(steps, keep_last, keep_every, protected=()) -> set[int]:
    """Retention as docs/tiers.md states it: the newest, the protected, the
    ``keep_last`` newest and the multiples of ``keep_every``; all None keeps all."""
    if not steps:
        return set()
    order = sorted(steps)
    if keep_last is None and keep_every is None:
        return set(order)
    keep = {order[-1]} | (set(protected) & set(order))
    if keep_last:
        keep.update(order[-keep_last:])
    if keep_every:
        keep.update(s for s in order if s % keep_every == 0)
    return keep


class Copy:
    """One tier's committed copy of a step, as its manifest described it when first seen."""

    def __init__(self, root: str, step: int) -> None:
        own = step_name(step)
        with open(os.path.join(root, own, MANIFEST), "rb") as f:
            self.raw = f.read()
        m = json.loads(self.raw)
        assert m["metadata"]["step"] == step, (root, step, m["metadata"])
        where = {f["name"]: f.get("base") or own for f in m["files"]}
        #: (physical directory, file name, size) of every file it reads
        self.files = [(where[f["name"]], f["name"], f["size"]) for f in m["files"]]
        #: (physical directory, file name, offset, length) of every stored chunk
        self.chunks = [(where[c[0]], c[0], c[1], c[2]) for t in m["tensors"] for c in t["chunks"]]

    def intact(self, flips: set) -> bool:
        return not any(d == fd and f == ff and off <= pos < off + n
                       for fd, ff, pos in flips for d, f, off, n in self.chunks)


def _committed_on_disk(root: str) -> set[int]:
    if not os.path.isdir(root):
        return set()
    return {int(m.group(1)) for m in map(STEP_RE.match, os.listdir(root))
            if m and os.path.exists(os.path.join(root, m.group(0), MANIFEST))}


def _fallbacks(caught) -> int:
    return sum(1 for w in caught if w.category.__name__ == FALLBACK)


class CheckpointerModel(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.tmp = tempfile.mkdtemp(prefix="ckptstore-model-")
        self.root = {"local": os.path.join(self.tmp, "local"),
                     "remote": os.path.join(self.tmp, "remote")}
        self.ck = None
        self.copies: dict[str, dict[int, Copy]] = {"local": {}, "remote": {}}
        self.flips: dict[str, set] = {"local": set(), "remote": set()}
        self.next_step = 1
        self.torn: set[int] = set()  # steps whose save died before its commit
        self.crashes = 0

    # -- configuration and helpers ----------------------------------------------
    @initialize(keep_last=st.integers(1, 3), keep_every=st.sampled_from([None, 3]),
                compression=st.sampled_from(["lz4", "lz4", "none"]),
                remote=st.sampled_from(["none", "all", "last1", "last2", "every2"]))
    def configure(self, keep_last, keep_every, compression, remote):
        self.local_policy = (keep_last, keep_every)
        self.kwargs = dict(keep_last=keep_last, keep_every=keep_every, compression=compression,
                           save_options=dict(SAVE_OPTIONS))
        self.tiers = ["local"]
        self.remote_policy = None
        if remote != "none":
            self.tiers.append("remote")
            rl, re_ = {"all": (None, None), "last1": (1, None), "last2": (2, None),
                       "every2": (None, 2)}[remote]
            self.remote_policy = (rl, re_)
            self.kwargs.update(remote="file://" + self.root["remote"], remote_keep_last=rl,
                               remote_keep_every=re_)
        self.ck = self._open(self.root["local"])

    def _open(self, local):
        return ckptstore.Checkpointer(local, **self.kwargs)

    def _eligible(self, step: int) -> bool:
        rl, re_ = self.remote_policy
        return step % re_ == 0 if (re_ and rl is None) else True

    def _remote_files(self) -> dict:
        """(directory, name) -> size of every file below the remote root, as
        promotion's "does the destination already hold it" check sees them."""
        out = {}
        root = self.root["remote"]
        if os.path.isdir(root):
            for d in os.listdir(root):
                if os.path.isdir(os.path.join(root, d)):
                    for f in os.listdir(os.path.join(root, d)):
                        out[(d, f)] = os.path.getsize(os.path.join(root, d, f))
        return out

    def _promotable(self, copy: Copy, step: int, remote_files: dict) -> bool:
        """Replay promote_step's checks: a referenced file the remote holds at its size
        stays a reference; any other file is read from the local tier and refused if a
        chunk this manifest reads from it is damaged."""
        for d, name, size in copy.files:
            if d != step_name(step) and remote_files.get((d, name)) == size:
                continue
            if not _only(copy, d, name).intact(self.flips["local"]):
                return False
            remote_files[(step_name(step), name)] = size
        return True

    def _pending_promotion(self) -> set[int]:
        """Local steps the remote policy wants and the remote lacks (after a crash)."""
        if self.remote_policy is None:
            return set()
        local, remote = set(self.copies["local"]), set(self.copies["remote"])
        cands = {s for s in local if self._eligible(s)} | remote
        return select(cands, *self.remote_policy) - remote

    def _repaired(self, step: int) -> bool:
        """Replay the repair ``Checkpointer.load`` runs on a damaged local copy: each
        damaged file it reads is replaced by the remote copy of the same step (or of
        the step holding the file) unless that copy is damaged in a chunk some local
        copy reads. Whether the local copy of ``step`` is intact now."""
        copy, flips = self.copies["local"][step], self.flips["local"]
        if "remote" not in self.tiers:
            return copy.intact(flips)
        bad = {(d, f) for fd, ff, pos in flips for d, f, off, n in copy.chunks
               if (d, f) == (fd, ff) and off <= pos < off + n}
        for d, f in sorted(bad):
            cover = [(off, n) for c in self.copies["local"].values()
                     for cd, cf, off, n in c.chunks if (cd, cf) == (d, f)]
            for src in (step, int(STEP_RE.match(d).group(1))):
                there = self.copies["remote"].get(src)
                rd = next((fd for fd, name, _ in there.files if name == f), None) if there else None
                if rd is None or any((fd, ff) == (rd, f) and off <= pos < off + n
                                     for fd, ff, pos in self.flips["remote"] for off, n in cover):
                    continue
                event("a damaged local file was repaired from the remote tier")
                flips.difference_update({x for x in flips if x[:2] == (d, f)})
                break
        return copy.intact(flips)

    def _check_tiers(self) -> None:
        for t in ("local", "remote"):
            assert _committed_on_disk(self.root[t]) == set(self.copies[t]), \
                (t, sorted(_committed_on_disk(self.root[t])), sorted(self.copies[t]))

    def _new_step(self, data) -> int:
        # a restarted trainer resumes from the newest step and saves a torn one again
        newest = max([s for t in ("local", "remote") for s in self.copies[t]], default=0)
        reusable = sorted(s for s in self.torn if s > newest)
        if reusable and data.draw(st.booleans(), label="save a torn step again"):
            return data.draw(st.sampled_from(reusable), label="torn step")
        self.next_step += 1
        return self.next_step - 1

    # -- rules --------------------------------------------------------------------
    @rule(data=st.data())
    def save(self, data):
        """A save, waited for; then the background round replayed on the model."""
        step = self._new_step(data)
        remote_files = self._remote_files() if self.remote_policy else {}
        handle = self.ck.save(step, make_state(step))
        try:
            self.ck.wait()
            error = None
        except Exception as e:  # noqa: BLE001 (compared with the model below)
            error = e
        assert handle.exception() is None, f"the save of step {step} failed: {handle.exception()!r}"
        self.torn.discard(step)
        local_copies = dict(self.copies["local"])
        local_copies[step] = Copy(self.root["local"], step)
        local = set(local_copies)
        remote = set(self.copies["remote"])
        failed = None
        ll, le = self.local_policy
        if self.remote_policy is not None:
            rl, re_ = self.remote_policy
            cands = {s for s in local if self._eligible(s)} | remote
            for s in sorted(select(cands, rl, re_) - remote, reverse=True):
                if not self._promotable(local_copies[s], s, remote_files):
                    failed = s
                    break
                remote.add(s)
            if failed is None:
                unpromoted = select(cands, rl, re_) - remote
                local = select(local, ll, le, unpromoted)
                remote = select(remote, rl, re_)
        else:
            local = select(local, ll, le)
        if not local_copies[step].intact(self.flips["local"]):
            event("a fresh incremental save reused a damaged chunk")
        if failed is None:
            assert error is None, f"save of step {step}: unexpected background error {error!r}"
        else:
            event("promotion refused a damaged local copy")
            assert isinstance(error, ckptstore.CorruptCheckpointError), \
                f"promotion of damaged local step {failed} should fail, got {error!r}"
        self.copies["local"] = {s: c for s, c in local_copies.items() if s in local}
        on_disk = _committed_on_disk(self.root["remote"])
        assert on_disk == remote, ("remote", sorted(on_disk), sorted(remote))
        self.copies["remote"] = {s: self.copies["remote"].get(s) or Copy(self.root["remote"], s)
                                 for s in remote}
        self._check_tiers()

    @rule(data=st.data())
    def another_save(self, data):
        """The same as ``save``: saves are what a run mostly does, so they are drawn
        twice as often as each other rule."""
        self.save(data)

    @rule(data=st.data())
    def crash_mid_save(self, data):
        """The trainer dies in a save (this Checkpointer is gone), then restarts.

        data_write / manifest_link: an EIO fails the save before its commit;
        after_link: the EIO is reported after the manifest link ran (committed);
        killed: a killed writer's debris (data files and a temp file, no manifest);
        killed_promoting: the save committed locally, then the trainer died while
        promoting it: its data files are on the remote, the manifest is not, and no
        retention ran."""
        modes = ["data_write", "manifest_link", "after_link", "killed"]
        if self.remote_policy is not None:
            modes.append("killed_promoting")
        mode = data.draw(st.sampled_from(modes), label="crash")
        step = self.next_step
        self.next_step += 1
        self.ck.close()
        self.ck = None
        d = os.path.join(self.root["local"], step_name(step))
        if mode == "killed":
            scratch = os.path.join(self.tmp, f"scratch-{self.crashes}")
            ckptstore.save(make_state(step), scratch, compression=self.kwargs["compression"],
                           blocking=True, **SAVE_OPTIONS)
            os.makedirs(d, exist_ok=True)
            for name in os.listdir(scratch):
                if name != MANIFEST:
                    shutil.copyfile(os.path.join(scratch, name), os.path.join(d, name))
                    with open(os.path.join(d, f".tmp-{name}.4242.deadbeef"), "wb") as f:
                        f.write(b"half a shard")
            shutil.rmtree(scratch)
        elif mode == "killed_promoting":
            # the same save, with no background round (a tier that keeps everything)
            quiet = dict(self.kwargs, keep_last=None, keep_every=None)
            for k in ("remote", "remote_keep_last", "remote_keep_every"):
                quiet.pop(k)
            with ckptstore.Checkpointer(self.root["local"], **quiet) as plain:
                plain.save(step, make_state(step)).wait()
            copy = Copy(self.root["local"], step)
            rd = os.path.join(self.root["remote"], step_name(step))
            os.makedirs(rd, exist_ok=True)
            for where, name, _ in copy.files:  # uploaded under final names, then killed
                shutil.copyfile(os.path.join(self.root["local"], where, name), os.path.join(rd, name))
        else:
            fail = {"data_write": dict(fail={"write": 1}, where=".tmp-shard-*"),
                    "manifest_link": dict(fail={"link_exclusive": 1}, where=".tmp-manifest*"),
                    "after_link": dict(fail={"link_exclusive": 1}, where=".tmp-manifest*",
                                       fail_when="after")}[mode]
            storage = FaultyStorage(LocalStorage(self.root["local"]),
                                    ledger=os.path.join(self.tmp, f"ledger-{self.crashes}"),
                                    **fail)
            crashed = self._open(storage)
            handle = crashed.save(step, make_state(step))
            with pytest.raises(OSError) as e:
                handle.wait()
            assert e.value.errno == errno.EIO, e.value
            try:
                crashed.close()
            except OSError:
                pass
        self.crashes += 1
        if mode in ("after_link", "killed_promoting"):  # committed locally: nothing lost
            self.copies["local"][step] = Copy(self.root["local"], step)
        else:
            self.torn.add(step)
        self._check_tiers()
        self.ck = self._open(self.root["local"])

    @rule()
    def restart(self):
        self.ck.close()
        self.ck = self._open(self.root["local"])

    @rule(data=st.data())
    def gc(self, data):
        tier = data.draw(st.sampled_from(self.tiers), label="gc tier")
        root = self.root[tier]
        if not os.path.isdir(root):
            return
        r = subprocess.run([sys.executable, "-m", "ckptstore", "gc", root, "--grace", "0"],
                           capture_output=True, text=True, timeout=120)
        assert r.returncode == 0, (r.returncode, r.stdout, r.stderr)
        if "removed" in r.stdout:
            event("gc removed something")
        refs = {(d, f) for c in self.copies[tier].values() for d, f, _ in c.files}
        for d in os.listdir(root):
            m = STEP_RE.match(d)
            if not m:
                continue
            names = os.listdir(os.path.join(root, d))
            assert not [n for n in names if n.startswith(".tmp-")], (tier, d, names)
            if int(m.group(1)) not in self.copies[tier]:
                assert names and all((d, n) in refs for n in names), (tier, d, names)
        self._check_tiers()

    @rule(data=st.data())
    def damage(self, data):
        """Flip one byte inside one stored chunk of one tier's copy of a committed step."""
        if not any(self.copies[t] for t in self.tiers):
            return
        # a copy a later promotion must read (rare: only after a crash) is picked 3 times
        # in 4, so that the promotion's own hash check gets exercised
        pending = sorted(self._pending_promotion())
        if pending and data.draw(st.integers(0, 3), label="damage a copy awaiting promotion"):
            tier, step = "local", data.draw(st.sampled_from(pending), label="step")
        else:
            tier, step = data.draw(st.sampled_from(
                [(t, s) for t in self.tiers for s in sorted(self.copies[t])]), label="copy")
        chunks = [c for c in self.copies[tier][step].chunks if c[3] > 0]
        d, f, off, n = data.draw(st.sampled_from(chunks), label="chunk")
        pos = off + n // 2
        if (d, f, pos) in self.flips[tier]:
            return  # flipping it again would repair it
        path = os.path.join(self.root[tier], d, f)
        with open(path, "r+b") as fh:
            fh.seek(pos)
            b = fh.read(1)
            fh.seek(pos)
            fh.write(bytes([b[0] ^ 0x5A]))
        self.flips[tier].add((d, f, pos))

    @rule(data=st.data())
    def load_step(self, data):
        """``load(step)``: its local copy, else its remote copy, else not found."""
        step = data.draw(st.integers(1, self.next_step), label="step to load")
        good = [t for t in self.tiers if step in self.copies[t]
                and (self.copies[t][step].intact(self.flips[t])
                     or t == "local" and self._repaired(step))][:1]
        skipped = self.tiers.index(good[0]) if good else len(self.tiers)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            if good:
                assert_state(self.ck.load(step), step, f"load({step})")
                assert self.ck.loaded_step == step
            else:
                with pytest.raises(ckptstore.CheckpointNotFoundError):
                    self.ck.load(step)
        assert _fallbacks(caught) == skipped, (step, [str(w.message) for w in caught])

    # -- invariants ---------------------------------------------------------------
    @invariant()
    def tiers_match_the_model(self):
        if self.ck is None:
            return
        self._check_tiers()
        for t in ("local", "remote"):
            for s, c in self.copies[t].items():
                with open(os.path.join(self.root[t], step_name(s), MANIFEST), "rb") as f:
                    assert f.read() == c.raw, f"the {t} manifest of step {s} changed"

    @invariant()
    def every_copy_loads_exactly_or_is_refused(self):
        if self.ck is None:
            return
        for t in self.tiers:
            for s, c in sorted(self.copies[t].items()):
                where = os.path.join(self.root[t], step_name(s))
                if c.intact(self.flips[t]):
                    assert_state(ckptstore.load(where), s, f"{t} copy of step {s}")
                else:
                    with pytest.raises(ckptstore.CorruptCheckpointError):
                        ckptstore.load(where)

    @invariant()
    def latest_is_the_newest_intact_step(self):
        if self.ck is None:
            return
        every = sorted(set(self.copies["local"]) | set(self.copies["remote"]))
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            assert self.ck.steps() == every
            assert self.ck.latest() == (every[-1] if every else None)
        assert not caught, [str(w.message) for w in caught]
        order = [(s, t) for s in reversed(every) for t in self.tiers if s in self.copies[t]]
        # the first copy that is intact, or a local one that is repaired
        good = next(([i] for i, (s, t) in enumerate(order) if self.copies[t][s].intact(self.flips[t])
                     or t == "local" and self._repaired(s)), [])
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            if good:
                step = order[good[0]][0]
                assert_state(self.ck.load("latest"), step, "load('latest')")
                assert self.ck.loaded_step == step
            else:
                with pytest.raises(ckptstore.CheckpointNotFoundError):
                    self.ck.load("latest")
        skipped = good[0] if good else len(order)
        if skipped:
            event("load('latest') fell back past a damaged copy")
        assert _fallbacks(caught) == skipped, [str(w.message) for w in caught]

    def teardown(self):
        try:
            if self.ck is not None:
                self.ck.close()
        finally:
            shutil.rmtree(self.tmp, ignore_errors=True)


def _only(copy: Copy, d: str, name: str) -> Copy:
    """A view of ``copy`` restricted to the chunks it reads from file ``d/name``."""
    view = object.__new__(Copy)
    view.chunks = [c for c in copy.chunks if c[0] == d and c[1] == name]
    return view


def _flip_frozen_chunk(run: str, step: int) -> None:
    """Flip one byte of the first stored chunk of ``frozen`` in ``step``'s own file."""
    d = os.path.join(run, step_name(step))
    with open(os.path.join(d, MANIFEST), "rb") as f:
        m = json.loads(f.read())
    name, off = next(t for t in m["tensors"] if t["name"] == "frozen")["chunks"][0][:2]
    with open(os.path.join(d, name), "r+b") as fh:
        fh.seek(off + 7)
        b = fh.read(1)
        fh.seek(off + 7)
        fh.write(bytes([b[0] ^ 0x5A]))


def test_a_save_after_damage_to_its_base_loads(tmp_path):
    """Found by CheckpointerModel (rules: save, damage, save): a save that ``wait()``
    accepted must load bit-identical even if its incremental base was damaged."""
    with ckptstore.Checkpointer(tmp_path, keep_last=3, compression="lz4",
                                save_options=SAVE_OPTIONS) as ck:
        ck.save(1, make_state(1)).wait()
        _flip_frozen_chunk(str(tmp_path), 1)  # bit rot in step 1, after its commit
        ck.save(2, make_state(2)).wait()  # accepted
        ck.wait()
    assert_state(ckptstore.load(tmp_path / step_name(2)), 2, "step 2")



TestCheckpointerModel = CheckpointerModel.TestCase
TestCheckpointerModel.settings = settings(
    # about 15-30 s on two busy cores; CKPTSTORE_MODEL_EXAMPLES=150 for a longer hunt
    max_examples=int(os.environ.get("CKPTSTORE_MODEL_EXAMPLES", "30")), stateful_step_count=20,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
