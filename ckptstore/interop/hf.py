"""Export a checkpoint as a Hugging Face model folder that ``from_pretrained`` loads.

The metadata convention: a checkpoint whose ``save(metadata=...)`` holds
``{"hf_config": config.to_dict(), "hf_generation_config": ...}`` (see
:func:`hf_metadata`) exports with its ``config.json`` (and ``generation_config.json``);
:func:`ckptstore.interop.convert.import_checkpoint` of a Hugging Face folder stores
its configs the same way, so exporting it back gives an equivalent folder.

The folder holds ``model.safetensors``, or shards and ``model.safetensors.index.json``
when the weights exceed ``max_shard_size`` (split by ``huggingface_hub``). Tied
weights (one tensor under several names in the checkpoint) are written once under
the name the model class keeps; ``from_pretrained`` re-ties the others. Shards are
read from the checkpoint one at a time. The folder appears whole or not at all: it
is written to a temporary sibling and renamed (object stores: every file is written
atomically and config.json, which ``from_pretrained`` reads first, last).
"""
from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from ckptstore.commit.atomic import atomic_write, temp_name
from ckptstore.errors import CheckpointExistsError, UnsupportedTypeError
from ckptstore.interop.select import Entry, InteropUsageError, dedupe_aliases, select, split_parent
from ckptstore.read.lazy import KeySpec, open as open_lazy
from ckptstore.storage import Storage, open_storage

log = logging.getLogger(__name__)

CONFIG_KEY = "hf_config"  #: metadata key of config.json's content
GENERATION_KEY = "hf_generation_config"  #: metadata key of generation_config.json's content
CONFIG_NAME = "config.json"
GENERATION_NAME = "generation_config.json"
SINGLE_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"


def hf_metadata(model_or_config: Any, generation_config: Any = None) -> dict:
    """Checkpoint metadata that lets ``export_hf`` write config.json (and
    generation_config.json): ``save(state, path, metadata=hf_metadata(model))``.

    Takes a ``PreTrainedModel`` (its ``config`` and, when it can generate, its
    ``generation_config``) or a ``PretrainedConfig``. Merge it with your own
    metadata: ``metadata={**hf_metadata(model), "step": step}``.
    """
    config = getattr(model_or_config, "config", model_or_config)
    if generation_config is None and hasattr(model_or_config, "config"):
        can = getattr(model_or_config, "can_generate", None)
        if callable(can) and can():
            generation_config = getattr(model_or_config, "generation_config", None)
    out = {CONFIG_KEY: _as_json(config)}
    if config is not model_or_config and not out[CONFIG_KEY].get("architectures"):
        # what save_pretrained records: from_pretrained and the tied-weights lookup use it
        out[CONFIG_KEY]["architectures"] = [type(model_or_config).__name__]
    if generation_config is not None:
        out[GENERATION_KEY] = _as_json(generation_config)
    return out


def _as_json(cfg: Any) -> dict:
    if isinstance(cfg, dict):
        return json.loads(json.dumps(cfg))
    return json.loads(cfg.to_json_string(use_diff=False))  # what save_pretrained writes


@dataclass(frozen=True, slots=True)
class HFExport:
    """What :func:`export_hf` wrote."""

    out: str
    files: tuple[str, ...]  #: weight files, in order
    tensors: tuple[str, ...]  #: written names
    tied: tuple[tuple[str, str], ...]  #: (name not written, name it is tied to)
    selection: str  #: which tensors were chosen and why
    config_from: str  #: "--config", "metadata" or "none"
    nbytes: int

    def to_json(self) -> dict:
        return {"out": self.out, "format": "hf", "files": list(self.files),
                "tensors": list(self.tensors), "bytes": self.nbytes,
                "tied": {a: b for a, b in self.tied}, "selection": self.selection,
                "config_from": self.config_from}


