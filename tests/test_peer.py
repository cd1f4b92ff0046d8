"""Peer replicas: a keeper process per "node" (separate roots, port 0), pushes of real
checkpoints between them, fetches back, damage, kills, hostile names, dead keepers."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest
import torch
from conftest import assert_same_tree

import ckptstore
from ckptstore import manifest as fmt
from ckptstore.errors import (
    CheckpointExistsError,
    CheckpointNotFoundError,
    CorruptCheckpointError,
    UnsafeCheckpointError,
)
from ckptstore.peer import Keeper, PeerClient, PeerUnavailableError, loopback_speed, start_keeper, wire
from ckptstore.peer.speed import landing_speed
from ckptstore.runs.layout import step_name
from ckptstore.storage import LocalStorage

pytestmark = pytest.mark.timeout(120)
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def nodes(tmp_path_factory):
    """Two nodes: each a directory with a keeper of its own."""
    base = tmp_path_factory.mktemp("nodes")
    keepers = {n: start_keeper(base / n / "keeper") for n in ("a", "b")}
    yield {n: (base / n, k) for n, k in keepers.items()}
    for k in keepers.values():
        k.stop()


def _state(seed: int, big: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {"w": torch.randn(300, 40, generator=g), "b": torch.randn(40, generator=g).to(torch.bfloat16),
            "ids": torch.arange(1000), "big": torch.randn(big, generator=g), "step": seed}


def _save(where, seed: int, compression: str = "zstd", big: int = 0) -> LocalStorage:
    ckptstore.save(_state(seed, big), where, compression=compression, blocking=True)
    return LocalStorage(where)


def _leftovers(root) -> list[str]:
    return sorted(os.path.relpath(os.path.join(d, f), root) for d, _, fs in os.walk(root) for f in fs
                  if f != ".keeper.log")


@pytest.mark.parametrize("compression", ["none", "zstd"])
def test_push_to_the_buddy_then_fetch_back_bit_identical(nodes, tmp_path, compression):
    (home_a, _), (home_b, kb) = nodes["a"], nodes["b"]
    run = f"train-{compression}"
    src = _save(home_a / "local" / run / step_name(7), 7, compression)
    with PeerClient(kb.address) as c:
        sent = c.push(src, run, 7)
        assert sent > sum(f.size for f in fmt.read_manifest(src).files)
        held = home_b / "keeper" / run / step_name(7)
        assert ckptstore.fsck(held).ok
        assert not [n for n in os.listdir(held) if n.startswith(".tmp-")]
        assert c.steps(run) == [7]
        assert c.push(src, run, 7) == 0  # the same checkpoint again: a no-op
        back = LocalStorage(tmp_path / "fresh" / step_name(7))
        assert c.fetch(run, 7, back) == sent
        assert c.fetch(run, 7, back) == 0
    assert ckptstore.fsck(back.url).ok
    assert_same_tree(ckptstore.load(back.url), ckptstore.load(src.url))
    assert_same_tree(ckptstore.load(back.url), _state(7))


def test_a_different_checkpoint_for_a_held_step_is_refused(nodes, tmp_path):
    _, ka = nodes["a"]
    first = _save(tmp_path / "one", 1)
    other = _save(tmp_path / "two", 2)
    with PeerClient(ka.address) as c:
        c.push(first, "clash", 1)
        with pytest.raises(CheckpointExistsError, match=ka.address):
            c.push(other, "clash", 1)
        with pytest.raises(CheckpointExistsError):  # fetch into a dir holding another one
            c.fetch("clash", 1, other)
        assert c.steps("clash") == [1]  # and the connection still serves
    assert_same_tree(ckptstore.load(first.url), _state(1))


def test_steps_and_drop(nodes, tmp_path):
    home, k = nodes["a"]
    with PeerClient(k.address) as c:
        for s in (3, 1, 2):
            c.push(_save(tmp_path / step_name(s), s), "dropper", s)
        assert c.steps("dropper") == [1, 2, 3]
        assert c.steps("never-pushed") == []
        c.drop("dropper", 2)
        assert c.steps("dropper") == [1, 3]
        assert not (home / "keeper" / "dropper" / step_name(2)).exists()
        c.drop("dropper", 2)  # gone already: no error
        with pytest.raises(CheckpointNotFoundError):
            c.fetch("dropper", 2, LocalStorage(tmp_path / "nothing"))
        assert not (tmp_path / "nothing").exists()
        assert c.fetch("dropper", 3, LocalStorage(tmp_path / "got3")) > 0
    assert_same_tree(ckptstore.load(tmp_path / "got3"), _state(3))


@pytest.mark.parametrize("compression", ["none", "zstd"])
def test_a_damaged_source_file_is_refused_and_nothing_is_committed(nodes, tmp_path, compression):
    home, k = nodes["b"]
    src = _save(tmp_path / "src", 5, compression)
    f = next(r for r in fmt.read_manifest(src).files)
    path = tmp_path / "src" / f.name
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x10  # inside a chunk of data: only its hash can tell
    path.write_bytes(bytes(data))
    run = f"damaged-{compression}"
    with PeerClient(k.address) as c:
        with pytest.raises(CorruptCheckpointError, match="nothing was committed"):
            c.push(src, run, 5)
        assert c.steps(run) == []
    assert _leftovers(home / "keeper" / run) == []
    assert not (home / "keeper" / run / step_name(5)).exists()


def test_a_fetch_verifies_the_keepers_copy(nodes, tmp_path):
    """A keeper file damaged after its commit is refused by the fetching side."""
    home, k = nodes["a"]
    with PeerClient(k.address) as c:
        c.push(_save(tmp_path / "src", 9, "none"), "rot", 9)
        held = home / "keeper" / "rot" / step_name(9)
        name = fmt.read_manifest(LocalStorage(held)).files[0].name
        data = bytearray((held / name).read_bytes())
        data[-3] ^= 0xFF
        (held / name).write_bytes(bytes(data))
        dst = tmp_path / "dst"
        with pytest.raises(CorruptCheckpointError, match="nothing was committed"):
            c.fetch("rot", 9, LocalStorage(dst))
    assert not dst.exists() or _leftovers(dst) == []


STALLING_CLIENT = r"""
import sys, time
from ckptstore.peer import PeerClient
from ckptstore.storage import LocalStorage
from ckptstore.storage.faulty import FaultyStorage

