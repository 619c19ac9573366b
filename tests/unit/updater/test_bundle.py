"""The bundle's tar.gz and its Ed25519 signature (services/updater/bundle.py)."""

from __future__ import annotations

import base64
import io
import tarfile

import pytest

from services.updater.bundle import (
    build_bundle,
    build_manifest,
    check_signature,
    generate_key,
    load_private_key,
    main,
    pack,
    sign,
    unpack_bundle,
)
from services.updater.errors import VerificationError
from shared.rules import MANIFEST, SIGNATURE, validate_bundle

RULES = {"attachments.toml": b'blocked_extensions = ["xyz"]\n'}
PRIVATE, PUBLIC = generate_key()
OTHER_PRIVATE, OTHER_PUBLIC = generate_key()
KEY = load_private_key(PRIVATE)


def tar_with(*members: tarfile.TarInfo, data: bytes = b"x") -> bytes:
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w:gz") as archive:
        for info in members:
            archive.addfile(info, io.BytesIO(data) if info.isfile() else None)
    return out.getvalue()


def member(name: str, kind: bytes = tarfile.REGTYPE, size: int = 1) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.size = size if kind == tarfile.REGTYPE else 0
    if kind in (tarfile.SYMTYPE, tarfile.LNKTYPE):
        info.linkname = "/etc/passwd"
    return info


def test_a_signed_bundle_round_trip() -> None:
    files = unpack_bundle(build_bundle(RULES, "2026.1", KEY))
    assert set(files) == {"attachments.toml", MANIFEST, SIGNATURE}
    assert check_signature(files, [PUBLIC], allow_unsigned=False) == "signed by key 1"
    assert validate_bundle(files).version == "2026.1"


def test_bundles_are_reproducible() -> None:
    assert build_bundle(RULES, "1", KEY, created="x") == build_bundle(RULES, "1", KEY, created="x")


def test_a_leading_dot_slash_and_the_top_directory_are_fine() -> None:
    data = tar_with(member(".", tarfile.DIRTYPE), member("./attachments.toml"))
    assert unpack_bundle(data) == {"attachments.toml": b"x"}


@pytest.mark.parametrize(
    ("data", "error"),
    [
        (b"not a tar.gz at all", "not a readable tar.gz"),
        (build_bundle(RULES, "1", KEY)[:40], "not a readable tar.gz"),
        (tar_with(member("../attachments.toml")), "is not a plain file name"),
        (tar_with(member("/etc/attachments.toml")), "is not a plain file name"),
        (tar_with(member("dir/attachments.toml")), "is not a plain file name"),
        (tar_with(member("link", tarfile.SYMTYPE)), "is not a regular file"),
        (tar_with(member("hard", tarfile.LNKTYPE)), "is not a regular file"),
        (tar_with(member("dev", tarfile.CHRTYPE)), "is not a regular file"),
        (tar_with(member("sub", tarfile.DIRTYPE)), "is not a regular file"),
        (tar_with(member("a.toml"), member("a.toml")), "appears twice"),
        (tar_with(*[member(f"f{i}") for i in range(70)]), "more than 64 files"),
    ],
)
def test_hostile_or_broken_archives(data: bytes, error: str) -> None:
    with pytest.raises(VerificationError, match=error):
        unpack_bundle(data)


def test_a_member_too_large() -> None:
    big = b"x" * (4 * 1024 * 1024 + 1)
    with pytest.raises(VerificationError, match="larger than"):
        unpack_bundle(pack({"attachments.toml": big}))


def signed(version: str = "1", key: object = KEY) -> dict[str, bytes]:
    return unpack_bundle(build_bundle(RULES, version, key))  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("files", "keys", "allow_unsigned", "expected"),
    [
        (signed(), [PUBLIC], False, "signed by key 1"),
        (signed(), [OTHER_PUBLIC, PUBLIC], False, "signed by key 2"),  # key rotation: either verifies
        (signed(key=None), [PUBLIC], True, "unsigned"),
        (signed(), [], True, "unsigned (no bundle_public_keys to check the signature with)"),
    ],
)
def test_accepted(files: dict[str, bytes], keys: list[str], allow_unsigned: bool, expected: str) -> None:
    assert check_signature(files, keys, allow_unsigned) == expected


def _tampered() -> dict[str, bytes]:
    files = signed()
    return {**files, MANIFEST: files[MANIFEST].replace(b'"version": "1"', b'"version": "9"')}


@pytest.mark.parametrize(
    ("files", "keys", "allow_unsigned", "error"),
    [
        (signed(key=None), [PUBLIC], False, "not signed"),
        (signed(), [OTHER_PUBLIC], False, "bad signature: manifest.json does not verify with any of the 1 key"),
        (signed(), [OTHER_PUBLIC], True, "bad signature"),  # allow_unsigned does not excuse a bad signature
        (_tampered(), [PUBLIC], False, "bad signature"),
        ({**signed(), SIGNATURE: b"%%% not base64"}, [PUBLIC], False, "not base64"),
        ({**signed(), SIGNATURE: base64.b64encode(b"short")}, [PUBLIC], False, "bad signature"),
        (signed(), [], False, "no bundle_public_keys are configured"),
        ({"attachments.toml": b""}, [PUBLIC], False, "no manifest.json"),
    ],
)
def test_refused(files: dict[str, bytes], keys: list[str], allow_unsigned: bool, error: str) -> None:
    with pytest.raises(VerificationError, match=error):
        check_signature(files, keys, allow_unsigned)


def test_signature_covers_the_rule_files_through_the_manifest() -> None:
    manifest = build_manifest(RULES, "1", "now")
    files = {**RULES, MANIFEST: manifest, SIGNATURE: sign(manifest, KEY)}
    changed = {**files, "attachments.toml": b'blocked_extensions = ["other"]\n'}
    assert check_signature(changed, [PUBLIC], False) == "signed by key 1"  # the signature alone...
    with pytest.raises(Exception, match="SHA-256"):
        validate_bundle(changed)  # ...and the sums: together they refuse it


def test_pem_keys_load_too() -> None:
    from cryptography.hazmat.primitives import serialization

    pem = KEY.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    assert load_private_key(pem.decode()).public_key() == KEY.public_key()
    with pytest.raises(ValueError, match="not an Ed25519 private key"):
        load_private_key("bm9wZQ==")


def test_the_bundle_tool(tmp_path: object, capsys: pytest.CaptureFixture[str]) -> None:
    from pathlib import Path

    base = Path(str(tmp_path))
    key_file = base / "signing.key"
    assert main(["keygen", str(key_file)]) == 0
    public = capsys.readouterr().out.strip()
    rules = base / "rules"
    rules.mkdir()
    (rules / "attachments.toml").write_bytes(RULES["attachments.toml"])
    out = base / "bundle.tar.gz"
    assert main(["build", str(rules), "--version", "3", "--key", str(key_file), "-o", str(out)]) == 0
    files = unpack_bundle(out.read_bytes())
    assert check_signature(files, [public], False) == "signed by key 1"
    assert validate_bundle(files).version == "3"
    (rules / "attachments.toml").write_bytes(b"mode = 'sideways'")
    assert main(["build", str(rules), "--version", "4", "-o", str(base / "bad.tar.gz")]) == 1
    assert not (base / "bad.tar.gz").exists()
