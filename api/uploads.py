"""Receiving model sources: request bodies streamed to disk with a size cap, archives checked.

Nothing here holds a whole upload in memory: bodies are written to a temporary file in 1 MiB
blocks (in a worker thread) while their sha256 is computed.
"""

from __future__ import annotations

import hashlib
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import AsyncIterator

from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile
from starlette.formparsers import MultiPartException, MultiPartParser
from starlette.requests import Request

from quantyard import archive, gguf_header
from quantyard.settings import Settings

from api.errors import ApiError

ARCHIVE_TYPES = {
    "application/gzip",
    "application/x-gzip",
    "application/x-tar",
    "application/x-gtar",
    "application/zip",
    "application/x-zip-compressed",
    "application/octet-stream",  # accepted: the kind is detected from the bytes anyway
}
MULTIPART = "multipart/form-data"
_BLOCK = 1 << 20


@dataclass
class Received:
    path: Path
    sha256: str
    size_bytes: int


@dataclass
class CheckedSource:
    path: Path
    kind: str
    members: list[archive.MemberInfo]
    root: str
    config: dict
    architecture: str | None


def upload_dir(settings: Settings) -> Path:
    d = settings.data_dir / "tmp" / "uploads"
    d.mkdir(parents=True, exist_ok=True)
    return d


def too_large(limit: int) -> ApiError:
    return ApiError(413, "payload_too_large", f"upload is larger than the limit of {limit} bytes")


def check_content_length(request: Request, limit: int) -> None:
    raw = request.headers.get("content-length")
    if raw is None:
        return
    try:
        length = int(raw)
    except ValueError:
        raise ApiError(400, "bad_request", "Content-Length is not a number") from None
    if length > limit:
        raise too_large(limit)


async def capped_stream(request: Request, limit: int) -> AsyncIterator[bytes]:
    total = 0
    async for chunk in request.stream():
        total += len(chunk)
        if total > limit:
            raise too_large(limit)
        yield chunk


def _write(f, hasher, buf: bytes) -> None:
    f.write(buf)
    hasher.update(buf)


async def receive_body(request: Request, dest: Path, limit: int) -> Received:
    """Stream the request body into ``dest`` (at most ``limit`` bytes), hashing it on the way."""
    hasher = hashlib.sha256()
    size = 0
    buf = bytearray()
    with open(dest, "wb") as f:
        async for chunk in capped_stream(request, limit):
            size += len(chunk)
            buf += chunk
            if len(buf) >= _BLOCK:
                block = bytes(buf)
                buf.clear()
                await run_in_threadpool(_write, f, hasher, block)
        if buf:
            await run_in_threadpool(_write, f, hasher, bytes(buf))
    return Received(dest, hasher.hexdigest(), size)


def hash_file(path: Path) -> tuple[str, int]:
    h = hashlib.sha256()
    size = 0
    with open(path, "rb") as f:
        while block := f.read(_BLOCK):
            h.update(block)
            size += len(block)
    return h.hexdigest(), size


async def receive_multipart(request: Request, workdir: Path, limit: int) -> Path:
    """Parse a multipart body whose ``files`` parts are model files, and pack them into a tar.

    The body passes the same size cap; Starlette spools each file part to disk past 1 MiB.
    Returns the tar's path.
    """
    parser = MultiPartParser(request.headers, capped_stream(request, limit), max_files=10_000)
    try:
        form = await parser.parse()
    except MultiPartException as exc:
        raise ApiError(400, "bad_request", f"malformed multipart body: {exc.message}") from exc
    try:
        uploads = [v for k, v in form.multi_items() if k == "files" and isinstance(v, UploadFile)]
        if not uploads:
            raise ApiError(422, "validation_error", "multipart upload needs one or more 'files' parts")
        files_dir = workdir / "files"
        files_dir.mkdir()
        pairs: list[tuple[str, Path]] = []
        for i, up in enumerate(uploads):
            if not up.filename:
                raise ApiError(422, "validation_error", f"'files' part #{i + 1} has no filename")
            local = files_dir / f"{i:05d}"

            def _copy(up=up, local=local):
                up.file.seek(0)
                with open(local, "wb") as out:
                    shutil.copyfileobj(up.file, out, _BLOCK)

            await run_in_threadpool(_copy)
            pairs.append((up.filename, local))
        tar_path = workdir / "source.tar"
        await run_in_threadpool(archive.pack_files, pairs, tar_path)
        shutil.rmtree(files_dir, ignore_errors=True)
        return tar_path
    finally:
        await form.close()


def check_source_archive(path: Path, settings: Settings) -> CheckedSource:
    """Safety checks, then config.json. Raises UnsafeArchive / InvalidArchive / ApiError.
    A single GGUF file is a source too (for requantization): its header is read, nothing else."""
    if gguf_header.is_gguf(path):
        return check_gguf(path)
    kind = archive.detect_kind(path)
    members = archive.inspect_archive(path, max_members=settings.max_archive_members,
                                      max_unpacked_bytes=settings.max_unpacked_bytes)
    try:
        root, config = archive.read_model_config(path, members)
    except KeyError:
        raise ApiError(400, "invalid_model",
                       "the archive holds no config.json (at its top level or in its single top folder)") from None
    except ValueError as exc:
        raise ApiError(400, "invalid_model", str(exc)) from None
    return CheckedSource(path, kind, members, root, config, archive.architecture_of(config))


def check_gguf(path: Path) -> CheckedSource:
    try:
        info = gguf_header.summary(path)
    except gguf_header.NotGGUF as exc:
        raise ApiError(400, "invalid_model", f"the GGUF file is unreadable: {exc}") from None
    if info["split_count"] and info["split_count"] > 1:
        raise ApiError(400, "invalid_model", "this GGUF is one shard of a split model; upload the "
                       "shards as one archive or merge them first")
    return CheckedSource(path, "gguf", [], "", info, info["architecture"])


def source_metadata(checked: CheckedSource) -> dict:
    if checked.kind == "gguf":
        return dict(checked.config)
    files = [m for m in checked.members if not m.is_dir]
    config = checked.config
    return {
        "archive_kind": checked.kind,
        "model_root": checked.root,
        "model_type": config.get("model_type") if isinstance(config.get("model_type"), str) else None,
        "architectures": [a for a in config.get("architectures", []) if isinstance(a, str)]
        if isinstance(config.get("architectures"), list) else [],
        "file_count": len(files),
        "unpacked_bytes": sum(m.size for m in files),
        "files": [m.name for m in files][:200],
    }


def new_workdir(settings: Settings) -> Path:
    return Path(tempfile.mkdtemp(prefix="upload-", dir=upload_dir(settings)))


def remove(path: Path) -> None:
    """Remove a temporary file or directory; missing is fine."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)
