"""The keeper: a node's daemon that holds peer replicas of other nodes' checkpoints.

``python -m ckptstore.peer.keeper --root DIR --listen HOST:PORT`` serves the peer
protocol (:mod:`ckptstore.peer.wire`) on one TCP port, one thread per connection, and
stores what it receives below ``DIR`` (``<run>/step-NNNNNNNNNNNN``) with the commit
protocol of every tier. On start it removes what interrupted transfers left; when a
connection drops mid-push it removes that push's files at once. It prints
``LISTENING host:port`` on its standard output when it accepts connections, then
closes that stream; SIGTERM or SIGINT stop it. :func:`start_keeper` starts one in its
own session, so that it outlives the process that started it. No torch import.
"""
from __future__ import annotations

import argparse
import logging
import os
import signal
import socket
import sys
import threading

from ckptstore.errors import CkptTimeoutError
from ckptstore.peer import wire
from ckptstore.peer.store import KeeperStore
from ckptstore.peer.wire import READY, split_address
from ckptstore.storage import LocalStorage

log = logging.getLogger("ckptstore.peer")

IDLE_TIMEOUT = 600.0  #: seconds a connection may wait between requests
IO_TIMEOUT = 120.0  #: seconds one read or write inside a request may take
MAX_CONNECTIONS = 64


class KeeperServer:
    """Accepts connections on ``sock`` and serves each in a thread."""

    def __init__(self, store: KeeperStore, sock: socket.socket) -> None:
        self.store = store
        self.sock = sock
        self.stopping = threading.Event()
        self._slots = threading.BoundedSemaphore(MAX_CONNECTIONS)

    @property
    def address(self) -> str:
        host, port = self.sock.getsockname()[:2]
        return f"{host}:{port}"

    def serve_forever(self) -> None:
        while not self.stopping.is_set():
            try:
                conn, peer = self.sock.accept()
            except OSError:
                if self.stopping.is_set():
                    return
                raise
            if not self._slots.acquire(blocking=False):
                self._refuse(conn)
                continue
            threading.Thread(target=self._serve, args=(conn, peer), daemon=True,
                             name=f"ckptstore-peer-{peer[1]}").start()

    def _refuse(self, conn: socket.socket) -> None:
        try:
            conn.settimeout(5.0)
            wire.send(conn, wire.error_reply(CkptTimeoutError(
                f"the keeper serves {MAX_CONNECTIONS} connections already; retry later")))
        except OSError:
            pass
        conn.close()

    def _serve(self, conn: socket.socket, peer: tuple) -> None:
        try:
            wire.tune(conn, IO_TIMEOUT)
            while not self.stopping.is_set():
                conn.settimeout(IDLE_TIMEOUT)
                req = wire.recv(conn, eof_ok=True)
                if req is None:
                    return
                conn.settimeout(IO_TIMEOUT)
                self.store.handle(conn, req)
        except (TimeoutError, ConnectionError, EOFError) as e:  # the client went away (or
            # went silent): its transfer was discarded
            log.info("connection from %s:%s ended: %s", peer[0], peer[1], e)
        except Exception as e:  # refused request: say why, then close (the stream may be out of step)
            log.warning("request from %s:%s failed: %s: %s", peer[0], peer[1], type(e).__name__, e)
            try:
                wire.send(conn, wire.error_reply(e))
                _linger(conn)
            except OSError:
                pass
        finally:
            conn.close()
            self._slots.release()

    def stop(self) -> None:
        self.stopping.set()
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.sock.close()


def _linger(conn: socket.socket, limit: int = 64 << 20) -> None:
    """After an error reply: end our side, then read (and drop) what the client still
    sends for a moment, so that closing does not reset the connection before the
    client read the reply (a close with unread data sends RST, which can discard it)."""
    conn.shutdown(socket.SHUT_WR)
    conn.settimeout(2.0)
    buf = bytearray(1 << 20)
    while limit > 0:
        try:
            n = conn.recv_into(buf)
        except OSError:
            return
        if n == 0:
            return
        limit -= n


def listen(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(128)
    return sock


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m ckptstore.peer.keeper",
                                 description="Hold peer replicas of checkpoints below a root.")
    ap.add_argument("--root", required=True, help="directory the replicas are stored below")
    ap.add_argument("--listen", default="127.0.0.1:0", help="HOST:PORT (port 0: any free port)")
    ap.add_argument("--log-level", default="INFO")
    args = ap.parse_args(argv)
    logging.basicConfig(level=args.log_level, stream=sys.stderr,
                        format="%(asctime)s keeper[%(process)d] %(levelname)s %(message)s")
    root = LocalStorage(args.root)
    root.makedirs()
    store = KeeperStore(root)
    store.clean()
    server = KeeperServer(store, listen(*split_address(args.listen)))

    def stop(signum, frame) -> None:
        threading.Thread(target=server.stop, daemon=True).start()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    log.info("keeper of %s listening on %s", root.url, server.address)
    sys.stdout.write(f"{READY}{server.address}\n")
    sys.stdout.flush()
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 1)  # the starter may stop reading (it may exit): never write there again
    os.close(devnull)
    server.serve_forever()
    log.info("keeper of %s stopped", root.url)
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
