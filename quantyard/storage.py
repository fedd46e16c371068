"""Object storage: a local directory (``file:///abs/dir``) or S3 (``s3://bucket[/prefix]``).

Every write goes to a temporary key under ``tmp/`` first, with the sha256 and size computed in the
same pass that moves the bytes (the source file is read exactly once), and becomes visible at its
final key only when complete (local: ``os.replace``; S3: server-side copy, then the temporary
object is deleted). A failed write leaves neither a partial object at the key nor the temporary.

Keys are relative, ``/``-separated (``sources/<sha256>/<filename>``, ``artifacts/<sha256>/<filename>``);
an S3 store with a prefix puts them under ``<prefix>/``. ``StoredObject.key`` is always the store's
own (prefix-less) key; ``uri`` is the full location.

Credentials for S3 come from the boto3 default chain (``AWS_*`` variables, profiles, instance
roles) unless given to :func:`open_store` explicitly. ``endpoint_url`` selects an S3-compatible
server (MinIO, SeaweedFS); path-style addressing is used then.

``progress`` callbacks receive ``(bytes_done, total_bytes_or_None)``.

Outages: S3 requests that fail in a way worth repeating (connection refused or reset, timeouts,
5xx, throttling) are retried by botocore a few times, then by the store itself with exponential
backoff for up to ``retry_s`` seconds (a whole upload from a file is redone, the copy to the
final key is repeated; a stream cannot be re-read, so only its copy is). When the store stays
unreachable the error is :class:`StorageUnavailable` (a retryable ``ConversionError`` with code
``storage_unavailable``, whose message names the object, never the store's URL). Temporary
objects a crashed or cut-off write left behind are removed by :meth:`sweep_temp` (workers call it
periodically), which also aborts stale multipart uploads under ``tmp/``.
"""

from __future__ import annotations

import hashlib
import logging
import os
import random
import shutil
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import BinaryIO, Protocol, runtime_checkable
from urllib.parse import quote, unquote, urlparse

from quantyard.engine.errors import ConversionError

log = logging.getLogger(__name__)

Progress = Callable[[int, int | None], None]

COPY_CHUNK = 1 << 20
MiB = 1024 * 1024
MAX_PARTS = 10_000
MAX_PRESIGN_S = 7 * 24 * 3600
# CopyObject handles objects up to 5 GiB in one request; above that a multipart copy is needed.
SINGLE_COPY_LIMIT = 5 * 1024**3
# How long the store keeps retrying a transient S3 failure by default (short: an API request
# waits through it; workers pass settings.storage_retry_s), and its backoff steps.
DEFAULT_RETRY_S = 10.0
RETRY_FIRST_DELAY_S = 0.5
RETRY_MAX_DELAY_S = 8.0
TEMP_PREFIX = "tmp/"


class StorageError(Exception):
    """Any failure of the object store (unreachable, denied, misconfigured)."""


class ObjectNotFound(StorageError, FileNotFoundError):
    """The key does not exist."""


class StorageUnavailable(StorageError, ConversionError):
    """The object store did not answer (down, unreachable, overloaded) after every retry.

    Also a ConversionError, so a worker records it on the target as ``storage_unavailable``
    (retryable) like any other typed failure; the message names the object, not the store."""

    code = "storage_unavailable"
    retryable = True


@dataclass(frozen=True)
class StoredObject:
    key: str
    uri: str
    sha256: str
    size_bytes: int


@runtime_checkable
class ObjectStore(Protocol):
    url: str

    def put_file(self, key: str, path: Path, *, progress: Progress | None = None) -> StoredObject: ...
    def put_stream(self, key: str, stream: BinaryIO, *, progress: Progress | None = None) -> StoredObject: ...
    def download_file(self, key: str, dest: Path) -> None: ...
    def iter_bytes(self, key: str, chunk_size: int = COPY_CHUNK) -> Iterator[bytes]: ...
    def presigned_url(self, key: str, *, expires_s: int = 3600, filename: str | None = None) -> str | None: ...
    def stat(self, key: str) -> int | None: ...
    def delete(self, key: str) -> None: ...
    def list_keys(self, prefix: str = "") -> list[str]: ...
    def sweep_temp(self, older_than_s: float) -> int: ...
    def check(self) -> None: ...


# --------------------------------------------------------------------------------------- helpers


