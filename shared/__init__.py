"""What several smtpgw services share: configuration, the envelope, the transports, metrics, logging."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("smtpgw")
except PackageNotFoundError:  # running from a source tree that was not installed
    __version__ = "0.0.0"
