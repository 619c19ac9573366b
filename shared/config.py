"""Configuration: one TOML file plus `SMTPGW_<SECTION>__<KEY>` environment overrides.

Everything is validated once at start-up into frozen dataclasses; services get
the `Config` object passed in and never read files or the environment
themselves. Every key has a default, so a file holding only the keys it
changes is valid. Every problem found is reported, each as
`file:section.key: reason`, in one `ConfigError`.

The key names are a contract that operators, deployment files and tests rely
on: extend them, never rename them. `etc/smtpgw.example.toml` documents each.
"""

from __future__ import annotations

import base64
import dataclasses
import ipaddress
import math
import os
import re
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, NamedTuple
from urllib.parse import urlsplit

from shared.errors import ConfigError

ENV_PREFIX = "SMTPGW_"

# ---------------------------------------------------------------- value kinds


class HostPort(NamedTuple):
    host: str
    port: int

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


_DURATION_UNITS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}
_SIZE_UNITS = {
    "": 1, "b": 1,
    "k": 1000, "kb": 1000, "m": 1000**2, "mb": 1000**2, "g": 1000**3, "gb": 1000**3,
    "kib": 1024, "mib": 1024**2, "gib": 1024**3,
}  # fmt: skip


def parse_duration(value: object) -> float:
    """`"90s"`, `"10m"`, `"24h"`, `"60d"`, `"1h30m"` or a number of seconds -> seconds."""
    if isinstance(value, bool):
        raise ValueError("expected a duration like '30s', '10m', '24h'")
    if isinstance(value, int | float):
        if value < 0:
            raise ValueError("must not be negative")
        if not math.isfinite(value):  # TOML has nan and inf
            raise ValueError(f"{value!r} is not a finite number of seconds")
        return float(value)
    if not isinstance(value, str):
        raise ValueError("expected a duration like '30s', '10m', '24h'")
    parts = re.findall(r"(\d+(?:\.\d+)?)\s*(ms|s|m|h|d|w)", value.strip().lower())
    rebuilt = "".join(n + u for n, u in parts)
    if not parts or rebuilt != re.sub(r"\s+", "", value.strip().lower()):
        raise ValueError(f"{value!r} is not a duration like '30s', '10m', '24h', '60d'")
    return sum(float(n) * _DURATION_UNITS[u] for n, u in parts)


def parse_size(value: object) -> int:
    """`"10MiB"`, `"128MiB"`, `"500KB"` or a number of bytes -> bytes."""
    if isinstance(value, bool):
        raise ValueError("expected a size like '10MiB'")
    if isinstance(value, int):
        if value < 0:
            raise ValueError("must not be negative")
        return value
    if not isinstance(value, str):
        raise ValueError("expected a size like '10MiB', '128MiB', '500KB'")
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*", value)
    if not m or m.group(2).lower() not in _SIZE_UNITS:
        raise ValueError(f"{value!r} is not a size like '10MiB', '128MiB', '500KB'")
    return int(float(m.group(1)) * _SIZE_UNITS[m.group(2).lower()])


def parse_hostport(value: object) -> HostPort:
    """`"127.0.0.1:2525"`, `"[::1]:25"`, `":2525"` (all interfaces)."""
    if not isinstance(value, str):
        raise ValueError("expected 'host:port'")
    m = re.fullmatch(r"\[([0-9a-fA-F:.]+)\]:(\d+)|([^:\s]*):(\d+)", value.strip())
    if not m:
        raise ValueError(f"{value!r} is not 'host:port'")
    host = m.group(1) if m.group(1) is not None else m.group(3)
    port = int(m.group(2) or m.group(4))
    if not 0 <= port <= 65535:
        raise ValueError(f"port {port} is out of range")
    return HostPort(host or "0.0.0.0", port)


def parse_domain(value: str) -> str:
    """Normalise a domain for comparison: lower case, no trailing dot, IDNA-encoded."""
    domain = value.strip().rstrip(".").lower()
    try:
        return domain.encode("idna").decode("ascii") if not domain.isascii() else domain
    except UnicodeError as exc:
        raise ValueError(f"{value!r} is not a valid domain") from exc


def _str(value: object) -> str:
    if not isinstance(value, str):
        raise ValueError(f"expected a string, got {type(value).__name__}")
    return value


def _int(minimum: int = 0) -> Callable[[object], int]:
    def conv(value: object) -> int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"expected an integer, got {value!r}")
        if value < minimum:
            raise ValueError(f"must be at least {minimum}")
        return value

    return conv


def _float(value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"expected a number, got {value!r}")
    return float(value)


def _bool(value: object) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"expected true or false, got {value!r}")
    return value


