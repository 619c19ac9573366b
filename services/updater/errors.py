"""The updater's errors, under the gateway's tree (shared/errors.py):

GatewayError
└── UpdateError               an update did not happen; the active versions are untouched
    ├── FetchError            a download failed (after its retries); `temporary` says
    │                         whether trying again later may help
    ├── VerificationError     what was fetched is refused: checksum, signature, rules
    │                         that do not parse, signatures that do not load or miss a canary
    └── ActivationError       a verified update could not be put in force everywhere
                              (a clamd did not confirm the reload, a scanner could not
                              load the rules); the previous version is restored
"""

from __future__ import annotations

from shared.errors import GatewayError


class UpdateError(GatewayError):
    """An update did not happen."""


class FetchError(UpdateError):
    """A download failed. `temporary`: a network error, timeout, 5xx or truncated transfer.
    `reason` is one of network, timeout, http, truncated, size, storage (a metrics label)."""

    def __init__(self, message: str, *, temporary: bool, reason: str = "network") -> None:
        self.temporary = temporary
        self.reason = reason
        super().__init__(message)


class VerificationError(UpdateError):
    """The update is refused: it is not what it claims to be, or it does not work."""


class ActivationError(UpdateError):
    """A verified update could not be put in force everywhere."""