def export_hf(path: "str | os.PathLike", out: "str | os.PathLike", *, keys: KeySpec = None,
              strip_prefix: str | None = None, config: "str | os.PathLike | dict | None" = None,
              max_shard_size: int | str = "5GB", overwrite: bool = False, verify: bool = True,
              storage_options: dict | None = None,
              progress: Callable[[int], None] | None = None) -> HFExport:
    """Write checkpoint ``path`` as a Hugging Face model folder ``out``.

    ``keys``/``strip_prefix`` select the model's tensors by name (``"model."``);
    without them the model's subtree is chosen from the tree (see
    :mod:`ckptstore.interop.select`). ``config`` (a config.json path or dict)
    overrides the config kept in the checkpoint's metadata (:func:`hf_metadata`).
    ``progress(nbytes)`` is called as tensors are written.
    """
    from huggingface_hub import split_torch_state_dict_into_shards

    ckpt = open_lazy(path, verify=verify, storage_options=storage_options)
    cfg, config_from = _config(config, ckpt.metadata, ckpt.storage.url)
    gen = ckpt.metadata.get(GENERATION_KEY) if isinstance(ckpt.metadata, dict) else None
    sel = select(ckpt, keys=keys, strip_prefix=strip_prefix, auto=True)
    log.info("%s", sel.note)
    keep, copies, tied = dedupe_aliases(sel.entries, _tied_targets(cfg))
    entries = {e.out: e for e in keep + copies}
    if len(entries) != len(keep) + len(copies):
        raise InteropUsageError("two tensors would be written under one name; use --keys and "
                                "--strip-prefix to select one model")
    metas = {name: torch.empty(ckpt.info(e.name).shape, dtype=_dtype(ckpt.info(e.name).dtype),
                               device="meta") for name, e in entries.items()}
    try:
        split = split_torch_state_dict_into_shards(metas, max_shard_size=max_shard_size)
    except ValueError as e:
        raise InteropUsageError(f"--max-shard-size {max_shard_size!r}: {e}") from None

    files: list[tuple[str, bytes | Callable[[], bytes]]] = []
    for fname, names in split.filename_to_tensors.items():
        files.append((fname, _shard_writer(ckpt, [entries[n] for n in names], progress)))
    if split.is_sharded:
        index = {"metadata": {**split.metadata, "total_parameters": _params(metas)},
                 "weight_map": dict(sorted(split.tensor_to_filename.items()))}
        files.append((INDEX_NAME, _json_bytes(index)))
    if isinstance(gen, dict):
        files.append((GENERATION_NAME, _json_bytes(gen)))
    if cfg is not None:
        files.append((CONFIG_NAME, _json_bytes(cfg)))
    write_folder(os.fspath(out), files, overwrite=overwrite, storage_options=storage_options)
    return HFExport(os.fspath(out), tuple(split.filename_to_tensors), tuple(entries),
                    tuple(sorted(tied.items())), sel.note, config_from,
                    sum(ckpt.info(e.name).nbytes for e in entries.values()))


def _config(config: Any, metadata: Any, url: str) -> tuple[dict | None, str]:
    if config is not None:
        if isinstance(config, dict):
            return config, "--config"
        try:
            with open(os.fspath(config), encoding="utf-8") as f:
                data = json.load(f)
        except (OSError, ValueError) as e:
            raise InteropUsageError(f"--config {config}: cannot read a JSON config: {e}") from None
        if not isinstance(data, dict):
            raise InteropUsageError(f"--config {config} does not hold a JSON object")
        return data, "--config"
    if isinstance(metadata, dict) and isinstance(metadata.get(CONFIG_KEY), dict):
        return metadata[CONFIG_KEY], "metadata"
    raise InteropUsageError(
        f"{url} keeps no Hugging Face config in its metadata (key {CONFIG_KEY!r}); pass "
        "--config config.json, or save with metadata=ckptstore.interop.hf.hf_metadata(model)")


