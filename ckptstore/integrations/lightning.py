"""PyTorch Lightning: ``Trainer(plugins=[CkptstoreCheckpointIO()])``.

:class:`CkptstoreCheckpointIO` is a ``lightning.pytorch.plugins.io.CheckpointIO``.
Every checkpoint Lightning writes (``ModelCheckpoint``, ``trainer.save_checkpoint``)
becomes a ckptstore checkpoint *directory* at the path Lightning chose (e.g.
``.../epoch=0-step=10.ckpt/``), saved with ``ckptstore.save(checkpoint, path,
overwrite=True)``: the directory's manifest, written last, is the commit, and an
overwrite (``last.ckpt``) replaces it atomically.

Saves are asynchronous::

    save_checkpoint  -> wait for the previous save (its error raised here, once)
                     -> ckptstore.save(...) returns once the state is staged
                     (training goes on; writers compress, hash, write, commit)
    remove_checkpoint(p), load_checkpoint, teardown, wait()
                     -> wait for the save in flight (remove: only a save of ``p``)

A background error is raised once, with its own type, by whichever of those calls
comes first. When Lightning tears down after a training error, a failed save does
not replace that error: it is logged and added to it as a note.

``LightningModule.load_from_checkpoint(path)`` loads through Lightning's
``lightning.pytorch.core.saving.pl_load`` (``fsspec`` open + ``torch.load``), which
has no plug-in hook. Importing this module replaces that one name with a wrapper:
a path that is a ckptstore checkpoint (a directory holding the manifest) is loaded
with ckptstore; everything else (files, URLs, file objects) goes to the original
function, unchanged. ``install_loader()`` / ``uninstall_loader()`` do it explicitly.
"""
from __future__ import annotations

import functools
import logging
import os
import sys
import threading
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from lightning.fabric.utilities.cloud_io import get_filesystem
from lightning.pytorch.plugins.io import CheckpointIO, TorchCheckpointIO
from lightning_utilities.core.apply_func import apply_to_collection

from ckptstore.api.load import load
from ckptstore.api.save import save
from ckptstore.manifest import MANIFEST_NAME
from ckptstore.pipeline.handle import SaveHandle
from ckptstore.runs.retention import remove_unreferenced, uncommit
from ckptstore.storage import open_storage

log = logging.getLogger("ckptstore.lightning")

__all__ = ["CkptstoreCheckpointIO", "is_ckptstore_checkpoint", "load_checkpoint", "install_loader",
           "uninstall_loader"]

#: ckptstore.save arguments the plug-in decides itself
_RESERVED = frozenset({"overwrite", "base", "distributed", "storage_options"})


@dataclass
class PendingSave:
    """The save of one plug-in that may still be running."""

    key: str  #: the normalised path it writes
    handle: SaveHandle
    #: the exception being handled when the save started (None almost always)
    context: BaseException | None


