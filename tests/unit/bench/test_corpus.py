"""The benchmark corpus: deterministic, the advertised mix and size, well-formed messages."""

from __future__ import annotations

import email
import email.policy
import zipfile
from io import BytesIO

import pytest

from bench import corpus


@pytest.fixture(scope="module")
def samples() -> list[corpus.Sample]:
    return corpus.build(600, seed=1)


def test_same_seed_same_bytes() -> None:
    first, again = corpus.build(40, seed=3), corpus.build(40, seed=3)
    assert [(s.kind, s.data) for s in again] == [(s.kind, s.data) for s in first]


def test_other_seed_other_bytes() -> None:
    assert [s.data for s in corpus.build(10, seed=4)] != [s.data for s in corpus.build(10, seed=3)]


@pytest.mark.parametrize(
    ("size", "expected"),
    [
        (1000, {"text": 600, "attachment": 250, "zip": 100, "blocked": 40, "eicar": 10}),
        (100, {"text": 60, "attachment": 25, "zip": 10, "blocked": 4, "eicar": 1}),
        (20, {"text": 11, "attachment": 5, "zip": 2, "blocked": 1, "eicar": 1}),
        (5, {"text": 1, "attachment": 1, "zip": 1, "blocked": 1, "eicar": 1}),
    ],
)
def test_kind_counts(size: int, expected: dict[str, int]) -> None:
    assert corpus.kind_counts(size) == expected


def test_mix_and_mean_size(samples: list[corpus.Sample]) -> None:
    kinds = [s.kind for s in samples]
    assert {k: kinds.count(k) for k in set(kinds)} == corpus.kind_counts(600)
    assert 75 * 1024 < corpus.mean_size(samples) < 90 * 1024  # "about 82 KiB"
    text = [len(s.data) for s in samples if s.kind == "text"]
    assert min(text) > 2_000
    assert max(text) < 25_000


def test_every_message_parses_with_crlf_and_short_lines(samples: list[corpus.Sample]) -> None:
    for s in samples:
        assert s.data.endswith(b"\r\n")
        assert b"\n" not in s.data.replace(b"\r\n", b"")
        assert max(map(len, s.data.split(b"\r\n"))) <= 998
        msg = email.message_from_bytes(s.data, policy=email.policy.compat32)
        assert msg["Message-ID"]
        assert msg["To"].endswith("@example.test>")


def test_bad_samples_carry_a_marker_of_their_attachment(samples: list[corpus.Sample]) -> None:
    for s in samples:
        if s.kind in corpus.BAD_KINDS:
            assert s.marker
            assert s.marker in s.data
        else:
            assert s.marker == b""


def test_eicar_plain_and_zipped(samples: list[corpus.Sample]) -> None:
    eicar = [s for s in samples if s.kind == "eicar"]
    assert {s.detail for s in eicar} == {"eicar-plain", "eicar-zip"}
    for s in eicar:
        msg = email.message_from_bytes(s.data, policy=email.policy.compat32)
        payload = msg.get_payload()[1].get_payload(decode=True)
        if s.detail == "eicar-zip":
            payload = zipfile.ZipFile(BytesIO(payload)).read("eicar.txt")
        assert payload == corpus.EICAR


def test_docx_and_zip_attachments_are_real_zips(samples: list[corpus.Sample]) -> None:
    for s in samples:
        if s.detail in ("docx", "flat", "nested"):
            msg = email.message_from_bytes(s.data, policy=email.policy.compat32)
            data = msg.get_payload()[1].get_payload(decode=True)
            assert zipfile.ZipFile(BytesIO(data)).testzip() is None


@pytest.mark.parametrize(
    ("message", "wire"),
    [
        (b"a\r\n", b"a\r\n.\r\n"),
        (b".starts\r\n", b"..starts\r\n.\r\n"),
        (b"x\r\n.\r\ny\r\n", b"x\r\n..\r\ny\r\n.\r\n"),
        (b"no newline", b"no newline\r\n.\r\n"),
    ],
)
def test_wire_dot_stuffs_and_terminates(message: bytes, wire: bytes) -> None:
    assert corpus.wire(message) == wire


def test_load_directory(tmp_path) -> None:  # type: ignore[no-untyped-def]
    (tmp_path / "easy_ham").mkdir()
    (tmp_path / "easy_ham" / "0001.abc").write_bytes(b"From a@b  Mon\nSubject: x\n\nbody\n")
    (tmp_path / "easy_ham" / "0002.def").write_bytes(b"Subject: y\r\n\r\nbody")
    (tmp_path / "cmds").write_bytes(b"not a message")
    real = corpus.load_directory(str(tmp_path))
    assert [s.data for s in real] == [b"Subject: x\r\n\r\nbody\r\n", b"Subject: y\r\n\r\nbody\r\n"]
    assert {s.kind for s in real} == {"real"}
