"""Safe inspection, extraction and packing of model archives (.tar, .tar.gz/.tgz, .zip).

Pure standard library; used by the API (to check an upload before it is stored) and by the
worker (to unpack a source before conversion). The archive kind is detected from magic bytes,
never from the file name.

Rules (both at inspection and, again, while extracting):

* member names must be relative, without ``..`` components, NUL bytes or drive letters;
* only regular files and directories: symlinks, hard links, devices and fifos are refused;
* no duplicate member names;
* at most ``max_members`` members and at most ``max_unpacked_bytes`` bytes in total. Extraction
  counts the bytes really written, so an archive whose headers under-state its sizes is stopped
  as soon as it passes the cap;
* no compression bomb: past ``RATIO_FLOOR_BYTES``, neither one zip member nor the whole archive
  may unpack to more than ``max_ratio`` times its compressed size. Sizes are checked from the
  headers, before the data is decompressed;
* caps checked before anything is allocated for them: a zip's member count is read from its
  end-of-central-directory record (zip64 too) and its central directory is walked entry by entry
  before ``zipfile`` builds a ZipInfo per entry; tar metadata headers (pax, GNU long names) are
  limited to ``MAX_META_HEADER_BYTES`` before ``tarfile`` reads them into memory;
* archives inside the archive are ordinary files: never unpacked.
"""

from __future__ import annotations

import gzip
import os
import stat
import struct
import tarfile
import zipfile
import zlib
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Iterator

from quantyard.engine.errors import InvalidModel
from quantyard.engine.jsonsafe import load_json_object

_CHUNK = 1 << 20

#: A member (or archive) may unpack to at most this many times its compressed size ...
MAX_COMPRESSION_RATIO = 100
#: ... once it unpacks to more than this (small files compress far better than weights do).
RATIO_FLOOR_BYTES = 32 * 1024 * 1024
#: Longest member name accepted (Linux's PATH_MAX).
MAX_NAME_BYTES = 4096
#: Biggest pax / GNU long-name header tarfile may read into memory.
MAX_META_HEADER_BYTES = 1024 * 1024
#: Biggest zip central directory zipfile may parse (10,000 members with long names fit easily).
MAX_ZIP_DIRECTORY_BYTES = 64 * 1024 * 1024

KIND_TAR = "tar"
KIND_TAR_GZ = "tar.gz"
KIND_TAR_BZ2 = "tar.bz2"
KIND_TAR_XZ = "tar.xz"
KIND_ZIP = "zip"

#: File extension (without the dot) conventionally used for each kind.
EXTENSIONS = {
    KIND_TAR: "tar",
    KIND_TAR_GZ: "tar.gz",
    KIND_TAR_BZ2: "tar.bz2",
    KIND_TAR_XZ: "tar.xz",
    KIND_ZIP: "zip",
}


class ArchiveError(ValueError):
    """Base class: the file cannot be used as a model archive."""


class InvalidArchive(ArchiveError):
    """Not an archive of a supported kind, or corrupt."""


class UnsafeArchive(ArchiveError):
    """The archive holds something that must not be unpacked (``member`` names it, if any)."""

    def __init__(self, message: str, *, member: str | None = None):
        super().__init__(message)
        self.member = member


@dataclass(frozen=True)
class MemberInfo:
    name: str  # normalised relative POSIX path, no trailing slash
    size: int  # uncompressed size as declared by the archive (0 for directories)
    is_dir: bool


# --------------------------------------------------------------------------- detection


def detect_kind(path: str | os.PathLike) -> str:
    """Return the archive kind of ``path`` from its magic bytes; raise InvalidArchive."""
    with open(path, "rb") as f:
        head = f.read(512)
    if head[:2] == b"\x1f\x8b":
        return KIND_TAR_GZ
    if head[:4] in (b"PK\x03\x04", b"PK\x05\x06"):
        return KIND_ZIP
    if head[:3] == b"BZh":
        return KIND_TAR_BZ2
    if head[:6] == b"\xfd7zXZ\x00":
        return KIND_TAR_XZ
    if len(head) >= 262 and head[257:262] == b"ustar":
        return KIND_TAR
    # Old-style (v7) tar has no magic; let tarfile decide.
    try:
        if tarfile.is_tarfile(path):
            return KIND_TAR
    except OSError:
        pass
    raise InvalidArchive("not a supported archive (expected .tar, .tar.gz or .zip)")


