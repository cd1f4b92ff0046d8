"""Object stores (and any other fsspec filesystem) behind the Storage interface.

There is no rename on S3 or GCS, so ``capabilities.rename`` is False and the commit
layer uploads data objects under their final names, then creates the manifest last
with :meth:`FsspecStorage.put_exclusive`: S3 ``If-None-Match: *`` (s3fs
``pipe_file(mode="create")``), GCS ``ifGenerationMatch=0`` (gcsfs, same call). Both
raise ``FileExistsError`` when the object exists.

Instances are pickled into writer and promotion processes: only the URL and the
options travel; each process creates its own filesystem on first use.
Every call goes through :func:`ckptstore.retry.retrying`.

Beyond the Storage interface it implements the protocols
:class:`~ckptstore.storage.capabilities.ObjectInfo` (``info``: size, ETag, crc32c) and
:class:`~ckptstore.storage.capabilities.MultipartGC` (S3's incomplete multipart
uploads; none elsewhere).

Large data files (:meth:`FsspecStorage.open_bulk_write`) go up in parts from the
writer's memory (:mod:`ckptstore.storage.transfer`): on S3 a multipart upload with
several parts in flight; on GCS a resumable upload, whose chunks must go in order,
one at a time (:mod:`ckptstore.storage.object_requests`; parallel parts would need
temporary objects and a compose, visible and left behind by a crash, and measured no
faster against fake-gcs-server). :meth:`FsspecStorage.read_extent` reads ranges in
parallel, each streamed straight into the caller's new buffer.
"""
from __future__ import annotations

import errno
import io
import posixpath
from typing import Any

from ckptstore.errors import DestinationNotWritableError, StorageError, UnsupportedOperationError
from ckptstore.storage import object_requests, transfer
from ckptstore.storage.base import Capabilities, Storage, WriteHandle, check_name
from ckptstore.storage.capabilities import IncompleteUpload
from ckptstore.storage.retry import retrying

#: protocols whose create-only put is enforced by the server
_CREATE_ONLY = {"s3", "s3a", "gs", "gcs"}
#: fsspec filesystems that cannot write (a save to them is refused before it starts)
_READ_ONLY = {"http", "https", "zip", "tar", "libarchive", "github", "gist", "reference", "dask"}
#: protocols whose filesystem lives in the memory of one process
_PROCESS_LOCAL = {"memory"}


class FsspecWriteHandle(WriteHandle):
    """Buffers one object and uploads it whole on close (s3fs and gcsfs switch to
    multipart / resumable uploads with bounded concurrency for large objects)."""

    def __init__(self, storage: "FsspecStorage", name: str) -> None:
        self.storage = storage
        self.name = name
        self.buf: io.BytesIO | None = io.BytesIO()

    def write(self, data: memoryview | bytes) -> int:
        assert self.buf is not None, "write after close"
        return self.buf.write(data)

    def fsync(self) -> None:  # durability comes with the upload's completion
        return None

    def close(self) -> None:
        buf, self.buf = self.buf, None
        if buf is not None:
            self.storage._put(self.name, buf.getbuffer(), create=False)

    def abort(self) -> None:
        self.buf = None  # nothing was uploaded: an object appears only on close


