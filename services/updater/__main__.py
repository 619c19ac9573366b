"""`python -m services.updater [-c FILE]`: run the updater service alone.

A thin entry: the same as `smtpgw run updater`, whose wiring (transport,
metrics, signals, orderly stop) lives in `services/runner.py`.
"""

from __future__ import annotations

import sys

from services.cli import main

if __name__ == "__main__":
    sys.exit(main(["run", "updater", *sys.argv[1:]]))
