"""The children of the memory family (:mod:`fuzz.memory`): a trainer that saves steps of
a known state through a Checkpointer with the memory tier and a buddy keeper, and a
loader that restores the newest step in a fresh process. They run as forks of a server
(``python -m fuzz.memory_child --serve``) that imported torch once.
"""
from __future__ import annotations

import json
import logging
import os
import sys
import time
import traceback
from typing import Any

import ckptstore
from ckptstore.errors import CkptError
from ckptstore.runs.recovery import CheckpointFallbackWarning

from .common import make_state, serve_forks, tree_digest

#: a few shards and chunks per step; a step is 3-6 MiB
OPTS = dict(chunk_size=256 << 10, shard_size=1 << 20)
FROZEN: list = []


def step_state(step: int, scale: int = 1) -> dict:
    """The state saved as ``step``: ``make_state(step)``, a step-dependent tensor of
    ``scale`` MiB and a 2 MiB tensor that every step shares."""
    import torch

    if not FROZEN:
        FROZEN.append(torch.randn(512 << 10, generator=torch.Generator().manual_seed(4242)))
    g = torch.Generator().manual_seed(10_000 + step)
    return dict(make_state(step), big=torch.randn(scale << 18, generator=g), frozen=FROZEN[0])


# -- the children (forks of the server) -----------------------------------------


def _open(spec: dict):
    os.environ["CKPTSTORE_MEMORY_DIR"] = spec["memdir"]
    p = spec["policy"]
    return ckptstore.Checkpointer(spec["local"], memory=True, peer=spec["peer"], keep_last=3,
                                  memory_keep=p["memory_keep"], compression=p["compression"],
                                  incremental=p["incremental"], save_options=OPTS)


def trainer(spec: dict) -> int:
    """Save steps until killed (``close``: that many steps, then close)."""
    fd = os.open(spec["events"], os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)

    def note(what: str, step: int) -> None:
        os.write(fd, f"{what} {step} {time.monotonic():.6f}\n".encode())

    ck = _open(spec)
    note("ready", 0)
    for step in range(1, (spec["close"] or 10 ** 6) + 1):
        state = step_state(step, spec["scale"])
        note("begin", step)
        ck.save(step, state).wait()
        note("committed", step)
        if step % spec["policy"]["wait_every"] == 0:
            ck.wait()
    ck.close()
    note("closed", 0)
    return 0


def loader(spec: dict) -> int:
    """A restarted process: ``latest()``, ``load("latest")``, ``close()``; its findings
    as JSON in ``spec["result"]``."""
    import warnings

    out: dict[str, Any] = {}
    ck = None
    try:
        ck = _open(spec)
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always")
            out["latest"] = ck.latest()
            got = ck.load("latest")
        out.update(step=ck.loaded_step, tier=ck.loaded_from, timings=ck.load_timings,
                   warnings=[str(w.message)[:300] for w in seen  # a copy fell back
                             if issubclass(w.category, CheckpointFallbackWarning)],
                   digest=tree_digest(got) if ck.loaded_step is not None else None)
    except Exception as e:
        out.update(error=type(e).__name__, typed=isinstance(e, CkptError), message=str(e)[:500],
                   trace=traceback.format_exc()[-1500:])
    try:
        if ck is not None:
            ck.close()
    except Exception as e:
        out.update(close_error=f"{type(e).__name__} (typed: {isinstance(e, CkptError)}): {e}"[:500])
    with open(spec["result"], "w") as f:
        json.dump(out, f)
    return 0


def serve() -> int:
    """The fork server: one child per spec line, in a session of its own; answers
    ``{"pid"}`` at once and ``{"status"}`` when the child ended."""
    import ckptstore.api.checkpointer  # noqa: F401 - imported once, before the forks
    import ckptstore.peer.client  # noqa: F401

    step_state(0)
    def life(spec: dict) -> int:
        logging.basicConfig(level=logging.WARNING)
        return (trainer if spec["role"] == "trainer" else loader)(spec)

    return serve_forks(life, truncate_log=False)


if __name__ == "__main__":
    sys.exit(serve() if sys.argv[1:] == ["--serve"] else 2)
