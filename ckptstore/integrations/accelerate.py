"""Hugging Face Accelerate: ``save_state``/``load_state`` as ckptstore checkpoints, no pickle.

``accelerator.save_state(dir)`` writes the model weights with safetensors but pickles
the optimizers, schedulers, samplers, GradScaler, RNG states and registered objects.
These two functions save and restore the same things as one verified, atomically
committed ckptstore checkpoint::

    from ckptstore.integrations.accelerate import load_state, save_state

    save_state(accelerator, "ckpt/step_100")       # instead of accelerator.save_state(...)
    load_state(accelerator, "ckpt/step_100")       # instead of accelerator.load_state(...)

Every process calls them, as with Accelerate's own methods. What the checkpoint holds:

- ``models``: each prepared model's ``state_dict()``, unwrapped (no DDP ``module.``
  or ``torch.compile`` ``_orig_mod.`` prefix), restored in place into the model;
- ``optimizers``/``schedulers``: the prepared wrappers' ``state_dict()`` (that of the
  wrapped object), restored through their ``load_state_dict`` (a fresh optimizer too);
- ``dataloaders``: per prepared data loader, its epoch (``set_epoch``), the seed and
  epoch of a ``SeedableRandomSampler``, the state of a sampler's own
  ``torch.Generator``, and the ``state_dict()`` of a ``StatefulDataLoader``
  (``use_stateful_dataloader=True``). Without a stateful loader the position inside
  an epoch is not known to Accelerate: keep it in a registered object and use
  ``accelerator.skip_first_batches``;
- ``scaler``: ``accelerator.scaler`` (GradScaler) when there is one;
- ``rng``: :class:`ckptstore.RNGState` (every rank's generators when
  ``num_processes > 1``; each rank restores its own);
- ``custom``: the objects given to ``accelerator.register_for_checkpointing``, in order;
- ``accelerator``: ``accelerator.step`` (gradient accumulation) and the save counter
  ``project_configuration.iteration`` (``automatic_checkpoint_naming``).

``save_state`` returns once the checkpoint is committed; with ``blocking=False`` once
the state is staged (the main process gets the :class:`ckptstore.SaveHandle`; the next
``save_state``/``load_state`` or :func:`wait` waits for it). For a bit-exact resume
with shuffling, use ``DataLoaderConfiguration(use_seedable_sampler=True)`` and give the
``DataLoader`` a ``generator`` of its own (see docs/integrations.md).

Accelerate exposes the prepared objects only as private lists (``_models``,
``_optimizers``, ``_schedulers``, ``_dataloaders``, ``_custom_objects`` and the hook
dicts); they are read, never written, in :func:`prepared` alone. Accelerate's
save/load-state pre-hooks are not called (a warning says so when some are registered).

Covered: one process (CPU or one GPU) and DDP (``MULTI_CPU``/``MULTI_GPU`` and the
other ``MULTI_*`` types). The main process writes (with ``save_on_each_node``: the
main process of each node). Not covered: FSDP, DeepSpeed, Megatron-LM, XLA and models
holding DTensors (tensor/context parallelism): :class:`UnsupportedOperationError`.
"""
from __future__ import annotations

import logging
import os
import re
import weakref
from dataclasses import dataclass
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.data_loader import SeedableRandomSampler
from accelerate.utils import DistributedType

from ckptstore.api.load import load
from ckptstore.api.rng import RNGState
from ckptstore.api.save import save
from ckptstore.distributed import holds_dtensor
from ckptstore.errors import (
    CheckpointNotFoundError,
    DistributedSaveError,
    StrictLoadError,
    UnsupportedOperationError,
)
from ckptstore.manifest import MANIFEST_NAME
from ckptstore.manifest.io import read_manifest
from ckptstore.pipeline.handle import SaveHandle
from ckptstore.read.into import LoadReport
from ckptstore.runs.retention import referenced_files, remove_unreferenced, uncommit
from ckptstore.storage import Storage, open_storage

log = logging.getLogger("ckptstore.accelerate")