def _tar_mode(kind: str) -> str:
    return {KIND_TAR: "r:", KIND_TAR_GZ: "r:gz", KIND_TAR_BZ2: "r:bz2", KIND_TAR_XZ: "r:xz"}[kind]


# --------------------------------------------------------------------------- name checks


def _normalise_name(raw: str) -> str:
    """Check a member name and return it normalised; raise UnsafeArchive."""
    if not raw:
        raise UnsafeArchive("archive member with an empty name", member=raw)
    if "\x00" in raw:
        raise UnsafeArchive(f"member {raw!r} has a NUL byte in its name", member=raw)
    name = raw.replace("\\", "/")
    if name.startswith("/"):
        raise UnsafeArchive(f"member {raw!r} has an absolute path", member=raw)
    if len(name) >= 2 and name[1] == ":" and name[0].isalpha():
        raise UnsafeArchive(f"member {raw!r} has a drive-letter path", member=raw)
    parts = [p for p in name.split("/") if p not in ("", ".")]
    if any(p == ".." for p in parts):
        raise UnsafeArchive(f"member {raw!r} escapes the archive root ('..')", member=raw)
    if not parts:
        return ""  # "./" - the root itself
    return str(PurePosixPath(*parts))


def _too_many(max_members: int, raw: str | None = None) -> UnsafeArchive:
    at = f" (at {raw!r})" if raw is not None else ""
    return UnsafeArchive(f"archive has more than {max_members} members{at}", member=raw)


class _Budget:
    def __init__(self, max_members: int, max_unpacked_bytes: int, *, archive_bytes: int = 0,
                 max_ratio: float = MAX_COMPRESSION_RATIO):
        self.max_members = max_members
        self.max_bytes = max_unpacked_bytes
        self.archive_bytes = archive_bytes
        self.max_ratio = max_ratio
        self.entries = 0  # every header, the root "./" and skipped ones included
        self.members = 0
        self.bytes = 0
        self.names: set[str] = set()

    def entry(self, raw: str) -> None:
        self.entries += 1
        if self.entries > self.max_members + 1:  # + 1: an archive may also list its root
            raise _too_many(self.max_members, raw)

    def member(self, name: str, raw: str) -> None:
        self.members += 1
        if self.members > self.max_members:
            raise _too_many(self.max_members, raw)
        if name in self.names:
            raise UnsafeArchive(f"member {raw!r} appears more than once", member=raw)
        self.names.add(name)

    def add_bytes(self, n: int, raw: str, *, compressed: int | None = None) -> None:
        self.bytes += n
        if self.bytes > self.max_bytes:
            raise UnsafeArchive(
                f"archive unpacks to more than {self.max_bytes} bytes (at member {raw!r})",
                member=raw,
            )
        if compressed is not None and self._bomb(n, compressed):
            raise UnsafeArchive(
                f"member {raw!r} unpacks to {n} bytes from {compressed}: more than "
                f"{self.max_ratio:g} times its compressed size (a compression bomb?)", member=raw)
        if self.archive_bytes and self._bomb(self.bytes, self.archive_bytes):
            raise UnsafeArchive(
                f"archive unpacks to more than {self.max_ratio:g} times its size of "
                f"{self.archive_bytes} bytes (at member {raw!r}; a compression bomb?)", member=raw)

    def _bomb(self, unpacked: int, compressed: int) -> bool:
        return unpacked > RATIO_FLOOR_BYTES and unpacked > self.max_ratio * max(compressed, 1)


# --------------------------------------------------------------------------- per-format iteration


