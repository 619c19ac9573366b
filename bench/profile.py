"""Where the gateway's time goes: a py-spy raw profile summed up by component.

py-spy's raw format is one line per distinct stack, "frame;frame;...;leaf N"
(root first). Each sample is charged to the first frame, from the leaf up,
that belongs to one of smtpgw's parts, so a frame of the email package counts
for the scanner that called it, and aiosmtplib for delivery. Pure: lines in,
numbers and markdown out; `python -m bench.profile FILE` prints the table.
"""

from __future__ import annotations

import sys
from collections import Counter
from collections.abc import Iterable

# (component, markers in a frame's "function (file:line)" text), checked in this order per frame.
COMPONENTS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("logging", ("(logging/", "(shared/logging.py", "(json/")),
    ("spool and envelope codec", ("(shared/spool.py", "(shared/envelope.py")),
    ("scanner (MIME, policy, clamd client)", ("(services/scanner/", "(shared/clamd.py")),
    ("delivery (aiosmtplib, ledger)", ("(services/delivery/",)),
    ("receiver (aiosmtpd, DATA reader)", ("(services/receiver/",)),
)
OTHER = "event loop, threads, other"


def component(stack: str) -> str:
    frames = stack.split(";")
    for frame in reversed(frames):
        for name, markers in COMPONENTS:
            if any(marker in frame for marker in markers):
                return name
    return OTHER


def summarise(lines: Iterable[str]) -> Counter[str]:
    """Samples per component."""
    totals: Counter[str] = Counter()
    for line in lines:
        stack, _, count = line.rstrip("\n").rpartition(" ")
        if stack and count.isdigit():
            totals[component(stack)] += int(count)
    return totals


def top_functions(lines: Iterable[str], n: int = 12) -> list[tuple[str, int]]:
    """The leaf functions with the most samples (self time)."""
    leaves: Counter[str] = Counter()
    for line in lines:
        stack, _, count = line.rstrip("\n").rpartition(" ")
        if stack and count.isdigit():
            leaves[stack.split(";")[-1]] += int(count)
    return leaves.most_common(n)


def table(totals: Counter[str]) -> str:
    total = sum(totals.values()) or 1
    rows = ["| component | share of samples |", "|---|---|"]
    for name, samples in totals.most_common():
        rows.append(f"| {name} | {100 * samples / total:.0f}% |")
    return "\n".join(rows) + "\n"


def main(argv: list[str]) -> int:
    with open(argv[0]) as fh:
        lines = fh.readlines()
    print(table(summarise(lines)))
    for function, samples in top_functions(lines):
        print(f"{samples:6d}  {function}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
