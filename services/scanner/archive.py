"""Archive inspection: what is inside a zip, tar, gzip, bzip2 or xz attachment,
nested archives included, within hard bounds and without inflating a bomb.

Pure: bytes in, an `ArchiveReport` out. The attachment filter reads the member
names and sniffed executables from it (a blocked name inside an archive is
still a blocked attachment); the archive filter reads its `problem` (over a
limit or unreadable: the "archive" category) and `encrypted` (the "encrypted"
category). Formats the standard library cannot open (7z, rar, cab, ...) are
recognised but left to clamd, which scans every archive attachment on its own.

How a bomb is stopped (42.zip: nested zips whose leaves declare gigabytes;
or a member whose headers understate what it inflates to):
- sizes are checked as declared before anything is inflated: the sum of the
  declared sizes of every member, at every level, counts against `max_size`,
  and a member declaring more than `max_ratio` times its compressed size is
  refused without reading it;
- members are read only to sniff their head, and in full only when they are
  archives themselves, through a bounded read that asks the decompressor for
  at most the declared size (zipfile also stops there and then fails the
  CRC), and for compressed streams at most what the size and ratio allow;
- nesting counts every layer (a .tar.gz is two), members are counted across
  all levels, and the walk stops at the first limit.
"""

from __future__ import annotations

import bz2
import io
import lzma
import tarfile
import zipfile
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field

from services.scanner.magic import HEAD_SIZE, INSPECTABLE, archive_format, archive_format_by_name, executable_kind

# Below this decompressed size the ratio does not matter: a 200 KiB run of zeros
# compresses a thousandfold and harms nobody. Bombs are about gigabytes.
RATIO_FLOOR = 1024 * 1024

# zip general purpose bit 0: the member is encrypted (APPNOTE 4.4.4); AES sets it too.
_ZIP_ENCRYPTED = 0x1

# Suffixes a compressed stream's name loses when it is decompressed (gzip(1), bzip2(1), xz(1)).
_STREAM_SUFFIXES = {
    ".tgz": ".tar", ".taz": ".tar", ".tbz": ".tar", ".tbz2": ".tar", ".txz": ".tar",
    ".gz": "", ".gzip": "", ".bz2": "", ".bz": "", ".xz": "",
}  # fmt: skip


@dataclass(frozen=True, slots=True)
class ArchiveLimits:
    max_depth: int
    max_size: int
    max_ratio: int
    max_entries: int


@dataclass(frozen=True, slots=True)
class Member:
    path: str  # where it is, for reasons: "docs.zip/inner.tar.gz/inner.tar/bin/tool.exe"
    name: str  # its own name inside its archive: "bin/tool.exe"
    executable: str | None = None  # what magic.executable_kind saw in its head


@dataclass(frozen=True, slots=True)
class ArchiveReport:
    format: str  # "zip", "tar", "gzip", "bzip2", "xz", or a format only clamd opens ("7z", ...)
    members: tuple[Member, ...] = ()
    problem: str = ""  # over a limit, or unreadable: the "archive" category
    encrypted: str = ""  # the first password-protected member: the "encrypted" category
    opened: bool = True  # False for formats left to clamd


