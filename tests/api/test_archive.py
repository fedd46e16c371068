"""quantyard.archive: detection, safety checks, extraction with a real byte count, packing."""

from __future__ import annotations

import gzip
import hashlib
import io
import os
import tarfile
from pathlib import Path

import pytest

from quantyard import archive
from quantyard.archive import InvalidArchive, UnsafeArchive
from tests.api import archives

BIG = 1 << 30


def write(tmp_path: Path, data: bytes, name: str = "a.bin") -> Path:
    p = tmp_path / name
    p.write_bytes(data)
    return p


@pytest.mark.parametrize("builder,kind", [
    (archives.model_tar_gz, "tar.gz"), (archives.model_tar, "tar"), (archives.model_zip, "zip"),
])
def test_detects_kind_from_bytes_not_name(tmp_path, builder, kind):
    p = write(tmp_path, builder(), "misleading.txt")
    assert archive.detect_kind(p) == kind
    members = archive.inspect_archive(p, max_members=100, max_unpacked_bytes=BIG)
    assert {m.name for m in members} == set(archives.model_files())
    root, config = archive.read_model_config(p, members)
    assert root == "" and archive.architecture_of(config) == "LlamaForCausalLM"


def test_not_an_archive(tmp_path):
    with pytest.raises(InvalidArchive):
        archive.inspect_archive(write(tmp_path, b"hello world" * 100), max_members=10, max_unpacked_bytes=BIG)


