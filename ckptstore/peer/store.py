"""What a keeper does with its root: one request handler per operation.

The root is a :class:`ckptstore.storage.LocalStorage`; a run is a directory directly
below it (a plain name, :func:`ckptstore.peer.wire.check_run`), a step the usual
``step-NNNNNNNNNNNN`` directory with data files and ``manifest.json`` written last.
Requests on one step are serialized by a per-step lock, so a drop never removes files
a fetch is sending and two pushes of one step commit at most one checkpoint.
This module imports no torch.
"""
from __future__ import annotations

import logging
import socket
import threading
from collections.abc import Iterator
from contextlib import contextmanager

from ckptstore import manifest as fmt
from ckptstore.commit.atomic import is_temp_name
from ckptstore.errors import (
    CheckpointNotFoundError,
    CorruptCheckpointError,
    UnsafeCheckpointError,
    UnsupportedOperationError,
)
from ckptstore.peer import transfer, wire
from ckptstore.runs.layout import committed_steps, parse_step, step_name
from ckptstore.storage import LocalStorage, Storage

log = logging.getLogger("ckptstore.peer")


class KeeperStore:
    """The keeper's root and the operations clients ask of it."""

    def __init__(self, root: LocalStorage) -> None:
        self.root = root
        self._locks: dict[tuple[str, int], threading.Lock] = {}
        self._guard = threading.Lock()

    @contextmanager
    def _step(self, run: str, step: int) -> Iterator[Storage]:
        key = (wire.check_run(run), wire.check_step(step))
        with self._guard:
            lock = self._locks.setdefault(key, threading.Lock())
        with lock:
            yield self.root.child(run).child(step_name(step))

    # -- start-up -----------------------------------------------------------
    def clean(self) -> list[str]:
        """Remove what a killed transfer or keeper left: temp files everywhere, and
        step directories without a manifest (nothing else writes below the root,
        and no transfer runs yet). Returns the removed paths."""
        removed: list[str] = []
        for run in self.root.listdir():
            if wire.RUN_RE.fullmatch(run) is None or not self.root.isdir(run):
                continue
            rd = self.root.child(run)
            for entry in rd.listdir():
                if is_temp_name(entry):
                    rd.remove(entry)
                    removed.append(f"{run}/{entry}")
                if parse_step(entry) is None or not rd.isdir(entry):
                    continue
                sd = rd.child(entry)
                if not sd.exists(fmt.MANIFEST_NAME):
                    sd.rmtree("")
                    removed.append(f"{run}/{entry}")
                    continue
                for name in sd.listdir():
                    if is_temp_name(name):
                        sd.remove(name)
                        removed.append(f"{run}/{entry}/{name}")
        if removed:
            log.warning("removed %d leftovers of interrupted transfers below %s: %s", len(removed),
                        self.root.url, ", ".join(removed[:20]))
        return removed

    # -- requests -----------------------------------------------------------
    def handle(self, sock: socket.socket, req: dict) -> None:
        """Serve one request whose header is ``req`` (its body, if any, unread)."""
        op = req.get("op")
        if op == "hello":
            wire.send(sock, {"ok": True, "protocol": wire.PROTOCOL, "root": self.root.url})
        elif op == "steps":
            run = wire.check_run(req.get("run"))
            wire.send(sock, {"ok": True, "steps": committed_steps(self.root.child(run))})
        elif op == "push":
            self.push(sock, req)
        elif op == "fetch":
            self.fetch(sock, req)
        elif op == "drop":
            self.drop(req.get("run"), req.get("step"))
            wire.send(sock, {"ok": True})
        else:
            raise UnsupportedOperationError(f"unknown peer request {str(op)[:40]!r}")

    def push(self, sock: socket.socket, req: dict) -> None:
        """``push`` + manifest body; reply ``{"ok": true, "already": bool}`` (true: this
        very checkpoint is held, nothing more is sent); then one ``file`` frame per data
        file and ``commit``; the last reply comes after the verified commit."""
        data, m = transfer.receive_manifest(sock, req)  # read before anything can fail
        with self._step(req.get("run"), req.get("step")) as dst:  # type: ignore[arg-type]
            if transfer.same_commit(dst, m.save_id):
                wire.send(sock, {"ok": True, "already": True})
                return
            landing = transfer.Landing(dst)
            try:
                dst.makedirs()
                wire.send(sock, {"ok": True, "already": False})
                nbytes = transfer.receive_files(sock, landing, m, "the pushing client")
                end = wire.recv(sock)
                if not end or end.get("op") != "commit":
                    raise UnsafeCheckpointError("a push must end with a commit frame")
                transfer.commit_verified(landing, data, m, f"push of {dst.url}")
            finally:
                landing.discard()
        log.info("committed %s (%d files, %d bytes)", dst.url, len(m.files), nbytes)
        wire.send(sock, {"ok": True, "bytes": nbytes + len(data)})

    def fetch(self, sock: socket.socket, req: dict) -> None:
        """``fetch`` (``have``: the save_id the client holds there, or null): reply
        with the step's ``save_id`` and ``files`` and the manifest body, then stream
        one ``file`` frame per file (an error frame in place of one if a file turns
        out unreadable), then ``{"ok": true}``."""
        with self._step(req.get("run"), req.get("step")) as src:  # type: ignore[arg-type]
            if not src.exists(fmt.MANIFEST_NAME):
                raise CheckpointNotFoundError(f"the keeper holds no committed step {req.get('step')} "
                                              f"of run {req.get('run')}")
            data, m, items = transfer.source_files(src)
            have = req.get("have")
            if have is not None:
                wire.send(sock, {"ok": True, "save_id": m.save_id, "files": 0, "size": 0})
                return
            wire.send(sock, {"ok": True, "save_id": m.save_id, "files": len(items),
                             "size": len(data)}, data)
            try:
                transfer.send_files(sock, items)
            except (CorruptCheckpointError, FileNotFoundError) as e:
                # only raised before a file's frame went out: the stream is in step
                wire.send(sock, wire.error_reply(e))
                log.error("fetch of %s: %s", src.url, e)
                return
            wire.send(sock, {"ok": True})

    def drop(self, run: object, step: object) -> None:
        """Remove a step: its manifest first (durably), then its files and directory.
        A step that is not there is no error."""
        with self._step(run, step) as sd:  # type: ignore[arg-type]
            if not sd.isdir(""):
                return
            if sd.exists(fmt.MANIFEST_NAME):
                sd.remove(fmt.MANIFEST_NAME)
                sd.fsync_dir()
            sd.rmtree("")
            sd.parent().fsync_dir()
        log.info("dropped %s", sd.url)