class _StopError(Exception):
    """Ends the walk: `reason` is the problem the report carries."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def inspect_archive(data: bytes, name: str, limits: ArchiveLimits) -> ArchiveReport | None:
    """Inspect one attachment. None when it is not an archive by content or by name.

    Never raises: whatever the archive libraries throw at hostile input becomes
    an "unreadable" problem in the report.
    """
    fmt = detect(data, name)
    if fmt is None:
        claimed = archive_format_by_name(name)
        if claimed in INSPECTABLE:
            reason = f"{name or 'attachment'}: named like a {claimed} archive but is not one"
            return ArchiveReport(claimed, problem=reason)
        return None
    if fmt not in INSPECTABLE:
        return ArchiveReport(fmt, opened=False)
    walker = _Walker(limits)
    problem = ""
    try:
        walker.walk(data, fmt, name or "attachment", name, depth=1)
    except _StopError as stop:
        problem = stop.reason
    except Exception as exc:  # any parser failure on hostile input is "unreadable", never a crash
        problem = f"{name or 'attachment'}: unreadable {fmt}: {type(exc).__name__}: {exc}"
    return ArchiveReport(fmt, tuple(walker.members), problem, walker.encrypted)


def detect(data: bytes, name: str = "") -> str | None:
    """The archive format of `data`: by its leading bytes, or a zip with data in front
    (self-extractors, or junk prepended to evade a check of the first bytes, which zip
    readers accept because they start from the central directory at the end)."""
    fmt = archive_format(data[:HEAD_SIZE])
    if fmt is None and _has_zip_directory(data):
        return "zip"
    return fmt


def _has_zip_directory(data: bytes) -> bool:
    # The end-of-central-directory record sits in the last 64 KiB + 22 bytes (APPNOTE 4.3.16).
    if b"PK\x05\x06" not in data[-(65536 + 22) :]:
        return False
    try:
        return zipfile.is_zipfile(io.BytesIO(data))
    except Exception:  # a probe: any failure means "not a zip"
        return False


@dataclass
class _Walker:
    limits: ArchiveLimits
    members: list[Member] = field(default_factory=list)
    encrypted: str = ""
    entries: int = 0
    size: int = 0  # bytes decompressed so far, or declared by members not read

    def walk(self, data: bytes, fmt: str, path: str, name: str, depth: int) -> None:
        if depth > self.limits.max_depth:
            raise _StopError(f"{path}: archives nested more than {self.limits.max_depth} levels deep")
        if fmt == "zip":
            self._zip(data, path, depth)
        elif fmt == "tar":
            self._tar(data, path, depth)
        else:
            self._stream(data, fmt, path, name, depth)

    # ---------------------------------------------------------------- accounting

    def _count(self, n: int, path: str) -> None:
        self.entries += n
        if self.entries > self.limits.max_entries:
            raise _StopError(f"{path}: more than {self.limits.max_entries} archive members")

    def _account(self, nbytes: int, path: str, declared: bool) -> None:
        self.size += nbytes
        if self.size > self.limits.max_size:
            how = "declares" if declared else "decompresses to"
            raise _StopError(
                f"{path}: {how} more than {self.limits.max_size} bytes in total (archive_max_size); "
                "a decompression bomb?"
            )

    def _check_ratio(self, size: int, compressed: int, path: str) -> None:
        if size > RATIO_FLOOR and size > max(compressed, 1) * self.limits.max_ratio:
            raise _StopError(
                f"{path}: compression ratio over {self.limits.max_ratio} ({size} from {compressed} bytes); "
                "a decompression bomb?"
            )

    # ---------------------------------------------------------------- members

    def _member(self, path: str, name: str, head: bytes, depth: int, read: Callable[[], bytes]) -> None:
        """Record one member; open it when it is an archive itself (by content or by name)."""
        self.members.append(Member(path, name, executable_kind(head)))
        fmt = archive_format(head)
        data: bytes | None = None
        if fmt is None and archive_format_by_name(name) in INSPECTABLE:
            data = read()
            fmt = detect(data, name)
            if fmt is None:
                raise _StopError(f"{path}: named like an archive but is not one")
        if fmt in INSPECTABLE:
            self.walk(read() if data is None else data, fmt, path, name, depth + 1)

    def _zip(self, data: bytes, path: str, depth: int) -> None:
        try:
            archive = zipfile.ZipFile(io.BytesIO(data))
        except Exception as exc:  # BadZipFile, but also OSError/ValueError/struct.error on junk
            raise _StopError(f"{path}: unreadable zip: {exc}") from None
        infos = archive.infolist()
        self._count(len(infos), path)
        # Declared sizes first: a bomb says what it is before anything is inflated.
        self._account(sum(info.file_size for info in infos), path, declared=True)
        for info in infos:
            if info.is_dir():
                continue
            member_path = f"{path}/{info.filename}"
            if info.flag_bits & _ZIP_ENCRYPTED:
                # The names of an encrypted zip are readable, its contents are not.
                self.members.append(Member(member_path, info.filename))
                self.encrypted = self.encrypted or member_path
                continue
            self._check_ratio(info.file_size, info.compress_size, member_path)
            try:
                with archive.open(info) as fh:
                    head = fh.read(HEAD_SIZE)
            except Exception as exc:  # bad CRC, unknown method, truncated data, lying headers
                raise _StopError(f"{member_path}: unreadable: {exc}") from None
            self._member(member_path, info.filename, head, depth, _zip_reader(archive, info, member_path))

    def _tar(self, data: bytes, path: str, depth: int) -> None:
        try:
            with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as archive:
                for info in archive:
                    self._count(1, path)
                    if not info.isfile():
                        continue
                    member_path = f"{path}/{info.name}"
                    # Tar stores members uncompressed, so a declared size is an actual one.
                    self._account(info.size, member_path, declared=True)
                    stream = archive.extractfile(info)
                    head = stream.read(HEAD_SIZE) if stream else b""

                    def read(info: tarfile.TarInfo = info, archive: tarfile.TarFile = archive) -> bytes:
                        stream = archive.extractfile(info)
                        return stream.read() if stream else b""

                    self._member(member_path, info.name, head, depth, read)
        except _StopError:
            raise
        except Exception as exc:  # ReadError on junk, but also EOFError/ValueError on truncated headers
            raise _StopError(f"{path}: unreadable tar: {exc}") from None

    def _stream(self, data: bytes, fmt: str, path: str, name: str, depth: int) -> None:
        """gzip, bzip2 or xz: one compressed file; decompressed within size and ratio."""
        size_left = self.limits.max_size - self.size
        if fmt == "gzip" and len(data) >= 18:
            # ISIZE, the last 4 bytes (RFC 1952 section 2.3.1): what the sender claims, checked first.
            declared = int.from_bytes(data[-4:], "little")
            if declared > size_left:
                raise _StopError(
                    f"{path}: declares {declared} bytes, more than archive_max_size allows; a decompression bomb?"
                )
        ratio_limit = max(len(data) * self.limits.max_ratio, RATIO_FLOOR)
        try:
            out = _decompress(fmt, data, min(size_left, ratio_limit) + 1)
        except _StopError as stop:
            raise _StopError(f"{path}: {stop.reason}") from None
        except Exception as exc:  # zlib.error, OSError (bz2), LZMAError, EOFError
            raise _StopError(f"{path}: unreadable {fmt}: {exc}") from None
        self._check_ratio(len(out), len(data), path)
        self._account(len(out), path, declared=False)
        self._count(1, path)
        inner = _inner_name(name)
        self._member(f"{path}/{inner}", inner, out[:HEAD_SIZE], depth, lambda: out)


def _zip_reader(archive: zipfile.ZipFile, info: zipfile.ZipInfo, path: str) -> Callable[[], bytes]:
    def read() -> bytes:
        try:
            with archive.open(info) as fh:
                # Ask for one byte more than declared: zipfile never returns more than the
                # declared size, and fails the CRC when the data was meant to be longer.
                data = fh.read(info.file_size + 1)
        except Exception as exc:  # see _zip
            raise _StopError(f"{path}: unreadable (its headers may lie about its size): {exc}") from None
        if len(data) > info.file_size:
            raise _StopError(f"{path}: inflates to more than its declared {info.file_size} bytes")
        return data

    return read


def _inner_name(name: str) -> str:
    lower = name.lower()
    for suffix, replacement in _STREAM_SUFFIXES.items():
        if lower.endswith(suffix) and len(name) > len(suffix):
            return name[: -len(suffix)] + replacement
    return name or "data"


def _decompress(fmt: str, data: bytes, limit: int) -> bytes:
    """Decompress all concatenated streams of `data`, stopping after `limit` bytes of output."""
    out = bytearray()
    pending = data
    while pending and len(out) < limit:
        if fmt == "gzip":
            z = zlib.decompressobj(wbits=31)
            out += z.decompress(pending, limit - len(out))
            while z.unconsumed_tail and len(out) < limit:
                out += z.decompress(z.unconsumed_tail, limit - len(out))
            done, rest = z.eof, z.unused_data
        else:
            d = bz2.BZ2Decompressor() if fmt == "bzip2" else lzma.LZMADecompressor(format=lzma.FORMAT_XZ)
            out += d.decompress(pending, max_length=limit - len(out))
            while not d.eof and not d.needs_input and len(out) < limit:
                out += d.decompress(b"", max_length=limit - len(out))
            done, rest = d.eof, d.unused_data
        if len(out) >= limit:
            break
        if not done:
            raise _StopError(f"truncated {fmt} data")
        # Concatenated members are one file (RFC 1952 section 2.2); trailing zero padding
        # or other junk after the last one is ignored, as gzip(1) does.
        pending = rest.lstrip(b"\0")
        if archive_format(pending[:HEAD_SIZE]) != fmt:
            break
    return bytes(out)
