"""torchtitan: ckptstore as the storage of torchtitan's DCP checkpoints.

torchtitan (0.3) saves and loads through ``torch.distributed.checkpoint`` in its
``CheckpointManager``; the trainer builds whichever manager class its
``config.checkpoint`` names (torchtitan's ``Configurable``: ``Config.build`` constructs
the class that declares the ``Config``). :class:`CkptStoreCheckpointManager` is that
manager with ckptstore as DCP's storage. Two ways to select it, both configuration:

* torchtitan's own override mechanism, from the command line (no code change; every
  other ``--checkpoint.*`` setting is kept)::

      --override.imports ckptstore.integrations.torchtitan.use_ckptstore
      --override.imports 'ckptstore.integrations.torchtitan.use_ckptstore={"compression": "zstd"}'

* or in a config registry function::

      from ckptstore.integrations.torchtitan import CkptStoreCheckpointManager
      checkpoint=CkptStoreCheckpointManager.Config(enable=True, interval=500, compression="zstd")

Every ``step-N`` directory torchtitan writes is then a committed ckptstore
checkpoint (chunk hashes, atomic manifest commit, ``ckptstore.load``/``fsck`` work on
it); DCP still plans the save and the resharded load, so any parallelism torchtitan
runs keeps working. What it overrides, and why:

* ``dcp_save`` / ``dcp_load`` (public methods): torchtitan calls ``dcp.save`` and
  ``dcp.load`` with a ``checkpoint_id`` only, and DCP then picks its own
  ``FileSystemWriter``/``Reader``; there is no setting for another storage. The
  overrides make the same calls with :class:`CkptStoreWriter`/:class:`CkptStoreReader`.
  Hugging Face exports (``last_save_in_hf``) and loads (``initial_load_in_hf``), and
  plain DCP directories (an ``initial_load_path`` from a run without ckptstore), go
  to torchtitan's own code unchanged.
* ``_load`` (the documented subclass hook of torchtitan's ``BaseCheckpointManager``:
  "subclasses override the hooks, not these methods"): torchtitan finds the step to
  resume from with its private ``_find_load_step``, which only counts directories
  holding DCP's ``.metadata`` file (or a Hugging Face index) and has no way to add
  another, so a ckptstore run would silently start again from step 0. The hook
  resolves "latest" (``step=-1``) with :func:`latest_step` and hands torchtitan that
  explicit step, so its own loading logic runs unchanged; ``_find_load_step`` itself
  is not overridden.

torchtitan's Trainer cannot be imported with a CPU-only torch (0.3 imports triton
through its MoE kernels); the manager and the override work without it.
"""
from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict_saver import AsyncCheckpointerType
from torchtitan.components.checkpointer import MODEL, AsyncMode, CheckpointManager
from torchtitan.config.override import derive, override
from torchtitan.tools.utils import GarbageCollection

from ckptstore.distributed.dcp import CkptStoreReader, CkptStoreWriter
from ckptstore.manifest import MANIFEST_NAME
from ckptstore.storage import open_storage

log = logging.getLogger("ckptstore.torchtitan")

__all__ = ["CkptStoreCheckpointManager", "latest_step", "is_ckptstore_checkpoint", "use_ckptstore"]

#: torchtitan's step directory names (``step-N``, not zero-padded)
STEP_DIR = re.compile(r"^step-(\d+)$")


def is_ckptstore_checkpoint(path: "str | os.PathLike", storage_options: dict | None = None) -> bool:
    """Whether ``path`` is a committed ckptstore checkpoint (its manifest is in place)."""
    try:
        return open_storage(path, storage_options).exists(MANIFEST_NAME)
    except (FileNotFoundError, NotADirectoryError):
        return False