class _CappedTarInfo(tarfile.TarInfo):
    """tarfile reads a pax or GNU long-name header's whole body into memory, at whatever size
    the header claims: refuse big ones before that read (and sparse files, whose maps grow
    without bound)."""

    def _proc_member(self, tarfile_):
        meta = (tarfile.GNUTYPE_LONGNAME, tarfile.GNUTYPE_LONGLINK, tarfile.XHDTYPE,
                tarfile.XGLTYPE, tarfile.SOLARIS_XHDTYPE)
        if self.type in meta and self.size > MAX_META_HEADER_BYTES:
            raise UnsafeArchive(f"a tar metadata header claims {self.size} bytes "
                                f"(at most {MAX_META_HEADER_BYTES} allowed)")
        if self.type == tarfile.GNUTYPE_SPARSE:
            raise UnsafeArchive(f"member {self.name!r} is a sparse file", member=self.name)
        return super()._proc_member(tarfile_)


def _tar_type_problem(ti: tarfile.TarInfo) -> str | None:
    if ti.sparse is not None:
        return "is a sparse file"
    if ti.issym():
        return f"is a symbolic link (to {ti.linkname!r})"
    if ti.islnk():
        return f"is a hard link (to {ti.linkname!r})"
    if ti.ischr() or ti.isblk():
        return "is a device file"
    if ti.isfifo():
        return "is a fifo"
    if not (ti.isreg() or ti.isdir()):
        return f"has an unsupported type ({ti.type!r})"
    return None


def _zip_type_problem(zi: zipfile.ZipInfo) -> str | None:
    if zi.flag_bits & 0x41:  # bit 0: encrypted, bit 6: strong encryption
        return "is encrypted"
    mode = (zi.external_attr >> 16) & 0xFFFF
    if mode and zi.create_system == 3:  # Unix attributes present
        fmt = stat.S_IFMT(mode)
        if stat.S_ISLNK(mode):
            return "is a symbolic link"
        if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
            return "is a device file"
        if stat.S_ISFIFO(mode):
            return "is a fifo"
        if stat.S_ISSOCK(mode):
            return "is a socket"
        if fmt not in (0, stat.S_IFREG, stat.S_IFDIR):
            return "has an unsupported file type"
    return None


# Zip structures (APPNOTE 4.3.12-4.3.16): end of central directory, its zip64 locator and
# record, and a central directory file header.
_EOCD = struct.Struct("<4s4H2LH")
_EOCD64_LOCATOR = struct.Struct("<4sLQL")
_EOCD64 = struct.Struct("<4sQ2H2L4Q")
_CD_ENTRY = struct.Struct("<4s6H3L5H2L")


def _zip_directory(f, file_size: int) -> tuple[int, int, int]:
    """(offset, size, declared entry count) of the central directory, found the way zipfile
    finds it (the EOCD record at the end, after an optional comment; zip64 when its locator
    sits right before)."""
    # Exactly zipfile's search (_EndRecData): the record without a comment at the very end,
    # else the last signature in the final 64 KiB. Any other choice could check one directory
    # here and let zipfile parse another.
    tail_len = min(file_size, _EOCD.size + (1 << 16))
    f.seek(file_size - tail_len)
    tail = f.read(tail_len)
    if tail[-_EOCD.size:-_EOCD.size + 4] == b"PK\x05\x06" and tail[-2:] == b"\0\0":
        pos = len(tail) - _EOCD.size
    else:
        pos = tail.rfind(b"PK\x05\x06")
    if pos < 0 or pos + _EOCD.size > len(tail):
        raise InvalidArchive("corrupt zip archive: no end of central directory record")
    _, _, _, _, entries, cd_size, _, _ = _EOCD.unpack_from(tail, pos)
    eocd_at = file_size - tail_len + pos
    loc_at = eocd_at - _EOCD64_LOCATOR.size
    if loc_at >= _EOCD64.size:
        f.seek(loc_at)
        if f.read(4) == b"PK\x06\x07":
            f.seek(loc_at - _EOCD64.size)
            rec = f.read(_EOCD64.size)
            if len(rec) != _EOCD64.size or rec[:4] != b"PK\x06\x06":
                raise InvalidArchive("corrupt zip archive: bad zip64 end of central directory")
            _, _, _, _, _, _, _, entries, cd_size, _ = _EOCD64.unpack(rec)
            eocd_at = loc_at - _EOCD64.size
    if cd_size > eocd_at:
        raise InvalidArchive("corrupt zip archive: the central directory does not fit the file")
    return eocd_at - cd_size, cd_size, entries


