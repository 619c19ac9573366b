"""The updater service: keeps ClamAV's signatures and smtpgw's rule bundles current,
and never lets an update take the gateway down.

    fetch (network) -> stage -> verify -> activate (rename) -> reload everywhere
                                  │ refused: nothing changed      │ failed anywhere: previous version back

    app.py          wiring: the schedule, one update of each component, rollback, status
    signatures.py   the ClamAV signature set: stage, compare, verify, activate, roll back
    rulesets.py     the rule bundle: fetch, verify, install, announce to scanners, roll back
    fetch.py        adapter: http(s):// and file:// downloads, limits, retries (tenacity)
    freshclam.py    adapter: freshclam into the staging directory
    canary.py       the throw-away engine (clamscan): must detect EICAR and canaries, pass clean samples
    clamds.py       RELOAD every clamd and confirm, by a per-version marker signature, that it did
    bundle.py       pure: the bundle's tar.gz and Ed25519 signature (and making bundles)
    versions.py     versioned directories behind an atomically swapped symlink
    state.py        last attempts and successes, withdrawn versions, the update lock
    errors.py       UpdateError and its kinds

The rule files themselves (what a bundle holds, and how it is validated) are
shared with the scanner: shared/rules.py.
"""
