"""The store-specific requests behind :mod:`ckptstore.storage.transfer`: S3 multipart
uploads and GCS resumable uploads (each a :class:`~ckptstore.storage.transfer.PartTarget`),
and ranged GETs streamed straight into the caller's memory.

They speak through the filesystems of an :class:`~ckptstore.storage.fsspec_backend.
FsspecStorage` (s3fs's botocore client, gcsfs's aiohttp session: credentials,
endpoints and options as configured there), and every request goes through that
storage's retries.
"""
from __future__ import annotations

import hashlib
from typing import Any, Protocol

from ckptstore.errors import StorageError, TransientStorageError
from ckptstore.storage.transfer import Part


class Backend(Protocol):
    """What the requests use of an FsspecStorage."""

    protocol: str

    @property
    def fs(self) -> Any: ...

    @property
    def url(self) -> str: ...

    def _call(self, what: str, fn: Any, *args: Any, **kwargs: Any) -> Any: ...

    def _put(self, name: str, data: Any, *, create: bool) -> None: ...

    def _file(self, name: str) -> str: ...

    def size(self, name: str) -> int: ...

    def info(self, name: str) -> dict: ...

    def remove(self, name: str) -> None: ...


def _check_size(storage: Backend, name: str, size: int) -> None:
    """The completed object holds what was sent (as the single put checks); a wrong
    one is removed: a failed upload leaves nothing."""
    got = storage.size(name)
    if got != size:
        storage.remove(name)
        raise StorageError(f"upload of {storage.url}/{name} left {got} bytes, sent {size}")


class S3Parts:
    """The requests of one S3 multipart upload. Parts need no order and go several at
    once; all but the last are at least 5 MiB."""

    min_part = 5 << 20
    granule = 1
    parallel = True

    def __init__(self, storage: Backend, name: str) -> None:
        self.storage, self.name = storage, name
        self.path = storage._file(name)
        self.bucket, self.key, _ = storage.fs.split_path(self.path)
        self.upload_id: str | None = None

    def _s3(self, what: str, method: str, **kwargs: Any) -> dict:
        return self.storage._call(f"{what} of {self.name}", self.storage.fs.call_s3, method,
                                  Bucket=self.bucket, Key=self.key, **kwargs)

    def put(self, body: bytes) -> None:
        self.storage._put(self.name, body, create=False)

    def begin(self) -> None:
        self.upload_id = self._s3("start of upload", "create_multipart_upload")["UploadId"]

    def send(self, part: Part) -> dict | None:
        if not part.nbytes:  # an empty last part: nothing to send
            return None
        resp = self._s3(f"upload part {part.number}", "upload_part", UploadId=self.upload_id,
                        PartNumber=part.number, Body=part.body())
        out = {"PartNumber": part.number, "ETag": resp["ETag"]}
        # with an additional checksum (botocore adds CRC32), completion repeats each part's
        out.update({k: v for k, v in resp.items() if k.startswith("Checksum") and k != "ChecksumType"
                    and isinstance(v, str)})
        return out

    def finish(self, receipts: list[Any], size: int) -> None:
        parts = [r for r in receipts if r]
        try:
            self._s3("completion of upload", "complete_multipart_upload", UploadId=self.upload_id,
                     MultipartUpload={"Parts": parts})
        except Exception:
            # an earlier attempt may have completed it and lost the answer (NoSuchUpload now)
            expected = multipart_etag(parts)
            if expected is None or self._etag() != expected:
                raise
        self.storage.fs.invalidate_cache(self.path)
        _check_size(self.storage, self.name, size)

    def _etag(self) -> str | None:
        try:
            return str(self.storage.info(self.name).get("ETag", "")).strip('"')
        except FileNotFoundError:
            return None

    def abort(self) -> None:
        self._s3("abort of upload", "abort_multipart_upload", UploadId=self.upload_id)


def multipart_etag(parts: list[dict]) -> str | None:
    """The ETag S3 gives a completed multipart upload (md5 of the parts' md5s, "-N"),
    or None where the parts' ETags are no md5s (SSE-KMS...)."""
    try:
        digests = b"".join(bytes.fromhex(p["ETag"].strip('"')) for p in parts)
    except ValueError:
        return None
    return f"{hashlib.md5(digests).hexdigest()}-{len(parts)}"


