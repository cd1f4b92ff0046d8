"""Lazy and partial reads: ``ckptstore.open(path)`` and ``load(path, keys=...)``.

Opening reads only the manifest. The state tree is rebuilt with a placeholder per
array leaf, which gives every leaf its '.'-joined name (aliases included) without
touching tensor data; a tensor's chunks are read and verified when it is asked for.
"""
from __future__ import annotations

import difflib
import os
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, Union

from ckptstore import manifest as fmt
from ckptstore.errors import CorruptCheckpointError, KeyNotFoundError
from ckptstore.manifest.io import read_catalog
from ckptstore.plan.keymap import RenameSpec, rename_names
from ckptstore.plan.stateful import holds_stateful
from ckptstore.plan.tree import path_name, unflatten
from ckptstore.read.boxes import read_boxes
from ckptstore.read.into import apply_into, leaves_of, rename_tree
from ckptstore.read.reader import read_tensors
from ckptstore.storage import Storage, open_storage

KeySpec = Union[str, Iterable[str], Callable[[str], bool], None]


@dataclass(frozen=True, slots=True)
class TensorInfo:
    """Metadata of one array leaf, known without reading its data."""

    name: str
    kind: str  #: "torch" or "numpy"
    dtype: str
    shape: tuple[int, ...]
    nbytes: int
    digest: str  #: content hash (xxh3-128 over the chunk hashes; depends on chunk_size)
    index: int  #: position in the manifest's tensor table


@dataclass(frozen=True, slots=True)
class _Ref:
    """Placeholder for array leaf ``index`` while the tree has no data yet."""

    kind: str
    index: int


def key_filter(keys: KeySpec) -> Callable[[str], bool] | None:
    """``keys`` as a predicate: exact names, or prefixes ending in '.'; a single
    string is one name or prefix; a callable is used as is; None selects all."""
    if keys is None:
        return None
    if callable(keys):
        return keys
    items = [keys] if isinstance(keys, str) else list(keys)
    for k in items:
        if not isinstance(k, str):
            raise TypeError(f"keys must be names or prefixes (str), got {k!r}")
    exact = set(items)
    prefixes = tuple(k if k.endswith(".") else k + "." for k in items)
    return lambda name: name in exact or name.startswith(prefixes)


def check_keys(keys: KeySpec, names: Iterable[str], url: str) -> None:
    """Raise :class:`KeyNotFoundError` naming every name or prefix in ``keys`` that
    matches none of ``names`` (close names are suggested); a predicate must match one."""
    if keys is None:
        return
    names = list(names)
    if callable(keys):
        if not any(keys(n) for n in names):
            raise KeyNotFoundError(f"the keys predicate selected nothing in {url} ({len(names)} names)")
        return
    items = [keys] if isinstance(keys, str) else list(keys)
    missing = [k for k in items if isinstance(k, str) and k not in names
               and not any(n.startswith(k if k.endswith(".") else k + ".") for n in names)]
    if not missing:
        return
    parts = []
    for k in missing:
        close = difflib.get_close_matches(k, names, n=3, cutoff=0.6)
        parts.append(repr(k) + (f" (did you mean {', '.join(map(repr, close))}?)" if close else ""))
    raise KeyNotFoundError(
        f"{'key' if len(missing) == 1 else 'keys'} {', '.join(parts)} not found in {url}: a key is "
        "a '.'-joined name or a prefix of names; `ckptstore inspect PATH` lists them",
        tuple(missing))


def node_names(tree: Any, path: tuple = ()) -> Iterator[str]:
    """The '.'-joined name of every node of ``tree`` below its root (containers too)."""
    items: Iterable[tuple[Any, Any]] = ()
    if isinstance(tree, dict):
        items = tree.items()
    elif isinstance(tree, (list, tuple)):
        items = enumerate(tree)
    for k, v in items:
        yield path_name(path + (k,))
        yield from node_names(v, path + (k,))


