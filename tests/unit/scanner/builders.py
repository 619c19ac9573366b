"""Message, archive and clamd fakes shared by the scanner's tests."""

from __future__ import annotations

import dataclasses
import io
import struct
import tarfile
import zipfile
from collections.abc import Callable, Iterable, Sequence
from email import policy
from email.message import EmailMessage
from typing import Any

from shared.clamd import ScanResult, ScanStatus
from shared.config import ScannerConfig

NEEDLE = b"VIRUS-NEEDLE-4711"


def settings(**changes: Any) -> ScannerConfig:
    """The default [scanner] settings with some keys changed (converted as the config file would)."""
    base = ScannerConfig()
    converted = {}
    for f in dataclasses.fields(ScannerConfig):
        if f.name in changes:
            converted[f.name] = f.metadata["conv"](changes.pop(f.name))
    assert not changes, f"unknown settings {changes}"
    return dataclasses.replace(base, **converted)


def mail(
    body: str = "Hello.\n",
    attachments: Iterable[tuple[str, bytes]] = (),
    *,
    subject: str = "test",
    linesep: str = "\r\n",
) -> bytes:
    """A multipart message (or a single part one without attachments), as an MUA would send it."""
    msg = EmailMessage()
    msg["From"] = "sender@example.org"
    msg["To"] = "user@example.test"
    msg["Subject"] = subject
    msg.set_content(body)
    for name, data in attachments:
        msg.add_attachment(data, maintype="application", subtype="octet-stream", filename=name)
    return msg.as_bytes(policy=policy.SMTP.clone(linesep=linesep))


def raw_mail(*parts: bytes, boundary: bytes = b"BOUNDARY", headers: bytes = b"") -> bytes:
    """A multipart/mixed message from raw part texts (headers + blank line + body each)."""
    out = [
        b"From: sender@example.org\r\nTo: user@example.test\r\nSubject: raw\r\nMIME-Version: 1.0\r\n" + headers,
        b'Content-Type: multipart/mixed; boundary="' + boundary + b'"\r\n\r\npreamble\r\n',
    ]
    for part in parts:
        out.append(b"--" + boundary + b"\r\n" + part + b"\r\n")
    out.append(b"--" + boundary + b"--\r\nepilogue\r\n")
    return b"".join(out)


def zip_of(members: Sequence[tuple[str, bytes]], method: int = zipfile.ZIP_DEFLATED) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", method) as zf:
        for name, data in members:
            zf.writestr(name, data)
    return buf.getvalue()


def tar_of(members: Sequence[tuple[str, bytes]], mode: str = "w") -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode=mode) as tf:  # type: ignore[call-overload]
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def patch_zip_sizes(
    data: bytes, *, file_size: int | None = None, compress_size: int | None = None, flags: int | None = None
) -> bytes:
    """Rewrite the size fields (or general purpose flags) of every member, in the local
    headers and the central directory alike: headers that lie (APPNOTE 4.3.7, 4.3.12)."""
    out = bytearray(data)
    for signature, flag_at, csize_at, size_at in ((b"PK\x03\x04", 6, 18, 22), (b"PK\x01\x02", 8, 20, 24)):
        start = 0
        while (at := out.find(signature, start)) >= 0:
            if flags is not None:
                struct.pack_into("<H", out, at + flag_at, flags)
            if compress_size is not None:
                struct.pack_into("<I", out, at + csize_at, compress_size)
            if file_size is not None:
                struct.pack_into("<I", out, at + size_at, file_size)
            start = at + 4
    return bytes(out)


@dataclasses.dataclass
class FakeClamd:
    """Finds NEEDLE (or what `verdict` says) in whatever it is given; records every call.

    Real clamd decodes MIME itself; the fake does not, so tests put the needle into
    parts with a 7bit or 8bit transfer encoding, where it appears in the raw message too.
    """

    signature: str = "Test.Needle"
    verdict: Callable[[bytes], str | None] | None = None
    calls: list[bytes] = dataclasses.field(default_factory=list)
    error: Exception | None = None

    def scan(self, data: bytes) -> ScanResult:
        self.calls.append(data)
        if self.error is not None:
            raise self.error
        found = self.verdict(data) if self.verdict else (self.signature if NEEDLE in data else None)
        if found:
            return ScanResult(ScanStatus.FOUND, found, f"stream: {found} FOUND")
        return ScanResult(ScanStatus.OK, text="stream: OK")


def text_part(
    body: bytes, *, name: str = "", ctype: bytes = b"text/plain", cte: bytes = b"7bit", disposition: bytes = b""
) -> bytes:
    """One raw MIME part."""
    headers = b"Content-Type: " + ctype
    if name:
        headers += b'; name="' + name.encode() + b'"'
    headers += b"\r\nContent-Transfer-Encoding: " + cte + b"\r\n"
    if disposition:
        headers += b"Content-Disposition: " + disposition + b"\r\n"
    return headers + b"\r\n" + body