class Stalling(FaultyStorage):
    # reads past the first piece of a file stall: the push is cut in the middle of a body
    def readinto(self, name, offset, buf):
        if offset > 0:
            print("STALLED", flush=True)
            time.sleep(600)
        return super().readinto(name, offset, buf)

PeerClient(sys.argv[1]).push(Stalling(LocalStorage(sys.argv[2])), "killed", 4)
"""


def _child_env() -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    return env


def _wait_for(what, predicate, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"still waiting for {what}"
        time.sleep(0.05)


def test_a_client_killed_mid_push_leaves_nothing_committed_and_no_temp_files(nodes, tmp_path):
    home, k = nodes["b"]
    src = _save(tmp_path / "src", 4, "none", big=3 << 20)  # a 12 MiB file: more than one piece
    child = subprocess.Popen([sys.executable, "-c", STALLING_CLIENT, k.address, str(tmp_path / "src")],
                             stdout=subprocess.PIPE, env=_child_env())
    try:
        assert child.stdout is not None
        assert child.stdout.readline().strip() == b"STALLED"
        step_dir = home / "keeper" / "killed" / step_name(4)
        _wait_for("the keeper's temp file", lambda: any(n.startswith(".tmp-") for n in os.listdir(step_dir)))
        os.kill(child.pid, signal.SIGKILL)
        child.wait()
    finally:
        if child.poll() is None:
            os.kill(child.pid, signal.SIGKILL)
            child.wait()
    _wait_for("the keeper to clean up", lambda: not step_dir.exists())
    assert _leftovers(home / "keeper" / "killed") == []
    with PeerClient(k.address) as c:
        assert c.steps("killed") == []
        assert c.push(src, "killed", 4) > 0  # and the step can be pushed again whole
        assert c.steps("killed") == [4]


def test_a_starting_keeper_removes_what_interrupted_transfers_left(tmp_path):
    root = tmp_path / "keeper"
    committed = root / "run" / step_name(1)
    _save(committed, 1)
    (committed / ".tmp-shard-00001-abc.chunks.1.ab").write_bytes(b"x" * 10)
    torn = root / "run" / step_name(2)
    torn.mkdir()
    (torn / "shard-00000-abcdef012345.chunks").write_bytes(b"y" * 10)
    (torn / ".tmp-manifest.json.1.cd").write_bytes(b"{")
    (root / "run" / ".tmp-stray.1.ef").write_bytes(b"z")
    k = start_keeper(root)
    try:
        assert PeerClient(k.address).steps("run") == [1]
        assert _leftovers(root) == sorted(os.path.relpath(os.path.join(committed, n), root)
                                          for n in os.listdir(committed))
        assert not torn.exists()
        assert ckptstore.fsck(committed).ok
    finally:
        k.stop()


@pytest.mark.parametrize("run", ["../x", "/abs", "a/b", "..", ".hidden", "", "x" * 129, "a\x00b", 7])
def test_hostile_run_names_are_refused(nodes, tmp_path, run):
    _, k = nodes["a"]
    with PeerClient(k.address) as c:
        for call in (lambda: c.steps(run), lambda: c.drop(run, 1),
                     lambda: c.fetch(run, 1, LocalStorage(tmp_path / "d")),
                     lambda: c.push(LocalStorage(tmp_path / "nothing"), run, 1)):
            with pytest.raises(UnsafeCheckpointError, match="plain name"):
                call()


def _raw(address: str, header: dict, body: bytes = b"") -> dict:
    """One request past the client's own checks, as a hostile client sends it."""
    host, port = address.rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=30) as s:
        wire.send(s, header, body)
        reply = wire.recv(s)
    assert reply is not None
    return reply


