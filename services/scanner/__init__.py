"""The scanner service: takes messages off the `scan` queue, runs the policy chain,
and hands them on to `deliver` (as received, or with attachments removed) or
`quarantine`, or drops them.

    app.py          wiring: the job handler, outputs, metrics, the canonical log line
    core.py         pure: run the filters in `[scanner].filters` order, combine, strip
    context.py      what a filter gets; finding -> Verdict with the configured action
    policy/         the filters, each `check(ctx) -> list[Verdict]`:
                    limits, attachments, archives, virus
    mime.py         pure: parse once (compat32), walk parts, attached messages, uuencode
    archive.py      pure: zip/tar/gzip/bzip2/xz inspection within hard limits
    filenames.py    pure: RFC 2231/2047 file names, Windows extension rules
    magic.py        pure: executables and archives by content
    rebuild.py      pure: replace parts by notices, record findings in a header
    reply.py        pure: what the core needs from clamd, signature categories
    rules.py        the current rules (config + the active rule bundle), reloaded live
    (the clamd adapter, shared with the updater, is shared/clamd.py)
"""
