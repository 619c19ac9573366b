from __future__ import annotations

import bz2
import gzip
import lzma
import struct

import pytest

from services.scanner.magic import archive_format, archive_format_by_name, executable_kind
from tests.unit.scanner.builders import tar_of, zip_of


def pe(offset: int = 0x80) -> bytes:
    header = bytearray(b"MZ" + b"\0" * (offset + 64))
    struct.pack_into("<I", header, 0x3C, offset)
    header[offset : offset + 4] = b"PE\0\0"
    return bytes(header)


@pytest.mark.parametrize(
    ("data", "kind"),
    [
        (pe(), "PE"),
        (pe(0x200), "PE"),
        (b"MZ\x90\x00" + b"\xff" * 500, "MZ"),  # DOS header, no PE signature: still a program
        (b"MZ", "MZ"),
        (b"\x7fELF\x02\x01\x01" + b"\0" * 60, "ELF"),
        (b"\xcf\xfa\xed\xfe" + b"\0" * 60, "Mach-O"),
        (b"\xfe\xed\xfa\xce" + b"\0" * 60, "Mach-O"),
        (b"#!/bin/sh\nrm -rf ~\n", "script"),
        (b"#! /usr/bin/env python3\n", "script"),
        (b"#!\t/bin/bash\n", "script"),
        (b"#!not a path\n", None),  # a comment line, not an interpreter
        (b"\xca\xfe\xba\xbe" + b"\0" * 60, None),  # Java class file, shares the fat Mach-O magic
        (b"%PDF-1.7\n", None),
        (b"Hello MZ\n", None),
        (b"", None),
    ],
)
def test_executable_kind(data: bytes, kind: str | None) -> None:
    assert executable_kind(data) == kind


@pytest.mark.parametrize(
    ("data", "fmt"),
    [
        (zip_of([("a.txt", b"a")]), "zip"),
        (zip_of([]), "zip"),
        (gzip.compress(b"x"), "gzip"),
        (bz2.compress(b"x"), "bzip2"),
        (lzma.compress(b"x"), "xz"),
        (tar_of([("a.txt", b"a")]), "tar"),
        (b"7z\xbc\xaf\x27\x1c\x00\x04", "7z"),
        (b"Rar!\x1a\x07\x01\x00", "rar"),
        (b"MSCF\0\0\0\0", "cab"),
        (b"\x60\xea\x2c\x00", "arj"),
        (b"BZhx", None),  # "BZh" must be followed by the block size digit
        (b"plain text", None),
        (b"", None),
    ],
)
def test_archive_format(data: bytes, fmt: str | None) -> None:
    assert archive_format(data) == fmt


@pytest.mark.parametrize(
    ("name", "fmt"),
    [
        ("a.ZIP", "zip"),
        ("a.tar.gz", "gzip"),
        ("a.tgz", "gzip"),
        ("x.7z", "7z"),
        ("x.rar", "rar"),
        ("zip", None),
        (".zip", None),
        ("a.txt", None),
    ],
)
def test_archive_format_by_name(name: str, fmt: str | None) -> None:
    assert archive_format_by_name(name) == fmt
