"""`[receiver].processes`: several receiver processes on one port, with the limits of one.

A real Receiver leads a group of three processes (two spawned) in front of a
real spool; clients connect to the one port and the kernel spreads their
connections over the processes.
"""

from __future__ import annotations

import contextlib
import dataclasses
import glob
import os
import signal
import smtplib
import socket
from pathlib import Path

import pytest

from shared.config import Config
from shared.spool import SpoolTransport
from tests.integration.test_receiver_support import RawClient, make_config, running, stored
from tests.support import wait_until

pytestmark = pytest.mark.integration

MESSAGE = b"Subject: group\r\n\r\nHello.\r\n"


def group_config(spool_dir: Path, **receiver: object) -> Config:
    config = make_config(processes=3, **receiver)
    return dataclasses.replace(
        config,
        spool=dataclasses.replace(config.spool, dir=str(spool_dir)),  # the spawned processes open it themselves
        metrics=dataclasses.replace(config.metrics, enabled=False),
    )


def test_the_group_shares_its_port_its_limits_and_its_spool(spool_dir: Path) -> None:
    spool = SpoolTransport(str(spool_dir))
    with running(group_config(spool_dir, max_connections=12), spool) as receiver:
        assert len(receiver.pids) == 2
        # Twelve connections spread over three processes (all on one: 3 * (1/3)**12); the group's
        # thirteenth is refused whichever process takes it.
        clients = [RawClient(receiver.port) for _ in range(12)]
        try:
            for client in clients:
                assert client.reply()[0].startswith(b"220 ")
            assert wait_until(lambda: receiver.connections == 12)
            with RawClient(receiver.port) as extra:
                [reply] = extra.reply()
                assert reply.startswith(b"421 4.7.0 ")
                assert extra.closed()
        finally:
            for client in clients:
                client.close()
        assert wait_until(lambda: receiver.connections == 0)
        for _ in range(30):
            with smtplib.SMTP("127.0.0.1", receiver.port) as client:
                assert client.sendmail("sender@sender.example", ["user@example.test"], MESSAGE) == {}
        assert wait_until(lambda: receiver.connections == 0)
        assert receiver.data_inflight == 0
        port = receiver.port
    assert len(stored(spool)) == 30
    assert glob.glob("/dev/shm/smtpgw-receiver-*.counters") == []  # the leader removed the counters
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", port), timeout=2).close()


def clients_of(pid: int, port: int) -> int:
    """Established connections to `port` that process `pid` holds (/proc/net/tcp, by socket inode)."""
    inodes = set()
    for fd in glob.glob(f"/proc/{pid}/fd/*"):
        with contextlib.suppress(OSError):
            target = os.readlink(fd)
            if target.startswith("socket:["):
                inodes.add(target[8:-1])
    with open("/proc/net/tcp") as table:
        rows = [line.split() for line in table.readlines()[1:]]
    # Columns: sl, local address (hex ip:port), remote address, state (01 = ESTABLISHED), ..., inode.
    return sum(1 for r in rows if int(r[1].split(":")[1], 16) == port and r[3] == "01" and r[9] in inodes)


def test_a_process_that_dies_is_replaced_and_its_places_freed(spool_dir: Path) -> None:
    spool = SpoolTransport(str(spool_dir))
    with running(group_config(spool_dir, max_connections=6), spool) as receiver:
        clients: list[RawClient] = []
        for _ in range(20):  # the kernel picks the process: until one of the spawned two holds some
            for client in clients:
                client.close()
            assert wait_until(lambda: receiver.connections == 0)
            clients = [RawClient(receiver.port) for _ in range(6)]
            for client in clients:
                assert client.reply()[0].startswith(b"220 ")
            assert wait_until(lambda: receiver.connections == 6)
            victim = max(receiver.pids, key=lambda pid: clients_of(pid, receiver.port))
            held = clients_of(victim, receiver.port)
            if held:
                break
        try:
            assert held
            os.kill(victim, signal.SIGKILL)  # dies holding its connections
            # The leader clears what the dead process counted and starts another.
            assert wait_until(lambda: victim not in receiver.pids and len(receiver.pids) == 2)
            assert wait_until(lambda: receiver.connections == 6 - held)
            for client in clients:
                client.close()
            assert wait_until(lambda: receiver.connections == 0)
        finally:
            for client in clients:
                client.close()
        # The group takes mail again, on every process, the new one too.
        for _ in range(12):
            with smtplib.SMTP("127.0.0.1", receiver.port) as client:
                assert client.sendmail("sender@sender.example", ["user@example.test"], MESSAGE) == {}
    assert len(stored(spool)) == 12