@pytest.mark.parametrize("run", ["../escaped", "{abs}", "a/../../escaped"])
def test_the_keeper_itself_refuses_hostile_names(nodes, tmp_path, run):
    home, k = nodes["a"]
    run = run.format(abs=home / "escaped")
    data = (_save(tmp_path / "src", 3).read(fmt.MANIFEST_NAME))
    for header, body in (({"op": "push", "run": run, "step": 3, "size": len(data)}, data),
                         ({"op": "steps", "run": run}, b""), ({"op": "drop", "run": run, "step": 3}, b""),
                         ({"op": "fetch", "run": run, "step": 3, "have": None}, b"")):
        reply = _raw(k.address, header, body)
        assert reply["ok"] is False and reply["error"] == "UnsafeCheckpointError", reply
    assert not (home / "escaped").exists() and not (home / "keeper" / "escaped").exists()


def test_the_keeper_refuses_oversized_and_malformed_headers(nodes):
    _, k = nodes["b"]
    host, port = k.address.rsplit(":", 1)
    for frame in ((wire.MAX_HEADER + 1).to_bytes(4, "big"), (5).to_bytes(4, "big") + b"[1,2]",
                  (4).to_bytes(4, "big") + b"\x80(.)"):
        with socket.create_connection((host, int(port)), timeout=30) as s:
            s.sendall(frame)
            reply = wire.recv(s)
        assert reply is not None and reply["ok"] is False, reply
        assert reply["error"] == "UnsafeCheckpointError", reply
    assert PeerClient(k.address).steps("any") == []  # still serving


