"""The gateway's exception tree: every error a service raises on purpose.

    GatewayError
    ├── ConfigError               bad configuration; carries every problem found
    ├── EnvelopeDecodeError       an envelope we cannot read (unknown schema, garbage)
    ├── TransportError            a queue operation failed (spool or broker)
    │   ├── SpoolError            embedded spool directory: write, fsync, rename
    │   └── BrokerError           RabbitMQ: connection, channel, nack, timeout
    ├── RetryLater                a consumer asks for the job to be tried again later
    ├── ScanError                 a scan could not produce a verdict
    │   ├── ScannerUnavailable    clamd down or not answering
    │   └── ScanLimitExceeded     the scanner refused the input (size, stream limit)
    └── DeliveryError             a delivery attempt failed
        ├── TemporaryFailure      4xx or no answer: try again later
        └── PermanentFailure      5xx: bounce

Adapters translate their library's exceptions into these at the boundary, so
the pure cores never see a pika, aiosmtplib or socket exception.
"""

from __future__ import annotations


class GatewayError(Exception):
    """Base class of every error the gateway raises on purpose."""


class ConfigError(GatewayError):
    """Configuration is invalid. `problems` holds one `file:key: reason` per problem."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = list(problems)
        super().__init__("\n".join(self.problems))


class EnvelopeDecodeError(GatewayError):
    """Serialized envelope or queue item cannot be decoded."""


class TransportError(GatewayError):
    """A queue operation failed; nothing was made durable."""


class SpoolError(TransportError):
    """The embedded spool could not store or move a message."""


class BrokerError(TransportError):
    """The broker refused, nacked or could not be reached."""


class RetryLater(GatewayError):
    """Raised by a job handler: leave the job queued and try again after `delay` seconds."""

    def __init__(self, reason: str, delay: float = 30.0) -> None:
        self.reason = reason
        self.delay = delay
        super().__init__(reason)


class ScanError(GatewayError):
    """A scan could not produce a verdict; the message must not pass."""


class ScannerUnavailable(ScanError):
    """The virus scanner cannot be reached or stopped answering."""


class ScanLimitExceeded(ScanError):
    """The virus scanner refused the input because of its own limits."""


class DeliveryError(GatewayError):
    """A delivery attempt failed. `code` and `message` are the SMTP reply, if any."""

    def __init__(self, message: str, code: int | None = None) -> None:
        self.code = code
        self.message = message
        super().__init__(f"{code} {message}" if code else message)


class TemporaryFailure(DeliveryError):
    """Try again later (4xx reply, timeout, connection refused)."""


class PermanentFailure(DeliveryError):
    """Do not try again (5xx reply); the message bounces."""