def validate_key(key: str) -> str:
    """Return ``key`` if it is a safe relative object key, else raise ValueError."""
    if not isinstance(key, str) or not key or key.startswith("/") or "\\" in key or "\x00" in key:
        raise ValueError(f"invalid object key: {key!r}")
    parts = key.split("/")
    if any(p in ("", ".", "..") for p in parts):
        raise ValueError(f"invalid object key: {key!r}")
    return key


def temp_key(key: str) -> str:
    return f"{TEMP_PREFIX}{uuid.uuid4().hex}/{PurePosixPath(key).name}"


class HashingReader:
    """A read-only, non-seekable file wrapper that hashes and counts what passes through it.

    Deliberately not seekable: boto3 then reads it strictly once, front to back, so the digest
    covers exactly the bytes sent (no re-reads for retries or payload signing)."""

    def __init__(self, raw: BinaryIO, *, total: int | None = None, progress: Progress | None = None):
        self._raw = raw
        self._hash = hashlib.sha256()
        self._lock = threading.Lock()
        self.size = 0
        self.total = total
        self._progress = progress

    def read(self, n: int = -1) -> bytes:
        # Fill the request (raw streams may return short reads; boto3 takes a short read as EOF).
        if n is None or n < 0:
            data = self._raw.read()
        else:
            parts, want = [], n
            while want > 0:
                chunk = self._raw.read(want)
                if not chunk:
                    break
                parts.append(chunk)
                want -= len(chunk)
            data = b"".join(parts)
        if data:
            with self._lock:
                self._hash.update(data)
                self.size += len(data)
                done = self.size
            if self._progress is not None:
                self._progress(done, self.total)
        return data

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return False

    @property
    def sha256(self) -> str:
        return self._hash.hexdigest()


def content_disposition(filename: str) -> str:
    ascii_name = filename.encode("ascii", "replace").decode("ascii").replace('"', "_").replace("?", "_")
    return f"attachment; filename=\"{ascii_name}\"; filename*=UTF-8''{quote(filename, safe='')}"


