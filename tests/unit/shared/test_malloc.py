"""The services' malloc settings (shared/malloc.py), observed as page faults in fresh processes."""

from __future__ import annotations

import os
import platform
import signal
import subprocess
import sys
import textwrap

import pytest

from services import runner
from services.receiver import processes
from shared import malloc
from shared.config import load_config

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

# What a scanner thread does per message, reduced: allocate a few MiB in blocks of an attachment's
# size, free them all, and again. Prints the page faults of the second round.
PROBE = textwrap.dedent(
    """
    import resource, sys, threading
    from shared import malloc

    if sys.argv[1] == "tuned":
        assert malloc.tune()
    BLOCK = 200 * 1024
    faults = {}

    def work():
        warm = b"x" * BLOCK  # glibc sizes its dynamic thresholds from blocks freed before
        del warm
        for round_ in (1, 2):
            before = resource.getrusage(resource.RUSAGE_THREAD).ru_minflt
            blocks = [b"x" * BLOCK for _ in range(15)]
            del blocks
            faults[round_] = resource.getrusage(resource.RUSAGE_THREAD).ru_minflt - before

    thread = threading.Thread(target=work)
    thread.start()
    thread.join()
    print(faults[2])
    """
)


def _second_round_faults(mode: str) -> int:
    out = subprocess.run(
        [sys.executable, "-c", PROBE, mode],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": ROOT},
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    )
    return int(out.stdout)


def test_freed_memory_is_reused_without_faulting_it_in_again() -> None:
    # glibc's defaults give the 3 MiB back between the rounds (the probe measures something) ...
    assert _second_round_faults("plain") > 300
    # ... the tuned process keeps it and touches no new page.
    assert _second_round_faults("tuned") < 20


def test_tune_reports_whether_it_set_the_thresholds(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(platform, "libc_ver", lambda *_: ("musl", ""))
    assert malloc.tune() is False


class _Tuned(Exception):
    pass


def _refuse(*_: object) -> bool:
    raise _Tuned


def _too_soon(*_: object) -> None:
    raise AssertionError("the transport was opened before the malloc thresholds were set")


def test_smtpgw_run_tunes_before_it_opens_the_transport(monkeypatch: pytest.MonkeyPatch) -> None:
    # `smtpgw run` with one role, with all, and each child of --split.
    monkeypatch.setattr(malloc, "tune", _refuse)
    monkeypatch.setattr(runner, "open_transport", _too_soon)
    with pytest.raises(_Tuned):
        runner.run(load_config(None, env={}), {"scanner"})


def test_extra_receiver_processes_tune_before_they_open_the_transport(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(malloc, "tune", _refuse)
    monkeypatch.setattr(processes, "open_transport", _too_soon)
    monkeypatch.setattr(processes, "setup", lambda *_, **__: None)  # leave the test's logging alone
    monkeypatch.setattr(processes, "bind", lambda **_: None)
    previous = signal.getsignal(signal.SIGINT)
    try:
        with pytest.raises(_Tuned):
            processes.run_process(load_config(None, env={}), 0, "", 1, None, 0)  # type: ignore[arg-type]
    finally:
        signal.signal(signal.SIGINT, previous)