class FsspecStorage(Storage):
    """Objects below ``url`` on any fsspec filesystem (``s3://``, ``gs://``,
    ``memory://``...). ``storage_options`` go to ``fsspec.filesystem``."""

    def __init__(self, url: str, storage_options: dict[str, Any] | None = None) -> None:
        import fsspec.core

        self._url = url.rstrip("/")
        self.options = dict(storage_options or {})
        protocol, path = fsspec.core.split_protocol(self._url)
        self.protocol = protocol or "file"
        self.root = path.rstrip("/")
        create_only = self.protocol in _CREATE_ONLY
        self.capabilities = Capabilities(rename=False, fsync=False, create_only=create_only,
                                         local_path=False,
                                         process_local=self.protocol in _PROCESS_LOCAL)
        self.transfer_settings = transfer.TransferSettings.from_options(self.options)
        self._fs = None

    def __getstate__(self) -> dict:
        return {"url": self._url, "options": self.options}

    def __setstate__(self, state: dict) -> None:
        FsspecStorage.__init__(self, state["url"], state["options"])

    def __repr__(self) -> str:
        return f"FsspecStorage({self._url!r})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, FsspecStorage) and (other._url, other.options) == (
            self._url, self.options)

    def __hash__(self) -> int:
        return hash(self._url)

    @property
    def fs(self):
        if self._fs is None:
            import fsspec

            opts = {k: v for k, v in self.options.items() if k not in transfer.OPTION_KEYS}
            # other processes write here: never answer from a stale listing cache
            opts.setdefault("use_listings_cache", False)
            if self.protocol in ("gs", "gcs"):
                opts.setdefault("consistency", "size")
            if self.protocol in ("s3", "s3a"):  # parts of one multipart upload in flight
                opts.setdefault("max_concurrency", 4)
            self._fs = fsspec.filesystem(self.protocol, **opts)
        return self._fs

    @property
    def url(self) -> str:
        return self._url

    def _path(self, name: str) -> str:
        """The path of ``name``; ``""`` is the root itself (directory operations)."""
        return f"{self.root}/{check_name(name)}" if name else self.root

    def _file(self, name: str) -> str:
        """The path of object ``name``: like :meth:`_path`, but the root is no object."""
        return f"{self.root}/{check_name(name)}"

    def child(self, name: str) -> "FsspecStorage":
        return FsspecStorage(f"{self._url}/{check_name(name)}", self.options)

    def at(self, url: str) -> "FsspecStorage":
        return FsspecStorage(url, self.options)

    def _call(self, what: str, fn, *args, **kwargs):
        return retrying(lambda: fn(*args, **kwargs), f"{what} on {self._url}")

    # -- write side ---------------------------------------------------------
    def check_writable(self) -> None:
        """Refuse a read-only protocol before a save stages anything (cheap: no request;
        permissions on object stores show at the first upload)."""
        if self.protocol in _READ_ONLY:
            raise DestinationNotWritableError(
                errno.EROFS, f"cannot save to {self._url}: fsspec's {self.protocol!r} file "
                "system is read-only; save to a local directory or an object store "
                "(s3://, gs://)", self._url)

    def makedirs(self) -> None:
        if self.protocol not in _CREATE_ONLY:  # object stores have no directories
            self._call("makedirs", self.fs.makedirs, self.root, exist_ok=True)

    def open_write(self, name: str) -> FsspecWriteHandle:
        check_name(name)
        return FsspecWriteHandle(self, name)

    def open_bulk_write(self, name: str) -> WriteHandle:
        """An upload in parts, several in flight on S3, fed from held memory; elsewhere
        (``memory://``...) the buffered handle of :meth:`open_write`."""
        check_name(name)
        if self.protocol in ("s3", "s3a"):
            target: transfer.PartTarget = object_requests.S3Parts(self, name)
        elif self.protocol in ("gs", "gcs"):
            target = object_requests.GCSResumable(self, name)
        else:
            return self.open_write(name)
        return transfer.PartedUpload(target, self.transfer_settings, f"upload of {self._url}/{name}")

    def _put(self, name: str, data, *, create: bool) -> None:
        path = self._file(name)
        data = bytes(data)
        kwargs = {"mode": "create"} if create else {}
        if create and self.protocol not in _CREATE_ONLY:
            # no server-side precondition: best effort, documented in docs/tiers.md
            if self.fs.exists(path):
                raise FileExistsError(f"{self._url}/{name} already exists")
            kwargs = {}
        first = [True]

        def put() -> None:
            if create and not first[0] and self._same_object(path, data):
                return  # an earlier attempt succeeded but its answer was lost
            first[0] = False
            self.fs.pipe_file(path, data, **kwargs)

        self._call(f"upload of {name}", put)
        size = self._call("size", self.fs.size, path)
        if size != len(data):  # the store did not keep what we sent
            raise StorageError(f"upload of {self._url}/{name} left {size} bytes, sent {len(data)}")

    def _same_object(self, path: str, data: bytes) -> bool:
        try:
            return self.fs.cat_file(path) == data
        except FileNotFoundError:
            return False

    def put_exclusive(self, name: str, data: bytes) -> None:
        self._put(name, data, create=True)

    def rename(self, src: str, dst: str) -> None:
        raise UnsupportedOperationError("object stores have no rename; ckptstore never copies and "
                                  "deletes instead")

    def link_exclusive(self, src: str, dst: str) -> None:
        self.rename(src, dst)

    def fsync_dir(self, name: str = "") -> None:
        if name:
            check_name(name)

    def remove(self, name: str) -> None:
        try:
            self._call("delete", self.fs.rm_file, self._file(name))
        except FileNotFoundError:
            pass

    def rmtree(self, name: str) -> None:
        path = self._path(name)
        try:
            self._call("delete", self.fs.rm, path, recursive=True)
        except FileNotFoundError:
            pass

    # -- read side ----------------------------------------------------------
    def exists(self, name: str) -> bool:
        return bool(self._call("exists", self.fs.exists, self._path(name)))

    def size(self, name: str) -> int:
        info = self._call("stat", self.fs.info, self._file(name))
        if info.get("type") == "directory":
            raise FileNotFoundError(f"{self._url}/{name} is a directory")
        return int(info["size"])

    def info(self, name: str) -> dict:
        """The backend's metadata of ``name`` (size, ETag, crc32c, ...)."""
        return self._call("stat", self.fs.info, self._file(name))

    def read(self, name: str, offset: int = 0, length: int | None = None) -> bytes:
        path = self._file(name)
        if length == 0:
            return b""
        if offset == 0 and length is None:  # no range: an empty object has none
            return self._call(f"read of {name}", self.fs.cat_file, path)
        end = None if length is None else offset + length
        try:
            return self._call(f"read of {name}", self.fs.cat_file, path, start=offset, end=end)
        except Exception as e:
            # S3 and GCS answer 416 to a range that starts at or after the end of the
            # object, where a file gives a short read: return that short read
            if not _range_not_satisfiable(e) or self.size(name) > offset:
                raise
        return b""

    def read_extent(self, name: str, offset: int, length: int) -> memoryview:
        """Ranges of ``transfer_settings.range_size`` read in parallel, each streamed into its
        slice of one new bytearray (no intermediate ``bytes`` per range). No size lookup
        first (a round trip): the end of the object shows as a short range, and ranges
        past it as HTTP 416."""
        path = self._file(name)
        if length <= 0:
            return memoryview(bytearray(0))

        def fetch(start: int, view: memoryview) -> int:
            try:
                return self._call(f"read of {name}", object_requests.fetch_into, self, path, start, view)
            except Exception as e:
                if _range_not_satisfiable(e):  # at or past the end: no bytes there
                    return 0
                raise

        return transfer.read_ranges(fetch, offset, length, self.transfer_settings)

    def listdir(self, name: str = "") -> list[str]:
        path = self._path(name)
        try:
            entries = self._call("list", self.fs.ls, path, detail=False)
        except FileNotFoundError:
            return []
        out = set()
        for e in entries:
            e = e.rstrip("/")
            base = posixpath.basename(e)
            if base and e != path:
                out.add(base)
        return sorted(out)

    def isdir(self, name: str) -> bool:
        return bool(self._call("stat", self.fs.isdir, self._path(name)))

    def mtime(self, name: str) -> float:
        return self._call("stat", self.fs.modified, self._file(name)).timestamp()

    # -- MultipartGC ----------------------------------------------------------
    def incomplete_uploads(self) -> list[IncompleteUpload]:
        """S3's incomplete multipart uploads below the root; other protocols keep none."""
        if self.protocol not in ("s3", "s3a"):
            return []
        bucket, _, prefix = self.root.partition("/")
        resp = self.fs.call_s3("list_multipart_uploads", Bucket=bucket, Prefix=prefix + "/")
        out = []
        for up in resp.get("Uploads", []):
            started = up.get("Initiated")
            out.append(IncompleteUpload(url=f"s3://{bucket}/{up['Key']}", key=up["Key"],
                                        upload_id=up["UploadId"],
                                        started=None if started is None else started.timestamp()))
        return out

    def abort_upload(self, upload: IncompleteUpload) -> None:
        bucket = self.root.partition("/")[0]
        self.fs.call_s3("abort_multipart_upload", Bucket=bucket, Key=upload.key,
                        UploadId=upload.upload_id)


def _range_not_satisfiable(e: BaseException | None) -> bool:
    """Whether ``e`` (or an error it wraps) is HTTP 416: gcsfs ``HttpError.code``,
    botocore ``ClientError.response`` (s3fs wraps it in an OSError)."""
    for _ in range(8):
        if e is None:
            return False
        if getattr(e, "code", None) == 416 or getattr(e, "status", None) == 416:
            return True
        resp = getattr(e, "response", None)
        if isinstance(resp, dict) and (
                resp.get("Error", {}).get("Code") == "InvalidRange"
                or resp.get("ResponseMetadata", {}).get("HTTPStatusCode") == 416):
            return True
        e = e.__cause__ or e.__context__
    return False