class CkptstoreCheckpointIO(CheckpointIO):
    """Lightning checkpoints as verified, atomically committed ckptstore directories,
    saved in the background.

    Args:
        compression: as :func:`ckptstore.save` (``"auto"``: none on local disks,
            zstd on object stores).
        blocking: wait for every save to commit before ``save_checkpoint`` returns.
        verify: check every chunk's hash on load.
        storage_options: fsspec options for remote paths (``s3://``, ``gs://``...).
        save_options: more keyword arguments for :func:`ckptstore.save`
            (``staging_budget``, ``zstd_level``, ``metadata``...).

    ``trainer.save_checkpoint(path, storage_options={...})`` passes a dict of
    :func:`ckptstore.save` keyword arguments for that one save.
    """

    def __init__(self, *, compression: str = "auto", blocking: bool = False, verify: bool = True,
                 storage_options: dict[str, Any] | None = None,
                 save_options: dict[str, Any] | None = None) -> None:
        self.save_options = _check_options({"compression": compression, **(save_options or {})})
        self.blocking = blocking
        self.verify = verify
        self.storage_options = dict(storage_options or {})
        self._pending: PendingSave | None = None
        self._lock = threading.Lock()
        _LIVE.add(self)

    # -- CheckpointIO ---------------------------------------------------------
    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any,
                        storage_options: Any | None = None) -> None:
        """Wait for the previous save (raising its error), then stage ``checkpoint``
        and return; the directory at ``path`` is committed in the background."""
        if storage_options is not None and not isinstance(storage_options, dict):
            raise TypeError("CkptstoreCheckpointIO.save_checkpoint: storage_options must be a dict of "
                            f"ckptstore.save keyword arguments, not {type(storage_options).__name__}")
        opts = {**self.save_options, **_check_options(storage_options or {})}
        opts.setdefault("metadata", _metadata(checkpoint))
        self.wait()
        handle = save(checkpoint, _fspath(path), overwrite=True,
                      storage_options=self.storage_options or None, **opts)
        with self._lock:
            self._pending = PendingSave(_key(path), handle, sys.exc_info()[1])
        if self.blocking:
            self.wait()

    def load_checkpoint(self, path: Any, map_location: Any | None = None,
                        weights_only: bool | None = None) -> dict[str, Any]:
        """Load the checkpoint at ``path`` (after the save in flight). A path that is
        not a ckptstore checkpoint (a ``.ckpt`` file from a run without the plug-in)
        is loaded by Lightning's ``TorchCheckpointIO``, as without the plug-in."""
        self.wait()
        if not is_ckptstore_checkpoint(path, self.storage_options):
            kwargs: dict[str, Any] = {"weights_only": weights_only}
            if map_location is not None:
                kwargs["map_location"] = map_location
            return TorchCheckpointIO().load_checkpoint(path, **kwargs)
        return load_checkpoint(path, map_location, verify=self.verify, storage_options=self.storage_options)

    def remove_checkpoint(self, path: Any) -> None:
        """Remove the checkpoint at ``path``: after its save if that is in flight;
        the manifest first (durably), then the data, so a crash leaves no checkpoint
        that looks committed but lacks files."""
        with self._lock:
            mine = self._pending is not None and self._pending.key == _key(path)
        if mine:
            self.wait()
        remove(path, self.storage_options)

    def teardown(self) -> None:
        """Wait for the save in flight and raise its error (once). If Lightning is
        tearing down because of another error, log the save's error and add it to
        that error as a note instead of replacing it."""
        with self._lock:
            p, self._pending = self._pending, None
        if p is None:
            return
        err = p.handle.exception()
        if err is None or p.handle.take_unobserved_error() is None:
            return
        current = sys.exc_info()[1]
        if current is not None and current is not p.context:
            log.error("checkpoint save to %s failed while training was failing: %s: %s",
                      p.handle.path, type(err).__name__, err, exc_info=err)
            add_note = getattr(current, "add_note", None)
            if add_note is not None:
                add_note(f"ckptstore: the checkpoint save to {p.handle.path} failed too: "
                         f"{type(err).__name__}: {err}")
            return
        raise err

    # -- beyond CheckpointIO ----------------------------------------------------
    def wait(self) -> None:
        """Block until the save in flight (if any) has committed; raise its error,
        with its own type, unless it was raised before. Use it after a
        ``trainer.save_checkpoint`` made outside ``fit``/``validate``/``test``."""
        with self._lock:
            p, self._pending = self._pending, None
        if p is not None:
            _finish(p.handle)

    def pending(self) -> SaveHandle | None:
        """The :class:`ckptstore.SaveHandle` of the last save nobody has waited for
        yet (it may have committed since), or None."""
        p = self._pending
        return None if p is None else p.handle

    def wait_for(self, path: Any) -> None:
        """Wait for (and raise the error of) the save in flight if it writes ``path``."""
        with self._lock:
            p = self._pending
            if p is None or p.key != _key(path):
                return
            self._pending = None
        _finish(p.handle)


_LIVE: "weakref.WeakSet[CkptstoreCheckpointIO]" = weakref.WeakSet()


def _finish(handle: SaveHandle) -> None:
    """Wait for ``handle``; raise its error if nobody has seen it yet."""
    err = handle.exception()
    if err is not None and handle.take_unobserved_error() is not None:
        raise err


def _check_options(opts: dict[str, Any]) -> dict[str, Any]:
    bad = sorted(_RESERVED & set(opts))
    if bad:
        raise ValueError(f"CkptstoreCheckpointIO sets {', '.join(bad)} itself; remove "
                         f"{'it' if len(bad) == 1 else 'them'} from the save options (fsspec "
                         "options go to CkptstoreCheckpointIO(storage_options=...))")
    return dict(opts)


def _metadata(checkpoint: dict[str, Any]) -> dict[str, Any]:
    """Epoch and step in the manifest (``ckptstore ls``/``info`` show them)."""
    out: dict[str, Any] = {"framework": "lightning"}
    for k in ("epoch", "global_step"):
        v = checkpoint.get(k)
        if isinstance(v, int) and not isinstance(v, bool):
            out[k] = v
    return out


def _fspath(path: Any) -> str:
    return os.fspath(path) if isinstance(path, os.PathLike) else str(path)


def _is_local(path: str) -> bool:
    return "://" not in path or path.startswith("file://")


