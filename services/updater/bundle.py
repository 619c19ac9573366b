"""Rule bundles on the wire: the tar.gz, its Ed25519 signature, and how to make one.

Pure (values in, values out). `unpack_bundle` reads the archive without ever
extracting it to disk, so a hostile member name ("../x", "/etc/x", links,
devices) has nowhere to go: only flat regular files within size limits are
accepted. `check_signature` verifies manifest.sig over manifest.json with the
configured public keys (through `cryptography`, which wraps OpenSSL's
Ed25519); the manifest gives the SHA-256 of every other file, which
`shared.rules.validate_bundle` checks, so the signature covers the whole
bundle. `build_bundle` makes a bundle, for `python -m services.updater.bundle`
and the tests.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import io
import json
import re
import tarfile
import zlib
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from services.updater.errors import VerificationError
from shared.rules import FORMAT, MANIFEST, MAX_FILE_SIZE, SIGNATURE

MAX_MEMBERS = 64
MAX_BUNDLE_SIZE = 16 * 1024 * 1024  # unpacked; rule lists are small
_MEMBER_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")


def unpack_bundle(data: bytes) -> dict[str, bytes]:
    """A bundle's tar.gz -> {file name: bytes}. Raises VerificationError."""
    files: dict[str, bytes] = {}
    tar = _gunzip(data)
    try:
        with tarfile.open(fileobj=io.BytesIO(tar), mode="r:") as archive:
            for count, member in enumerate(archive, 1):
                if count > MAX_MEMBERS:
                    raise VerificationError(f"bundle: more than {MAX_MEMBERS} files")
                name = member.name.removeprefix("./")
                if member.isdir() and name in ("", "."):
                    continue
                if not member.isfile():
                    raise VerificationError(f"bundle: {member.name!r} is not a regular file")
                if not _MEMBER_NAME.fullmatch(name):
                    raise VerificationError(f"bundle: {member.name!r} is not a plain file name")
                if name in files:
                    raise VerificationError(f"bundle: {name!r} appears twice")
                if member.size > MAX_FILE_SIZE:
                    raise VerificationError(f"bundle: {name!r} is larger than {MAX_FILE_SIZE} bytes")
                handle = archive.extractfile(member)
                if handle is None:  # pragma: no cover - regular files always have content
                    raise VerificationError(f"bundle: {name!r} has no content")
                files[name] = handle.read()
    except (tarfile.TarError, EOFError, OSError, zlib.error) as exc:
        raise VerificationError(f"bundle: not a readable tar.gz: {exc}") from None
    return files


def _gunzip(data: bytes) -> bytes:
    """The whole gzip stream, or VerificationError: a tar reader would stop at the tar's end
    marker and never notice a cut-off gzip trailer, so the stream is checked to its end (CRC)."""
    inflater = zlib.decompressobj(wbits=16 + zlib.MAX_WBITS)
    try:
        tar = inflater.decompress(data, MAX_BUNDLE_SIZE + 1)
    except zlib.error as exc:
        raise VerificationError(f"bundle: not a readable tar.gz: {exc}") from None
    if len(tar) > MAX_BUNDLE_SIZE:
        raise VerificationError(f"bundle: more than {MAX_BUNDLE_SIZE} bytes unpacked")
    if not inflater.eof:
        raise VerificationError("bundle: not a readable tar.gz: the gzip stream is cut short (truncated download?)")
    if inflater.unused_data:
        raise VerificationError("bundle: not a readable tar.gz: data after the end of the gzip stream")
    return tar


def check_signature(files: Mapping[str, bytes], public_keys: Sequence[str], allow_unsigned: bool) -> str:
    """Verify manifest.sig over manifest.json with one of `public_keys` (base64 raw Ed25519 keys).

    Returns how the bundle is vouched for ("signed by key N", or "unsigned" when that is
    allowed). Raises VerificationError for an unsigned bundle unless `allow_unsigned`, and for
    a signature that none of the keys verifies, whatever `allow_unsigned` says: a signature
    that does not verify means the bundle was changed or someone else signed it.
    """
    manifest = files.get(MANIFEST)
    if manifest is None:
        raise VerificationError(f"bundle: no {MANIFEST}")
    encoded = files.get(SIGNATURE)
    if encoded is None:
        if allow_unsigned:
            return "unsigned"
        raise VerificationError(f"bundle is not signed (no {SIGNATURE}); refused (see [updater] allow_unsigned)")
    if not public_keys:
        if allow_unsigned:
            return "unsigned (no bundle_public_keys to check the signature with)"
        raise VerificationError("bundle is signed, but no bundle_public_keys are configured to check it")
    try:
        signature = base64.b64decode(encoded.strip(), validate=True)
    except (binascii.Error, ValueError):
        raise VerificationError(f"bad signature: {SIGNATURE} is not base64") from None
    for number, key in enumerate(public_keys, 1):
        try:
            Ed25519PublicKey.from_public_bytes(base64.b64decode(key)).verify(signature, manifest)
        except (InvalidSignature, ValueError):
            continue
        return f"signed by key {number}"
    raise VerificationError(f"bad signature: {MANIFEST} does not verify with any of the {len(public_keys)} key(s)")