def _list(item: Callable[[object], Any]) -> Callable[[object], tuple[Any, ...]]:
    def conv(value: object) -> tuple[Any, ...]:
        if not isinstance(value, list):
            raise ValueError(f"expected a list, got {type(value).__name__}")
        out = []
        for i, v in enumerate(value):
            try:
                out.append(item(v))
            except ValueError as exc:
                raise ValueError(f"item {i} ({v!r}): {exc}") from None
        return tuple(out)

    return conv


def _choice(*choices: str) -> Callable[[object], str]:
    def conv(value: object) -> str:
        if value not in choices:
            raise ValueError(f"{value!r} is not one of {', '.join(choices)}")
        return str(value)

    return conv


def _network(value: object) -> ipaddress.IPv4Network | ipaddress.IPv6Network:
    try:
        return ipaddress.ip_network(_str(value), strict=False)
    except ValueError as exc:
        raise ValueError(f"{value!r} is not a network like '10.0.0.0/8'") from exc


def _domain(value: object) -> str:
    text = _str(value)
    domain = parse_domain(text.lstrip("."))
    if not domain or not re.fullmatch(r"[a-z0-9_-]+(\.[a-z0-9_-]+)*", domain):
        raise ValueError(f"{text!r} is not a domain")
    # A leading dot means "the subdomains of this domain" (not the domain itself), as Postfix's ".domain".
    return "." + domain if text.startswith(".") else domain


def _clamd_address(value: object) -> str:
    url = urlsplit(_str(value))
    if url.scheme == "tcp" and url.hostname and url.port:
        return _str(value)
    if url.scheme == "unix" and url.path:
        return _str(value)
    raise ValueError(f"{value!r} is not 'tcp://host:port' or 'unix:///path/to/clamd.sock'")


def _route(value: object) -> str:
    text = _str(value)
    if text == "mx":
        return text
    url = urlsplit(text)
    if url.scheme == "smtp" and url.hostname:
        try:
            url.port  # noqa: B018 - validates the port
        except ValueError:
            raise ValueError(f"{text!r} has an invalid port") from None
        return text
    raise ValueError(f"{text!r} is not 'mx' or 'smtp://host[:port]'")


def _broker_url(value: object) -> str:
    text = _str(value)
    if text == "embedded" or urlsplit(text).scheme in ("amqp", "amqps"):
        return text
    raise ValueError(f"{text!r} is not 'embedded' or 'amqp://user:pass@host:port/vhost'")


def _ledger(value: object) -> str:
    text = _str(value)
    url = urlsplit(text)
    if text == "file" or (url.scheme in ("redis", "rediss") and url.hostname) or (url.scheme == "unix" and url.path):
        return text
    raise ValueError(f"{text!r} is not 'file', 'redis://host:port/db' or 'unix:///path/to/redis.sock'")


def _template(value: object) -> str:
    text = _str(value)
    if "%FILENAME%" not in text:
        raise ValueError("must contain %FILENAME%")
    return text


ACTIONS = ("deliver", "strip", "quarantine", "delete")
# Which actions make sense per scanner category: "strip" needs an attachment to remove.
DEFAULT_ACTIONS = {
    "virus": "strip",  # infected attachment removed; infected body quarantines the whole message
    "attachment": "strip",  # blocked extension or executable content
    "archive": "quarantine",  # archive over limits or unreadable
    "encrypted": "quarantine",  # password-protected archive: cannot be scanned
    "unscannable": "quarantine",  # clamd hit its own limits (Heuristics.Limits.Exceeded.*)
    "limits": "quarantine",  # MIME part count or nesting over the bounds
}


def _actions(value: object) -> Mapping[str, str]:
    if not isinstance(value, dict):
        raise ValueError('expected a table like { virus = "strip" }')
    merged = dict(DEFAULT_ACTIONS)
    for key, action in value.items():
        if key not in DEFAULT_ACTIONS:
            raise ValueError(f"unknown category {key!r}; known: {', '.join(DEFAULT_ACTIONS)}")
        if action not in ACTIONS:
            raise ValueError(f"{key} = {action!r} is not one of {', '.join(ACTIONS)}")
        merged[key] = action
    return MappingProxyType(merged)


def _routes(value: object) -> Mapping[str, str]:
    if not isinstance(value, dict):
        raise ValueError('expected a table like { "example.test" = "smtp://10.0.0.5:25", "*" = "mx" }')
    out = {}
    for key, route in value.items():
        try:
            domain = "*" if key == "*" else _domain(key)
            out[domain] = _route(route)
        except ValueError as exc:
            raise ValueError(f"{key!r}: {exc}") from None
    return MappingProxyType(out)