def test_a_dead_keeper_is_a_typed_connection_error_naming_it(tmp_path):
    k = start_keeper(tmp_path / "keeper")
    c = PeerClient(k.address, timeout=600.0)  # refused must not wait for a timeout
    assert c.steps("run") == []
    k.stop()
    k.stop()  # idempotent
    assert not k.alive()
    for call in (lambda: c.steps("run"), lambda: c.push(_save(tmp_path / "src", 1), "run", 1),
                 lambda: c.fetch("run", 1, LocalStorage(tmp_path / "dst"))):
        with pytest.raises(PeerUnavailableError, match=k.address) as info:
            call()
        assert isinstance(info.value, ConnectionError) and isinstance(info.value, OSError)
    assert not (tmp_path / "dst").exists()


STARTER = r"""
import json, sys
from ckptstore.peer import start_keeper
k = start_keeper(sys.argv[1])
print(json.dumps({"address": k.address, "pid": k.pid}), flush=True)
"""


def test_the_keeper_outlives_the_process_that_started_it(tmp_path):
    out = subprocess.run([sys.executable, "-c", STARTER, str(tmp_path / "keeper")], env=_child_env(),
                         capture_output=True, check=True, timeout=60)
    info = json.loads(out.stdout)
    k = Keeper(info["address"], info["pid"])
    try:
        assert k.alive()
        assert os.getsid(k.pid) != os.getsid(0)  # its own session: a node daemon
        with PeerClient(k.address) as c:
            assert c.push(_save(tmp_path / "src", 2), "orphan", 2) > 0
            assert c.steps("orphan") == [2]
    finally:
        k.stop()
    assert not k.alive()


def test_loopback_speed_measures_a_transfer():
    assert loopback_speed(8 << 20) > 0


def test_an_incremental_step_is_pushed_complete(nodes, tmp_path):
    """A step that reads unchanged chunks from an older step (``base``) arrives with
    all its files, its manifest naming none of another step."""
    _, k = nodes["b"]
    local = tmp_path / "local"
    frozen = torch.randn(256, 64, generator=torch.Generator().manual_seed(5))
    ckptstore.save({"frozen": frozen, "w": torch.ones(8)}, local / step_name(1), compression="zstd",
                   blocking=True)
    ckptstore.save({"frozen": frozen, "w": torch.zeros(8)}, local / step_name(2), compression="zstd",
                   blocking=True, base=step_name(1))
    src = LocalStorage(local / step_name(2))
    assert any(f.base for f in fmt.read_manifest(src).files)  # it does read step 1's file
    with PeerClient(k.address) as c:
        c.push(src, "incremental", 2)
        back = LocalStorage(tmp_path / "back" / step_name(2))
        c.fetch("incremental", 2, back)
    assert not any(f.base for f in fmt.read_manifest(back).files)
    assert ckptstore.fsck(back.url).ok
    assert_same_tree(ckptstore.load(back.url), ckptstore.load(src.url))


def test_a_write_failure_while_fetching_leaves_nothing_and_names_the_error(nodes, tmp_path):
    """ENOSPC on the receiving side: the rest of the stream is still read (the
    connection stays in step), the error comes out typed by errno, nothing is left."""
    import errno

    from ckptstore.storage.faulty import FaultyStorage

    _, k = nodes["a"]
    with PeerClient(k.address) as c:
        c.push(_save(tmp_path / "src", 6, "none", big=1 << 20), "full-disk", 6)
        dst = FaultyStorage(LocalStorage(tmp_path / "dst"), fail={"write": [1]}, errno=errno.ENOSPC)
        try:
            with pytest.raises(OSError) as info:
                c.fetch("full-disk", 6, dst)
        finally:
            dst.ledger.remove()
        assert info.value.errno == errno.ENOSPC
        assert not (tmp_path / "dst").exists() or _leftovers(tmp_path / "dst") == []
        assert c.steps("full-disk") == [6]
        assert c.fetch("full-disk", 6, LocalStorage(tmp_path / "dst")) > 0
    assert_same_tree(ckptstore.load(tmp_path / "dst"), _state(6, 1 << 20))


