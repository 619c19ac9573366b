"""`python -m services.delivery [-c FILE] [--threads N]`: run the delivery service alone.

A thin entry: the same as `smtpgw run delivery`, whose wiring (transport,
metrics, signals, orderly stop) lives in `services/runner.py`.
"""

from __future__ import annotations

import sys

from services.cli import main

if __name__ == "__main__":
    sys.exit(main(["run", "delivery", *sys.argv[1:]]))
