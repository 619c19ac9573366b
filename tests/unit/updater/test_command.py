"""`smtpgw update now|status|rollback`: exit codes and what they print (rule bundles from
file:// URLs, so no network and no clamd are needed)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from services.cli import main
from services.updater.bundle import build_bundle, generate_key, load_private_key

PRIVATE, PUBLIC = generate_key()
KEY = load_private_key(PRIVATE)
STRANGER = load_private_key(generate_key()[0])


def rules(*extensions: str) -> dict[str, bytes]:
    return {"attachments.toml": ("blocked_extensions = [" + ", ".join(f'"{e}"' for e in extensions) + "]").encode()}


@pytest.fixture
def setup(tmp_path: Path) -> tuple[Path, Path]:
    bundle = tmp_path / "bundle.tar.gz"
    config = tmp_path / "smtpgw.toml"
    config.write_text(
        f"""
[scanner]
rules_dir = "{tmp_path / "rules"}"

[updater]
bundle_url = "{bundle.as_uri()}"
bundle_public_keys = ["{PUBLIC}"]
state_dir = "{tmp_path / "state"}"
database_dir = "{tmp_path / "clamav"}"
"""
    )
    return config, bundle


def run(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    code = main(list(args))
    out = capsys.readouterr()
    return code, out.out, out.err


def test_update_status_rollback(setup: tuple[Path, Path], capsys: pytest.CaptureFixture[str]) -> None:
    config, bundle = setup
    c = str(config)
    bundle.write_bytes(build_bundle(rules("xyz"), "1", KEY))
    assert run(capsys, "update", "now", "-c", c) == (
        0,
        "signatures: not configured (no signature_urls and freshclam off)\nrules: activated 1 (signed by key 1)\n",
        "",
    )
    code, out, err = run(capsys, "update", "now", "-c", c)
    assert (code, err) == (0, "")
    assert "rules: unchanged 1 (no new rules)" in out

    bundle.write_bytes(build_bundle(rules("abc"), "2", STRANGER))
    code, out, err = run(capsys, "update", "now", "-c", c)
    assert code == 1
    assert err.startswith("rules: refused (1 stays in force): bundle refused: bad signature")

    code, out, _ = run(capsys, "update", "status", "-c", c)
    assert code == 0
    assert "active        1" in out
    assert "refused" in out
    status = json.loads(run(capsys, "update", "status", "-c", c, "--json")[1])
    assert (status["components"]["rules"]["version"], status["components"]["rules"]["result"]) == ("1", "refused")
    assert "signatures" not in status["components"]

    bundle.write_bytes(build_bundle(rules("abc"), "2", KEY))
    assert run(capsys, "update", "now", "-c", c)[0] == 0
    code, out, err = run(capsys, "update", "rollback", "-c", c)
    assert (code, out, err) == (0, "rules: rolled_back 1 (rolled back from 2)\n", "")
    assert "rules: unchanged 1 (version 2 was rolled back; not again)" in run(capsys, "update", "now", "-c", c)[1]
    code, out, err = run(capsys, "update", "rollback", "-c", c)
    assert (code, out) == (1, "")
    assert "no previous rule bundle" in err
    assert "withdrawn     2" in run(capsys, "update", "status", "-c", c)[1]


def test_config_errors_name_the_key(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = tmp_path / "bad.toml"
    config.write_text('[updater]\nbundle_url = "https://rules.example.test/b.tar.gz"\nbundle_public_keys = ["short"]\n')
    code, _, err = run(capsys, "update", "now", "-c", str(config))
    assert code == 2
    assert "updater.bundle_public_keys: item 0 ('short')" in err