def setting(default: Any, conv: Callable[[object], Any]) -> Any:
    """Declare a key: its default as an operator would write it, and its converter."""
    value = conv(default)
    if isinstance(value, Mapping):
        # Tables are frozen too; a factory because dataclasses refuse mutable defaults.
        return field(default_factory=lambda: conv(default), metadata={"conv": conv})
    return field(default=value, metadata={"conv": conv})


# ---------------------------------------------------------------- sections

DEFAULT_BLOCKED_EXTENSIONS = [
    # The default list of the deployment smtpgw is modelled on (IMSS 5.1).
    "exe", "scr", "bat", "shs", "vbs", "pif", "dot", "pot", "com", "cmd", "lnk", "eml", "swf", "vbe", "chm",
]  # fmt: skip


@dataclass(frozen=True, slots=True)
class ReceiverConfig:
    listen: HostPort = setting("127.0.0.1:2525", parse_hostport)
    hostname: str = setting("mx.example.test", _str)
    banner: str = setting("SMTPGWY ready", _str)
    max_connections: int = setting(1000, _int(1))
    max_connections_per_client: int = setting(50, _int(1))
    idle_timeout: float = setting("10m", parse_duration)
    max_message_size: int = setting("10MiB", parse_size)
    max_recipients: int = setting(100, _int(1))
    max_messages_per_connection: int = setting(100, _int(1))
    max_line_length: int = setting(998, _int(78))
    data_memory_budget: int = setting("512MiB", parse_size)
    internal_domains: tuple[str, ...] = setting(["example.test"], _list(_domain))
    relay_networks: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] = setting(
        ["127.0.0.2/32"], _list(_network)
    )
    workers: int = setting(4, _int(1))
    processes: int = setting(1, _int(1))
    in_flow_delay: float = setting("1s", parse_duration)
    in_flow_backlog: int = setting(200, _int(0))


@dataclass(frozen=True, slots=True)
class BrokerConfig:
    url: str = setting("embedded", _broker_url)
    namespace: str = setting("smtpgw", _str)
    confirm_timeout: float = setting("10s", parse_duration)
    max_scan_queue: int = setting(10000, _int(1))
    delivery_limit: int = setting(5, _int(1))


@dataclass(frozen=True, slots=True)
class SpoolConfig:
    dir: str = setting("var/spool", _str)
    fsync: bool = setting(True, _bool)
    min_free: int = setting("1GiB", parse_size)


@dataclass(frozen=True, slots=True)
class ScannerConfig:
    threads: int = setting(16, _int(1))  # mostly waiting for clamd: see etc/smtpgw.example.toml
    clamd: str = setting("tcp://127.0.0.1:3310", _clamd_address)
    clamd_timeout: float = setting("60s", parse_duration)
    retry_delay: float = setting("30s", parse_duration)
    filters: tuple[str, ...] = setting(
        ["limits", "attachments", "archives", "virus"], _list(_choice("limits", "attachments", "archives", "virus"))
    )
    max_parts: int = setting(1000, _int(1))
    max_depth: int = setting(20, _int(1))
    blocked_extensions: tuple[str, ...] = setting(DEFAULT_BLOCKED_EXTENSIONS, _list(_str))
    block_executables: bool = setting(True, _bool)
    archive_max_depth: int = setting(10, _int(1))
    archive_max_size: int = setting("128MiB", parse_size)
    archive_max_ratio: int = setting(250, _int(1))
    archive_max_entries: int = setting(10000, _int(1))
    actions: Mapping[str, str] = setting({}, _actions)
    virus_text: str = setting("The attachment (%FILENAME%) was infected with a virus and removed.", _template)
    blocked_text: str = setting("The attachment (%FILENAME%) was blocked by the mail policy and removed.", _template)
    rules_dir: str = setting("", _str)


@dataclass(frozen=True, slots=True)
class DeliveryConfig:
    routes: Mapping[str, str] = setting({"*": "mx"}, _routes)
    retry_interval: float = setting("30m", parse_duration)
    max_queue_lifetime: float = setting("24h", parse_duration)
    threads: int = setting(8, _int(1))
    timeout: float = setting("60s", parse_duration)
    helo_name: str = setting("", _str)
    nameservers: tuple[HostPort, ...] = setting([], _list(parse_hostport))
    dns_timeout: float = setting("10s", parse_duration)
    mx_port: int = setting(25, _int(1))
    ledger: str = setting("file", _ledger)
    pipelining: bool = setting(True, _bool)


@dataclass(frozen=True, slots=True)
class QuarantineConfig:
    dir: str = setting("var/quarantine", _str)
    retention: float = setting("60d", parse_duration)


