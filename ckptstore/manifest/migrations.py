"""Schema migrations: upgrade an older manifest, as its raw JSON object, step by step.

``manifest.decode`` calls :func:`migrate` for a manifest whose ``schema_version`` is
older than ``manifest.SCHEMA_VERSION``. Each registered step turns a version-N object
into a version-N+1 object (and sets ``schema_version`` to N+1); the steps run in
order until the object has the library's version, and only then is it parsed into
records. A step works on plain JSON (dicts, lists, strings, numbers) and must not
read files: the manifest's checksum was checked on the original bytes.

Adding a schema version (see docs/compat.md):

1. bump ``SCHEMA_VERSION`` in ``ckptstore/manifest/records.py`` and change the writer;
2. register the step from the previous version here::

       @register(1)
       def _v1_to_v2(obj: dict) -> dict:
           ...
           return obj

3. add a golden checkpoint and a schema description for the new version under
   ``tests/golden/`` (``python tests/golden/make_golden.py``).

Version 2 added rank indexes (``indexes``, and tensors listed by ``grid``): a
version-1 manifest is a version-2 manifest without them.
"""
from __future__ import annotations

import copy
import logging
from collections.abc import Callable

from ckptstore.errors import SchemaVersionError
from ckptstore.manifest import records

log = logging.getLogger(__name__)

Migration = Callable[[dict], dict]

#: from-version -> function that upgrades a manifest object of that version by one
MIGRATIONS: dict[int, Migration] = {}


def register(from_version: int, registry: dict[int, Migration] | None = None
             ) -> Callable[[Migration], Migration]:
    """Decorator: register ``fn`` as the ``from_version -> from_version + 1`` step."""
    table = MIGRATIONS if registry is None else registry

    def deco(fn: Migration) -> Migration:
        if from_version in table:
            raise ValueError(f"a migration from schema version {from_version} is already "
                             f"registered ({table[from_version].__name__})")
        table[from_version] = fn
        return fn

    return deco


def migrate(obj: dict, *, target: int | None = None,
            registry: dict[int, Migration] | None = None) -> dict:
    """Upgrade manifest object ``obj`` to schema version ``target`` (default: the
    library's ``manifest.SCHEMA_VERSION``). The input is not modified."""
    table = MIGRATIONS if registry is None else registry
    target = records.SCHEMA_VERSION if target is None else target
    version = obj.get("schema_version")
    if not isinstance(version, int) or isinstance(version, bool):
        raise SchemaVersionError(f"manifest schema_version {version!r} is not an integer")
    if version > target:
        raise SchemaVersionError(f"cannot migrate schema version {version} down to {target}")
    out = copy.deepcopy(obj) if version < target else obj
    while version < target:
        step = table.get(version)
        if step is None:
            raise SchemaVersionError(
                f"checkpoint uses schema version {version} and this ckptstore has no "
                f"migration from it to version {version + 1}; load it with the ckptstore "
                "release that wrote it and save it again")
        out = step(out)
        if not isinstance(out, dict) or out.get("schema_version") != version + 1:
            raise SchemaVersionError(
                f"migration {getattr(step, '__name__', step)!r} from schema version {version} "
                f"did not produce a version {version + 1} manifest")
        log.debug("migrated manifest from schema version %d to %d", version, version + 1)
        version += 1
    return out


@register(1)
def _v1_to_v2(obj: dict) -> dict:
    """Version 2 lists a distributed save's chunks in rank indexes; a version-1
    manifest holds every chunk itself, so it has none."""
    obj["schema_version"] = 2
    obj.setdefault("indexes", [])
    return obj


__all__ = ["MIGRATIONS", "Migration", "migrate", "register"]
