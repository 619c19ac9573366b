"""The benchmark's corpus: a deterministic, seeded mix of realistic messages.

`build(size, seed)` returns the same `Sample`s for the same arguments on any
machine. The mix (by count, exact up to rounding) follows what a perimeter
gateway sees:

    text        60%  text/plain or multipart/alternative text + HTML, 2-20 KB
    attachment  25%  one 50-300 KB attachment: PDF-like or DOCX-like (a real zip)
    zip         10%  a zip of documents, some with a zip inside (nested)
    blocked      4%  an attachment with a blocked extension (.exe, .scr, .bat, ...)
    eicar        1%  the EICAR test file, plain or zipped

The average message is about 82 KiB on the wire. Every sample knows what the
gateway must do with it: clean ones arrive unchanged; blocked and EICAR ones
must not reach the sink with their `marker` (a piece of the offending
attachment's encoded bytes) still in them.

`load_directory` reads an optional real-mail corpus (the SpamAssassin public
corpus: one message per file) as samples of kind "real", which carry no
expectation beyond being answered.
"""

from __future__ import annotations

import base64
import io
import os
import random
import zipfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

EICAR = rb"X5O!P%@AP[4\PZX54(P^)7CC)7}$EICAR-STANDARD-ANTIVIRUS-TEST-FILE!$H+H*"

MIX: tuple[tuple[str, float], ...] = (
    ("text", 0.60),
    ("attachment", 0.25),
    ("zip", 0.10),
    ("blocked", 0.04),
    ("eicar", 0.01),
)
CLEAN_KINDS = frozenset({"text", "attachment", "zip"})
BAD_KINDS = frozenset({"blocked", "eicar"})

RECIPIENT_DOMAIN = "example.test"
SENDER_DOMAIN = "sender.test"

_WORDS = [
    "the",
    "quarterly",
    "report",
    "invoice",
    "meeting",
    "agenda",
    "project",
    "budget",
    "review",
    "please",
    "find",
    "attached",
    "regards",
    "schedule",
    "delivery",
    "customer",
    "contract",
    "update",
    "team",
    "office",
    "proposal",
    "minutes",
    "draft",
    "signed",
    "approval",
    "order",
    "shipment",
    "payment",
    "account",
    "details",
    "thanks",
    "monday",
    "tuesday",
    "friday",
    "network",
    "server",
    "release",
    "version",
    "support",
    "ticket",
    "policy",
    "security",
    "training",
    "summary",
    "figures",
]
_BLOCKED = (
    ("setup.exe", "application/x-msdownload", "exe"),
    ("screensaver.scr", "application/octet-stream", "exe"),
    ("run.bat", "application/x-msdos-program", "script"),
    ("invoice.pdf.vbs", "text/vbscript", "script"),
    ("update.cmd", "application/octet-stream", "script"),
    ("photo.pif", "application/octet-stream", "exe"),
)


@dataclass(frozen=True, slots=True)
class Sample:
    index: int
    kind: str  # one of MIX's kinds, or "real"
    data: bytes  # the RFC 5322 message, CRLF line ends, ending in CRLF
    marker: bytes = b""  # for blocked/eicar: encoded bytes that must never reach the sink
    detail: str = ""  # e.g. "pdf", "docx", "nested", "eicar-zip"

    @property
    def clean(self) -> bool:
        return self.kind in CLEAN_KINDS


def kind_counts(size: int, mix: Sequence[tuple[str, float]] = MIX) -> dict[str, int]:
    """How many samples of each kind a corpus of `size` holds: largest remainder, every kind
    with a share gets at least one once `size` allows it."""
    exact = [(kind, share * size) for kind, share in mix]
    counts = {kind: int(value) for kind, value in exact}
    left = size - sum(counts.values())
    by_remainder = sorted(exact, key=lambda kv: (-(kv[1] - int(kv[1])), kv[0]))
    for kind, _ in by_remainder[:left]:
        counts[kind] += 1
    for kind, _ in mix:  # a tiny corpus still exercises every kind
        if counts[kind] == 0 and size >= len(mix):
            donor = max(counts, key=counts.__getitem__)
            counts[donor] -= 1
            counts[kind] += 1
    return counts


def build(size: int, seed: int = 1) -> list[Sample]:
    """`size` samples in a seeded order; the same arguments give the same bytes."""
    rng = random.Random(seed)
    kinds = [kind for kind, n in kind_counts(size).items() for _ in range(n)]
    rng.shuffle(kinds)
    makers = {"text": _text, "attachment": _attachment, "zip": _zip, "blocked": _blocked, "eicar": _eicar}
    samples: list[Sample] = []
    for index, kind in enumerate(kinds):
        # One generator per sample: a sample's bytes do not depend on the ones before it.
        sample_rng = random.Random(f"{seed}:{index}")
        if kind == "eicar":  # plain and zipped in turn, whatever their positions
            samples.append(_eicar(index, sample_rng, zipped=sum(s.kind == "eicar" for s in samples) % 2 == 1))
        else:
            samples.append(makers[kind](index, sample_rng))
    return samples


