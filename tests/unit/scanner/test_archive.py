from __future__ import annotations

import bz2
import gzip
import lzma
import os
import random
import struct
import tracemalloc
import zipfile
import zlib

import pytest

from services.scanner.archive import ArchiveLimits, detect, inspect_archive
from tests.unit.scanner.builders import patch_zip_sizes, tar_of, zip_of

LIMITS = ArchiveLimits(max_depth=10, max_size=128 * 1024 * 1024, max_ratio=250, max_entries=10000)
MiB = 1024 * 1024


def names(data: bytes, name: str = "a.zip", limits: ArchiveLimits = LIMITS) -> list[str]:
    report = inspect_archive(data, name, limits)
    assert report is not None
    return [m.path for m in report.members]


def nest(levels: int, leaf: bytes, fanout: int = 1) -> bytes:
    data = leaf
    for level in range(levels):
        data = zip_of([(f"level{level}-{i}.zip", data) for i in range(fanout)])
    return data


# ---------------------------------------------------------------- contents


def test_zip_and_tar_names_nested() -> None:
    inner = gzip.compress(tar_of([("docs/readme.txt", b"read me"), ("bin/tool.exe", b"MZ")]))
    outer = zip_of([("notes.txt", b"n"), ("inner.tar.gz", inner), ("sub/", b"")])
    assert names(outer, "outer.zip") == [
        "outer.zip/notes.txt",
        "outer.zip/inner.tar.gz",
        "outer.zip/inner.tar.gz/inner.tar",
        "outer.zip/inner.tar.gz/inner.tar/docs/readme.txt",
        "outer.zip/inner.tar.gz/inner.tar/bin/tool.exe",
    ]


@pytest.mark.parametrize(
    ("data", "name", "inner"),
    [
        (gzip.compress(b"MZ payload"), "tool.exe.gz", "tool.exe"),
        (bz2.compress(b"MZ payload"), "tool.exe.bz2", "tool.exe"),
        (lzma.compress(b"MZ payload"), "tool.exe.xz", "tool.exe"),
        (gzip.compress(tar_of([("x.scr", b"s")])), "bundle.tgz", "bundle.tar"),
        (gzip.compress(b"a") + gzip.compress(b"b"), "two.gz", "two"),  # concatenated members are one file
    ],
)
def test_compressed_streams_are_opened(data: bytes, name: str, inner: str) -> None:
    report = inspect_archive(data, name, LIMITS)
    assert report is not None
    assert report.problem == ""
    assert report.members[0].name == inner


def test_executables_are_sniffed_inside_archives() -> None:
    report = inspect_archive(zip_of([("photo.jpg", b"\x7fELF\x02\x01"), ("a.txt", b"text")]), "a.zip", LIMITS)
    assert report is not None
    assert [(m.name, m.executable) for m in report.members] == [("photo.jpg", "ELF"), ("a.txt", None)]


def test_renamed_and_prefixed_archives_are_found_by_content() -> None:
    data = zip_of([("tool.exe", b"x")])
    assert names(data, "holiday.jpg") == ["holiday.jpg/tool.exe"]
    # Junk in front of a zip: readers start from the central directory at the end.
    assert detect(b"junk" * 100 + data) == "zip"
    assert names(b"junk" * 100 + data, "x.bin") == ["x.bin/tool.exe"]
    assert detect(b"junk" * 100_000 + data) == "zip"  # far more junk than the record's window
    # An (empty) end record counts only within its window at the end of the data.
    record = b"x" + b"PK\x05\x06" + b"\0" * 18
    assert detect(record + b"junk" * 10) == "zip"
    assert detect(record + b"junk" * 20_000) is None


def test_formats_left_to_clamd_and_non_archives() -> None:
    report = inspect_archive(b"7z\xbc\xaf\x27\x1c\x00\x04" + os.urandom(100), "x.7z", LIMITS)
    assert report is not None
    assert (report.format, report.opened, report.problem) == ("7z", False, "")
    assert inspect_archive(b"%PDF-1.4 hello", "doc.pdf", LIMITS) is None
    assert inspect_archive(b"", "empty.txt", LIMITS) is None


# ---------------------------------------------------------------- unreadable and encrypted