def test_truncated_gzip_is_invalid(tmp_path):
    data = archives.model_tar_gz()
    with pytest.raises(InvalidArchive):
        archive.inspect_archive(write(tmp_path, data[: len(data) // 2]), max_members=10, max_unpacked_bytes=BIG)


@pytest.mark.parametrize("builder,member", [
    (archives.traversal_tar_gz, "../evil.txt"),
    (archives.symlink_tar_gz, "weights.bin"),
    (archives.hardlink_tar_gz, "hard.bin"),
    (archives.device_tar_gz, "null"),
    (archives.fifo_tar_gz, "pipe"),
    (archives.absolute_zip, "/etc/cron.d/evil"),
    (archives.symlink_zip, "link"),
])
def test_unsafe_members_are_named(tmp_path, builder, member):
    p = write(tmp_path, builder())
    with pytest.raises(UnsafeArchive) as exc:
        archive.inspect_archive(p, max_members=100, max_unpacked_bytes=BIG)
    assert exc.value.member == member
    assert member in str(exc.value)
    dest = tmp_path / "out"
    with pytest.raises(UnsafeArchive):
        archive.extract_archive(p, dest, max_members=100, max_unpacked_bytes=BIG)
    assert not (tmp_path / "evil.txt").exists()


def test_absolute_tar_member(tmp_path):
    p = write(tmp_path, archives.model_tar_gz(extra=[archives.file_member("/tmp/x", b"x")]))
    with pytest.raises(UnsafeArchive, match="absolute"):
        archive.inspect_archive(p, max_members=100, max_unpacked_bytes=BIG)


def test_too_many_members_and_too_big(tmp_path):
    p = write(tmp_path, archives.model_tar_gz())
    with pytest.raises(UnsafeArchive, match="more than 2 members"):
        archive.inspect_archive(p, max_members=2, max_unpacked_bytes=BIG)
    with pytest.raises(UnsafeArchive, match="more than 10 bytes"):
        archive.inspect_archive(p, max_members=100, max_unpacked_bytes=10)


def test_lying_zip_header_cannot_bypass_the_cap(tmp_path):
    """A zip whose central directory under-states a member's size: extraction counts real bytes."""
    payload = b"A" * 100_000
    buf = io.BytesIO()
    import zipfile

    with zipfile.ZipFile(buf, "w", zipfile.ZIP_STORED) as zf:
        zf.writestr("config.json", b"{}")
        zf.writestr("big.bin", payload)
    data = bytearray(buf.getvalue())
    # Patch the declared uncompressed size of big.bin in the central directory to 10 bytes.
    cd = data.rfind(b"PK\x01\x02")
    assert data[cd + 46: cd + 46 + 7] == b"big.bin"
    data[cd + 24: cd + 28] = (10).to_bytes(4, "little")
    p = write(tmp_path, bytes(data))
    # Headers claim 12 bytes in total: inspection passes ...
    archive.inspect_archive(p, max_members=10, max_unpacked_bytes=1000)
    # ... but extraction never writes more than the cap (zipfile refuses or we stop it).
    with pytest.raises((UnsafeArchive, InvalidArchive)):
        archive.extract_archive(p, tmp_path / "out", max_members=10, max_unpacked_bytes=1000)
    total = sum(f.stat().st_size for f in (tmp_path / "out").rglob("*") if f.is_file())
    assert total <= 1000


def test_extract_counts_real_bytes_for_tar(tmp_path):
    p = write(tmp_path, archives.model_tar_gz())
    members = archive.inspect_archive(p, max_members=100, max_unpacked_bytes=BIG)
    total = sum(m.size for m in members)
    with pytest.raises(UnsafeArchive):
        archive.extract_archive(p, tmp_path / "o", max_members=100, max_unpacked_bytes=total - 1)
    out = archive.extract_archive(p, tmp_path / "ok", max_members=100, max_unpacked_bytes=total)
    assert {m.name for m in out} == set(archives.model_files())
    for name, data in archives.model_files().items():
        assert (tmp_path / "ok" / name).read_bytes() == data


def test_single_top_folder_is_the_model_root(tmp_path):
    p = write(tmp_path, archives.model_tar_gz(prefix="tiny-llama/"))
    members = archive.inspect_archive(p, max_members=100, max_unpacked_bytes=BIG)
    root, config = archive.read_model_config(p, members)
    assert root == "tiny-llama" and config["model_type"] == "llama"


def test_missing_config(tmp_path):
    p = write(tmp_path, archives.model_tar_gz({"model.safetensors": b"x"}))
    members = archive.inspect_archive(p, max_members=100, max_unpacked_bytes=BIG)
    with pytest.raises(KeyError):
        archive.read_model_config(p, members)


def test_duplicate_members_refused(tmp_path):
    p = write(tmp_path, archives.model_tar_gz(extra=[archives.file_member("./config.json", b"{}")]))
    with pytest.raises(UnsafeArchive, match="more than once"):
        archive.inspect_archive(p, max_members=100, max_unpacked_bytes=BIG)


def test_pack_directory_roundtrip_and_reproducible(tmp_path):
    src = tmp_path / "model"
    (src / "sub").mkdir(parents=True)
    for name, data in archives.model_files().items():
        (src / name).write_bytes(data)
    (src / "sub" / "extra.txt").write_bytes(b"extra")
    (src / ".git").mkdir()
    (src / ".git" / "HEAD").write_bytes(b"ref")
    blob = tmp_path / "blob"
    blob.write_bytes(b"linked weights")
    os.symlink(blob, src / "linked.bin")
    a = archive.pack_directory(src, tmp_path / "a.tar.gz")
    os.utime(src / "config.json", (1, 1))
    b = archive.pack_directory(src, tmp_path / "b.tar.gz")
    assert hashlib.sha256(a.read_bytes()).digest() == hashlib.sha256(b.read_bytes()).digest()
    assert archive.detect_kind(a) == "tar.gz"
    members = archive.inspect_archive(a, max_members=100, max_unpacked_bytes=BIG)
    names = {m.name for m in members}
    assert names == set(archives.model_files()) | {"sub/extra.txt", "linked.bin"}
    out = tmp_path / "out"
    archive.extract_archive(a, out, max_members=100, max_unpacked_bytes=BIG)
    assert (out / "linked.bin").read_bytes() == b"linked weights"
    assert not (out / "linked.bin").is_symlink()
    with tarfile.open(a) as tf, gzip.open(a) as _:
        assert all(ti.isreg() for ti in tf.getmembers())


def _zip_bytes(n: int, **kwargs) -> bytes:
    import zipfile

    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_STORED) as zf:
        for i in range(n):
            zf.writestr(f"f{i:06d}", b"")
        zf.comment = kwargs.get("comment", b"")
    return buf.getvalue()


def test_zip64_member_count_is_read_from_the_zip64_records(tmp_path):
    """70,000 members: zipfile writes zip64 end records (the classic count field says 0xFFFF);
    the pre-check reads the real count from them, as zipfile does."""
    data = _zip_bytes(70_000)
    assert b"PK\x06\x06" in data[-200:]
    p = write(tmp_path, data, "many.zip")
    assert len(archive.inspect_archive(p, max_members=100_000, max_unpacked_bytes=BIG)) == 70_000
    with pytest.raises(UnsafeArchive, match="more than 10000 members"):
        archive.inspect_archive(p, max_members=10_000, max_unpacked_bytes=BIG)


@pytest.mark.parametrize("comment, readable", [
    (b"made by a tool", True),
    (b"PK\x05\x06 looks like an end record", False),  # zipfile picks it up too, and fails
])
def test_the_end_record_is_found_as_zipfile_finds_it(comment, readable, tmp_path):
    """The pre-check must read the same central directory zipfile will: same search for the
    end record, so a comment cannot show one directory to the check and another to zipfile."""
    import zipfile

    buf = io.BytesIO(archives.model_zip())
    with zipfile.ZipFile(buf, "a") as zf:
        zf.comment = comment
    p = write(tmp_path, buf.getvalue(), "commented.zip")
    try:
        zipfile.ZipFile(p).infolist()
        zipfile_reads = True
    except zipfile.BadZipFile:
        zipfile_reads = False
    assert zipfile_reads == readable
    if readable:
        members = archive.inspect_archive(p, max_members=100, max_unpacked_bytes=BIG)
        assert {m.name for m in members} == set(archives.model_files())
    else:
        with pytest.raises(InvalidArchive):
            archive.inspect_archive(p, max_members=100, max_unpacked_bytes=BIG)


def test_truncated_zip_directory_is_invalid(tmp_path):
    data = archives.model_zip()
    cd = data.rfind(b"PK\x01\x02")
    p = write(tmp_path, data[:cd + 10] + data[data.rfind(b"PK\x05\x06"):], "cut.zip")
    with pytest.raises(InvalidArchive):
        archive.inspect_archive(p, max_members=100, max_unpacked_bytes=BIG)


@pytest.mark.parametrize("builder, error, words", [
    ("zip_bad_crc", InvalidArchive, "config.json"),
    ("zip_name_not_utf8", InvalidArchive, "UTF-8"),
    ("zip_strong_encryption_flag", UnsafeArchive, "encrypted"),
])
def test_fuzzer_findings_are_typed_refusals(builder, error, words, tmp_path):
    """Found by the archive fuzzer: each was a 500 (BadZipFile, UnicodeDecodeError,
    NotImplementedError escaping); each is an archive refusal naming what is wrong."""
    from tests.security import hostile

    p = write(tmp_path, getattr(hostile, builder)(), "fuzz.zip")
    with pytest.raises(error, match=words):
        members = archive.inspect_archive(p, max_members=100, max_unpacked_bytes=BIG)
        archive.read_model_config(p, members)
    with pytest.raises(archive.ArchiveError):
        archive.extract_archive(p, tmp_path / "out", max_members=100, max_unpacked_bytes=BIG)


# Inputs the archive fuzzer found (fuzz/fuzz_archive.py, issue 10): a local header offset before
# the file's start (zipfile's seek raised OSError EINVAL) and a "zip file version 20.7" directory
# (NotImplementedError). Both were 500s; both are InvalidArchive.
FUZZ_NEGATIVE_OFFSET = (
    "UEsDBBQAAAAIAKBMg129FlkKBmB+CvnOZK6wMbOLB5Od5t1kWZoKZaDQLm1RTiqrje05/+nR/M/iZJgg/324/ZwH"
    "OG+kE7lwgnOabqnQphGOprR2tIvoqavlh/zTLIkpIluK7m4RR/Eyov3YI2MAUEsDBBQAAAAIAKBMg10S9t9pGgAA"
    "ABgAAAAVAAAAdG9rZW5pemVyX2NvbmZpZy5qc29uq1bKzU9JzYnPTayIz0nNSy/JULJSMDSrBQBQSwECUEsGBwAA"
    "CACgTINdvRZZCmUAAAB5AAAACwAAAAAAAAAAAAAAgAEAAAAAY29uZmlnLmpzb25QSwECFAMUAAAACACgTINdudNQ"
    "4lkAAABwAAAAEQAAAAAAAAAAAAAAgAGOAAAAbW9kZWwuc2FmZXRlbnNvcnNQSwECFAMUAAAACACgTINdEvbfaRoA"
    "AAAYAAAAFQAAAAAAAAAAAAAAgAEWAQAAdG9rZW5pemVyX2NvbmZpZy5qc29uUEsFBgAAAAADAAMAuwAAAGMBAAAA"
    "AA=="
)
FUZZ_ZIP_VERSION = (
    "UEsDBBQAAAAIAKBMg129FlkKZQAAAHkAAAALAAAAY29uZmlnLmpzb26rVkosSs7ILElNLiktSi1WslKIVvLJScxN"
    "dMsvck4sLU7M8fFVitWvtsrNT0nNiS+pLEgFqlHKASlRAgpnZKakpObFF2dWgcQtgCJ5pbnxUNGcxMrUIpCZhkDx"
    "svzkxCSYQpNaAFBLAwQUAAAACACgTINdudNQ4lkAAABwAAAAEQAAAG1vZGVsLnNhZm10ZW5zb4ByYICLc2ql+Pjc"
    "1JLElMSSxPh4JatqpbT8otzEEiUrpYISpVo2HaVykFhKSWVBKlDIzdhISUepOCMRxIs20jGK1VEC68xPSytOLSkG"
    "ChroGJrF1tYyMDTYI2MAUEsDBBQAAAAIAKBMg10S9t9pGgAAABgAAAAVAAAAdG9rZW5pemVyX2NvbmZpZy5qc29u"
    "q1bKzU9JzYnPTayIz0nNSy/JULJSMDSrBQBQSwECFAMUAAAACACgTINdvRZZCmUAAAB5AAAACwAAAAAAAAAAAAAA"
    "gAEAAAAAY29uZmlnLmpzb25QSwECFFHPb2gACACgTINdudNQ4lkAAABwAAAAEQAAAAD3/wAAAAAAgAGOAAAAbW9k"
    "ZWwuc2FmZXRlbnNvcnNQSwECFAMUAAAACACgTINdEvbfaRoAAAAYAAAAFQAAAAAAAAAAAAAAgAEWAQAAdG9rZW5p"
    "emVyX2NvbmZpZy5qc29uUEsFBgAAAAADAAMAuwAAAGMBJycnJycnJycnJycnJycnJycnJycnJycnJycnJycnJycn"
    "JycnJycnJycnJycnJycnJycnJycnJycnJycnJycnJycnJyeCAAAA"
)


@pytest.mark.parametrize("blob, words", [(FUZZ_NEGATIVE_OFFSET, "config.json"), (FUZZ_ZIP_VERSION, "version")])
def test_fuzzer_inputs_are_invalid_archives(blob, words, tmp_path):
    import base64

    p = write(tmp_path, base64.b64decode(blob), "fuzz.zip")
    with pytest.raises(InvalidArchive, match=words):
        archive.inspect_archive(p, max_members=100, max_unpacked_bytes=BIG)
        archive.extract_archive(p, tmp_path / "out", max_members=100, max_unpacked_bytes=BIG)