def _tied_targets(cfg: dict | None) -> set[str] | None:
    """The parameter names the model class re-ties on load (its ``{target: source}``
    tied-weights mapping), from an instance built on the meta device; None when
    transformers or the class is not available."""
    if cfg is None or not cfg.get("architectures") or "model_type" not in cfg:
        return None
    archs = cfg["architectures"]
    try:
        import transformers

        cls = getattr(transformers, str(archs[0]), None)
        if cls is None:
            return None
        conf = transformers.AutoConfig.for_model(**cfg)
        with torch.device("meta"):
            model = cls(conf)
        mapping = getattr(model, "all_tied_weights_keys", None)
        return set(mapping) if isinstance(mapping, dict) else None
    except Exception as e:  # any model code may fail; fall back to tree order
        log.debug("could not ask %s for its tied weights: %s", archs[0], e)
        return None


def _dtype(name: str) -> torch.dtype:
    dt = getattr(torch, name.removeprefix("torch."), None)
    if not isinstance(dt, torch.dtype):
        raise UnsupportedTypeError(f"dtype {name} is not a torch dtype")
    return dt


def _params(metas: dict[str, torch.Tensor]) -> int:
    return sum(t.numel() for t in metas.values())


def _json_bytes(obj: Any) -> bytes:
    return (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode()


def _shard_writer(ckpt: Any, entries: list[Entry],
                  progress: Callable[[int], None] | None) -> Callable[[], bytes]:
    """Reads this shard's tensors (only these) when the file is written."""
    def make() -> bytes:
        from safetensors.torch import save as st_save

        flat = ckpt.flat({e.name for e in entries}.__contains__)
        tensors: dict[str, torch.Tensor] = {}
        for e in entries:
            t = flat[e.name]
            tensors[e.out] = t.clone() if any(t is v for v in tensors.values()) else t
        try:
            data = st_save(tensors, metadata={"format": "pt"})
        except (TypeError, ValueError, KeyError) as err:
            raise UnsupportedTypeError(f"safetensors cannot store these tensors: {err}") from None
        if progress is not None:
            progress(sum(e.nbytes for e in entries))
        return data
    return make


def write_folder(out: str, files: list[tuple[str, bytes | Callable[[], bytes]]], *,
                 overwrite: bool = False, storage_options: dict | None = None) -> None:
    """Write ``files`` (name, bytes or a function making them) as the folder ``out``,
    all or nothing: into a temporary sibling that is renamed to ``out`` at the end."""
    parent_url, name = split_parent(out)
    parent = open_storage(parent_url, storage_options)
    parent.makedirs()
    if parent.exists(name) and (not parent.isdir(name) or parent.listdir(name)) and not overwrite:
        raise CheckpointExistsError(f"{out} already exists; pass overwrite=True (--overwrite) "
                                    "or choose a new folder")
    if not parent.capabilities.rename:
        _write_in_place(parent.child(name), files)
        return
    tmp = temp_name(name)
    try:
        folder = parent.child(tmp)
        folder.makedirs()
        for fname, data in files:
            atomic_write(folder, fname, [data() if callable(data) else data])
        old = None
        if parent.exists(name):
            old = temp_name(name)
            parent.rename(name, old)
        parent.rename(tmp, name)
        parent.fsync_dir()
    except BaseException:
        _remove(parent, tmp)
        raise
    if old is not None:
        _remove(parent, old)


def _write_in_place(folder: Storage, files: list[tuple[str, bytes | Callable[[], bytes]]]) -> None:
    """Object stores: each object appears whole; config.json (listed last) is
    written last, so an interrupted export has no config and does not load."""
    folder.makedirs()
    for fname, data in files:
        atomic_write(folder, fname, [data() if callable(data) else data])
    new = {fname for fname, _ in files}
    for stale in folder.listdir():  # weights of an overwritten export that are not ours
        if stale not in new and (stale.endswith(".safetensors") or stale == INDEX_NAME):
            folder.remove(stale)


def _remove(parent: Storage, name: str) -> None:
    try:
        if parent.isdir(name):
            parent.rmtree(name)
    except OSError as e:  # cleanup must not hide the first error
        log.warning("could not remove %s: %s", name, e)


__all__ = ["CONFIG_KEY", "GENERATION_KEY", "HFExport", "export_hf", "hf_metadata", "write_folder"]