def latest_step(folder: "str | os.PathLike", storage_options: dict | None = None) -> int:
    """The newest step torchtitan can resume from in ``folder``: the largest N of a
    ``step-N`` directory that holds a committed ckptstore checkpoint (or, for a run
    that switched to ckptstore, DCP's ``.metadata``); -1 when there is none. A step
    whose save never committed (a crash mid-save) has no manifest and is skipped."""
    root = open_storage(folder, storage_options)
    try:
        entries = root.listdir()
    except (FileNotFoundError, NotADirectoryError):
        return -1
    steps = []
    for name in entries:
        m = STEP_DIR.match(name)
        if m is None:
            continue
        step_dir = root.child(name)
        if step_dir.exists(MANIFEST_NAME) or step_dir.exists(".metadata"):
            steps.append(int(m.group(1)))
    return max(steps, default=-1)


class CkptStoreCheckpointManager(CheckpointManager):
    """torchtitan's ``CheckpointManager`` writing and reading ckptstore checkpoints."""

    @dataclass(kw_only=True, slots=True)
    class Config(CheckpointManager.Config):
        compression: str = "auto"
        """ckptstore compression: "auto", "none", "zstd" or "lz4" (see ckptstore.save)."""

        verify: bool = True
        """Verify every chunk's hash when loading."""

    def __init__(self, config: Config, **kwargs: Any) -> None:
        self.ckptstore_compression = config.compression
        self.ckptstore_verify = config.verify
        super().__init__(config, **kwargs)

    @torch.no_grad()
    def dcp_save(self, state_dict: dict[str, Any], checkpoint_id: str, async_mode: AsyncMode,
                 enable_garbage_collection: bool = False, to_hf: bool = False) -> Any:
        if to_hf:  # a Hugging Face safetensors export: torchtitan's own writer
            return super().dcp_save(state_dict, checkpoint_id, async_mode,
                                    enable_garbage_collection, to_hf)
        # torchtitan overwrites a step directory it saves again (as DCP's writer does)
        writer = CkptStoreWriter(checkpoint_id, compression=self.ckptstore_compression, overwrite=True)
        if async_mode == AsyncMode.ASYNC:
            ret: Any = dcp.async_save(state_dict, storage_writer=writer, process_group=self.pg)
        elif async_mode == AsyncMode.ASYNC_WITH_PINNED_MEM:
            ret = dcp.async_save(state_dict, storage_writer=writer, process_group=self.pg,
                                 async_checkpointer_type=AsyncCheckpointerType.PROCESS,
                                 async_stager=self.stager)
        else:
            ret = dcp.save(state_dict, storage_writer=writer)
        if enable_garbage_collection:
            GarbageCollection.collect("GC collection invoked by checkpointer.")
        return ret

    def dcp_load(self, state_dict: dict[str, Any], checkpoint_id: str, from_hf: bool,
                 from_quantized: bool) -> None:
        if from_hf or not is_ckptstore_checkpoint(checkpoint_id):
            # Hugging Face safetensors, or a plain DCP directory: torchtitan's own reader
            super().dcp_load(state_dict, checkpoint_id, from_hf, from_quantized)
            return
        dcp.load(state_dict, storage_reader=CkptStoreReader(checkpoint_id, verify=self.ckptstore_verify))
        # as torchtitan does: the model's entries are flattened into the state, so
        # DCP cannot hand them to the model's load_state_dict itself
        if MODEL in self.states:
            self.states[MODEL].load_state_dict(state_dict)

    def _load(self, step: int = -1) -> bool:
        if step == -1:
            found = latest_step(self.folder)
            if found >= 0:
                log.info("resuming from step %d in %s", found, self.folder)
                step = found
        return super()._load(step)


@override(target=CheckpointManager.Config, exact=True,
          description="ckptstore as the storage of torchtitan's DCP checkpoints")
def use_ckptstore(cfg: CheckpointManager.Config, *, compression: str = "auto",
                  verify: bool = True) -> CkptStoreCheckpointManager.Config:
    """torchtitan override (``--override.imports ckptstore.integrations.torchtitan.use_ckptstore``):
    the same checkpoint settings, saved and loaded by :class:`CkptStoreCheckpointManager`."""
    return derive(cfg, CkptStoreCheckpointManager.Config, compression=compression, verify=verify)