def _zip_precheck(path: str | os.PathLike, max_members: int) -> None:
    """Member count and central directory size from the zip's own records, then a walk over the
    directory's fixed-size entry headers (zipfile trusts the directory size, not the count), so
    a zip of a million empty members is refused after reading max_members + 1 headers."""
    with open(path, "rb") as f:
        file_size = os.fstat(f.fileno()).st_size
        start, size, declared = _zip_directory(f, file_size)
        if declared > max_members + 1:
            raise _too_many(max_members)
        if size > MAX_ZIP_DIRECTORY_BYTES:
            raise UnsafeArchive(f"the zip's central directory is {size} bytes "
                                f"(at most {MAX_ZIP_DIRECTORY_BYTES} allowed)")
        f.seek(start)
        seen = count = 0
        while seen < size:
            head = f.read(_CD_ENTRY.size)
            if len(head) != _CD_ENTRY.size or head[:4] != b"PK\x01\x02":
                raise InvalidArchive("corrupt zip archive: bad central directory entry")
            name_len, extra_len, comment_len = _CD_ENTRY.unpack(head)[10:13]
            count += 1
            if count > max_members + 1:
                raise _too_many(max_members)
            if name_len > MAX_NAME_BYTES:
                raise UnsafeArchive(f"a zip member name is {name_len} bytes long "
                                    f"(at most {MAX_NAME_BYTES} allowed)")
            f.seek(name_len + extra_len + comment_len, os.SEEK_CUR)
            seen += _CD_ENTRY.size + name_len + extra_len + comment_len


def _why(exc: BaseException) -> str:
    """What went wrong reading an archive, in our words: the zip/tar/zlib libraries' own text
    and type names are not shown to tenants (they can name server paths and say nothing useful)."""
    if isinstance(exc, NotImplementedError):
        return "an unsupported zip version or compression method"
    if isinstance(exc, zlib.error | gzip.BadGzipFile):
        return "data that does not decompress"
    if isinstance(exc, EOFError):
        return "truncated data"
    if isinstance(exc, tarfile.TarError):
        return "a damaged tar header"
    return "damaged or truncated data (bad checksum, header or offset)"


def _check_name_length(raw: str) -> None:
    if len(raw.encode("utf-8", "surrogateescape")) > MAX_NAME_BYTES:
        raise UnsafeArchive(f"member {raw[:64]!r}... has a name longer than {MAX_NAME_BYTES} bytes",
                            member=raw[:256])


def _open_zip_member(zf: zipfile.ZipFile, zi: zipfile.ZipInfo):
    try:
        return zf.open(zi)
    except (zipfile.BadZipFile, OSError, ValueError, NotImplementedError, EOFError) as exc:
        # e.g. a local header offset before the start of the file (seek: EINVAL)
        raise InvalidArchive(f"corrupt zip archive at member {zi.filename!r}: {_why(exc)}") from None