@pytest.mark.parametrize(
    ("data", "name", "problem"),
    [
        (zip_of([("a.txt", b"a" * 1000)])[:60], "cut.zip", "cut.zip: unreadable zip"),
        (b"just some text", "fake.zip", "named like a zip archive but is not one"),
        (b"just some text", "fake.tar.gz", "named like a gzip archive but is not one"),
        (gzip.compress(random.Random(1).randbytes(5000))[:-2000] + bytes(4), "cut.gz", "cut.gz: truncated gzip"),
        (b"\x1f\x8b\x08\x00garbage", "junk.gz", "junk.gz: truncated gzip"),
        (b"\x1f\x8b\x08\x00" + bytes(6) + b"\xff" * 30 + bytes(4), "bad.gz", "bad.gz: unreadable gzip"),
        (b"BZh9garbage", "junk.bz2", "unreadable bzip2"),
        (
            zip_of([("inner.zip", b"not a zip at all")]),
            "a.zip",
            "a.zip/inner.zip: named like an archive but is not one",
        ),
    ],
)
def test_unreadable_archives(data: bytes, name: str, problem: str) -> None:
    report = inspect_archive(data, name, LIMITS)
    assert report is not None
    assert problem in report.problem


def test_unsupported_compression_method_is_unreadable() -> None:
    data = bytearray(zip_of([("a.txt", b"hello")]))
    for signature, at in ((b"PK\x03\x04", 8), (b"PK\x01\x02", 10)):
        struct.pack_into("<H", data, data.find(signature) + at, 9)  # deflate64, which zipfile cannot read
    report = inspect_archive(bytes(data), "d64.zip", LIMITS)
    assert report is not None
    assert "unreadable" in report.problem


def test_corrupt_member_crc_is_unreadable() -> None:
    data = bytearray(zip_of([("inner.zip", zip_of([("a.txt", b"a" * 100)]))], method=zipfile.ZIP_STORED))
    data[data.find(b"a" * 100) + 50] ^= 0xFF
    report = inspect_archive(bytes(data), "a.zip", LIMITS)
    assert report is not None
    assert "Bad CRC-32" in report.problem


def test_encrypted_zip() -> None:
    data = patch_zip_sizes(zip_of([("secret.txt", b"s"), ("tool.exe", b"t")]), flags=0x1)
    report = inspect_archive(data, "secret.zip", LIMITS)
    assert report is not None
    assert report.encrypted == "secret.zip/secret.txt"
    assert report.problem == ""
    # The names of an encrypted zip are readable, so blocked names inside still count.
    assert [m.name for m in report.members] == ["secret.txt", "tool.exe"]


def test_encrypted_zip_nested() -> None:
    inner = patch_zip_sizes(zip_of([("secret.doc", b"s")]), flags=0x1)
    report = inspect_archive(zip_of([("inner.zip", inner)], method=zipfile.ZIP_STORED), "outer.zip", LIMITS)
    assert report is not None
    assert report.encrypted == "outer.zip/inner.zip/secret.doc"


# ---------------------------------------------------------------- limits and bombs


def test_nesting_depth() -> None:
    assert inspect_archive(nest(9, zip_of([("a.txt", b"a")])), "a.zip", LIMITS).problem == ""  # type: ignore[union-attr]
    report = inspect_archive(nest(10, zip_of([("a.txt", b"a")])), "a.zip", LIMITS)
    assert report is not None
    assert "nested more than 10 levels deep" in report.problem
    # a .tar.gz is two layers
    report = inspect_archive(gzip.compress(tar_of([("a.txt", b"a")])), "a.tgz", ArchiveLimits(1, MiB, 250, 100))
    assert report is not None
    assert "nested more than 1 levels deep" in report.problem


def test_entry_count_across_levels() -> None:
    inner = zip_of([(f"{i}.txt", b"x") for i in range(6)])
    data = zip_of([("inner.zip", inner), *[(f"{i}.txt", b"x") for i in range(4)]])
    limits = ArchiveLimits(10, MiB, 250, 10)
    report = inspect_archive(data, "a.zip", limits)
    assert report is not None
    assert "more than 10 archive members" in report.problem
    assert inspect_archive(data, "a.zip", ArchiveLimits(10, MiB, 250, 11)).problem == ""  # type: ignore[union-attr]


