"""aiosmtpd hooks: translate SMTP commands into policy questions and the accepted
message into an `Envelope` on the scan queue.

Each hook asks `policy` and turns its Decision into a reply. `handle_DATA`
builds the trace header and the message's envelope, then publishes it to
`Queue.SCAN` on a worker thread (`offload.py`: publish fsyncs or waits for a
broker confirm, it must not block the event loop) and answers
250 only after publish returned (DESIGN.md: never 250 before durable).
Whatever goes wrong there is logged and answered 451, so the client keeps the
message and retries.

Flow control (Postfix's in_flow_delay): while more than `in_flow_backlog`
accepted messages wait for a scanner or a delivery attempt, MAIL FROM waits up
to `in_flow_delay` for the backlog to fall below it, then goes on either way.
Under a sustained overload the senders then slow to the pace the gateway
keeps, instead of its queues growing until `max_scan_queue` refuses mail, and
the time from a 250 to delivery stays short. A 250 is never held: the wait
comes before the transaction starts. Deferred messages do not count: waiting
is what they are meant to do.

Logging: one canonical line per accepted or refused message and per refused
recipient, never a body.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Sequence
from datetime import UTC, datetime, timedelta
from typing import Generic, TypeVar

from aiosmtpd.smtp import Session

from services.receiver import policy
from services.receiver.smtp import ReceiverSMTP, Transaction
from services.receiver.trace import protocol, received_header
from shared import metrics
from shared.config import Config
from shared.crlf import bare_newline
from shared.envelope import Client, Direction, Envelope, new_queue_id
from shared.logging import bound, event
from shared.offload import Offload
from shared.transport import Queue, Transport

log = logging.getLogger(__name__)

# Back-pressure is a state of the queues, not of one message: asking the transport
# once per interval keeps a thread hop off every MAIL FROM.
ACCEPTING_TTL = 0.5
# How often a MAIL FROM held by flow control looks at the backlog again (one look is shared
# by every session waiting).
FLOW_POLL = 0.1

T = TypeVar("T")

# Metric children bound once: `.labels()` looks them up under a lock on every call.
_ACCEPTED = metrics.MESSAGES_RECEIVED.labels(result="accepted", reason=policy.accepted_reply("").reason)


def authenticated_user(session: Session) -> str:
    """The AUTH identity of the session (RFC 4954), "" when none.

    The receiver offers no AUTH yet, so this is always "". Once it does, the
    identity goes here: it lands in `Client.authenticated` and makes the
    client a relay client (may send to any destination), like relay networks.
    """
    return ""


class _Sampled(Generic[T]):
    """The answer of a blocking transport call, asked on the offload at most every `ttl`
    seconds; callers meanwhile (or while it is being asked) get the previous answer."""

    def __init__(
        self, offload: Offload, call: Callable[[], T], ttl: float, *, initial: T, failed: T, failure: str
    ) -> None:
        self._offload = offload
        self._call = call
        self._ttl = ttl
        self._value = initial
        self._failed = failed  # the answer when the call raises
        self._failure = failure  # what is logged then
        self._asked = float("-inf")  # monotonic time it was last asked

    async def get(self) -> T:
        now = time.monotonic()
        if now - self._asked >= self._ttl:
            self._asked = now
            try:
                self._value = await self._offload.run(self._call)
            except Exception:
                log.exception(self._failure)
                self._value = self._failed
        return self._value


class ReceiverHandler:
    """The hooks aiosmtpd calls, one instance shared by all sessions of a Receiver."""

    def __init__(self, config: Config, transport: Transport, offload: Offload) -> None:
        self._config = config
        self._settings = config.receiver
        self._transport = transport
        self._offload = offload
        self._lifetime = timedelta(seconds=config.delivery.max_queue_lifetime)
        self._outage = False  # publish is failing: log the outage once, not once per message
        self._accepting = _Sampled[str | None](
            offload,
            transport.accepting,
            ACCEPTING_TTL,
            initial=None,
            failed="queues unavailable",
            failure="transport.accepting() failed; deferring new mail",
        )
        self._backlog = _Sampled(
            offload,
            transport.backlog,
            FLOW_POLL,
            initial=0,
            failed=0,
            failure="transport.backlog() failed; not holding senders back",
        )

    def client(self, server: ReceiverSMTP, session: Session) -> Client:
        user = authenticated_user(session)
        relay = server.relay_client or bool(user)
        return Client(
            ip=server.client_ip,
            helo=session.host_name or "",
            tls=session.ssl is not None,
            authenticated=user,
            relay=relay,
        )

    # ------------------------------------------------------------ hooks

    async def handle_EHLO(
        self, server: ReceiverSMTP, session: Session, envelope: Transaction, hostname: str, responses: list[str]
    ) -> list[str]:
        session.host_name = hostname
        # aiosmtpd lists SIZE (RFC 1870), 8BITMIME (RFC 6152) and SMTPUTF8 (RFC 6531); it
        # handles pipelined commands but does not say so (RFC 2920), nor that every reply
        # carries an enhanced status code (RFC 2034).
        return [*responses[:-1], "250-PIPELINING", "250-ENHANCEDSTATUSCODES", responses[-1]]

    async def handle_MAIL(
        self, server: ReceiverSMTP, session: Session, envelope: Transaction, address: str, mail_options: list[str]
    ) -> str:
        busy = await self._accepting.get()
        if busy:
            decision = policy.back_pressure(busy)
            event(log, "sender deferred", reason=decision.reason, detail=busy, dsn=decision.status)
            return decision.reply()
        decision = policy.check_sender(address)
        if not decision.accepted:
            event(log, "sender refused", sender=address, reason=decision.reason, dsn=decision.status)
            return decision.reply()
        await self._in_flow_delay()  # only a transaction that is going to start waits
        # aiosmtpd reads an empty mail_from as "no MAIL yet": keep its "<>" for the null sender.
        envelope.mail_from = decision.address or "<>"
        envelope.mail_options.extend(mail_options)
        return decision.reply()

    async def handle_RCPT(
        self, server: ReceiverSMTP, session: Session, envelope: Transaction, address: str, rcpt_options: list[str]
    ) -> str:
        decision = policy.check_recipient_count(len(envelope.rcpt_tos), self._settings.max_recipients)
        if decision is None:
            decision = policy.check_recipient(
                address,
                relay=server.relay_client or bool(authenticated_user(session)),  # as in client()
                internal_domains=self._settings.internal_domains,
            )
        if not decision.accepted:
            metrics.RECIPIENTS_REFUSED.labels(reason=decision.reason).inc()
            event(log, "recipient refused", to=address, reason=decision.reason, dsn=decision.status)
            return decision.reply()
        if decision.address not in envelope.rcpt_tos:  # the same recipient twice gets one copy
            envelope.rcpt_tos.append(decision.address)
            envelope.rcpt_options.extend(rcpt_options)
        return decision.reply()

    async def handle_DATA(self, server: ReceiverSMTP, session: Session, envelope: Transaction) -> str:
        result = envelope.data
        assert result is not None, "ReceiverSMTP.smtp_DATA sets the read result"
        sender = "" if envelope.mail_from == "<>" else str(envelope.mail_from)
        refusal = policy.check_data(result.problem)
        if refusal is not None:
            self._refused(refusal, sender, envelope.rcpt_tos, result.size)
            return refusal.reply()

        started = time.monotonic()
        queue_id = new_queue_id()
        received_at = datetime.now(UTC)
        client = self.client(server, session)
        rcpt_to = tuple(envelope.rcpt_tos)
        with bound(queue_id=queue_id):
            header = received_header(
                helo=client.helo,
                ip=client.ip,
                hostname=self._settings.hostname,
                queue_id=queue_id,
                with_protocol=protocol(
                    esmtp=bool(session.extended_smtp),
                    tls=client.tls,
                    authenticated=bool(client.authenticated),
                    smtputf8=bool(envelope.smtp_utf8),
                ),
                recipients=rcpt_to,
                received_at=received_at,
            )
            body = header + result.content
            # read_data refused the content if it broke a line ending; the header is checked
            # here (a few hundred octets) rather than trusted, since it carries the client's HELO.
            crlf_clean = not bare_newline(header)
            direction = Direction.OUTGOING if client.relay else Direction.INCOMING
            message = Envelope(
                queue_id=queue_id,
                received_at=received_at,
                client=client,
                mail_from=sender,
                rcpt_to=rcpt_to,
                size=len(body),
                direction=direction,
                smtputf8=bool(envelope.smtp_utf8),
                eight_bit="BODY=8BITMIME" in envelope.mail_options,
                expires_at=received_at + self._lifetime,
                crlf_clean=crlf_clean,
            )
            try:
                await self._offload.run(lambda: self._transport.publish(Queue.SCAN, message, body))
            except Exception as exc:
                if not self._outage:
                    self._outage = True
                    log.exception("cannot queue messages, answering 451 until this works again: %s", exc)
                self._refused(policy.TRANSPORT_FAILED, sender, rcpt_to, len(body), str(exc))
                return policy.TRANSPORT_FAILED.reply()
            if self._outage:
                self._outage = False
                log.warning("queueing messages works again")
            accepted = policy.accepted_reply(queue_id)
            metrics.ACCEPT_SECONDS.observe(time.monotonic() - started)
            _ACCEPTED.inc()
            event(
                log,
                "message accepted",
                sender=f"<{sender}>",
                to=",".join(f"<{r}>" for r in rcpt_to),
                nrcpt=len(rcpt_to),
                size=len(body),
                direction=str(direction),
                helo=client.helo,
                dsn=accepted.status,
                status="queued",
            )
            return accepted.reply()

    async def handle_exception(self, error: Exception) -> str:
        """aiosmtpd's contract: anything unexpected in a hook becomes a reply (STYLE.md §7)."""
        log.error("SMTP session error", exc_info=error)
        return policy.TRANSPORT_FAILED.reply()

    # ------------------------------------------------------------ helpers

    async def _in_flow_delay(self) -> None:
        """Wait while the backlog is over `in_flow_backlog`, `in_flow_delay` at most."""
        delay, limit = self._settings.in_flow_delay, self._settings.in_flow_backlog
        if delay <= 0 or await self._backlog.get() <= limit:
            return
        started = time.monotonic()
        deadline = started + delay
        while (left := deadline - time.monotonic()) > 0:
            await asyncio.sleep(min(FLOW_POLL, left))
            if await self._backlog.get() <= limit:
                break
        metrics.IN_FLOW_SECONDS.observe(time.monotonic() - started)

    def _refused(
        self, decision: policy.Decision, sender: str, rcpts: Sequence[str], size: int, error: str = ""
    ) -> None:
        metrics.MESSAGES_RECEIVED.labels(result="refused", reason=decision.reason).inc()
        fields = {"error": error} if error else {}
        event(
            log,
            "message refused",
            level=logging.WARNING if decision.code < 500 else logging.INFO,
            sender=f"<{sender}>",
            to=",".join(f"<{r}>" for r in rcpts),
            nrcpt=len(rcpts),
            size=size,
            reason=decision.reason,
            dsn=decision.status,
            **fields,
        )
