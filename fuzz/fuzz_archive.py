"""Fuzz target: archive inspection and extraction (quantyard/archive.py) on tar / tar.gz / zip
bytes.

Only ArchiveError (InvalidArchive, UnsafeArchive) may escape. An archive that inspect_archive
accepts is extracted into a fresh folder with the same caps: that may still refuse it (the bytes
really written are counted), but whatever it leaves must be plain files and folders inside the
destination, within the byte cap. read_model_config may answer KeyError (no config.json) or
ValueError / InvalidModel (config.json unusable), as documented.
"""

from __future__ import annotations

import os
from pathlib import Path

import _harness
import atheris

with atheris.instrument_imports(include=["quantyard", "tarfile", "zipfile", "gzip"]):
    from quantyard import archive
    from quantyard.engine.errors import InvalidModel

MAX_LEN = 64 * 1024
MAX_MEMBERS = 256
MAX_UNPACKED = 4 * 1024 * 1024
scratch = _harness.Scratch()


def _check_tree(dest: Path) -> None:
    total = 0
    root = dest.resolve()
    for dirpath, dirnames, filenames in os.walk(dest, followlinks=False):
        for name in dirnames + filenames:
            path = Path(dirpath) / name
            assert not path.is_symlink(), f"finding: extraction made a symlink {path}"
            assert root in path.resolve().parents, f"finding: {path} is outside the destination"
            if name in filenames:
                assert path.is_file(), f"finding: {path} is not a regular file"
                total += path.stat().st_size
    assert total <= MAX_UNPACKED, f"finding: {total} bytes unpacked past the cap"


def parse(data: bytes) -> None:
    path = scratch.write(data, "upload")
    members = archive.inspect_archive(path, max_members=MAX_MEMBERS, max_unpacked_bytes=MAX_UNPACKED)
    try:
        archive.read_model_config(path, members)
    except (KeyError, ValueError, InvalidModel):
        pass
    dest = scratch.fresh_dir("out")
    try:
        archive.extract_archive(path, dest, max_members=MAX_MEMBERS, max_unpacked_bytes=MAX_UNPACKED)
    finally:
        _check_tree(dest)


if __name__ == "__main__":
    allowed = (archive.ArchiveError,)
    _harness.main(_harness.guarded(parse, allowed, max_len=MAX_LEN), max_len=MAX_LEN, dictionary="archive.dict")
