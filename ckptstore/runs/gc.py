"""``gc``: remove what ckptstore creates and a crash can leave behind in a run.

Only once it is older than a grace period: temp files (``.tmp-*``), data files of
step directories that never committed (files still referenced by a committed step
stay), and incomplete multipart uploads below the prefix on a store that has them.
Committed checkpoints are never touched, nor files whose names ckptstore does not
write.
"""
from __future__ import annotations

import logging
import re
import time

from ckptstore import manifest as fmt
from ckptstore.commit.atomic import is_temp_name
from ckptstore.runs.layout import parse_step
from ckptstore.runs.listing import age_of
from ckptstore.runs.retention import referenced_files
from ckptstore.storage import Storage
from ckptstore.storage.capabilities import MultipartGC

log = logging.getLogger("ckptstore.gc")

#: names of files a save writes into a checkpoint directory:
#: shard-NNNNN-<save id>[-r<rank>].<format> (single-process, distributed, DCP) and temp files
DATA_RE = re.compile(r"^(shard-\d{5}-[0-9a-f]+(-r\d+)?\.(chunks|safetensors)|\.tmp-.*)$")
DEFAULT_GRACE = 3600.0


def gc(root: Storage, *, grace: float = DEFAULT_GRACE, dry_run: bool = False) -> list[str]:
    """Remove leftovers below run directory ``root`` older than ``grace`` seconds:
    temp files, shards that no committed manifest of the run names (in uncommitted
    step directories and in committed ones), incomplete uploads. ``root`` may also be
    a plain checkpoint directory: then only its temp files go (checkpoints next to it
    may read its shards). Returns what was (or, with ``dry_run``, would be) removed."""
    now = time.time()
    if root.exists(fmt.MANIFEST_NAME):  # a plain checkpoint, not a run: its temp files
        return _gc_temp(root, now, grace, dry_run) + _gc_multipart(root, now, grace, dry_run)
    manifests: dict[str, fmt.Manifest] = {}
    dirs = [e for e in root.listdir() if parse_step(e) is not None]
    for e in dirs:
        try:
            manifests[e] = fmt.read_manifest(root.child(e))
        except FileNotFoundError:
            continue
        except (OSError, ValueError):
            manifests[e] = None  # type: ignore[assignment]  # damaged: leave it alone
    refs = referenced_files(root, {k: v for k, v in manifests.items() if v is not None})
    # a manifest this version cannot read (damaged, or written by a newer ckptstore)
    # may reference files anywhere in the run: then only temp files go
    unknown = sorted(k for k, v in manifests.items() if v is None)
    if unknown:
        log.warning("gc of %s keeps every data file: the manifests of %s cannot be read "
                    "here (damaged or newer), so what they reference is unknown",
                    root.url, ", ".join(unknown))
    removed: list[str] = []
    for e in dirs:
        d = root.child(e)
        committed = e in manifests
        # in a committed step too: a shard its manifest does not name is left over
        # (e.g. two saves overwrote the same path); grace spares a save in progress
        removed += _remove_old(d, [f for f in d.listdir() if DATA_RE.match(f) and (e, f) not in refs
                                   and (is_temp_name(f) or not unknown)], now, grace, dry_run)
        if not committed and not dry_run and not d.listdir():
            # a save may just have made this directory and not written yet: only an
            # empty directory older than the grace period goes
            age = age_of(root, e, time.time()) if grace > 0 else 0.0
            if age is not None and age >= grace:
                root.rmtree(e)
    removed += _gc_multipart(root, now, grace, dry_run)
    return removed


def _gc_temp(d: Storage, now: float, grace: float, dry_run: bool) -> list[str]:
    """Temp files older than ``grace`` directly in ``d``."""
    return _remove_old(d, [f for f in d.listdir() if is_temp_name(f)], now, grace, dry_run)


def _remove_old(d: Storage, names: list[str], now: float, grace: float,
                dry_run: bool) -> list[str]:
    """Remove those of ``names`` in ``d`` older than ``grace`` seconds; their URLs."""
    out = []
    for f in names:
        age = age_of(d, f, now)
        if age is None or age < grace:
            continue
        out.append(f"{d.url}/{f}")
        if not dry_run:
            d.remove(f)
    return out


def _gc_multipart(root: Storage, now: float, grace: float, dry_run: bool) -> list[str]:
    """Abort incomplete (S3 multipart) uploads below ``root`` older than ``grace``."""
    if not isinstance(root, MultipartGC):
        return []
    out = []
    for up in root.incomplete_uploads():
        if up.started is not None and now - up.started < grace:
            continue
        out.append(f"{up.url} (incomplete upload {up.upload_id})")
        if not dry_run:
            root.abort_upload(up)
    return out