def load_directory(path: str, limit: int = 0) -> list[Sample]:
    """Messages from a directory tree, one per file (SpamAssassin corpus layout), as "real"
    samples: line ends made CRLF, an mbox "From " line dropped, sorted by path."""
    files = sorted(
        os.path.join(root, name)
        for root, _, names in os.walk(path)
        for name in names
        if not name.startswith(".") and name != "cmds"
    )
    samples: list[Sample] = []
    for file in files:
        with open(file, "rb") as fh:
            data = fh.read()
        if data.startswith(b"From "):
            data = data.split(b"\n", 1)[1] if b"\n" in data else b""
        data = data.replace(b"\r\n", b"\n").replace(b"\r", b"\n").replace(b"\n", b"\r\n")
        if not data.strip():
            continue
        if not data.endswith(b"\r\n"):
            data += b"\r\n"
        samples.append(Sample(len(samples), "real", data, detail=os.path.basename(os.path.dirname(file))))
        if limit and len(samples) >= limit:
            break
    return samples


def wire(data: bytes) -> bytes:
    """The DATA phase bytes: dot-stuffed (RFC 5321 §4.5.2) and terminated by CRLF.CRLF."""
    stuffed = data.replace(b"\r\n.", b"\r\n..")
    if stuffed.startswith(b"."):
        stuffed = b"." + stuffed
    if not stuffed.endswith(b"\r\n"):
        stuffed += b"\r\n"
    return stuffed + b".\r\n"


def mean_size(samples: Iterable[Sample]) -> float:
    sizes = [len(s.data) for s in samples]
    return sum(sizes) / len(sizes) if sizes else 0.0


# ---------------------------------------------------------------- the kinds


def _headers(index: int, rng: random.Random, subject: str, extra: str = "") -> str:
    user = rng.randrange(1, 51)
    day = 1 + index % 28
    return (
        f"From: Sender {index} <sender{index % 997}@{SENDER_DOMAIN}>\r\n"
        f"To: User {user} <user{user}@{RECIPIENT_DOMAIN}>\r\n"
        f"Subject: {subject}\r\n"
        f"Date: Mon, {day:02d} Jun 2025 {index % 24:02d}:{index % 60:02d}:{(index * 7) % 60:02d} +0000\r\n"
        f"Message-ID: <bench.{index}.{rng.getrandbits(40):x}@{SENDER_DOMAIN}>\r\n"
        "MIME-Version: 1.0\r\n" + extra
    )