def _iter_zip(path: str | os.PathLike, budget: _Budget):
    _zip_precheck(path, budget.max_members)
    try:
        zf = zipfile.ZipFile(path)
    except UnicodeDecodeError:  # a name flagged UTF-8 that is not
        raise InvalidArchive("corrupt zip archive: a member name is flagged UTF-8 but is not valid "
                             "UTF-8") from None
    except (zipfile.BadZipFile, OSError, EOFError, ValueError, NotImplementedError) as exc:
        raise InvalidArchive(f"corrupt zip archive: {_why(exc)}") from exc
    with zf:
        for zi in zf.infolist():
            raw = zi.filename
            budget.entry(raw)
            name = _normalise_name(raw)
            problem = _zip_type_problem(zi)
            if problem:
                raise UnsafeArchive(f"member {raw!r} {problem}", member=raw)
            if not name:
                continue
            budget.member(name, raw)
            is_dir = zi.is_dir()
            size = 0 if is_dir else zi.file_size
            budget.add_bytes(size, raw, compressed=zi.compress_size)
            yield MemberInfo(name, size, is_dir), (lambda zi=zi: _open_zip_member(zf, zi))


def _iter_checked(path: str | os.PathLike, budget: _Budget):
    """Yield (MemberInfo, opener) for every member after checking it; opener() -> file object."""
    kind = detect_kind(path)
    budget.archive_bytes = os.stat(path).st_size
    if kind == KIND_ZIP:
        yield from _iter_zip(path, budget)
        return
    try:
        tf = tarfile.open(path, _tar_mode(kind), tarinfo=_CappedTarInfo)
    except (tarfile.TarError, OSError, EOFError) as exc:
        raise InvalidArchive(f"corrupt {kind} archive: {_why(exc)}") from exc
    with tf:
        try:
            for ti in tf:
                raw = ti.name
                budget.entry(raw)
                _check_name_length(raw)
                name = _normalise_name(raw)
                problem = _tar_type_problem(ti)
                if problem:
                    raise UnsafeArchive(f"member {raw!r} {problem}", member=raw)
                if not name:
                    continue
                budget.member(name, raw)
                size = 0 if ti.isdir() else ti.size
                budget.add_bytes(size, raw)
                yield MemberInfo(name, size, ti.isdir()), (lambda ti=ti: tf.extractfile(ti))
        except (tarfile.TarError, EOFError, zipfile.BadZipFile, gzip.BadGzipFile, OSError) as exc:
            raise InvalidArchive(f"corrupt {kind} archive: {_why(exc)}") from exc


# --------------------------------------------------------------------------- public API


def inspect_archive(
    path: str | os.PathLike, *, max_members: int, max_unpacked_bytes: int,
    max_ratio: float = MAX_COMPRESSION_RATIO,
) -> list[MemberInfo]:
    """Check every member of the archive at ``path`` without unpacking it.

    Returns the members (directories included). Raises UnsafeArchive naming the offending
    member, or InvalidArchive when the file is not a readable archive.
    """
    budget = _Budget(max_members, max_unpacked_bytes, max_ratio=max_ratio)
    return [info for info, _ in _iter_checked(path, budget)]


def extract_archive(
    path: str | os.PathLike,
    dest: str | os.PathLike,
    *,
    max_members: int,
    max_unpacked_bytes: int,
    max_ratio: float = MAX_COMPRESSION_RATIO,
) -> list[MemberInfo]:
    """Unpack the archive into ``dest`` (created if needed), re-checking every member.

    File modes, owners and times from the archive are ignored (files 0644, directories 0755).
    The bytes actually written are counted against ``max_unpacked_bytes``. On any error the
    partially written files are left in ``dest`` for the caller to remove (callers normally
    extract into a fresh temporary directory).
    """
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    root = dest.resolve()
    header_budget = _Budget(max_members, max_unpacked_bytes, max_ratio=max_ratio)
    written = 0
    out: list[MemberInfo] = []
    for info, opener in _iter_checked(path, header_budget):
        target = (root / info.name).resolve()
        if target != root and root not in target.parents:
            raise UnsafeArchive(f"member {info.name!r} resolves outside the destination", member=info.name)
        if info.is_dir:
            target.mkdir(parents=True, exist_ok=True, mode=0o755)
            out.append(info)
            continue
        target.parent.mkdir(parents=True, exist_ok=True, mode=0o755)
        if target.is_symlink() or target.exists():
            raise UnsafeArchive(f"member {info.name!r} would overwrite an existing path", member=info.name)
        try:
            src = opener()
            if src is None:  # pragma: no cover - tarfile returns None only for non-files
                raise UnsafeArchive(f"member {info.name!r} is not a regular file", member=info.name)
            with src, open(target, "xb") as dst:
                while True:
                    chunk = src.read(_CHUNK)
                    if not chunk:
                        break
                    written += len(chunk)
                    if written > max_unpacked_bytes:
                        raise UnsafeArchive(
                            f"archive unpacks to more than {max_unpacked_bytes} bytes "
                            f"(at member {info.name!r})",
                            member=info.name,
                        )
                    dst.write(chunk)
        except _READ_ERRORS as exc:
            raise InvalidArchive(f"corrupt archive at member {info.name!r}: {_why(exc)}") from exc
        os.chmod(target, 0o644)
        out.append(info)
    return out


