"""freshclam.conf as the updater writes it (services/updater/freshclam.py)."""

from __future__ import annotations

from services.updater.freshclam import render_config

OPERATOR = """# my mirror
DatabaseMirror mirror.example.test
PrivateMirror 10.0.0.9
DatabaseCustomURL https://sigs.example.test/extra.ndb
DatabaseDirectory /var/lib/clamav
databaseowner clamav
NotifyClamd /etc/clamav/clamd.conf
Foreground no
Checks 24
PidFile /run/freshclam.pid
UpdateLogFile /var/log/freshclam.log
"""


def test_operator_settings_stay_and_ours_win() -> None:
    lines = render_config(OPERATOR, "/srv/db.versions/.staging-x", "smtpgw").splitlines()
    assert lines[:4] == [
        "# my mirror",
        "DatabaseMirror mirror.example.test",
        "PrivateMirror 10.0.0.9",
        "DatabaseCustomURL https://sigs.example.test/extra.ndb",
    ]
    assert lines[4:] == [
        "# Set by smtpgw's updater:",
        "DatabaseDirectory /srv/db.versions/.staging-x",
        "DatabaseOwner smtpgw",
        "Foreground yes",
    ]


def test_without_an_operator_file() -> None:
    assert render_config("", "/db", "root").splitlines()[1:] == [
        "DatabaseDirectory /db",
        "DatabaseOwner root",
        "Foreground yes",
        "DatabaseMirror database.clamav.net",
    ]


def test_custom_urls_alone_still_name_a_mirror() -> None:
    assert render_config("DatabaseCustomURL http://x.test/a.ndb\n", "/db", "root").splitlines()[-1] == (
        "DatabaseMirror database.clamav.net"
    )