class GCSResumable:
    """The requests of one GCS resumable upload: chunks in order, one at a time, all
    but the last a multiple of 256 KiB, the total size told with the last. The object
    appears with the last chunk; an abandoned session is never visible (GCS drops it
    after a week)."""

    min_part = granule = 256 << 10
    parallel = False

    def __init__(self, storage: Backend, name: str) -> None:
        self.storage, self.name = storage, name
        self.bucket, self.key, _ = storage.fs.split_path(storage._file(name))
        self.location: str | None = None

    def _post(self, headers: dict, data: Any) -> Any:
        """The answer's headers to one request to the session (gcsfs's session, auth,
        and error mapping)."""
        return self.storage.fs.call("POST", self.location, headers=headers, data=data)[0]

    def put(self, body: bytes) -> None:
        self.storage._put(self.name, body, create=False)

    def begin(self) -> None:
        import fsspec.asyn
        from gcsfs.core import initiate_upload

        fs = self.storage.fs
        self.location = self.storage._call(f"start of upload of {self.name}", fsspec.asyn.sync,
                                           fs.loop, initiate_upload, fs, self.bucket, self.key)

    def send(self, part: Part) -> None:
        # A retried chunk is sent again whole, as gcsfs does: GCS keeps the bytes it
        # had. No status query first: fake-gcs-server completes the object on one.
        # (It also appends re-sent bytes again: the size check in finish catches that.)
        self.storage._call(f"upload of {self.name} part {part.number}", self._send_from, part, 0)

    def _send_from(self, part: Part, skip: int) -> None:
        start, end = part.offset + skip, part.offset + part.nbytes
        span = f"{start}-{end - 1}" if end > start else "*"
        headers = {"Content-Range": f"bytes {span}/{end if part.last else '*'}",
                   "Content-Length": str(end - start), "Content-Type": "application/octet-stream"}
        body = part.view()
        resp = self._post(headers, memoryview(body)[skip:] if skip else body)
        kept = str(resp.get("Range", "")).rpartition("-")[2]
        if part.last or not kept.isdigit() or int(kept) + 1 == end:
            return
        if not start < int(kept) + 1 < end:
            raise TransientStorageError(f"GCS kept {int(kept) + 1} bytes of {self.name}, sent to {end}")
        self._send_from(part, int(kept) + 1 - part.offset)  # it took less: send the rest

    def finish(self, receipts: list[Any], size: int) -> None:
        _check_size(self.storage, self.name, size)

    def abort(self) -> None:
        self.storage._call(f"abort of upload of {self.name}", self.storage.fs.call, "DELETE",
                           self.location)


def fetch_into(storage: Backend, path: str, start: int, view: memoryview) -> int:
    """Fill ``view`` with the bytes of ``path`` from ``start``; returns the count."""
    import fsspec.asyn

    fs = storage.fs
    if storage.protocol in ("s3", "s3a"):
        return fsspec.asyn.sync(fs.loop, s3_range_into, fs, path, start, view)
    if storage.protocol in ("gs", "gcs") and GCS_STREAMING <= set(dir(fs)):
        return fsspec.asyn.sync(fs.loop, gcs_range_into, fs, path, start, view)
    data = fs.cat_file(path, start=start, end=start + len(view))
    view[:len(data)] = data
    return len(data)


async def s3_range_into(fs: Any, path: str, start: int, view: memoryview) -> int:
    """One ranged GET of S3, its body read straight into ``view``."""
    bucket, key, version = fs.split_path(path)
    extra = {"VersionId": version} if version else {}
    resp = await fs._call_s3("get_object", Bucket=bucket, Key=key,
                             Range=f"bytes={start}-{start + len(view) - 1}", **extra)
    body = resp["Body"]
    try:
        pos = 0
        while pos < len(view):
            n = await body.readinto(view[pos:])
            if not n:
                break
            pos += n
    finally:
        body.close()
    return _complete(pos, resp.get("ContentLength"), path)


def _complete(got: int, announced: Any, path: str) -> int:
    """``got``, once it is all the answer announced (a short range is the object's end,
    a short answer a broken connection: retried)."""
    if announced is not None and got < int(announced):
        raise TransientStorageError(f"ranged read of {path} ended after {got} of {announced} bytes")
    return got


#: what :func:`gcs_range_into` uses of gcsfs (else the plain cat_file path)
GCS_STREAMING = {"_set_session", "_get_headers", "_get_params", "session", "url", "requests_timeout"}


async def gcs_range_into(fs: Any, path: str, start: int, view: memoryview) -> int:
    """One ranged GET of GCS, its body copied chunk by chunk into ``view``."""
    from gcsfs.retry import validate_response

    await fs._set_session()
    headers = fs._get_headers({"Range": f"bytes={start}-{start + len(view) - 1}"})
    async with fs.session.get(url=fs.url(path), params=fs._get_params({}), headers=headers,
                              timeout=fs.requests_timeout) as r:
        if r.status >= 400:
            validate_response(r.status, await r.read(), path)
        if r.status != 206 and start:  # the range was ignored: these bytes start at 0
            raise StorageError(f"GCS answered {r.status} to a ranged read of {path}")
        pos = 0
        async for chunk in r.content.iter_any():
            take = min(len(chunk), len(view) - pos)
            view[pos:pos + take] = memoryview(chunk)[:take]
            pos += take
            if pos == len(view):
                break
        return _complete(pos, None if r.status != 206 else r.content_length, path)