class LazyCheckpoint(Mapping):
    """Read-only mapping name -> tensor (or numpy array) of a committed checkpoint.

    Iterating and ``info(name)`` use only the manifest; ``ckpt[name]`` reads and
    verifies that one tensor's chunks. Non-array values are in :meth:`tree`.
    """

    def __init__(self, storage: Storage, manifest: fmt.Manifest, *, verify: bool = True,
                 mmap: bool | None = None) -> None:
        self.storage = storage
        self.manifest = manifest
        self.verify = verify
        self.mmap = mmap
        self._skeleton = unflatten(manifest.tree, self._ref)
        self._names: dict[str, int] = {}
        for name, (value, _p, _k) in leaves_of(self._skeleton).items():
            if isinstance(value, _Ref):
                self._names[name] = value.index

    def _ref(self, kind: str, i: Any) -> _Ref:
        if not isinstance(i, int) or isinstance(i, bool) or not 0 <= i < len(self.manifest.tensors):
            raise CorruptCheckpointError(f"state tree refers to tensor {i!r}, which does not exist")
        want = "torch" if kind == "tensor" else "numpy"
        if self.manifest.tensors[i].kind != want:
            raise CorruptCheckpointError(f"state tree expects a {want} array for tensor {i}")
        return _Ref(kind, i)

    # -- Mapping --------------------------------------------------------------
    def _index(self, name: str) -> int:
        if name in self._names:
            return self._names[name]
        if isinstance(name, str) and name in set(node_names(self._skeleton)):
            raise KeyNotFoundError(f"{name!r} in {self.storage.url} is not an array: read other "
                                   f"values with .tree(keys={name!r})", (name,))
        check_keys([name], node_names(self._skeleton), self.storage.url)
        raise KeyNotFoundError(f"{name!r} is not in {self.storage.url}", (name,))  # a non-str name

    def __getitem__(self, name: str) -> Any:
        i = self._index(name)
        return self._arrays({i})[i]

    def _resolved(self, wanted: set[int]) -> fmt.Manifest:
        """The manifest with the ``wanted`` tensors' chunks known: a distributed save's
        rank indexes holding them are read now (once)."""
        self.manifest = fmt.resolve(self.storage, self.manifest, dict.fromkeys(wanted))
        return self.manifest

    def _arrays(self, wanted: set[int]) -> dict[int, Any]:
        """The ``wanted`` arrays, read and verified: a tensor saved sharded by several
        ranks is assembled from its shards, the others read as stored."""
        m = self._resolved(wanted)
        sharded = sorted(i for i in wanted if m.tensors[i].shards)
        out = dict(zip(sharded, read_boxes(
            self.storage, m, [(i, (0,) * len(m.tensors[i].shape), m.tensors[i].shape)
                              for i in sharded], verify=self.verify)))
        rest = wanted - set(sharded)
        if rest:
            out.update(read_tensors(self.storage, m, verify=self.verify, mmap=self.mmap,
                                    select=_indices(m, rest)))
        return out

    def __contains__(self, name: object) -> bool:  # fast: no suggestions for a miss
        return name in self._names

    def get(self, name: str, default: Any = None) -> Any:
        return self[name] if name in self._names else default

    def __iter__(self) -> Iterator[str]:
        return iter(self._names)

    def __len__(self) -> int:
        return len(self._names)

    def __repr__(self) -> str:
        return f"<ckptstore.LazyCheckpoint {self.storage.url} ({len(self)} arrays)>"

    # -- metadata ---------------------------------------------------------------
    def info(self, name: str) -> TensorInfo:
        """Metadata of the array called ``name`` (no data is read; of a distributed
        save, the rank indexes holding it are, for its digest)."""
        i = self._index(name)
        r = self.manifest.tensors[i]
        if not r.resolved:
            r = self._resolved({i}).tensors[i]
        return TensorInfo(name, r.kind, r.dtype, tuple(r.shape), r.nbytes, r.digest, i)

    def infos(self) -> dict[str, TensorInfo]:
        return {n: self.info(n) for n in self._names}

    @property
    def metadata(self) -> Any:
        """The user metadata given to ``save(metadata=...)``."""
        return self.manifest.metadata

    def values_skeleton(self) -> dict[str, Any]:
        """Every leaf by name: arrays as :class:`TensorInfo`, other values as they are."""
        out = {}
        for name, (value, _p, _k) in leaves_of(self._skeleton).items():
            out[name] = self.info(name) if isinstance(value, _Ref) else value
        return out

    # -- reads ----------------------------------------------------------------
    def tree(self, keys: KeySpec = None) -> Any:
        """The state tree; with ``keys``, only the selected leaves (and the containers
        that lead to them; unselected positions of a kept list or tuple hold None),
        reading only their chunks."""
        keys = _once(keys)
        check_keys(keys, node_names(self._skeleton), self.storage.url)
        pick = key_filter(keys)
        full = self._read(pick)
        return full if pick is None else _prune(full, (), pick)

    def flat(self, keys: KeySpec = None) -> dict[str, Any]:
        """The selected leaves (all by default) as ``{name: value}``, arrays read."""
        keys = _once(keys)
        check_keys(keys, node_names(self._skeleton), self.storage.url)
        pick = key_filter(keys)
        return {name: value for name, (value, _p, _k) in leaves_of(self._read(pick)).items()
                if not isinstance(value, _Ref) and (pick is None or pick(name))}

    def _read(self, pick: Callable[[str], bool] | None) -> Any:
        """The tree with the picked arrays read and the others left as placeholders."""
        wanted = {i for n, i in self._names.items() if pick is None or pick(n)}
        arrays = self._arrays(wanted)
        return unflatten(self.manifest.tree,
                         lambda kind, i: arrays[i] if i in arrays else self._ref(kind, i))


