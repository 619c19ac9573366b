"""The updater against a real clamd, a real clamscan and a loopback HTTP server.

One mirror serves, in turn, a good update, a corrupted file, a truncated download, a wrong
checksum, a bad signature, a signature set that fails the canaries, and a newer good update.
The updater takes only the good ones; a clamd of the test's own keeps detecting EICAR
throughout (scanned from a thread the whole time), and the active versions change only on
success. Then a rollback by hand, and freshclam with a DatabaseCustomURL.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest

from services.updater.app import Updater, read_status
from services.updater.bundle import build_bundle, build_manifest, generate_key, load_private_key, pack, sign
from services.updater.canary import CLEAN_SAMPLES
from services.updater.state import Result
from shared.config import Config, ScannerConfig, UpdaterConfig
from shared.rules import load_rules
from tests.integration.peers import EicarWatch, OwnClamd, Response, Site, ndb, own_clamd, site

pytestmark = pytest.mark.integration

PRIVATE, PUBLIC = generate_key()
KEY = load_private_key(PRIVATE)
STRANGER = load_private_key(generate_key()[0])
ALPHA = b"SMTPGW-UPDATER-TEST-PATTERN-ALPHA"
BETA = b"SMTPGW-UPDATER-TEST-PATTERN-BETA"


def attachments(*extensions: str) -> dict[str, bytes]:
    return {"attachments.toml": ("blocked_extensions = [" + ", ".join(f'"{e}"' for e in extensions) + "]\n").encode()}


@pytest.fixture
def clamd(tmp_path: Path) -> Iterator[OwnClamd]:
    with own_clamd(tmp_path / "clamd") as clamd:
        yield clamd


@pytest.fixture
def mirror() -> Iterator[Site]:
    with site() as s:
        s.serve("/sigs/extra.ign2", b"")  # an ignore list that ignores nothing (until a test says otherwise)
        yield s


def make_config(tmp_path: Path, clamd: OwnClamd, mirror: Site, **updater: object) -> Config:
    settings: dict[str, object] = {
        "database_dir": str(clamd.database_dir),
        "state_dir": str(tmp_path / "state"),
        "signature_urls": (mirror.url("/sigs/custom.ndb"), mirror.url("/sigs/extra.ign2")),
        "bundle_url": mirror.url("/rules/bundle.tar.gz"),
        "bundle_public_keys": (PUBLIC,),
        "clamd": (clamd.address,),
        "timeout": 5.0,
        "retries": 2,
        "retry_wait": 0.01,
        "reload_timeout": 30.0,
        **updater,
    }
    return Config(scanner=ScannerConfig(rules_dir=str(tmp_path / "rules")), updater=UpdaterConfig(**settings))  # type: ignore[arg-type]


def results(updater: Updater) -> dict[str, Result]:
    return {o.component: o.result for o in updater.update_now()}


def test_only_good_updates_are_activated(tmp_path: Path, clamd: OwnClamd, mirror: Site) -> None:
    config = make_config(tmp_path, clamd, mirror)
    updater = Updater(config)
    probe = clamd.client()

    def active() -> tuple[str | None, str]:
        return updater.signatures.store.active(), load_rules(tmp_path / "rules").version

    def step(sigs: Response | bytes, bundle: Response | bytes, ign2: bytes = b"") -> dict[str, Result]:
        for path, content in (("/sigs/custom.ndb", sigs), ("/rules/bundle.tar.gz", bundle), ("/sigs/extra.ign2", ign2)):
            mirror.routes[path] = content if isinstance(content, Response) else Response(content)
        return results(updater)

    with EicarWatch(clamd) as watch:
        # 1. A good update: a new signature, a signed bundle.
        assert not probe.scan(ALPHA).found
        first_bundle = build_bundle(attachments("xyz"), "1", KEY)
        assert step(ndb("Smtpgw.Test.Alpha", ALPHA), first_bundle) == {
            "signatures": Result.ACTIVATED, "rules": Result.ACTIVATED
        }  # fmt: skip
        assert probe.scan(ALPHA).signature == "Smtpgw.Test.Alpha.UNOFFICIAL"
        assert os.path.islink(clamd.database_dir)
        good = active()
        assert good[1] == "1"
        seed = updater.signatures.store.previous()
        assert seed is not None
        assert seed.endswith("-seed")

        # 2. A corrupted signature file (clamscan cannot load it) and a corrupted bundle.
        assert step(b"Smtpgw.Broken:0:*:zz-not-hex\n", b"\x1f\x8b garbage") == {
            "signatures": Result.REFUSED, "rules": Result.REFUSED
        }  # fmt: skip
        assert active() == good

        # 3. Truncated downloads: fewer bytes than Content-Length, then the connection closes.
        full = ndb("Smtpgw.Test.Alpha", ALPHA) + ndb("Smtpgw.Test.Beta", BETA)
        bundle = build_bundle(attachments("xyz", "abc"), "2", KEY)
        hits = dict(mirror.hits)
        assert step(Response(full, send=20), Response(bundle, send=len(bundle) // 2)) == {
            "signatures": Result.FAILED, "rules": Result.FAILED
        }  # fmt: skip
        assert mirror.hits["/sigs/custom.ndb"] - hits["/sigs/custom.ndb"] == 2  # retried ([updater] retries)
        assert active() == good

        # 4. A wrong checksum: the signed manifest does not describe the files in the bundle.
        manifest = build_manifest(attachments("xyz", "abc"), "2")
        wrong = pack(
            {**attachments("xyz", "abc", "exe"), "manifest.json": manifest, "manifest.sig": sign(manifest, KEY)}
        )
        assert step(ndb("Smtpgw.Test.Alpha", ALPHA), wrong) == {"signatures": Result.UNCHANGED, "rules": Result.REFUSED}
        assert active() == good

        # 5. A bad signature: a bundle signed by a key that is not configured.
        assert (
            step(ndb("Smtpgw.Test.Alpha", ALPHA), build_bundle(attachments("abc"), "2", STRANGER))["rules"]
            is Result.REFUSED
        )
        assert active() == good

        # 6. Signature sets that fail the canaries: one flags ordinary mail (a false positive),
        #    one switches EICAR's signatures off (an update that would blind the gateway).
        clean = CLEAN_SAMPLES[0].data[:30]
        assert step(full + ndb("Smtpgw.Test.FalsePositive", clean), first_bundle)["signatures"] is Result.REFUSED
        status = read_status(config)["components"]["signatures"]
        assert "clean sample clean-text.txt is detected" in status["detail"]
        blind = b"Eicar-Test-Signature\nEicar-Test-Signature.Text\n"
        assert step(full, first_bundle, ign2=blind)["signatures"] is Result.REFUSED
        assert "canary EICAR is not detected" in read_status(config)["components"]["signatures"]["detail"]
        assert active() == good
        assert not probe.scan(BETA).found

        # 7. A newer good update.
        assert step(full, bundle) == {"signatures": Result.ACTIVATED, "rules": Result.ACTIVATED}
        newer = active()
        assert newer[0] != good[0]
        assert newer[1] == "2"
        assert probe.scan(BETA).signature == "Smtpgw.Test.Beta.UNOFFICIAL"
        assert probe.scan(ALPHA).found

    assert watch.scans > 20
    assert watch.misses == []
    # Versions kept for rollback: the seed, the first good one, the newer one; nothing of the refused ones.
    assert updater.signatures.store.versions() == [seed, good[0], newer[0]]
    assert not [p for p in updater.signatures.store.root.iterdir() if p.name.startswith(".")]

    status = read_status(config)
    assert status["signatures"] == 5  # the project's 3 and the two patterns
    assert status["components"]["signatures"]["version"] == newer[0]
    assert {c["result"] for c in status["components"].values()} == {"activated"}


def test_rollback_by_hand_sticks(tmp_path: Path, clamd: OwnClamd, mirror: Site) -> None:
    config = make_config(tmp_path, clamd, mirror, bundle_url="")
    updater = Updater(config)
    probe = clamd.client()
    mirror.serve("/sigs/custom.ndb", ndb("Smtpgw.Test.Alpha", ALPHA))
    assert results(updater)["signatures"] is Result.ACTIVATED
    first = updater.signatures.store.active()
    mirror.serve("/sigs/custom.ndb", ndb("Smtpgw.Test.Alpha", ALPHA) + ndb("Smtpgw.Test.Beta", BETA))
    assert results(updater)["signatures"] is Result.ACTIVATED
    assert probe.scan(BETA).found

    [outcome] = updater.rollback(["signatures"])
    assert (outcome.result, outcome.version) == (Result.ROLLED_BACK, first)
    assert not probe.scan(BETA).found
    assert probe.scan(ALPHA).found
    # The schedule does not bring the withdrawn set back...
    assert results(updater)["signatures"] is Result.UNCHANGED
    assert updater.signatures.store.active() == first
    # ...but a newer one is welcome.
    mirror.serve("/sigs/custom.ndb", ndb("Smtpgw.Test.Alpha", ALPHA) + ndb("Smtpgw.Test.Gamma", b"GAMMA-PATTERN-123"))
    assert results(updater)["signatures"] is Result.ACTIVATED
    assert probe.scan(b"GAMMA-PATTERN-123").found


def test_a_clamd_that_does_not_confirm_means_rollback(tmp_path: Path, clamd: OwnClamd, mirror: Site) -> None:
    config = make_config(tmp_path, clamd, mirror, bundle_url="")
    mirror.serve("/sigs/custom.ndb", ndb("Smtpgw.Test.Alpha", ALPHA))
    assert results(Updater(config))["signatures"] is Result.ACTIVATED
    before = Updater(config).signatures.store.active()
    # A second clamd that should load the same directory but is not there.
    from tests.support import free_port

    absent = replace(config.updater, clamd=(clamd.address, f"tcp://127.0.0.1:{free_port()}"), reload_timeout=1.0)
    updater = Updater(replace(config, updater=absent))
    mirror.serve("/sigs/custom.ndb", ndb("Smtpgw.Test.Alpha", ALPHA) + ndb("Smtpgw.Test.Beta", BETA))
    [outcome, _] = updater.update_now()
    assert outcome.result is Result.ROLLED_BACK
    assert "did not confirm the reload" in outcome.detail
    assert updater.signatures.store.active() == before
    assert not clamd.client().scan(BETA).found  # the clamd that did load it went back
    assert clamd.client().scan(ALPHA).found


def test_freshclam_with_a_custom_database_url(tmp_path: Path, clamd: OwnClamd, mirror: Site) -> None:
    mirror.serve("/custom/smtpgw-extra.ndb", ndb("Smtpgw.Test.Freshclam", b"FRESHCLAM-DELIVERED-PATTERN"))
    conf = tmp_path / "freshclam.conf"
    conf.write_text(f"DatabaseCustomURL {mirror.url('/custom/smtpgw-extra.ndb')}\nDNSDatabaseInfo no\n")
    config = make_config(
        tmp_path, clamd, mirror, signature_urls=(), bundle_url="", freshclam=True,
        freshclam_config=str(conf), freshclam_official=False,
    )  # fmt: skip
    updater = Updater(config)
    [outcome, _] = updater.update_now()
    assert outcome.result is Result.ACTIVATED, outcome.detail
    assert clamd.client().scan(b"FRESHCLAM-DELIVERED-PATTERN").signature == "Smtpgw.Test.Freshclam.UNOFFICIAL"
    info = updater.signatures.active()
    assert info is not None
    assert info.sources["smtpgw-extra.ndb"] == "freshclam"
    assert info.sources["smtpgw.hsb"] == "local"
    assert updater.update_now()[0].result is Result.UNCHANGED