__all__ = ["save_state", "load_state", "wait", "prepared", "Prepared", "LoaderState", "Counters"]

#: ckptstore.save arguments this module decides itself
_RESERVED = frozenset({"distributed", "blocking"})
#: Accelerate's DDP-like types: every rank holds the whole model
_SUPPORTED = frozenset(t for t in DistributedType if t.name == "NO" or t.name.startswith("MULTI_"))
_CHECKPOINT_DIR = re.compile(r"^checkpoint_(\d+)$")


@dataclass(frozen=True, slots=True)
class Prepared:
    """What ``accelerator.prepare`` and ``register_for_checkpointing`` hold, in order."""

    models: tuple[Any, ...]
    optimizers: tuple[Any, ...]
    schedulers: tuple[Any, ...]
    dataloaders: tuple[Any, ...]
    custom_objects: tuple[Any, ...]
    hooks: int  #: save/load-state pre-hooks registered (not called by this module)


def prepared(accelerator: Accelerator) -> Prepared:
    """The one place that reads Accelerate's private lists (read-only): Accelerate has
    no public accessor for the objects its own ``save_state`` saves."""
    hooks = (len(getattr(accelerator, "_save_model_state_pre_hook", None) or ())
             + len(getattr(accelerator, "_load_model_state_pre_hook", None) or ()))
    return Prepared(tuple(accelerator._models), tuple(accelerator._optimizers),
                    tuple(accelerator._schedulers), tuple(accelerator._dataloaders),
                    tuple(accelerator._custom_objects), hooks)


class LoaderState:
    """A prepared data loader as a Stateful: its epoch, its sampler's seed/epoch or
    generator, and a ``StatefulDataLoader``'s own state. Only plain values and tensors."""

    def __init__(self, dataloader: Any, *, strict: bool = True) -> None:
        self.dataloader = dataloader
        self.strict = strict

    def _sampler(self) -> Any:
        get = getattr(self.dataloader, "get_sampler", None)
        return get() if callable(get) else getattr(self.dataloader, "sampler", None)

    def state_dict(self) -> dict[str, Any]:
        dl, sampler = self.dataloader, self._sampler()
        out: dict[str, Any] = {}
        epoch = getattr(dl, "iteration", None)
        if isinstance(epoch, int):
            out["epoch"] = epoch
        if isinstance(sampler, SeedableRandomSampler):
            out["sampler"] = {"initial_seed": int(sampler.initial_seed), "epoch": int(sampler.epoch)}
        else:
            gen = getattr(sampler, "generator", None)
            if isinstance(gen, torch.Generator):
                out["generator"] = gen.get_state()
        if getattr(dl, "use_stateful_dataloader", False):
            out["state"] = dl.state_dict()
        return out

    def load_state_dict(self, state: dict[str, Any]) -> None:
        dl, sampler = self.dataloader, self._sampler()
        want, have = set(self.state_dict()), set(state)
        if want != have:
            why = (f"the checkpoint holds {sorted(have)} for this data loader, it has {sorted(want)}: "
                   "prepare it with the same DataLoaderConfiguration (use_seedable_sampler, "
                   "use_stateful_dataloader) and sampler as the saved run")
            if self.strict:
                raise StrictLoadError(why)
            log.warning("%s; restoring what matches", why)
        if "epoch" in state and "epoch" in want:
            dl.set_epoch(int(state["epoch"]))
        if "sampler" in state and "sampler" in want:
            sampler.initial_seed = int(state["sampler"]["initial_seed"])
            sampler.set_epoch(int(state["sampler"]["epoch"]))
        if "generator" in state and "generator" in want:
            sampler.generator.set_state(torch.as_tensor(state["generator"], dtype=torch.uint8).contiguous())
        if "state" in state and "state" in want:
            dl.load_state_dict(state["state"])