def test_after_a_write_failure_the_receiver_reads_the_stream_to_its_end(tmp_path):
    """The keeper replies to a push only after the commit frame: a body it could not
    write must still be read whole, so that the next frame is where it belongs."""
    import errno
    import threading

    from ckptstore.peer import transfer
    from ckptstore.storage.faulty import FaultyStorage

    data, m, items = transfer.source_files(_save(tmp_path / "src", 8, "none", big=3 << 20))
    assert max(f.size for f in m.files) > wire.PIECE  # the failure comes inside a body
    a, b = socket.socketpair()
    sender = threading.Thread(target=lambda: (transfer.send_files(a, items), wire.send(a, {"op": "commit"})))
    sender.start()
    dst = FaultyStorage(LocalStorage(tmp_path / "dst"), fail={"write": [1]}, errno=errno.ENOSPC)
    dst.makedirs()
    try:
        with pytest.raises(OSError) as info:
            transfer.receive_files(b, transfer.Landing(dst), m, "test sender")
        assert info.value.errno == errno.ENOSPC
        assert wire.recv(b) == {"op": "commit"}
    finally:
        sender.join()
        a.close()
        b.close()
        dst.ledger.remove()


def test_landing_speed_measures_a_transfer_into_a_fresh_file_and_leaves_nothing(tmp_path):
    assert landing_speed(8 << 20, tmp_path) > 0
    with pytest.raises(ValueError):
        landing_speed(0, tmp_path)
    with pytest.raises(FileNotFoundError):  # no such directory
        landing_speed(1 << 20, tmp_path / "missing")
    assert os.listdir(tmp_path) == []


def test_a_file_damaged_in_the_middle_of_a_multi_file_fetch_commits_nothing(nodes, tmp_path):
    """Files before and after the damaged one arrive intact, yet nothing stays."""
    home, k = nodes["b"]
    g = torch.Generator().manual_seed(11)
    state = {f"w{i}": torch.randn(64 << 10, generator=g) for i in range(5)}
    ckptstore.save(state, tmp_path / "src", compression="none", blocking=True, shard_size=256 << 10,
                   chunk_size=128 << 10)  # one file of two chunks per tensor
    src = LocalStorage(tmp_path / "src")
    middle = fmt.read_manifest(src).files[2].name
    with PeerClient(k.address) as c:
        c.push(src, "multi", 1)
        held = home / "keeper" / "multi" / step_name(1)
        data = bytearray(pristine := (held / middle).read_bytes())
        data[-1000] ^= 0x01  # in the last chunk of the middle file
        (held / middle).write_bytes(bytes(data))
        dst = tmp_path / "dst"
        with pytest.raises(CorruptCheckpointError, match="nothing was committed") as info:
            c.fetch("multi", 1, LocalStorage(dst))
        assert info.value.damage == [("w2", 1)]
        assert not dst.exists() or _leftovers(dst) == []
        (held / middle).write_bytes(pristine)
        assert c.fetch("multi", 1, LocalStorage(dst)) > 0  # the connection still serves
    assert_same_tree(ckptstore.load(dst), state)


def test_splice_reads_a_body_it_cannot_write_to_its_end_and_returns_the_error(tmp_path):
    """A body of several pipe-fulls into a descriptor that refuses writes: the error
    is returned after the whole body was read (the stream stays in step)."""
    import threading

    from ckptstore.peer import splice

    if not splice.AVAILABLE:
        pytest.skip("no splice(2) here")
    body = os.urandom(3 * splice.PIPE_SIZE + 12345)
    a, b = socket.socketpair()
    sender = threading.Thread(target=lambda: a.sendall(body + b"NEXT" + body))
    sender.start()
    target = tmp_path / "f"
    try:
        with open(target, "xb") as f, open(target, "rb") as ro:
            assert isinstance(splice.splice_body(b, ro.fileno(), len(body)), OSError)
            assert wire.recv_exact(b, 4) == b"NEXT"
            assert splice.splice_body(b, f.fileno(), len(body)) is None
    finally:
        sender.join()
        a.close()
        b.close()
    assert target.read_bytes() == body