def partial_load(storage: Storage, manifest: fmt.Manifest, *, into: Any = None,
                 strict: bool = True, verify: bool = True, cast: bool = False,
                 rename: RenameSpec = None, keys: KeySpec = None, mmap: bool | None = None) -> Any:
    """``load(path, rename=..., keys=...)``: see :func:`ckptstore.load`.

    With ``into`` and ``keys``, the target keys taken into account are those the
    selection reaches (the renamed selected names) and those that match ``keys``
    themselves; other target keys are left alone and not reported missing.
    """
    ckpt = LazyCheckpoint(storage, manifest, verify=verify, mmap=mmap)
    if into is None:
        state = ckpt.tree(keys)
        return state if rename is None else rename_tree(state, rename)[0]
    keys = _once(keys)
    flat = ckpt.flat(keys)  # '.'-joined names are the same flat or nested
    target_filter: Callable[[str], bool] | None = None
    pick = key_filter(keys)
    if pick is not None:
        reached = set(rename_names(flat, rename)[0].values())
        # a Stateful object of the target is reached when a name inside it is
        inside = {".".join(n.split(".")[:i]) for n in reached for i in range(1, n.count(".") + 1)}
        target_filter = lambda name: name in reached or name in inside or pick(name)  # noqa: E731
    # Stateful objects take their part as a tree: int keys (an optimizer's) stay ints
    state = ckpt.tree(keys) if holds_stateful(into) else flat
    return apply_into(state, into, strict=strict, cast=cast, rename=rename,
                      target_filter=target_filter)


def _once(keys: KeySpec) -> KeySpec:
    """``keys`` that can be iterated more than once (a generator becomes a list)."""
    if keys is None or callable(keys) or isinstance(keys, str):
        return keys
    return list(keys)


def _indices(manifest: fmt.Manifest, wanted: set[int]) -> Callable[[fmt.TensorRecord], bool]:
    """read_tensors selects by record: match the manifest's own record objects."""
    ids = {id(manifest.tensors[i]) for i in wanted}
    return lambda rec: id(rec) in ids


_DROP = object()


def _prune(node: Any, path: tuple, pick: Callable[[str], bool]) -> Any:
    if isinstance(node, dict):
        out = type(node)()
        for k, v in node.items():
            sub = _prune(v, path + (k,), pick)
            if sub is not _DROP:
                out[k] = sub
        return out if out or pick(path_name(path)) else _DROP
    if isinstance(node, (list, tuple)):
        # positions matter in sequences: unselected entries of a kept one become None
        subs = [_prune(v, path + (i,), pick) for i, v in enumerate(node)]
        if all(s is _DROP for s in subs):
            return _DROP
        items = [None if s is _DROP else s for s in subs]
        return items if isinstance(node, list) else tuple(items)
    if isinstance(node, _Ref):
        return _DROP  # an array that was not selected (and so not read)
    return node if pick(path_name(path)) else _DROP


def open(path: "str | os.PathLike | Storage", *, verify: bool = True,  # noqa: A001
         storage_options: dict | None = None) -> LazyCheckpoint:
    """Open a committed checkpoint lazily: only the manifest is read now (of a
    distributed save, each rank index when a tensor it holds is first read).

    >>> ckpt = ckptstore.open("runs/step-1000")       # doctest: +SKIP
    >>> ckpt.info("model.lm_head.weight").shape       # doctest: +SKIP
    >>> w = ckpt["model.lm_head.weight"]              # reads just this tensor
    """
    storage = open_storage(path, storage_options)
    return LazyCheckpoint(storage, read_catalog(storage), verify=verify)


__all__ = ["open", "LazyCheckpoint", "TensorInfo", "check_keys", "key_filter", "node_names"]
