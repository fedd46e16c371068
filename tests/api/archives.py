"""Builders of small model archives (good and hostile) for the API and archive tests."""

from __future__ import annotations

import io
import json
import tarfile
import zipfile

CONFIG = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 8}


def _tar(members: list[tuple[tarfile.TarInfo, bytes | None]], mode: str = "w:gz") -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode=mode, format=tarfile.PAX_FORMAT) as tf:
        for ti, data in members:
            tf.addfile(ti, io.BytesIO(data) if data is not None else None)
    return buf.getvalue()


def file_member(name: str, data: bytes) -> tuple[tarfile.TarInfo, bytes]:
    ti = tarfile.TarInfo(name)
    ti.size = len(data)
    return ti, data


def model_files(config: dict | None = None) -> dict[str, bytes]:
    return {
        "config.json": json.dumps(config or CONFIG).encode(),
        "model.safetensors": b"\x08\x00\x00\x00\x00\x00\x00\x00{}      " + b"\x00" * 64,
        "tokenizer.json": b'{"model": {}}',
    }


def model_tar_gz(files: dict[str, bytes] | None = None, *, prefix: str = "", extra=()) -> bytes:
    files = model_files() if files is None else files
    members = [file_member(prefix + n, d) for n, d in files.items()]
    return _tar(members + list(extra), "w:gz")


def model_tar(files: dict[str, bytes] | None = None) -> bytes:
    files = model_files() if files is None else files
    return _tar([file_member(n, d) for n, d in files.items()], "w")


def model_zip(files: dict[str, bytes] | None = None, extra: dict[str, bytes] | None = None) -> bytes:
    files = model_files() if files is None else files
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        for n, d in {**files, **(extra or {})}.items():
            zf.writestr(zipfile.ZipInfo(n), d)
    return buf.getvalue()


def traversal_tar_gz() -> bytes:
    return model_tar_gz(extra=[file_member("../evil.txt", b"pwned")])


def symlink_tar_gz() -> bytes:
    link = tarfile.TarInfo("weights.bin")
    link.type = tarfile.SYMTYPE
    link.linkname = "/etc/passwd"
    return model_tar_gz(extra=[(link, None)])


def hardlink_tar_gz() -> bytes:
    link = tarfile.TarInfo("hard.bin")
    link.type = tarfile.LNKTYPE
    link.linkname = "config.json"
    return model_tar_gz(extra=[(link, None)])


def device_tar_gz() -> bytes:
    dev = tarfile.TarInfo("null")
    dev.type = tarfile.CHRTYPE
    dev.devmajor, dev.devminor = 1, 3
    return model_tar_gz(extra=[(dev, None)])


def fifo_tar_gz() -> bytes:
    fifo = tarfile.TarInfo("pipe")
    fifo.type = tarfile.FIFOTYPE
    return model_tar_gz(extra=[(fifo, None)])


def absolute_zip() -> bytes:
    return model_zip(extra={"/etc/cron.d/evil": b"* * * * * root true"})


def symlink_zip() -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for n, d in model_files().items():
            zf.writestr(n, d)
        zi = zipfile.ZipInfo("link")
        zi.create_system = 3
        zi.external_attr = (0o120777 << 16)
        zf.writestr(zi, "/etc/passwd")
    return buf.getvalue()
