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

from api.errors import ApiError
from quantyard import archive, gguf_header
from quantyard.engine.errors import InvalidModel
from quantyard.engine.hf.sanity import check_config_sizes
from quantyard.settings import Settings

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
        program = check_program(path, kind, members, settings)
        if program is not None:
            return program
        raise ApiError(400, "invalid_model",
                       "the archive holds no config.json (at its top level or in its single top folder) and no "
                       "program file (.pt2, TorchScript .pt/.pth or .onnx)") from None
    except ValueError as exc:
        raise ApiError(400, "invalid_model", str(exc)) from None
    try:  # absurd sizes (num_hidden_layers 1e6, vocab_size 1e12) refused before anything is stored
        check_config_sizes(config)
    except InvalidModel as exc:
        raise ApiError(400, "invalid_model", exc.message, details=exc.details) from None
    return CheckedSource(path, kind, members, root, config, archive.architecture_of(config))


def _program_root(members: list[archive.MemberInfo]) -> tuple[str, list[str]]:
    """Where a program source's files are ("" or the single top folder), and their names there."""
    files = [m.name for m in members if not m.is_dir]
    top = [n for n in files if "/" not in n]
    if top or not files:
        return "", top
    root = files[0].split("/", 1)[0]
    if all(n.startswith(root + "/") for n in files):
        return root, [n[len(root) + 1:] for n in files if "/" not in n[len(root) + 1:]]
    return "", []


def check_program(path: Path, kind: str, members: list[archive.MemberInfo],
                  settings: Settings) -> CheckedSource | None:
    """A folder without config.json holding one .pt2 / TorchScript / .onnx file: its kind is read
    from the bytes (the API never loads it); pickles are refused here, before anything is stored."""
    from quantyard.engine.onnx import program_files

    if kind == archive.KIND_ZIP and program_files.classify(path) in program_files.PROGRAM_KINDS:
        raise ApiError(400, "invalid_model", "this is a single torch.export/TorchScript file: upload it inside a "
                       "folder (a .tar.gz, or multipart 'files'), e.g. with `quantyard submit model.pt2`")
    root, names = _program_root(members)
    found = program_files.candidates(names)
    if not found:
        return None
    if len(found) > 1:
        raise ApiError(400, "invalid_model", f"a program source holds exactly one model file; found {', '.join(found)}")
    member = f"{root}/{found[0]}" if root else found[0]
    local = path.with_name(f"{path.name}.model{Path(found[0]).suffix}")  # the suffix tells .onnx apart
    try:
        archive.extract_member(path, member, local, max_bytes=settings.max_unpacked_bytes)
        source_kind = program_files.classify(local)
    finally:
        local.unlink(missing_ok=True)
    if source_kind in program_files.PICKLE_KINDS:
        raise ApiError(400, "invalid_model", f"refused {found[0]}: it is a pickle ({source_kind}), not a torch.export "
                       "or TorchScript program; Quantyard never unpickles arbitrary objects (an unsafe pickle could "
                       "run code). Save the model with torch.export.save or torch.jit.save, or export it to .onnx",
                       details={"file": found[0], "reason": "unsafe_pickle"})
    if source_kind not in program_files.PROGRAM_KINDS:
        raise ApiError(400, "invalid_model", f"{found[0]} is neither a torch.export archive, a TorchScript archive "
                       "nor an ONNX model")
    config = {"format": "program", "source_kind": source_kind, "model_file": found[0],
              "inputs_json": program_files.INPUTS_FILE in names}
    return CheckedSource(path, kind, members, root, config, source_kind)


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
    if config.get("format") == "program":  # no config.json: what check_program found
        return {**config, "archive_kind": checked.kind, "model_root": checked.root, "file_count": len(files),
                "unpacked_bytes": sum(m.size for m in files), "files": [m.name for m in files][:200]}
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
