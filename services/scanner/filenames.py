"""Attachment file names: decode them the way a mail client does, then judge them
the way Windows does.

Pure functions. The MIME walker uses `decode_param` on the Content-Disposition
`filename` and Content-Type `name` parameters; the attachment filter uses
`extension` to find the file type the recipient's system would act on.
"""

from __future__ import annotations

import email.errors
import email.header
import email.utils
import re
import unicodedata

# RFC 2047 encoded words ("=?charset?B?...?="); mail clients decode them even inside
# quoted parameter values, where RFC 2047 section 5 says they must not appear.
_ENCODED_WORD = re.compile(r"=\?[^?\s]+\?[bBqQ]\?[^?\s]*\?=")

# NTFS alternate data stream suffix: "x.exe::$DATA" opens x.exe.
_NTFS_DATA_STREAM = re.compile(r"::\$data$", re.IGNORECASE)


def decode_param(value: str | tuple[str, str, str] | None) -> str:
    """A parameter as `Message.get_param` returns it -> the file name a user would see.

    Handles RFC 2231 (charset, language and continuations, which compat32 has
    already joined into a tuple), RFC 2047 encoded words, and raw 8-bit bytes,
    which are read as UTF-8 (the parser keeps them as surrogate escapes).
    Never raises: undecodable bytes become U+FFFD.
    """
    if value is None:
        return ""
    if isinstance(value, tuple):
        text = email.utils.collapse_rfc2231_value(value, errors="replace")
    else:
        text = email.utils.unquote(value)
    text = _undo_surrogates(text)
    if _ENCODED_WORD.search(text):
        text = _decode_encoded_words(text)
    return text


def _undo_surrogates(text: str) -> str:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return text.encode("utf-8", "surrogateescape").decode("utf-8", "replace")
    return text


def _decode_encoded_words(text: str) -> str:
    try:
        chunks = email.header.decode_header(text)
    except (email.errors.HeaderParseError, ValueError):
        return text
    out = []
    for chunk, charset in chunks:
        if isinstance(chunk, str):
            out.append(chunk)
            continue
        try:
            out.append(chunk.decode(charset or "ascii", "replace"))
        except LookupError:  # an unknown charset: keep what can be read
            out.append(chunk.decode("utf-8", "replace"))
    return "".join(out)


def normalize(name: str) -> str:
    """The name as the recipient's file system would store it.

    Drops control and format characters (NUL, CR/LF, the right-to-left override
    U+202E that makes "invoice\u202efdp.exe" display as "invoiceexe.pdf"), any
    directory part, an NTFS "::$DATA" suffix, and trailing dots and spaces, which
    Windows strips (so "x.exe." and "x.exe " are x.exe).
    """
    name = "".join(c for c in name if unicodedata.category(c) not in ("Cc", "Cf"))
    name = re.split(r"[/\\]", name)[-1]
    name = _NTFS_DATA_STREAM.sub("", name)
    return name.rstrip(" .\t\u00a0\u3000")


def extension(name: str) -> str:
    """The last extension of the normalized name, lower case, without the dot ("" if none).

    Only the last extension decides what Windows does with a file, so that is the
    one that counts: "invoice.pdf.exe" is an .exe, "photo.exe.jpg" is a .jpg.
    """
    stem, dot, ext = normalize(name).rpartition(".")
    return ext.lower() if dot and stem.strip(" .") else ""


def is_double_extension(name: str) -> bool:
    """True for "invoice.pdf.exe": a decoy extension in front of the real one."""
    stem, _, _ = normalize(name).rpartition(".")
    return bool(extension(stem)) if stem else False


def clean_for_display(name: str) -> str:
    """A name safe to put into a notice text or a log line: no control characters."""
    return "".join(c for c in name if unicodedata.category(c) not in ("Cc", "Cf"))[:200]