def part_size_for(total: int | None, minimum: int) -> int:
    """A multipart chunk size that keeps the object under the 10,000-part limit."""
    if not total:
        return minimum
    needed = -(-total // (MAX_PARTS - 100))
    return max(minimum, -(-needed // MiB) * MiB)


# ------------------------------------------------------------------------------------ local store


class _Writes:
    """put_file / put_stream for both stores: each store implements `_put(key, src, total,
    progress)` (hash while copying, temp key, then the final key)."""

    def put_file(self, key: str, path: Path, *, progress: Progress | None = None) -> StoredObject:
        path = Path(path)
        with path.open("rb") as f:
            return self._put(key, f, total=path.stat().st_size, progress=progress)

    def put_stream(self, key: str, stream: BinaryIO, *, progress: Progress | None = None) -> StoredObject:
        return self._put(key, stream, total=None, progress=progress)


class LocalStore(_Writes):
    """Objects as files under one directory."""

    def __init__(self, root: Path):
        self.root = Path(root).resolve()
        self.url = self.root.as_uri()

    def _path(self, key: str) -> Path:
        return self.root.joinpath(*validate_key(key).split("/"))

    def _uri(self, key: str) -> str:
        return self._path(key).as_uri()

    def _put(self, key: str, src: BinaryIO, *, total: int | None, progress: Progress | None) -> StoredObject:
        final = self._path(key)
        tmp = self._path(temp_key(key))
        reader = HashingReader(src, total=total, progress=progress)
        try:
            tmp.parent.mkdir(parents=True, exist_ok=True)
            with tmp.open("wb") as out:
                while chunk := reader.read(COPY_CHUNK):
                    out.write(chunk)
                out.flush()
                os.fsync(out.fileno())
            final.parent.mkdir(parents=True, exist_ok=True)
            os.replace(tmp, final)
        except OSError as exc:
            raise StorageError(f"writing {key!r} to {self.url} failed: {exc}") from exc
        finally:
            tmp.unlink(missing_ok=True)
            _rmdir_quiet(tmp.parent)
        return StoredObject(key=key, uri=self._uri(key), sha256=reader.sha256, size_bytes=reader.size)

    def download_file(self, key: str, dest: Path) -> None:
        src = self._path(key)
        dest = Path(dest)
        dest.parent.mkdir(parents=True, exist_ok=True)
        part = dest.with_name(f".{dest.name}.{uuid.uuid4().hex[:8]}.part")
        try:
            shutil.copyfile(src, part)
            os.replace(part, dest)
        except FileNotFoundError as exc:
            raise ObjectNotFound(f"no object {key!r} in {self.url}") from exc
        finally:
            part.unlink(missing_ok=True)

    def iter_bytes(self, key: str, chunk_size: int = COPY_CHUNK) -> Iterator[bytes]:
        try:
            f = self._path(key).open("rb")
        except FileNotFoundError as exc:
            raise ObjectNotFound(f"no object {key!r} in {self.url}") from exc
        return _iter_file(f, chunk_size)

    def presigned_url(self, key: str, *, expires_s: int = 3600, filename: str | None = None) -> str | None:
        return None

    def stat(self, key: str) -> int | None:
        try:
            st = self._path(key).stat()
        except FileNotFoundError:
            return None
        return st.st_size if not os.path.isdir(self._path(key)) else None

    def delete(self, key: str) -> None:
        path = self._path(key)
        path.unlink(missing_ok=True)
        parent = path.parent
        while parent != self.root and _rmdir_quiet(parent):
            parent = parent.parent

    def list_keys(self, prefix: str = "") -> list[str]:
        if not self.root.exists():
            return []
        keys = []
        for dirpath, _dirs, files in os.walk(self.root):
            for name in files:
                rel = Path(dirpath, name).relative_to(self.root).as_posix()
                if rel.startswith(prefix):
                    keys.append(rel)
        return sorted(keys)

    def sweep_temp(self, older_than_s: float) -> int:
        """Delete temporary files under ``tmp/`` older than ``older_than_s`` (a killed writer's)."""
        tmp_root = self.root / TEMP_PREFIX.rstrip("/")
        cutoff = time.time() - older_than_s
        removed = 0
        for path in sorted(tmp_root.glob("*/*")) if tmp_root.is_dir() else []:
            try:
                if path.stat().st_mtime < cutoff:
                    path.unlink()
                    removed += 1
            except FileNotFoundError:  # its writer finished meanwhile
                continue
            _rmdir_quiet(path.parent)
        return removed

    def check(self) -> None:
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            probe = self.root / f".check-{uuid.uuid4().hex}"
            probe.write_bytes(b"")
            probe.unlink()
        except OSError as exc:
            raise StorageError(f"object store {self.url} is not writable: {exc}") from exc


def _iter_file(f: BinaryIO, chunk_size: int) -> Iterator[bytes]:
    with f:
        while chunk := f.read(chunk_size):
            yield chunk


def _rmdir_quiet(path: Path) -> bool:
    try:
        path.rmdir()
        return True
    except OSError:
        return False


# --------------------------------------------------------------------------------------- S3 store


class S3Store(_Writes):
    """Objects in an S3 bucket (AWS, MinIO, SeaweedFS), optionally under a prefix."""

    def __init__(
        self,
        bucket: str,
        prefix: str = "",
        *,
        client=None,
        endpoint_url: str | None = None,
        multipart_threshold: int = 64 * MiB,
        multipart_chunksize: int = 16 * MiB,
        max_concurrency: int = 4,
        retry_s: float = DEFAULT_RETRY_S,
    ):
        self.bucket = bucket
        self.retry_s = max(float(retry_s), 0.0)
        self.prefix = prefix.strip("/")
        self.endpoint_url = endpoint_url
        self.url = f"s3://{bucket}/{self.prefix}" if self.prefix else f"s3://{bucket}"
        self.client = client
        self.multipart_threshold = max(multipart_threshold, 5 * MiB)
        self.multipart_chunksize = max(multipart_chunksize, 5 * MiB)
        self.max_concurrency = max_concurrency

    # keys ---------------------------------------------------------------------------------
    def _full(self, key: str) -> str:
        validate_key(key)
        return f"{self.prefix}/{key}" if self.prefix else key

    def _uri(self, key: str) -> str:
        return f"s3://{self.bucket}/{self._full(key)}"

    def _transfer_config(self, total: int | None):
        from boto3.s3.transfer import TransferConfig

        return TransferConfig(
            multipart_threshold=self.multipart_threshold,
            multipart_chunksize=part_size_for(total, self.multipart_chunksize),
            max_concurrency=self.max_concurrency,
            use_threads=self.max_concurrency > 1,
        )

    def _copy_config(self, total: int | None):
        from boto3.s3.transfer import TransferConfig

        return TransferConfig(
            multipart_threshold=SINGLE_COPY_LIMIT,
            multipart_chunksize=part_size_for(total, 512 * MiB),
            max_concurrency=self.max_concurrency,
        )

    # writes -------------------------------------------------------------------------------
    def put_file(self, key: str, path: Path, *, progress: Progress | None = None) -> StoredObject:
        """A file can be read again, so a whole upload cut off by an outage is redone."""
        path = Path(path)
        total = path.stat().st_size
        deadline = time.monotonic() + self.retry_s

        def attempt() -> StoredObject:
            with path.open("rb") as f:
                return self._put(key, f, total=total, progress=progress, deadline=deadline)

        return _with_retries(attempt, what=f"storing {_name(key)!r}", deadline=deadline)

    def _put(self, key: str, src: BinaryIO, *, total: int | None, progress: Progress | None,
             deadline: float | None = None) -> StoredObject:
        final = self._full(key)
        tmp = self._full(temp_key(key))
        reader = HashingReader(src, total=total, progress=progress)
        deadline = time.monotonic() + self.retry_s if deadline is None else deadline
        try:
            self.client.upload_fileobj(reader, self.bucket, tmp, Config=self._transfer_config(total))
            # The temporary object is complete: the copy to the final key can be repeated
            # as often as needed (the completion step an outage most often cuts off).
            _with_retries(lambda: self.client.copy({"Bucket": self.bucket, "Key": tmp}, self.bucket, final,
                                                   Config=self._copy_config(reader.size)),
                          what=f"storing {_name(key)!r}", deadline=deadline)
        except Exception as exc:
            raise _wrap(exc, f"writing {key!r} to {self.url}", key=key, verb="storing") from exc
        finally:
            self._delete_quiet(tmp)  # if this fails too, sweep_temp removes it later
        return StoredObject(key=key, uri=self._uri(key), sha256=reader.sha256, size_bytes=reader.size)

    def _delete_quiet(self, full_key: str) -> None:
        try:
            self.client.delete_object(Bucket=self.bucket, Key=full_key)
        except Exception:  # best effort: the write's own error matters more
            pass

    def _retried(self, fn, *, key: str, verb: str, what: str):
        """fn() with retries on transient failures; every failure as a StorageError."""
        try:
            return _with_retries(fn, what=f"{verb} {_name(key)!r}",
                                 deadline=time.monotonic() + self.retry_s)
        except Exception as exc:
            raise _wrap(exc, what, key=key, verb=verb) from exc

    def sweep_temp(self, older_than_s: float) -> int:
        """Delete temporary objects and abort multipart uploads under ``tmp/`` that are older
        than ``older_than_s`` (left by a killed or cut-off write); returns how many."""
        from datetime import datetime, timedelta, timezone

        cutoff = datetime.now(timezone.utc) - timedelta(seconds=older_than_s)
        base = self._full(TEMP_PREFIX.rstrip("/")) + "/"
        removed = 0
        try:
            for page in self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=base):
                for obj in page.get("Contents", []):
                    if obj["LastModified"] < cutoff:
                        self.client.delete_object(Bucket=self.bucket, Key=obj["Key"])
                        removed += 1
            pages = self.client.get_paginator("list_multipart_uploads").paginate(Bucket=self.bucket, Prefix=base)
            for page in pages:
                for upload in page.get("Uploads", []):
                    if upload["Initiated"] < cutoff:
                        self.client.abort_multipart_upload(Bucket=self.bucket, Key=upload["Key"],
                                                           UploadId=upload["UploadId"])
                        removed += 1
        except Exception as exc:
            raise _wrap(exc, f"sweeping temporary objects of {self.url}", key=TEMP_PREFIX.rstrip("/"),
                        verb="sweeping") from exc
        return removed

    # reads --------------------------------------------------------------------------------
    def download_file(self, key: str, dest: Path) -> None:
        dest = Path(dest)
        dest.parent.mkdir(parents=True, exist_ok=True)
        part = dest.with_name(f".{dest.name}.{uuid.uuid4().hex[:8]}.part")
        try:
            self._retried(lambda: self.client.download_file(self.bucket, self._full(key), str(part),
                                                            Config=self._transfer_config(None)),
                          key=key, verb="reading", what=f"downloading {key!r} from {self.url}")
            os.replace(part, dest)
        finally:
            part.unlink(missing_ok=True)

    def iter_bytes(self, key: str, chunk_size: int = COPY_CHUNK) -> Iterator[bytes]:
        body = self._retried(lambda: self.client.get_object(Bucket=self.bucket, Key=self._full(key))["Body"],
                             key=key, verb="reading", what=f"reading {key!r} from {self.url}")
        return _iter_body(body, chunk_size)

    def presigned_url(self, key: str, *, expires_s: int = 3600, filename: str | None = None) -> str | None:
        params = {"Bucket": self.bucket, "Key": self._full(key)}
        if filename:
            params["ResponseContentDisposition"] = content_disposition(filename)
        expires = max(1, min(int(expires_s), MAX_PRESIGN_S))
        return self.client.generate_presigned_url("get_object", Params=params, ExpiresIn=expires)

    def stat(self, key: str) -> int | None:
        try:
            head = self._retried(lambda: self.client.head_object(Bucket=self.bucket, Key=self._full(key)),
                                 key=key, verb="reading", what=f"stat {key!r} in {self.url}")
        except ObjectNotFound:
            return None
        return int(head["ContentLength"])

    def delete(self, key: str) -> None:
        try:
            self._retried(lambda: self.client.delete_object(Bucket=self.bucket, Key=self._full(key)),
                          key=key, verb="deleting", what=f"deleting {key!r} from {self.url}")
        except ObjectNotFound:
            pass

    def list_keys(self, prefix: str = "") -> list[str]:
        base = f"{self.prefix}/" if self.prefix else ""

        def listing() -> list[str]:
            pages = self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=base + prefix)
            return [obj["Key"][len(base):] for page in pages for obj in page.get("Contents", [])]

        return sorted(self._retried(listing, key=prefix or "objects", verb="listing", what=f"listing {self.url}"))

    def check(self) -> None:
        try:
            self.client.head_bucket(Bucket=self.bucket)
        except Exception as exc:  # no retries: readiness checks must answer fast
            raise _wrap(exc, f"object store {self.url} is not reachable", key=self.bucket, verb="checking") from exc


def _iter_body(body, chunk_size: int) -> Iterator[bytes]:
    try:
        yield from body.iter_chunks(chunk_size)
    finally:
        body.close()


def _name(key: str) -> str:
    return PurePosixPath(key).name or key


_TRANSIENT_CODES = {"SlowDown", "ServiceUnavailable", "InternalError", "RequestTimeout", "Throttling",
                    "ThrottlingException", "RequestTimeTooSkewed", "OperationAborted", "500", "502", "503", "504"}


def _transient_one(exc: BaseException) -> bool:
    from botocore import exceptions as bx

    if isinstance(exc, (StorageUnavailable, bx.ConnectionError, bx.HTTPClientError, ConnectionError,
                        TimeoutError)):
        return True
    response = getattr(exc, "response", None)
    if isinstance(response, dict):
        status = int(response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0)
        code = str(response.get("Error", {}).get("Code", ""))
        return status >= 500 or status == 429 or code in _TRANSIENT_CODES
    last = getattr(exc, "last_exception", None)  # s3transfer's RetriesExceededError
    return isinstance(last, BaseException) and _transient_one(last)


def is_transient(exc: BaseException) -> bool:
    """Whether a failure is the store being unreachable or overloaded (worth retrying), looking
    through the exception's causes (the transfer manager wraps the client's errors)."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if _transient_one(current):
            return True
        current = current.__cause__ or current.__context__
    return False


def _with_retries(fn, *, what: str, deadline: float):
    """fn() until it succeeds, raises something not transient, or the deadline passes
    (StorageUnavailable then). Exponential backoff with jitter between attempts."""
    delay, attempt, started = RETRY_FIRST_DELAY_S, 0, time.monotonic()
    while True:
        attempt += 1
        try:
            return fn()
        except Exception as exc:
            if not is_transient(exc):
                raise
            left = deadline - time.monotonic()
            if left <= 0:
                raise StorageUnavailable(
                    f"object storage unavailable: {what} failed after {attempt} attempt(s) over "
                    f"{time.monotonic() - started:.0f}s") from exc
            pause = min(delay * random.uniform(0.5, 1.0), left)
            log.warning("object store: %s failed (attempt %d: %s); retrying in %.1fs", what, attempt,
                        type(exc).__name__, pause)
            time.sleep(pause)
            delay = min(delay * 2, RETRY_MAX_DELAY_S)


def _wrap(exc: Exception, what: str, *, key: str = "", verb: str = "using") -> StorageError:
    if isinstance(exc, StorageError):
        return exc
    code = ""
    response = getattr(exc, "response", None)
    if isinstance(response, dict):
        code = str(response.get("Error", {}).get("Code", ""))
    if code in ("404", "NoSuchKey", "NotFound"):
        return ObjectNotFound(f"{what}: not found")
    if is_transient(exc):  # tenant-visible: the object's name, never the store's URL
        return StorageUnavailable(f"object storage unavailable while {verb} {_name(key)!r}")
    return StorageError(f"{what}: {exc}")


def make_s3_client(
    *,
    endpoint_url: str | None = None,
    region: str = "us-east-1",
    access_key: str | None = None,
    secret_key: str | None = None,
):
    import boto3
    from botocore.config import Config

    config = Config(
        region_name=region,
        signature_version="s3v4",
        # botocore retries each request a few times; longer outages are the store's own
        # retry loop's (_with_retries). Timeouts keep a dead endpoint from hanging a worker.
        retries={"mode": "standard", "max_attempts": 3},
        connect_timeout=5,
        read_timeout=60,
        s3={"addressing_style": "path" if endpoint_url else "auto"},
        # S3-compatible servers differ in their support of the newer default checksums.
        request_checksum_calculation="when_required",
        response_checksum_validation="when_required",
    )
    return boto3.session.Session().client(
        "s3",
        endpoint_url=endpoint_url,
        aws_access_key_id=access_key,
        aws_secret_access_key=secret_key,
        config=config,
    )


# ---------------------------------------------------------------------------------------- factory


def open_store(
    url: str,
    *,
    endpoint_url: str | None = None,
    region: str = "us-east-1",
    access_key: str | None = None,
    secret_key: str | None = None,
    multipart_threshold: int = 64 * MiB,
    multipart_chunksize: int = 16 * MiB,
    retry_s: float = DEFAULT_RETRY_S,
) -> LocalStore | S3Store:
    """Open ``file:///abs/dir`` (or a plain absolute path) or ``s3://bucket[/prefix]``."""
    parsed = urlparse(url)
    if parsed.scheme == "file":
        # file:///abs/dir; a non-empty host other than localhost is read as a relative path.
        host = parsed.netloc if parsed.netloc not in ("", "localhost") else ""
        return LocalStore(Path(unquote(host + parsed.path)))
    if parsed.scheme == "" and url.startswith("/"):
        return LocalStore(Path(url))
    if parsed.scheme == "s3":
        if not parsed.netloc:
            raise ValueError(f"storage URL {url!r} names no bucket")
        client = make_s3_client(
            endpoint_url=endpoint_url, region=region, access_key=access_key, secret_key=secret_key
        )
        return S3Store(
            parsed.netloc,
            parsed.path,
            client=client,
            endpoint_url=endpoint_url,
            multipart_threshold=multipart_threshold,
            multipart_chunksize=multipart_chunksize,
            retry_s=retry_s,
        )
    raise ValueError(f"unsupported storage URL {url!r}: use file:///abs/dir or s3://bucket[/prefix]")


def uri_to_key(store: LocalStore | S3Store, uri: str) -> str:
    """Map a URI of this store back to its key; ValueError when the URI is not in this store."""
    if isinstance(store, LocalStore):
        parsed = urlparse(uri)
        if parsed.scheme != "file":
            raise ValueError(f"{uri!r} is not a file:// URI")
        path = Path(unquote(parsed.path))
        try:
            rel = path.relative_to(store.root).as_posix()
        except ValueError:
            raise ValueError(f"{uri!r} is not inside {store.url}") from None
        return validate_key(rel)
    if isinstance(store, S3Store):
        base = f"s3://{store.bucket}/" + (f"{store.prefix}/" if store.prefix else "")
        if not uri.startswith(base):
            raise ValueError(f"{uri!r} is not inside {store.url}")
        return validate_key(uri[len(base) :])
    raise TypeError(f"unknown store type {type(store).__name__}")