# ClamAV database files by extension (libclamav's CLI_DBEXT): what clamd loads from its DatabaseDirectory.
CLAMAV_DB_EXTENSIONS = frozenset([
    "cvd", "cld", "cud", "hdb", "hdu", "hsb", "hsu", "mdb", "mdu", "msb", "msu", "ndb", "ndu", "ldb", "ldu", "cdb",
    "idb", "ioc", "pdb", "gdb", "wdb", "ftm", "fp", "sfp", "cbc", "crb", "cat", "ign", "ign2", "imp", "yar", "yara",
    "pwdb", "info", "cfg",
])  # fmt: skip


def _fetch_url(value: object) -> str:
    text = _str(value)
    url = urlsplit(text)
    if (url.scheme in ("http", "https") and url.hostname) or (url.scheme == "file" and url.path):
        return text
    raise ValueError(f"{text!r} is not an http://, https:// or file:// URL")


def _optional_fetch_url(value: object) -> str:
    return "" if value == "" else _fetch_url(value)


def _signature_url(value: object) -> str:
    text = _fetch_url(value)
    name = urlsplit(text).path.rsplit("/", 1)[-1]
    if name.rpartition(".")[2].lower() not in CLAMAV_DB_EXTENSIONS or name.startswith("smtpgw-version."):
        raise ValueError(f"{text!r} does not name a ClamAV database file (.hsb, .ndb, .ldb, .hdb, .cdb, ...)")
    return text


def _ed25519_key(value: object) -> str:
    text = _str(value).strip()
    try:
        raw = base64.b64decode(text, validate=True)
    except ValueError:
        raise ValueError("is not base64") from None
    if len(raw) != 32:
        raise ValueError(f"is {len(raw)} bytes, an Ed25519 public key is 32 (base64 of the raw key)")
    return text


@dataclass(frozen=True, slots=True)
class UpdaterConfig:
    interval: float = setting("1h", parse_duration)
    jitter: float = setting("5m", parse_duration)
    database_dir: str = setting("var/clamav", _str)
    keep_versions: int = setting(3, _int(1))
    signature_urls: tuple[str, ...] = setting([], _list(_signature_url))
    freshclam: bool = setting(False, _bool)
    freshclam_config: str = setting("", _str)
    freshclam_official: bool = setting(True, _bool)
    bundle_url: str = setting("", _optional_fetch_url)
    bundle_public_keys: tuple[str, ...] = setting([], _list(_ed25519_key))
    allow_unsigned: bool = setting(False, _bool)
    canaries_dir: str = setting("", _str)
    clean_canaries_dir: str = setting("", _str)
    clamd: tuple[str, ...] = setting([], _list(_clamd_address))
    reload_timeout: float = setting("2m", parse_duration)
    timeout: float = setting("60s", parse_duration)
    retries: int = setting(3, _int(1))
    retry_wait: float = setting("2s", parse_duration)
    max_download_size: int = setting("512MiB", parse_size)
    max_age: float = setting("6h", parse_duration)
    report_window: float = setting("5s", parse_duration)
    state_dir: str = setting("var/updater", _str)


@dataclass(frozen=True, slots=True)
class MetricsConfig:
    listen: HostPort = setting("127.0.0.1:9101", parse_hostport)
    enabled: bool = setting(True, _bool)


@dataclass(frozen=True, slots=True)
class LoggingConfig:
    level: str = setting("info", _choice("debug", "info", "warning", "error"))
    format: str = setting("auto", _choice("auto", "json", "text"))


