"""Content sniffing: what a file *is*, whatever its name claims.

Pure functions over the first bytes of an attachment or archive member. The
attachment filter uses `executable_kind` to block renamed programs; the
archive filter and the virus filter use `archive_format` to decide what to
open themselves and what to hand to clamd on its own.
"""

from __future__ import annotations

import struct

# How many leading bytes the sniffers read: tar's magic sits at offset 257, and a PE header
# usually within the first few hundred bytes.
HEAD_SIZE = 4096

# Formats the archive filter opens itself (stdlib zipfile, tarfile, gzip, bz2, lzma).
INSPECTABLE = frozenset({"zip", "tar", "gzip", "bzip2", "xz"})

# File name extensions that announce an archive. A file named like one of the
# inspectable formats that is not one is an unreadable archive; every file
# named like any of them is also scanned by clamd on its own.
ARCHIVE_EXTENSIONS = {
    "zip": "zip", "jar": "zip",
    "tar": "tar",
    "gz": "gzip", "tgz": "gzip", "gzip": "gzip", "taz": "gzip",
    "bz2": "bzip2", "tbz": "bzip2", "tbz2": "bzip2", "bz": "bzip2",
    "xz": "xz", "txz": "xz",
    "7z": "7z", "rar": "rar", "cab": "cab", "arj": "arj", "lzh": "lzh", "lha": "lzh",
    "cpio": "cpio", "zst": "zstd", "ace": "ace", "iso": "iso", "z": "compress", "lz": "lzip",
}  # fmt: skip

# Leading signatures, checked in order. Sources: the zip APPNOTE (section 4.3.7), RFC 1952
# (gzip), the xz file format spec 1.0.4, the 7z, RAR 4/5, CAB, ARJ and zstd format notes.
_SIGNATURES: tuple[tuple[bytes, str], ...] = (
    (b"PK\x03\x04", "zip"),
    (b"PK\x05\x06", "zip"),  # empty archive: end of central directory only
    (b"PK\x07\x08", "zip"),  # spanned archive marker
    (b"\x1f\x8b", "gzip"),
    (b"\xfd7zXZ\x00", "xz"),
    (b"7z\xbc\xaf\x27\x1c", "7z"),
    (b"Rar!\x1a\x07", "rar"),
    (b"MSCF\x00\x00\x00\x00", "cab"),
    (b"\x60\xea", "arj"),
    (b"\x28\xb5\x2f\xfd", "zstd"),
    (b"070707", "cpio"),
    (b"070701", "cpio"),
    (b"070702", "cpio"),
    (b"\xc7\x71", "cpio"),
    (b"\x71\xc7", "cpio"),
    (b"\x1f\x9d", "compress"),
    (b"LZIP", "lzip"),
)

# Mach-O magics, both byte orders, 32 and 64 bit. 0xCAFEBABE (fat binaries) is left
# out on purpose: Java class files share it, and every .jar would look executable.
_MACHO = (b"\xfe\xed\xfa\xce", b"\xfe\xed\xfa\xcf", b"\xce\xfa\xed\xfe", b"\xcf\xfa\xed\xfe")


def archive_format(head: bytes) -> str | None:
    """The archive or compression format the leading bytes announce, or None."""
    for signature, name in _SIGNATURES:
        if head.startswith(signature):
            return name
    if head.startswith(b"BZh") and head[3:4].isdigit():
        return "bzip2"
    # POSIX ustar and GNU tar put "ustar" at offset 257 (POSIX.1-2001, pax header block).
    if head[257:262] == b"ustar":
        return "tar"
    if head[2:5] in (b"-lh", b"-lz") and head[6:7] == b"-":
        return "lzh"
    if head[7:14] == b"**ACE**":
        return "ace"
    return None


def archive_format_by_name(name: str) -> str | None:
    """The archive format a file name's last extension announces, or None."""
    stem, dot, ext = name.rpartition(".")
    if not dot or not stem:
        return None
    return ARCHIVE_EXTENSIONS.get(ext.lower())


def executable_kind(head: bytes) -> str | None:
    """ "PE", "MZ", "ELF", "Mach-O" or "script" when the bytes are a program, else None.

    A script is a file starting with "#!" followed by an interpreter path, the
    way execve(2) recognises it; plain text starting with "#!" and no path is not.
    """
    if head.startswith(b"MZ"):
        return _mz_kind(head)
    if head.startswith(b"\x7fELF"):
        return "ELF"
    if head[:4] in _MACHO:
        return "Mach-O"
    if head.startswith(b"#!"):
        interpreter = head[2:].lstrip(b" \t")
        if interpreter.startswith(b"/"):
            return "script"
    return None


def _mz_kind(head: bytes) -> str:
    """ "PE" when the new-header pointer leads to a PE (or NE/LE/LX) signature, else "MZ".

    Every MZ file counts: Windows runs a bare DOS header too, and a crafted or
    truncated header must not turn an executable into a harmless file.
    """
    if len(head) >= 64:
        (e_lfanew,) = struct.unpack_from("<I", head, 0x3C)
        signature = head[e_lfanew : e_lfanew + 4] if e_lfanew + 4 <= len(head) else b""
        if signature == b"PE\x00\x00" or signature[:2] in (b"NE", b"LE", b"LX"):
            return "PE"
    return "MZ"
