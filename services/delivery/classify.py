"""Classification of SMTP replies: delivered, try again later, or give up.

This module is the delivery service's pure vocabulary for results. The SMTP
client adapter feeds it the raw reply of each command; what comes out decides
whether a recipient is done, goes to the deferred queue or bounces. No I/O.

Rules (RFC 5321 section 4.2.1): 2xx is success, 4xx a transient failure, 5xx
a permanent one. The one exception is 552 to RCPT: RFC 5321 section
4.5.3.1.10 says RFC 821 wrongly listed "too many recipients" as 552, and that
clients SHOULD treat a 552 there as temporary (Mailman's `deliver.py` does the
same). Anything else (1xx, 3xx, garbage) is an unexpected state and is
treated as temporary: retrying later is safe, bouncing might not be.

Enhanced status codes (RFC 3463, announced by RFC 2034) lead the reply text,
e.g. "550 5.1.1 user unknown"; they are parsed out and carried into the DSN.
"""

from __future__ import annotations

import enum
import re
from dataclasses import dataclass

from shared.errors import DeliveryError, PermanentFailure


class Outcome(enum.StrEnum):
    """What one attempt for one recipient came to."""

    DELIVERED = "delivered"
    TEMPORARY = "temporary"
    PERMANENT = "permanent"


class Stage(enum.StrEnum):
    """The SMTP step a reply answers; only RCPT changes the rules (the 552 exception)."""

    CONNECT = "connect"  # TCP connect and the 220 greeting
    HELO = "helo"
    STARTTLS = "starttls"
    MAIL = "mail"
    RCPT = "rcpt"
    DATA = "data"  # the DATA command and the reply after the final dot


# RFC 3463 section 2: class.subject.detail; class matches the reply's first digit.
_ENHANCED = re.compile(r"^([245])\.(\d{1,3})\.(\d{1,3})(?=\s|$)")

# Statuses for failures that are not an SMTP reply (RFC 3463 section 3.5).
NO_ANSWER = "4.4.1"  # connection refused or unreachable: "No answer from host"
BAD_CONNECTION = "4.4.2"  # timeout or connection dropped mid-session
DNS_FAILURE = "4.4.3"  # "Directory server failure"
UNROUTABLE = "5.4.4"  # "Unable to route": no address for the destination
BAD_DESTINATION = "5.1.2"  # "Bad destination system address": no such domain
NULL_MX = "5.1.10"  # RFC 7505 section 3: "Recipient address has null MX"
ROUTING_LOOP = "5.4.6"  # we are the best MX of the destination
EXPIRED = "4.4.7"  # "Delivery time expired"; the last error is kept in the text
TOO_BIG = "5.3.4"  # "Message too big for system" (the server's announced SIZE)
NEEDS_SMTPUTF8 = "5.6.7"  # RFC 6531 section 3.2: the server cannot take SMTPUTF8 addresses


@dataclass(frozen=True, slots=True)
class Reply:
    """One SMTP reply, or a failure that stands in for one (`code` 0: no reply)."""

    code: int
    status: str  # enhanced status, always set: parsed, or derived from the code
    text: str  # the reply text without the enhanced status, one line

    def __str__(self) -> str:
        return f"{self.code} {self.status} {self.text}" if self.code else f"{self.status} {self.text}"


@dataclass(frozen=True, slots=True)
class RcptResult:
    """The result of one attempt for one recipient, as the log line and the DSN need it."""

    rcpt: str
    outcome: Outcome
    reply: Reply
    relay: str = "none"  # "host[ip]:port" that answered, Postfix style
    remote_mta: str = ""  # host name of that relay, for the DSN's Remote-MTA


def parse_reply(code: int, message: str) -> Reply:
    """Split a reply into code, enhanced status and text.

    Multi-line replies become one line. Without an enhanced status, or when its
    class contradicts the code, the status is derived from the code ("X.0.0",
    RFC 3463 section 3.1): the reply code is what the protocol acts on.
    """
    lines = [line.strip() for line in message.replace("\r", "").split("\n") if line.strip()]
    status = ""
    texts = []
    for i, line in enumerate(lines):
        m = _ENHANCED.match(line)
        if m:
            if i == 0:
                status = m.group(0)
            line = line[m.end() :].strip()
        texts.append(line)
    klass = str(code // 100) if 2 <= code // 100 <= 5 else "4"
    if not status:
        status = f"{klass}.0.0" if klass in "245" else "4.0.0"
    elif status[0] != klass and klass in "245":
        # RFC 3463 section 2: the class must agree with the reply code; the code wins.
        status = klass + status[1:]
    return Reply(code, status, " ".join(t for t in texts if t))


def classify(code: int, stage: Stage) -> Outcome:
    """Reply code at a stage -> outcome. See the module docstring for the rules."""
    if 200 <= code < 300:
        return Outcome.DELIVERED
    if 500 <= code < 600:
        if code == 552 and stage is Stage.RCPT:
            return Outcome.TEMPORARY
        return Outcome.PERMANENT
    return Outcome.TEMPORARY


def retry_in_next_transaction(code: int, stage: Stage) -> bool:
    """Is this RCPT refusal a server limit on recipients per transaction?

    RFC 5321 section 4.5.3.1.10: a server out of RCPT slots answers 452 (or,
    wrongly, 552); the client sends the rest in another transaction right away.
    """
    return stage is Stage.RCPT and code in (452, 552)


def failure_reply(exc: DeliveryError) -> tuple[Outcome, Reply]:
    """A TemporaryFailure/PermanentFailure from an adapter -> outcome and reply.

    Adapters put the enhanced status first in the message ("5.1.10 ...") when
    there is no SMTP reply to carry it.
    """
    permanent = isinstance(exc, PermanentFailure)
    outcome = Outcome.PERMANENT if permanent else Outcome.TEMPORARY
    if exc.code:
        # The adapter already classified the reply (it knew the stage); its type is the outcome.
        return outcome, parse_reply(exc.code, exc.message)
    m = _ENHANCED.match(exc.message)
    if m:
        return outcome, Reply(0, m.group(0), exc.message[m.end() :].strip())
    return outcome, Reply(0, "5.0.0" if permanent else "4.0.0", exc.message)
