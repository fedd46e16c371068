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
"""

from __future__ import annotations

import hashlib
import os
import shutil
import threading
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import BinaryIO, Protocol, runtime_checkable
from urllib.parse import quote, unquote, urlparse

Progress = Callable[[int, int | None], None]

COPY_CHUNK = 1 << 20
MiB = 1024 * 1024
MAX_PARTS = 10_000
MAX_PRESIGN_S = 7 * 24 * 3600
# CopyObject handles objects up to 5 GiB in one request; above that a multipart copy is needed.
SINGLE_COPY_LIMIT = 5 * 1024**3


class StorageError(Exception):
    """Any failure of the object store (unreachable, denied, misconfigured)."""


class ObjectNotFound(StorageError, FileNotFoundError):
    """The key does not exist."""


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
    return f"tmp/{uuid.uuid4().hex}/{PurePosixPath(key).name}"


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
    ):
        self.bucket = bucket
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
    def _put(self, key: str, src: BinaryIO, *, total: int | None, progress: Progress | None) -> StoredObject:
        final = self._full(key)
        tmp = self._full(temp_key(key))
        reader = HashingReader(src, total=total, progress=progress)
        try:
            self.client.upload_fileobj(reader, self.bucket, tmp, Config=self._transfer_config(total))
            self.client.copy(
                {"Bucket": self.bucket, "Key": tmp}, self.bucket, final, Config=self._copy_config(reader.size)
            )
        except Exception as exc:
            raise _wrap(exc, f"writing {key!r} to {self.url}") from exc
        finally:
            self._delete_quiet(tmp)
        return StoredObject(key=key, uri=self._uri(key), sha256=reader.sha256, size_bytes=reader.size)

    def _delete_quiet(self, full_key: str) -> None:
        try:
            self.client.delete_object(Bucket=self.bucket, Key=full_key)
        except Exception:  # best effort: the write's own error matters more
            pass

    # reads --------------------------------------------------------------------------------
    def download_file(self, key: str, dest: Path) -> None:
        dest = Path(dest)
        dest.parent.mkdir(parents=True, exist_ok=True)
        part = dest.with_name(f".{dest.name}.{uuid.uuid4().hex[:8]}.part")
        try:
            self.client.download_file(self.bucket, self._full(key), str(part), Config=self._transfer_config(None))
            os.replace(part, dest)
        except Exception as exc:
            raise _wrap(exc, f"downloading {key!r} from {self.url}") from exc
        finally:
            part.unlink(missing_ok=True)

    def iter_bytes(self, key: str, chunk_size: int = COPY_CHUNK) -> Iterator[bytes]:
        try:
            body = self.client.get_object(Bucket=self.bucket, Key=self._full(key))["Body"]
        except Exception as exc:
            raise _wrap(exc, f"reading {key!r} from {self.url}") from exc
        return _iter_body(body, chunk_size)

    def presigned_url(self, key: str, *, expires_s: int = 3600, filename: str | None = None) -> str | None:
        params = {"Bucket": self.bucket, "Key": self._full(key)}
        if filename:
            params["ResponseContentDisposition"] = content_disposition(filename)
        expires = max(1, min(int(expires_s), MAX_PRESIGN_S))
        return self.client.generate_presigned_url("get_object", Params=params, ExpiresIn=expires)

    def stat(self, key: str) -> int | None:
        try:
            return int(self.client.head_object(Bucket=self.bucket, Key=self._full(key))["ContentLength"])
        except Exception as exc:
            err = _wrap(exc, f"stat {key!r} in {self.url}")
            if isinstance(err, ObjectNotFound):
                return None
            raise err from exc

    def delete(self, key: str) -> None:
        try:
            self.client.delete_object(Bucket=self.bucket, Key=self._full(key))
        except Exception as exc:
            err = _wrap(exc, f"deleting {key!r} from {self.url}")
            if not isinstance(err, ObjectNotFound):
                raise err from exc

    def list_keys(self, prefix: str = "") -> list[str]:
        base = f"{self.prefix}/" if self.prefix else ""
        keys = []
        try:
            for page in self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=base + prefix):
                keys.extend(obj["Key"][len(base) :] for obj in page.get("Contents", []))
        except Exception as exc:
            raise _wrap(exc, f"listing {self.url}") from exc
        return sorted(keys)

    def check(self) -> None:
        try:
            self.client.head_bucket(Bucket=self.bucket)
        except Exception as exc:
            raise _wrap(exc, f"object store {self.url} is not reachable") from exc


def _iter_body(body, chunk_size: int) -> Iterator[bytes]:
    try:
        yield from body.iter_chunks(chunk_size)
    finally:
        body.close()


def _wrap(exc: Exception, what: str) -> StorageError:
    if isinstance(exc, StorageError):
        return exc
    code = ""
    response = getattr(exc, "response", None)
    if isinstance(response, dict):
        code = str(response.get("Error", {}).get("Code", ""))
    if code in ("404", "NoSuchKey", "NotFound"):
        return ObjectNotFound(f"{what}: not found")
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
        retries={"mode": "standard", "max_attempts": 5},
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