@dataclass(frozen=True, slots=True)
class Config:
    receiver: ReceiverConfig = field(default_factory=ReceiverConfig)
    broker: BrokerConfig = field(default_factory=BrokerConfig)
    spool: SpoolConfig = field(default_factory=SpoolConfig)
    scanner: ScannerConfig = field(default_factory=ScannerConfig)
    delivery: DeliveryConfig = field(default_factory=DeliveryConfig)
    quarantine: QuarantineConfig = field(default_factory=QuarantineConfig)
    updater: UpdaterConfig = field(default_factory=UpdaterConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    source: str = "<defaults>"


SECTIONS: dict[str, type] = {
    "receiver": ReceiverConfig,
    "broker": BrokerConfig,
    "spool": SpoolConfig,
    "scanner": ScannerConfig,
    "delivery": DeliveryConfig,
    "quarantine": QuarantineConfig,
    "updater": UpdaterConfig,
    "metrics": MetricsConfig,
    "logging": LoggingConfig,
}

# ---------------------------------------------------------------- loading


def _env_value(text: str) -> object:
    """Environment values are TOML values when they parse as one ('100', '["a"]', 'true'), else strings."""
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def load_config(path: str | os.PathLike[str] | None = None, env: Mapping[str, str] | None = None) -> Config:
    """Read, override and validate. Raises ConfigError naming every bad key."""
    env = os.environ if env is None else env
    source = os.fspath(path) if path is not None else "<defaults>"
    problems: list[str] = []
    raw: dict[str, Any] = {}
    if path is not None:
        try:
            with open(path, "rb") as fh:
                raw = tomllib.load(fh)
        except FileNotFoundError:
            raise ConfigError([f"{source}: file not found"]) from None
        except OSError as exc:
            raise ConfigError([f"{source}: cannot read: {exc.strerror}"]) from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError([f"{source}: not valid TOML: {exc}"]) from None

    origins: dict[tuple[str, str], str] = {}
    for section, keys in raw.items():
        if section not in SECTIONS:
            problems.append(f"{source}:{section}: unknown section; known: {', '.join(SECTIONS)}")
        elif not isinstance(keys, dict):
            problems.append(f"{source}:{section}: expected a [{section}] table")
        else:
            for key in keys:
                origins[(section, key)] = source
    for name, text in env.items():
        if not name.startswith(ENV_PREFIX) or "__" not in name:
            continue
        section, _, key = name[len(ENV_PREFIX) :].lower().partition("__")
        if section not in SECTIONS:
            problems.append(f"${name}: unknown section {section!r}")
            continue
        sect = raw.setdefault(section, {})
        if isinstance(sect, dict):
            sect[key] = _env_value(text)
            origins[(section, key)] = f"${name}"

    sections: dict[str, Any] = {}
    for section, cls in SECTIONS.items():
        values: dict[str, Any] = {}
        given = raw.get(section, {})
        if not isinstance(given, dict):
            continue
        known = {f.name: f for f in dataclasses.fields(cls)}
        for key, value in given.items():
            where = origins.get((section, key), source)
            prefix = f"{where}:{section}.{key}" if not where.startswith("$") else where
            if key not in known:
                problems.append(f"{prefix}: unknown key; known: {', '.join(known)}")
                continue
            try:
                values[key] = known[key].metadata["conv"](value)
            except ValueError as exc:
                problems.append(f"{prefix}: {exc}")
        try:
            sections[section] = cls(**values)
        except TypeError as exc:  # pragma: no cover - guarded by the known-key check
            problems.append(f"{source}:{section}: {exc}")
    if not problems:
        problems.extend(_cross_checks(sections, source))
    if problems:
        raise ConfigError(problems)
    return Config(**sections, source=source)


def _cross_checks(s: dict[str, Any], source: str) -> list[str]:
    """Checks that involve more than one key."""
    problems = []
    receiver: ReceiverConfig = s["receiver"]
    delivery: DeliveryConfig = s["delivery"]
    if not receiver.internal_domains:
        problems.append(f"{source}:receiver.internal_domains: must name at least one domain we accept mail for")
    if delivery.max_queue_lifetime < delivery.retry_interval:
        problems.append(f"{source}:delivery.max_queue_lifetime: must not be shorter than delivery.retry_interval")
    if receiver.data_memory_budget < receiver.max_message_size:
        problems.append(f"{source}:receiver.data_memory_budget: must be at least receiver.max_message_size")
    problems.extend(_updater_checks(s["updater"], s["scanner"], source))
    return problems


def _updater_checks(updater: UpdaterConfig, scanner: ScannerConfig, source: str) -> list[str]:
    problems = []
    if updater.interval <= 0:
        problems.append(f"{source}:updater.interval: must be longer than 0s")
    if updater.bundle_url and not scanner.rules_dir:
        problems.append(f"{source}:updater.bundle_url: needs scanner.rules_dir, the directory bundles are installed in")
    if updater.bundle_url and not updater.bundle_public_keys and not updater.allow_unsigned:
        problems.append(
            f"{source}:updater.bundle_public_keys: needed to verify updater.bundle_url"
            " (or set updater.allow_unsigned = true to accept unsigned bundles)"
        )
    names = [urlsplit(u).path.rsplit("/", 1)[-1] for u in updater.signature_urls]
    for name in sorted({n for n in names if names.count(n) > 1}):
        problems.append(f"{source}:updater.signature_urls: two URLs name the same file {name!r}")
    if updater.freshclam and updater.freshclam_config and not os.path.isfile(updater.freshclam_config):
        problems.append(f"{source}:updater.freshclam_config: {updater.freshclam_config!r} is not a file")
    return problems