# ---------------------------------------------------------------- making bundles


def generate_key() -> tuple[str, str]:
    """A new signing key: (private key as base64 PKCS#8 DER, public key as base64 raw)."""
    key = Ed25519PrivateKey.generate()
    private = key.private_bytes(
        serialization.Encoding.DER, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    public = key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return base64.b64encode(private).decode(), base64.b64encode(public).decode()


def load_private_key(text: str) -> Ed25519PrivateKey:
    """A private key as `generate_key` writes it (base64 PKCS#8 DER), or PEM."""
    raw = text.strip().encode()
    try:
        key = (
            serialization.load_pem_private_key(raw, None)
            if raw.startswith(b"-----")
            else serialization.load_der_private_key(base64.b64decode(raw), None)
        )
    except (ValueError, TypeError, binascii.Error) as exc:
        raise ValueError(f"not an Ed25519 private key: {exc}") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise ValueError("not an Ed25519 private key")
    return key


def build_manifest(rule_files: Mapping[str, bytes], version: str, created: str | None = None) -> bytes:
    created = created or datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    doc = {
        "format": FORMAT,
        "version": version,
        "created": created,
        "files": {name: hashlib.sha256(data).hexdigest() for name, data in sorted(rule_files.items())},
    }
    return (json.dumps(doc, indent=2, sort_keys=True) + "\n").encode()


def sign(manifest: bytes, key: Ed25519PrivateKey) -> bytes:
    return base64.b64encode(key.sign(manifest)) + b"\n"


def pack(files: Mapping[str, bytes]) -> bytes:
    """Files -> a reproducible tar.gz (fixed order, times and owners)."""
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w:gz", format=tarfile.PAX_FORMAT) as archive:
        for name, data in sorted(files.items()):
            info = tarfile.TarInfo(name)
            info.size, info.mode, info.mtime = len(data), 0o644, 0
            archive.addfile(info, io.BytesIO(data))
    return out.getvalue()


def build_bundle(
    rule_files: Mapping[str, bytes], version: str, key: Ed25519PrivateKey | None, created: str | None = None
) -> bytes:
    """A bundle of `rule_files` as `version`, signed with `key` (unsigned when None)."""
    manifest = build_manifest(rule_files, version, created)
    files = {**rule_files, MANIFEST: manifest}
    if key is not None:
        files[SIGNATURE] = sign(manifest, key)
    return pack(files)


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m services.updater.bundle keygen | build DIR --version V --key FILE -o OUT.tar.gz`."""
    import argparse
    import pathlib

    parser = argparse.ArgumentParser(prog="python -m services.updater.bundle", description="make smtpgw rule bundles")
    sub = parser.add_subparsers(dest="command", required=True)
    keygen = sub.add_parser("keygen", help="write a new signing key; print its public key for bundle_public_keys")
    keygen.add_argument("private_key_file")
    build = sub.add_parser("build", help="bundle the rule files of DIR (attachments.toml, ...), signed")
    build.add_argument("dir")
    build.add_argument("--version", required=True)
    build.add_argument("--key", help="private key file from keygen (omit for an unsigned bundle)")
    build.add_argument("-o", "--output", required=True)
    args = parser.parse_args(argv)
    if args.command == "keygen":
        private, public = generate_key()
        path = pathlib.Path(args.private_key_file)
        path.touch(mode=0o600, exist_ok=False)
        path.write_text(private + "\n")
        print(public)
        return 0
    from shared.rules import RULE_FILES, RulesError, validate_bundle

    rule_files = {p.name: p.read_bytes() for p in sorted(pathlib.Path(args.dir).iterdir()) if p.name in RULE_FILES}
    key = load_private_key(pathlib.Path(args.key).read_text()) if args.key else None
    data = build_bundle(rule_files, args.version, key)
    try:
        validate_bundle(unpack_bundle(data))
    except (RulesError, VerificationError) as exc:
        print(f"refusing to build a bundle smtpgw would refuse: {exc}")
        return 1
    pathlib.Path(args.output).write_bytes(data)
    print(f"{args.output}: version {args.version}, {', '.join(rule_files)}{'' if key else ' (unsigned)'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
