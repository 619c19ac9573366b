"""bench.instructions' counting against a real callgrind: zeroing, dumping and reading the count."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from bench import instructions
from tests.support import missing

pytestmark = pytest.mark.integration

# A Python process that does `n` units of work for each line "n" it reads, and says when.
WORKER = """
import sys
print("ready", flush=True)
for line in sys.stdin:
    total = 0
    for _ in range(int(line) * 1000):
        total += 1
    print("done", total, flush=True)
"""


def test_counts_follow_the_work_done_between_zero_and_dump(tmp_path: Path) -> None:
    if shutil.which("valgrind") is None or shutil.which("callgrind_control") is None:
        missing("valgrind (callgrind)")
    argv = [
        "valgrind",
        "--tool=callgrind",
        f"--callgrind-out-file={tmp_path}/callgrind.%p",
        sys.executable,
        "-c",
        WORKER,
    ]
    with subprocess.Popen(
        argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True
    ) as proc:
        assert proc.stdin is not None
        assert proc.stdout is not None
        stdin, stdout = proc.stdin, proc.stdout

        def work(units: int) -> int:
            instructions.zero(proc.pid)
            stdin.write(f"{units}\n")
            stdin.flush()
            assert stdout.readline().split() == ["done", str(units * 1000)]
            return instructions.counted(proc.pid, str(tmp_path))

        try:
            assert stdout.readline().strip() == "ready"
            small, large, small_again = work(20), work(80), work(20)
        finally:
            proc.kill()
    # Each count holds the work since its zeroing, not what came before: four times the loop,
    # about four times the instructions; the same loop again, about the same count.
    assert 3.5 < large / small < 4.5, (small, large)
    assert abs(small_again - small) / small < 0.05, (small, small_again)