def _words(rng: random.Random, size: int) -> str:
    """Plain text of about `size` bytes, ten words (under 78 characters) a line."""
    count = max(10, size // 7)  # the words average six letters and a space
    words = rng.choices(_WORDS, k=count - count % 10)
    return "".join(" ".join(words[i : i + 10]) + "\r\n" for i in range(0, len(words), 10))


def _b64(data: bytes) -> str:
    return base64.encodebytes(data).decode("ascii").replace("\n", "\r\n")


def _boundary(rng: random.Random) -> str:
    return f"=_bench_{rng.getrandbits(64):016x}"


def _attachment_part(boundary: str, name: str, ctype: str, data: bytes) -> tuple[str, bytes]:
    encoded = _b64(data)
    part = (
        f"--{boundary}\r\n"
        f'Content-Type: {ctype}; name="{name}"\r\n'
        f'Content-Disposition: attachment; filename="{name}"\r\n'
        "Content-Transfer-Encoding: base64\r\n\r\n" + encoded
    )
    # A line from the middle of the encoding: present only if the attachment went through.
    lines = encoded.split("\r\n")
    marker = lines[len(lines) // 2] if len(lines) > 2 else lines[0]
    return part, marker.encode("ascii")


def _with_attachments(
    index: int, rng: random.Random, subject: str, attachments: Sequence[tuple[str, str, bytes]]
) -> tuple[bytes, bytes]:
    boundary = _boundary(rng)
    text = _words(rng, rng.randrange(500, 3000))
    out = [
        _headers(index, rng, subject, f'Content-Type: multipart/mixed; boundary="{boundary}"\r\n'),
        "\r\nThis is a multi-part message in MIME format.\r\n",
        f"--{boundary}\r\nContent-Type: text/plain; charset=us-ascii\r\nContent-Transfer-Encoding: 7bit\r\n\r\n{text}",
    ]
    markers = []
    for name, ctype, data in attachments:
        part, marker = _attachment_part(boundary, name, ctype, data)
        out.append(part)
        markers.append(marker)
    out.append(f"--{boundary}--\r\n")
    return "".join(out).encode("ascii"), markers[0]


def _text(index: int, rng: random.Random) -> Sample:
    size = rng.randrange(2_000, 20_000)
    subject = f"{rng.choice(_WORDS)} {rng.choice(_WORDS)} {index}"
    if rng.random() < 0.5:
        body = _words(rng, size)
        head = _headers(index, rng, subject, "Content-Type: text/plain; charset=us-ascii\r\n")
        return Sample(index, "text", (head + "\r\n" + body).encode("ascii"), detail="plain")
    boundary = _boundary(rng)
    text = _words(rng, size // 2)
    paragraphs = "".join(f"<p>{line}</p>\r\n" for line in _words(rng, size // 2).split("\r\n") if line)
    html = f"<html><body>\r\n{paragraphs}</body></html>\r\n"
    data = (
        _headers(index, rng, subject, f'Content-Type: multipart/alternative; boundary="{boundary}"\r\n')
        + f"\r\n--{boundary}\r\nContent-Type: text/plain; charset=us-ascii\r\n\r\n{text}"
        + f"--{boundary}\r\nContent-Type: text/html; charset=us-ascii\r\n\r\n{html}"
        + f"--{boundary}--\r\n"
    )
    return Sample(index, "text", data.encode("ascii"), detail="html")


def _store(zf: zipfile.ZipFile, name: str, data: str | bytes) -> None:
    """A zip member with a fixed timestamp: zipfile would stamp the current time."""
    zf.writestr(zipfile.ZipInfo(name, date_time=(2025, 6, 2, 12, 0, 0)), data, zipfile.ZIP_DEFLATED)


def _pdf(rng: random.Random, size: int) -> bytes:
    """PDF-like: a header, objects with (incompressible) streams, an xref-ish tail."""
    out = io.BytesIO()
    out.write(b"%PDF-1.4\n%\xe2\xe3\xcf\xd3\n")
    obj = 1
    while out.tell() < size:
        stream = rng.randbytes(min(16_384, max(256, size - out.tell())))
        out.write(f"{obj} 0 obj\n<< /Length {len(stream)} /Filter /FlateDecode >>\nstream\n".encode())
        out.write(stream)
        out.write(b"\nendstream\nendobj\n")
        obj += 1
    out.write(f"trailer\n<< /Size {obj} >>\nstartxref\n0\n%%EOF\n".encode())
    return out.getvalue()


def _docx(rng: random.Random, size: int) -> bytes:
    """DOCX-like: a real zip with the OOXML parts a word processor writes, and an image."""
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as zf:
        _store(zf, "[Content_Types].xml", '<?xml version="1.0"?><Types/>')
        _store(zf, "_rels/.rels", '<?xml version="1.0"?><Relationships/>')
        text = _words(rng, max(2_000, size // 4))
        _store(zf, "word/document.xml", f"<w:document><w:body><w:t>{text}</w:t></w:body></w:document>")
        _store(zf, "word/media/image1.png", b"\x89PNG\r\n\x1a\n" + rng.randbytes(max(1_000, size * 3 // 4)))
    return out.getvalue()


def _attachment(index: int, rng: random.Random) -> Sample:
    size = rng.randrange(65_000, 345_000)
    if rng.random() < 0.6:
        name, ctype, data, detail = f"report-{index}.pdf", "application/pdf", _pdf(rng, size), "pdf"
    else:
        ctype = "application/vnd.openxmlformats-officedocument.wordprocessingml.document"
        name, data, detail = f"letter-{index}.docx", _docx(rng, size), "docx"
    body, _ = _with_attachments(index, rng, f"document {name}", [(name, ctype, data)])
    return Sample(index, "attachment", body, detail=detail)


def _zip_bytes(members: Sequence[tuple[str, bytes]]) -> bytes:
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, data in members:
            _store(zf, name, data)
    return out.getvalue()


def _zip(index: int, rng: random.Random) -> Sample:
    members = []
    for n in range(rng.randrange(1, 5)):
        if rng.random() < 0.5:
            members.append((f"notes-{n}.txt", _words(rng, rng.randrange(5_000, 60_000)).encode()))
        else:
            members.append((f"scan-{n}.pdf", _pdf(rng, rng.randrange(10_000, 80_000))))
    nested = rng.random() < 0.3
    if nested:
        members.append(("inner.zip", _zip_bytes([("inner.pdf", _pdf(rng, rng.randrange(5_000, 40_000)))])))
    name = f"archive-{index}.zip"
    body, _ = _with_attachments(index, rng, f"files {name}", [(name, "application/zip", _zip_bytes(members))])
    return Sample(index, "zip", body, detail="nested" if nested else "flat")


def _blocked(index: int, rng: random.Random) -> Sample:
    name, ctype, kind = _BLOCKED[index % len(_BLOCKED)]
    size = rng.randrange(5_000, 60_000)
    if kind == "exe":
        data = b"MZ\x90\x00\x03\x00\x00\x00" + rng.randbytes(size)
    else:
        data = (f"@echo off\r\nrem {index}\r\n" + _words(rng, size)).encode()
    body, marker = _with_attachments(index, rng, f"please run {name}", [(name, ctype, data)])
    return Sample(index, "blocked", body, marker, detail=name.rsplit(".", 1)[1])


def _eicar(index: int, rng: random.Random, zipped: bool = False) -> Sample:
    if not zipped:
        body, marker = _with_attachments(index, rng, "test file", [("eicar.txt", "text/plain", EICAR)])
        return Sample(index, "eicar", body, marker, detail="eicar-plain")
    archive = _zip_bytes([("eicar.txt", EICAR)])
    body, marker = _with_attachments(index, rng, "test archive", [("eicar.zip", "application/zip", archive)])
    return Sample(index, "eicar", body, marker, detail="eicar-zip")