def test_total_size_across_levels() -> None:
    part = os.urandom(300 * 1024)  # incompressible: only the size can stop it
    data = zip_of([("a.zip", zip_of([("1.bin", part), ("2.bin", part)])), ("3.bin", part)])
    report = inspect_archive(data, "a.zip", ArchiveLimits(10, MiB, 250, 100))
    assert report is not None
    assert "more than 1048576 bytes in total" in report.problem
    assert inspect_archive(data, "a.zip", ArchiveLimits(10, 2 * MiB, 250, 100)).problem == ""  # type: ignore[union-attr]


def test_ratio_bomb_is_refused_by_its_declared_sizes() -> None:
    data = zip_of([("zeros.bin", bytes(8 * MiB))])
    report = inspect_archive(data, "a.zip", LIMITS)
    assert report is not None
    assert "compression ratio over 250" in report.problem
    # Small members may compress as well as they like.
    assert inspect_archive(zip_of([("zeros.bin", bytes(500_000))]), "a.zip", LIMITS).problem == ""  # type: ignore[union-attr]


def test_gzip_bomb_stops_at_the_ratio() -> None:
    data = gzip.compress(bytes(8 * MiB), compresslevel=9)
    report = inspect_archive(data, "zeros.gz", LIMITS)
    assert report is not None
    assert "compression ratio over 250" in report.problem


def test_gzip_declaring_too_much_is_refused_before_inflating() -> None:
    data = bytearray(gzip.compress(b"small"))
    data[-4:] = (200 * MiB).to_bytes(4, "little")
    report = inspect_archive(bytes(data), "x.gz", LIMITS)
    assert report is not None
    assert "declares" in report.problem


def leaf_declaring(size: int) -> bytes:
    return patch_zip_sizes(zip_of([(f"{i}.bin", b"\0" * 100) for i in range(16)]), file_size=size)


def test_42_zip_style_bomb() -> None:
    """Five levels of sixteen zips each; the leaves declare 4 GiB per member, 16 per leaf zip:
    4.5 PB when fully extracted. It is stopped by the first leaf's declared sizes."""
    bomb = nest(5, leaf_declaring(0xFFFFFFFE), fanout=16)
    assert len(bomb) < 100_000
    tracemalloc.start()
    try:
        report = inspect_archive(bomb, "42.zip", LIMITS)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert report is not None
    assert "declares more than" in report.problem
    assert report.problem.startswith("42.zip/level4-0.zip/level3-0.zip/level2-0.zip/level1-0.zip/level0-0.zip")
    assert peak < 4 * MiB


@pytest.mark.parametrize("declared", [1000, 100_000])
def test_bomb_whose_headers_lie_is_not_inflated(declared: int) -> None:
    """A member declares a few bytes but inflates to 16 MiB: reading stops at the declared
    size (within the head that is sniffed, or the bounded read of a nested archive)."""
    inner = zlib.compressobj(9, zlib.DEFLATED, -15)
    deflated = inner.compress(b"PK\x03\x04" + bytes(16 * MiB)) + inner.flush()
    honest = zip_of([("inner.zip", b"PK\x03\x04")])  # a template: one deflated member
    head = honest.find(b"inner.zip") + len(b"inner.zip")
    central = honest.find(b"PK\x01\x02")
    liar = bytearray(honest[:head] + deflated + honest[central:])
    struct.pack_into("<H", liar, 8, zipfile.ZIP_DEFLATED)
    offset = liar.find(b"PK\x01\x02")
    struct.pack_into("<H", liar, offset + 10, zipfile.ZIP_DEFLATED)
    struct.pack_into("<I", liar, offset + 20, len(deflated))
    struct.pack_into("<I", liar, 18, len(deflated))
    end = liar.find(b"PK\x05\x06")
    struct.pack_into("<I", liar, end + 16, offset)  # where the central directory now starts
    liar = bytearray(patch_zip_sizes(bytes(liar), file_size=declared))
    tracemalloc.start()
    try:
        report = inspect_archive(bytes(liar), "liar.zip", LIMITS)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert report is not None
    assert report.problem.startswith("liar.zip/inner.zip: unreadable")
    assert "Bad CRC-32" in report.problem
    assert peak < 4 * MiB