def _key(path: Any) -> str:
    """One spelling per location: resolved local paths (a ``save_last="link"`` link
    names its target), URLs without a trailing '/'."""
    s = _fspath(path)
    if _is_local(s):
        return os.path.realpath(s.removeprefix("file://"))
    return s.rstrip("/")


def is_ckptstore_checkpoint(path: Any, storage_options: dict[str, Any] | None = None) -> bool:
    """True if ``path`` (local path or fsspec URL) is a directory holding a ckptstore
    manifest. File objects, ``http(s)://`` URLs and unreachable stores are not."""
    if not isinstance(path, (str, os.PathLike)):
        return False
    s = _fspath(path)
    if _is_local(s):
        return os.path.isfile(os.path.join(s.removeprefix("file://"), MANIFEST_NAME))
    if s.startswith(("http://", "https://")):
        return False
    try:
        return open_storage(s, storage_options).exists(MANIFEST_NAME)
    except (OSError, ValueError, ImportError):  # not ours to report: the caller's loader will
        return False


def load_checkpoint(path: Any, map_location: Any = None, *, verify: bool = True,
                    storage_options: dict[str, Any] | None = None) -> Any:
    """Load a ckptstore checkpoint as Lightning would load a ``.ckpt`` file: tensors on
    CPU, moved where ``map_location`` says (see :func:`place`). No pickle."""
    state = load(_fspath(path), verify=verify, storage_options=storage_options or None, mmap=False)
    return place(state, map_location)


def place(state: Any, map_location: Any) -> Any:
    """Move the (CPU) tensors of ``state`` as ``torch.load(map_location=...)`` would move
    tensors saved on CPU: a device or device string; a dict (its ``"cpu"`` entry);
    a callable ``(storage, location)`` (called once with an empty CPU storage and
    ``"cpu"``; None or a CPU storage keeps them on CPU)."""
    target = _target_device(map_location)
    if target is None or target.type == "cpu":
        return state
    return apply_to_collection(state, torch.Tensor, lambda t: t.to(target))


def _target_device(map_location: Any) -> torch.device | None:
    if map_location is None:
        return None
    if isinstance(map_location, (str, torch.device)):
        return torch.device(map_location)
    if isinstance(map_location, dict):
        to = map_location.get("cpu")
        return None if to is None else torch.device(to)
    if callable(map_location):
        out = map_location(torch.UntypedStorage(0), "cpu")
        return None if out is None else torch.device(out.device)
    raise TypeError(f"map_location must be a device, a string, a dict or a callable, not "
                    f"{type(map_location).__name__}")


def remove(path: Any, storage_options: dict[str, Any] | None = None) -> None:
    """Remove what is at ``path``: a symlink (``save_last="link"``) itself, never its
    target; a ckptstore checkpoint manifest first; anything else as Lightning does."""
    s = _fspath(path)
    if _is_local(s) and os.path.islink(s.removeprefix("file://")):
        os.remove(s.removeprefix("file://"))
        return
    if is_ckptstore_checkpoint(s, storage_options):
        storage = open_storage(s, storage_options)
        root, name = storage.parent(), storage.url.rstrip("/").rsplit("/", 1)[-1]
        uncommit(root, name)
        remove_unreferenced(root, name, set())
        return
    fs = get_filesystem(s, **(storage_options or {}))
    if fs.exists(s):
        fs.rm(s, recursive=True)
        log.debug("removed %s", s)


# -- LightningModule.load_from_checkpoint -----------------------------------------
_MARK = "__ckptstore_original__"


def _settle(path: Any) -> None:
    for io in list(_LIVE):
        io.wait_for(path)


def install_loader() -> None:
    """Make ``load_from_checkpoint`` read ckptstore checkpoints (idempotent; done on
    import). Other paths reach Lightning's own loader with the same arguments."""
    import lightning.pytorch.core.saving as saving

    original = saving.pl_load
    if getattr(original, _MARK, None) is not None:
        return

    @functools.wraps(original)
    def pl_load(path_or_url: Any, map_location: Any = None, weights_only: bool | None = None) -> Any:
        if isinstance(path_or_url, (str, os.PathLike)):
            _settle(path_or_url)  # a first save of this path commits its manifest only now
            if is_ckptstore_checkpoint(path_or_url):
                return load_checkpoint(path_or_url, map_location)  # no pickle: weights_only is moot
        return original(path_or_url, map_location=map_location, weights_only=weights_only)

    setattr(pl_load, _MARK, original)
    saving.pl_load = pl_load


def uninstall_loader() -> None:
    """Put Lightning's own loader back."""
    import lightning.pytorch.core.saving as saving

    original: Callable[..., Any] | None = getattr(saving.pl_load, _MARK, None)
    if original is not None:
        saving.pl_load = original


install_loader()