# read_member / extract_member look one member up in an archive already inspected with the
# caller's caps; these only keep a lookup bounded.
_LOOKUP_MAX_MEMBERS = 1 << 20


def model_root(members: list[MemberInfo], marker: str = "config.json") -> str | None:
    """Where the model lives inside the archive: "" when ``marker`` is at the top level, "dir"
    when every member sits under one top-level directory that holds ``marker``; else None."""
    names = {m.name for m in members if not m.is_dir}
    if marker in names:
        return ""
    tops = {m.name.split("/", 1)[0] for m in members}
    if len(tops) == 1:
        top = next(iter(tops))
        if f"{top}/{marker}" in names:
            return top
    return None


_READ_ERRORS = (zipfile.BadZipFile, tarfile.TarError, EOFError, gzip.BadGzipFile, zlib.error,
                NotImplementedError)  # NotImplementedError: an unknown zip compression method


@contextmanager
def _reading(name: str) -> Iterator[None]:
    """A member's data that does not decompress or fails its CRC is a corrupt archive."""
    try:
        yield
    except _READ_ERRORS as exc:
        raise InvalidArchive(f"corrupt archive at member {name!r}: {_why(exc)}") from None


def read_member(path: str | os.PathLike, name: str, *, max_bytes: int = 16 << 20) -> bytes:
    """Read one (small) regular-file member by its normalised name; KeyError if absent."""
    budget = _Budget(max_members=_LOOKUP_MAX_MEMBERS, max_unpacked_bytes=1 << 62)
    for info, opener in _iter_checked(path, budget):
        if info.name == name and not info.is_dir:
            if info.size > max_bytes:
                raise InvalidArchive(f"member {name!r} is larger than {max_bytes} bytes")
            with _reading(name), opener() as f:
                data = f.read(max_bytes + 1)
            if len(data) > max_bytes:
                raise InvalidArchive(f"member {name!r} is larger than {max_bytes} bytes")
            return data
    raise KeyError(name)


def extract_member(path: str | os.PathLike, name: str, dest: str | os.PathLike, *, max_bytes: int) -> Path:
    """Stream one regular-file member (by its normalised name) to ``dest``; KeyError if absent."""
    budget = _Budget(max_members=_LOOKUP_MAX_MEMBERS, max_unpacked_bytes=1 << 62)
    for info, opener in _iter_checked(path, budget):
        if info.name == name and not info.is_dir:
            written = 0
            with _reading(name), opener() as src, open(dest, "wb") as out:
                while chunk := src.read(_CHUNK):
                    written += len(chunk)
                    if written > max_bytes:
                        raise UnsafeArchive(f"member {name!r} is larger than {max_bytes} bytes", member=name)
                    out.write(chunk)
            return Path(dest)
    raise KeyError(name)


#: config.json is a few KB; anything past this is not a model config.
MAX_CONFIG_BYTES = 4 * 1024 * 1024


