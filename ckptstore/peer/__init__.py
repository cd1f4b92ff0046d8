"""Peer replicas: a keeper process per node holds copies of other nodes' checkpoints.

``start_keeper(root)`` starts ``python -m ckptstore.peer.keeper`` (a daemon in its own
session) and returns a :class:`Keeper` handle; :class:`PeerClient` pushes a committed
step to a keeper, lists, fetches and drops steps there. Transfers use a framed
protocol over one TCP connection (:mod:`.wire`), no pickle; the receiving side
verifies every file against the manifest before it commits the manifest, create-only.
Nothing here imports torch, and the package does not import the server (:mod:`.keeper`),
so ``python -m ckptstore.peer.keeper`` starts fast and imports it once.
"""
from __future__ import annotations

from ckptstore.errors import PeerUnavailableError
from ckptstore.peer.client import PeerClient
from ckptstore.peer.launch import Keeper, start_keeper
from ckptstore.peer.speed import landing_speed, loopback_speed

__all__ = ["Keeper", "PeerClient", "PeerUnavailableError", "landing_speed", "loopback_speed", "start_keeper"]
