"""The smtpgw benchmark: `python -m bench` (or `make bench`).

corpus.py     pure: the seeded corpus (text, attachments, zips, blocked, EICAR)
stats.py      pure: percentiles, rates, ratios
report.py     pure: the markdown table
loadgen.py    the SMTP load generator (a process of its own)
clamdload.py  the clamd ceiling: INSTREAM from N clients (a process of its own)
peers.py      processes: start, stop by pid, sample CPU and RSS from /proc
run.py        the run: peers, phases, checks of what arrived, report
"""