class Counters:
    """``accelerator.step`` and ``project_configuration.iteration`` as a Stateful.

    The iteration saved is that of the checkpoint (Accelerate counts it up after each
    ``save_state``); loading sets it to the next one, so that a resumed run with
    ``automatic_checkpoint_naming`` names its next checkpoint as the run that never
    stopped would have."""

    def __init__(self, accelerator: Accelerator) -> None:
        self.accelerator = accelerator

    def state_dict(self) -> dict[str, int]:
        return {"step": int(self.accelerator.step),
                "iteration": int(self.accelerator.project_configuration.iteration)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.accelerator.step = int(state["step"])
        self.accelerator.project_configuration.iteration = int(state["iteration"]) + 1


# -- the save in flight, per accelerator ------------------------------------------
_PENDING: "weakref.WeakKeyDictionary[Accelerator, SaveHandle]" = weakref.WeakKeyDictionary()


def wait(accelerator: Accelerator) -> None:
    """Block until this accelerator's save in flight (``blocking=False``) has
    committed; raise its error, with its own type, unless it was raised before."""
    handle = _PENDING.pop(accelerator, None)
    if handle is not None:
        err = handle.exception()
        if err is not None and handle.take_unobserved_error() is not None:
            raise err


def save_state(accelerator: Accelerator, path: "str | os.PathLike | None" = None, *,
               blocking: bool = True, **save_kwargs: Any) -> SaveHandle | None:
    """Save everything ``accelerator.save_state`` saves, as one ckptstore checkpoint.

    Every process must call it (the RNG states of all ranks are gathered). The main
    process (``save_on_each_node``: each node's main process) writes; it gets the
    :class:`ckptstore.SaveHandle`, the other processes None.

    Args:
        accelerator: the ``Accelerator`` whose prepared objects are saved.
        path: a directory (local or fsspec URL) that must not hold a checkpoint yet
            (pass ``overwrite=True`` to replace one atomically). None: with
            ``ProjectConfiguration(automatic_checkpoint_naming=True)``,
            ``{project_dir}/checkpoints/checkpoint_{iteration}``, the oldest removed
            beyond ``total_limit`` (manifest first) as Accelerate does.
        blocking: True (the default): return once the checkpoint is committed, on
            every process (a barrier follows). False: return once the state is
            staged; training may go on while writers compress, hash and commit.
            :func:`wait`, the next ``save_state`` and ``load_state`` wait for it; other
            processes must not read the checkpoint before the main process waited.
        save_kwargs: more :func:`ckptstore.save` arguments (``compression``,
            ``overwrite``, ``metadata``, ``staging_budget``, ``base``...).
    """
    bad = sorted(_RESERVED & set(save_kwargs))
    if bad:
        raise ValueError(f"save_state sets {', '.join(bad)} itself; remove it from the arguments")
    _check_supported(accelerator)
    objs = prepared(accelerator)
    _warn_hooks(objs)
    multi = accelerator.num_processes > 1
    rng = RNGState(per_rank=multi).state_dict()  # collective with several processes: every rank
    writes = (accelerator.is_local_main_process if accelerator.project_configuration.save_on_each_node
              else accelerator.is_main_process)
    handle: SaveHandle | None = None
    error: BaseException | None = None
    if writes:
        try:
            handle = _write(accelerator, objs, path, rng, blocking, save_kwargs)
        except BaseException as e:  # noqa: BLE001 - raised below, after telling the other ranks
            error = e
    if blocking and multi:  # a barrier that also says whether a writer failed
        failed = accelerator.reduce(torch.tensor([float(error is not None)], device=accelerator.device), "sum")
        if error is None and float(failed.sum()) > 0:
            raise DistributedSaveError("the main process failed to save the accelerator state (its own "
                                       "error says why); the checkpoint was not committed")
    if error is not None:
        raise error
    accelerator.project_configuration.iteration += 1
    return handle


def _write(accelerator: Accelerator, objs: Prepared, path: "str | os.PathLike | None", rng: Any,
           blocking: bool, save_kwargs: dict[str, Any]) -> SaveHandle:
    """The writing process's part of :func:`save_state`."""
    wait(accelerator)
    target = _save_target(accelerator, path)
    models = [accelerator.unwrap_model(m, keep_torch_compile=False).state_dict() for m in objs.models]
    _refuse_dtensors(models, "accelerator.save_state")
    state: dict[str, Any] = {
        "models": models,
        "optimizers": list(objs.optimizers),
        "schedulers": list(objs.schedulers),
        "dataloaders": [LoaderState(dl) for dl in objs.dataloaders],
        "rng": rng,
        "custom": list(objs.custom_objects),
        "accelerator": Counters(accelerator),
    }
    if accelerator.scaler is not None:
        state["scaler"] = accelerator.scaler
    kwargs = dict(save_kwargs)
    metadata: dict[str, Any] = {"framework": "accelerate", "accelerate": _layout(accelerator, objs)}
    if kwargs.get("metadata") is not None:
        metadata["user"] = kwargs.pop("metadata")
    kwargs.pop("metadata", None)
    handle = save(state, target, blocking=False, metadata=metadata, distributed=False, **kwargs)
    _PENDING[accelerator] = handle
    log.info("saving accelerator state to %s", handle.path)
    if blocking:
        wait(accelerator)
    return handle


def _refuse_dtensors(models: list, instead: str) -> None:
    if holds_dtensor(models):
        raise UnsupportedOperationError(
            "a model holds DTensors (tensor or context parallelism): ckptstore's Accelerate "
            f"integration covers single-process and DDP runs only; use {instead}")


def load_state(accelerator: Accelerator, path: "str | os.PathLike | None" = None, *, strict: bool = True,
               verify: bool = True, storage_options: dict | None = None) -> LoadReport:
    """Restore what :func:`save_state` saved into this accelerator's prepared objects.

    Every process calls it after ``accelerator.prepare`` (and after registering the
    same custom objects, in the same order). ``path=None`` loads the newest committed
    ``checkpoint_<n>`` of ``{project_dir}/checkpoints`` (``automatic_checkpoint_naming``).
    With ``strict=True`` (the default) a checkpoint holding other objects than this
    accelerator (another number of models, optimizers... or other keys) raises
    :class:`StrictLoadError` and nothing is loaded; ``strict=False`` loads what matches
    and says what did not in the returned :class:`ckptstore.LoadReport`. Every chunk
    is verified unless ``verify=False``.
    """
    _check_supported(accelerator)
    objs = prepared(accelerator)
    _warn_hooks(objs)
    wait(accelerator)
    source: Any = path if path is not None else _latest(accelerator, storage_options)
    storage = open_storage(source, storage_options)
    _check_layout(read_manifest(storage).metadata, _layout(accelerator, objs), strict)
    models = [accelerator.unwrap_model(m, keep_torch_compile=False) for m in objs.models]
    _refuse_dtensors([m.state_dict() for m in models], "accelerator.load_state")
    into: dict[str, Any] = {
        "models": models,
        "optimizers": list(objs.optimizers),
        "schedulers": list(objs.schedulers),
        "dataloaders": [LoaderState(dl, strict=strict) for dl in objs.dataloaders],
        "rng": RNGState(),
        "custom": list(objs.custom_objects),
        "accelerator": Counters(accelerator),
    }
    if accelerator.scaler is not None:
        into["scaler"] = accelerator.scaler
    report = load(storage, into=into, strict=strict, verify=verify)
    log.info("loaded accelerator state from %s: %s", storage.url, report.summary())
    return report


# -- helpers ------------------------------------------------------------------------
def _check_supported(accelerator: Accelerator) -> None:
    kind = accelerator.distributed_type
    if kind not in _SUPPORTED or getattr(accelerator, "is_fsdp2", False):
        raise UnsupportedOperationError(
            f"ckptstore's Accelerate integration covers single-process and DDP runs, not {kind.value}"
            " (FSDP, DeepSpeed, Megatron-LM and XLA keep their own checkpoint formats); use "
            "accelerator.save_state/load_state for this run")


def _warn_hooks(objs: Prepared) -> None:
    if objs.hooks:
        log.warning("Accelerate save/load-state pre-hooks are registered; ckptstore's save_state/"
                    "load_state do not call them (they save and load every prepared model themselves)")


def _layout(accelerator: Accelerator, objs: Prepared) -> dict[str, Any]:
    """How many objects of each kind the checkpoint holds (shown by ``ckptstore info``
    and checked on load before anything is read)."""
    return {"models": len(objs.models), "optimizers": len(objs.optimizers),
            "schedulers": len(objs.schedulers), "dataloaders": len(objs.dataloaders),
            "custom_objects": len(objs.custom_objects), "scaler": accelerator.scaler is not None,
            "num_processes": int(accelerator.num_processes)}


_COUNTED = ("models", "optimizers", "schedulers", "dataloaders", "custom_objects", "scaler")


def _check_layout(metadata: Any, here: dict[str, Any], strict: bool) -> None:
    saved = metadata.get("accelerate") if isinstance(metadata, dict) else None
    if not isinstance(saved, dict):
        if strict:
            raise StrictLoadError("this checkpoint was not written by ckptstore.integrations.accelerate."
                                  "save_state; load it with ckptstore.load, or pass strict=False")
        return
    diff = [f"{k}: {saved.get(k)!r} saved, {here[k]!r} here" for k in _COUNTED if saved.get(k) != here[k]]
    if diff:
        why = ("the checkpoint was saved from another set of prepared objects (" + "; ".join(diff) + "): "
               "prepare the same models, optimizers, schedulers and data loaders and register the same "
               "custom objects (accelerator.register_for_checkpointing), in the same order")
        if strict:
            raise StrictLoadError(why)
        log.warning("%s; loading what matches", why)


def _checkpoints_root(accelerator: Accelerator, storage_options: dict | None = None) -> Storage:
    config = accelerator.project_configuration
    if not config.automatic_checkpoint_naming or config.project_dir is None:
        raise ValueError("no path given and automatic checkpoint naming is off: pass a path, or create "
                         "the Accelerator with ProjectConfiguration(project_dir=..., "
                         "automatic_checkpoint_naming=True)")
    return open_storage(os.path.join(config.project_dir, "checkpoints"), storage_options)


def _numbered(root: Storage) -> list[tuple[int, str]]:
    names = root.listdir() if root.exists("") else []
    return sorted((int(m.group(1)), n) for n in names if (m := _CHECKPOINT_DIR.match(n)))


def _save_target(accelerator: Accelerator, path: "str | os.PathLike | None") -> Any:
    """``path``, or the next ``checkpoint_<iteration>`` after pruning to ``total_limit``."""
    if path is not None:
        return path
    root = _checkpoints_root(accelerator)
    name = f"checkpoint_{accelerator.project_configuration.iteration}"
    limit = accelerator.project_configuration.total_limit
    if limit is not None:
        existing = [n for _i, n in _numbered(root) if n != name]
        drop = existing[:max(0, len(existing) + 1 - limit)]
        if drop:
            log.warning("removing %d checkpoint(s) to keep total_limit=%d: %s", len(drop), limit,
                        ", ".join(drop))
            kept = {n: read_manifest(root.child(n)) for n in existing[len(drop):]
                    if root.child(n).exists(MANIFEST_NAME)}
            keep_refs = referenced_files(root, kept)  # files of older saves that incremental ones use
            for n in drop:  # every manifest first: no committed checkpoint ever lacks its files
                if root.child(n).exists(MANIFEST_NAME):
                    uncommit(root, n)
            for n in drop:
                remove_unreferenced(root, n, keep_refs)
    return root.child(name)


def _latest(accelerator: Accelerator, storage_options: dict | None) -> Storage:
    root = _checkpoints_root(accelerator, storage_options)
    for _i, name in reversed(_numbered(root)):
        if root.child(name).exists(MANIFEST_NAME):
            return root.child(name)
    raise CheckpointNotFoundError(f"{root.url} holds no committed checkpoint_<n> directory; pass the "
                                  "path of a checkpoint saved with save_state")