def read_model_config(path: str | os.PathLike, members: list[MemberInfo]) -> tuple[str, dict]:
    """Return (model root inside the archive, parsed config.json). Raises KeyError when the
    archive holds no config.json at its top (or in its single top-level directory) and
    ValueError when config.json is not a JSON object."""
    root = model_root(members)
    if root is None:
        raise KeyError("config.json")
    raw = read_member(path, f"{root}/config.json" if root else "config.json",
                      max_bytes=MAX_CONFIG_BYTES)
    try:
        config = load_json_object(raw, name="config.json", max_bytes=MAX_CONFIG_BYTES)
    except InvalidModel as exc:
        raise ValueError(exc.message) from None
    return root, config


def architecture_of(config: dict) -> str | None:
    """The architecture named by a Hugging Face config.json (architectures[0], else model_type)."""
    archs = config.get("architectures")
    if isinstance(archs, list) and archs and isinstance(archs[0], str):
        return archs[0]
    mt = config.get("model_type")
    return mt if isinstance(mt, str) else None


_SKIP_DIRS = {".git", ".cache"}


def _walk_files(src: Path) -> Iterator[tuple[str, Path]]:
    for dirpath, dirnames, filenames in os.walk(src, followlinks=False):
        dirnames[:] = sorted(d for d in dirnames if d not in _SKIP_DIRS)
        for fn in sorted(filenames):
            full = Path(dirpath) / fn
            rel = full.relative_to(src).as_posix()
            yield rel, full


def pack_directory(src_dir: str | os.PathLike, dest_path: str | os.PathLike, *, compresslevel: int = 1) -> Path:
    """Pack the regular files under ``src_dir`` into a reproducible tar.gz at ``dest_path``.

    Member names are relative to ``src_dir``; symbolic links to regular files (as in a
    Hugging Face cache snapshot) are stored as the files they point to; other special files,
    ``.git`` and ``.cache`` folders are skipped. Owners, modes and times are normalised so
    the same folder always gives the same bytes (and so the same sha256).
    """
    src = Path(src_dir)
    if not src.is_dir():
        raise NotADirectoryError(str(src))
    dest = Path(dest_path)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(dest.name + ".partial")
    try:
        with open(tmp, "wb") as raw, gzip.GzipFile(
            filename="", mode="wb", fileobj=raw, compresslevel=compresslevel, mtime=0
        ) as gz, tarfile.open(fileobj=gz, mode="w", format=tarfile.PAX_FORMAT) as tf:
            for rel, full in _walk_files(src):
                try:
                    st = full.stat()  # follows symlinks
                except FileNotFoundError:
                    continue  # dangling link
                if not stat.S_ISREG(st.st_mode):
                    continue
                ti = tarfile.TarInfo(rel)
                ti.size = st.st_size
                ti.mode = 0o644
                ti.mtime = 0
                ti.uid = ti.gid = 0
                ti.uname = ti.gname = ""
                with open(full, "rb") as f:
                    tf.addfile(ti, f)
        os.replace(tmp, dest)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return dest


def pack_files(files: list[tuple[str, Path]], dest_path: str | os.PathLike) -> Path:
    """Pack (member name, file path) pairs into a plain tar at ``dest_path`` (names are checked)."""
    dest = Path(dest_path)
    seen: set[str] = set()
    with tarfile.open(dest, mode="w", format=tarfile.PAX_FORMAT) as tf:
        for raw, path in files:
            name = _normalise_name(raw)
            if not name:
                raise UnsafeArchive(f"file name {raw!r} is not usable", member=raw)
            if name in seen:
                raise UnsafeArchive(f"file {raw!r} given more than once", member=raw)
            seen.add(name)
            ti = tarfile.TarInfo(name)
            ti.size = Path(path).stat().st_size
            ti.mode = 0o644
            ti.mtime = 0
            with open(path, "rb") as f:
                tf.addfile(ti, f)
    return dest


__all__ = [
    "ArchiveError",
    "InvalidArchive",
    "UnsafeArchive",
    "MemberInfo",
    "EXTENSIONS",
    "detect_kind",
    "inspect_archive",
    "extract_archive",
    "model_root",
    "read_member",
    "extract_member",
    "read_model_config",
    "architecture_of",
    "pack_directory",
    "pack_files",
]
