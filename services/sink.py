"""A local capture MTA for `make run` and demos: `smtpgw sink --listen HOST:PORT --dir DIR`.

Stands in for the internal mail system: every message the gateway delivers to
it is written as one file in `DIR/new/` (Maildir style: written to `tmp/`,
then renamed), with the envelope in `X-Sink-*` headers in front, so the user
sees exactly what the gateway let through.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import signal
import time
from typing import Any

from aiosmtpd.smtp import SMTP

from shared import eventloop
from shared.config import HostPort

_counter = itertools.count()


class SinkHandler:
    def __init__(self, directory: str) -> None:
        self.directory = os.path.abspath(directory)
        for sub in ("tmp", "new"):
            os.makedirs(os.path.join(directory, sub), exist_ok=True)

    async def handle_DATA(self, server: SMTP, session: Any, envelope: Any) -> str:
        name = f"{time.time():.6f}.{os.getpid()}.{next(_counter)}.eml"
        # aiosmtpd hands over the null reverse-path as "<>" already.
        sender = envelope.mail_from if envelope.mail_from.startswith("<") else f"<{envelope.mail_from}>"
        head = f"X-Sink-Mail-From: {sender}\r\nX-Sink-Rcpt-To: " + ", ".join(f"<{r}>" for r in envelope.rcpt_tos)
        data = head.encode("utf-8", "surrogateescape") + b"\r\n" + bytes(envelope.original_content)
        await asyncio.to_thread(self._store, name, data)
        return "250 2.0.0 Ok: stored"

    def _store(self, name: str, data: bytes) -> None:
        tmp = os.path.join(self.directory, "tmp", name)
        with open(tmp, "wb") as fh:
            fh.write(data)
        os.rename(tmp, os.path.join(self.directory, "new", name))


async def _serve(listen: HostPort, directory: str) -> None:
    handler = SinkHandler(directory)
    loop = asyncio.get_running_loop()
    server = await loop.create_server(
        lambda: SMTP(handler, enable_SMTPUTF8=True, data_size_limit=None, hostname="sink.local"),
        host=listen.host,
        port=listen.port,
        reuse_address=True,
    )
    stopping = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stopping.set)
    print(f"sink: listening on {listen}, writing to {handler.directory}/new/", flush=True)
    await stopping.wait()
    server.close()
    await server.wait_closed()


def run_sink(listen: HostPort, directory: str) -> int:
    eventloop.run(_serve(listen, directory))
    return 0
