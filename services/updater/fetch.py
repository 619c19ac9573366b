"""Downloads: http://, https:// and file:// URLs to bytes or to a file, within limits.

The updater's adapter to the network (stdlib urllib: one GET per file is all
it needs). Every download has a timeout (connect and each read) and a size
limit, and a transfer shorter than its Content-Length is an error, not a
file: a truncated signature file must never reach the staging directory.

Failures leave as `FetchError`. Temporary ones (network errors, timeouts, 5xx,
408 and 429 answers, truncated transfers) are retried with exponential
backoff through tenacity, a few times within the one update run (STYLE §4:
tenacity for short in-process retries; the next scheduled run is the long
retry). Permanent ones (other 4xx, a file too big, a missing file://, a full
disk) are not.
"""

from __future__ import annotations

import contextlib
import hashlib
import http.client
import logging
import os
import tempfile
import urllib.error
import urllib.request
from typing import IO

from tenacity import RetryCallState, Retrying, retry_if_exception, stop_after_attempt, wait_exponential

from services.updater.errors import FetchError
from shared import __version__
from shared.metrics import UPDATER_DOWNLOAD_RETRIES

log = logging.getLogger(__name__)

CHUNK = 64 * 1024
USER_AGENT = f"smtpgw-updater/{__version__}"
# Answers worth asking again for (RFC 9110 section 15.5.9 Request Timeout; RFC 6585 section 4 Too Many Requests).
_TEMPORARY_STATUS = frozenset({408, 429})


class Fetcher:
    """Downloads with `timeout` per network operation, `attempts` tries, and at most `max_size` bytes."""

    def __init__(self, timeout: float, attempts: int, wait: float, max_size: int) -> None:
        self._timeout = timeout
        self._attempts = attempts
        self._wait = wait
        self._max_size = max_size

    def fetch(self, url: str) -> bytes:
        """The whole body of `url`. Raises FetchError."""
        with tempfile.SpooledTemporaryFile(max_size=1024 * 1024) as sink:
            self.download(url, sink)
            sink.seek(0)
            return sink.read()

    def fetch_to(self, url: str, path: str) -> str:
        """Download `url` to `path` (written beside it, renamed into place once complete);
        returns its SHA-256. Raises FetchError."""
        directory = os.path.dirname(path) or "."
        try:
            fd, tmp = tempfile.mkstemp(prefix=".download-", dir=directory)
        except OSError as exc:
            raise FetchError(f"cannot write in {directory}: {exc.strerror}", temporary=False) from None
        try:
            os.fchmod(fd, 0o644)  # mkstemp makes it private; clamd may run as another user
            with os.fdopen(fd, "w+b") as sink:
                digest = self.download(url, sink)
                sink.flush()
                os.fsync(sink.fileno())
            os.replace(tmp, path)
        except OSError as exc:
            raise FetchError(f"{url}: cannot store it in {directory}: {exc.strerror}", temporary=False) from None
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
        return digest

    def download(self, url: str, sink: IO[bytes]) -> str:
        """Download `url` into `sink` (rewound and truncated before each try); returns the SHA-256.
        Raises FetchError after the last try, or at once when trying again cannot help."""

        def before_sleep(state: RetryCallState) -> None:
            exc = state.outcome.exception() if state.outcome is not None else None
            UPDATER_DOWNLOAD_RETRIES.labels(exc.reason if isinstance(exc, FetchError) else "network").inc()
            log.warning("download failed, trying again: %s", exc)

        for attempt in Retrying(
            stop=stop_after_attempt(self._attempts),
            wait=wait_exponential(multiplier=self._wait, max=max(self._wait, 60.0)),
            retry=retry_if_exception(lambda e: isinstance(e, FetchError) and e.temporary),
            before_sleep=before_sleep,
            reraise=True,
        ):
            with attempt:
                sink.seek(0)
                sink.truncate()
                return self._download(url, sink)
        raise AssertionError("unreachable: tenacity either returns or reraises")  # pragma: no cover

    def _download(self, url: str, sink: IO[bytes]) -> str:
        """One GET of `url` into `sink`; returns the SHA-256 of what was written."""
        local = url.startswith("file:")
        request = urllib.request.Request(url, headers={"User-Agent": USER_AGENT})
        digest = hashlib.sha256()
        received = 0
        try:
            with urllib.request.urlopen(request, timeout=self._timeout) as response:
                expected = _content_length(response)
                if expected is not None and expected > self._max_size:
                    raise FetchError(f"{url}: {expected} bytes, over max_download_size", temporary=False, reason="size")
                while chunk := response.read(CHUNK):
                    received += len(chunk)
                    if received > self._max_size:
                        raise FetchError(f"{url}: more than max_download_size bytes", temporary=False, reason="size")
                    digest.update(chunk)
                    try:
                        sink.write(chunk)
                    except OSError as exc:
                        raise _StoreError(exc) from None
        except _StoreError as exc:
            # A full disk is reported, not retried: the next scheduled run tries again.
            raise FetchError(
                f"{url}: cannot store it: {_describe(exc.error)}", temporary=False, reason="storage"
            ) from None
        except urllib.error.HTTPError as exc:
            exc.close()  # it holds the response, and with it the connection
            temporary = exc.code >= 500 or exc.code in _TEMPORARY_STATUS
            raise FetchError(f"{url}: HTTP {exc.code} {exc.reason}", temporary=temporary, reason="http") from None
        except urllib.error.URLError as exc:
            reason = "timeout" if isinstance(exc.reason, TimeoutError) else "network"
            raise FetchError(f"{url}: {_describe(exc.reason)}", temporary=not local, reason=reason) from None
        except http.client.IncompleteRead as exc:
            message = f"{url}: truncated: {len(exc.partial)} bytes, then the connection closed"
            raise FetchError(message, temporary=True, reason="truncated") from None
        except TimeoutError:
            raise FetchError(f"{url}: timed out", temporary=True, reason="timeout") from None
        except (http.client.HTTPException, OSError) as exc:
            raise FetchError(f"{url}: {_describe(exc)}", temporary=not local) from None
        if expected is not None and received != expected:
            raise FetchError(f"{url}: truncated: {received} of {expected} bytes", temporary=True, reason="truncated")
        return digest.hexdigest()


class _StoreError(Exception):
    """Writing what was received failed: a local problem (disk full), never a network one."""

    def __init__(self, error: OSError) -> None:
        self.error = error
        super().__init__(str(error))


def _content_length(response: object) -> int | None:
    headers = getattr(response, "headers", None)
    value = headers.get("Content-Length") if headers is not None else None
    try:
        return int(value) if value is not None else None
    except ValueError:
        return None


def _describe(exc: object) -> str:
    if isinstance(exc, TimeoutError):
        return "timed out"
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return str(exc) or type(exc).__name__
