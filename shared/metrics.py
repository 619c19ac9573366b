"""Prometheus metrics of every service, defined in this one place.

Names follow https://prometheus.io/docs/practices/naming: `smtpgw_<service>_<what>_<unit>`,
base units, `_total` counters. Labels take values from small closed sets;
addresses and queue ids are never labels.
"""

from __future__ import annotations

import socket
import threading
from collections.abc import Callable, Iterable, Mapping
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, make_server

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, make_wsgi_app
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.exposition import ThreadingWSGIServer
from prometheus_client.registry import REGISTRY, Collector

from shared.errors import GatewayError
from shared.health import Health

# Latency buckets from 1 ms to 2 minutes: SMTP answers, scans and deliveries all fit.
_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)

# receiver
CONNECTIONS = Counter("smtpgw_receiver_connections_total", "SMTP connections", ["result"])
# Gauges say how to combine processes under `run all --split` (prometheus_client multiprocess mode);
# the setting is ignored in a single process.
ACTIVE_CONNECTIONS = Gauge("smtpgw_receiver_active_connections", "Open SMTP connections", multiprocess_mode="livesum")
MESSAGES_RECEIVED = Counter("smtpgw_receiver_messages_total", "Messages accepted or refused", ["result", "reason"])
RECIPIENTS_REFUSED = Counter("smtpgw_receiver_recipients_refused_total", "Recipients refused", ["reason"])
DATA_INFLIGHT = Gauge(
    "smtpgw_receiver_data_inflight_bytes", "DATA bytes held in memory right now", multiprocess_mode="livesum"
)
ACCEPT_SECONDS = Histogram(
    "smtpgw_receiver_accept_duration_seconds", "End of DATA to the 250 (durable store)", buckets=_BUCKETS
)
IN_FLOW_SECONDS = Histogram(
    "smtpgw_receiver_in_flow_delay_seconds",
    "Time a MAIL FROM waited for the backlog to shrink ([receiver] in_flow_delay)",
    buckets=_BUCKETS,
)

# scanner
SCAN_SECONDS = Histogram("smtpgw_scan_duration_seconds", "Time to scan one message", buckets=_BUCKETS)
VERDICTS = Counter("smtpgw_scanner_verdicts_total", "Filter findings", ["category", "action"])
DISPOSITIONS = Counter("smtpgw_scanner_messages_total", "Scanned messages by outcome", ["disposition"])
CLAMD_ERRORS = Counter("smtpgw_scanner_clamd_errors_total", "clamd failures", ["kind"])
CLAMD_SECONDS = Histogram("smtpgw_scanner_clamd_duration_seconds", "One clamd INSTREAM call", buckets=_BUCKETS)

# delivery
DELIVERY_ATTEMPTS = Counter(
    "smtpgw_delivery_attempts_total", "Delivery attempts per recipient", ["result"]
)  # result: sent, deferred, bounced, duplicate
DELIVERY_SECONDS = Histogram("smtpgw_delivery_duration_seconds", "One SMTP delivery transaction", buckets=_BUCKETS)
BOUNCES = Counter("smtpgw_delivery_bounces_total", "Delivery status notifications generated", ["result"])

# quarantine
QUARANTINED = Counter("smtpgw_quarantine_messages_total", "Messages put in quarantine", ["category"])

# scanner rules (services/scanner/rules.py)
SCANNER_RULES_RELOADS = Counter(
    "smtpgw_scanner_rules_reloads_total", "Rule bundle loads by a scanner", ["result"]
)  # result: loaded, unchanged, failed (the rules in force stay)
SCANNER_RULES_VERSION = Gauge(
    "smtpgw_scanner_rules_version_info", "Rule bundle in force (1)", ["version"], multiprocess_mode="liveall"
)

# updater
UPDATER_RUNS = Counter(
    "smtpgw_updater_runs_total", "Update attempts per component", ["component", "result"]
)  # component: signatures, rules; result: see UPDATE_RESULTS
UPDATER_DOWNLOAD_RETRIES = Counter("smtpgw_updater_download_retries_total", "Downloads tried again", ["reason"])
UPDATE_RESULTS = ("activated", "unchanged", "refused", "failed", "rolled_back")

# transport
JOBS = Counter("smtpgw_queue_jobs_total", "Jobs finished by consumers", ["queue", "result"])

# broker (RabbitMQ transport)
BROKER_CONNECTS = Counter("smtpgw_broker_connections_opened_total", "Connections opened to RabbitMQ", ["role"])
BROKER_PUBLISH_FAILURES = Counter(
    "smtpgw_broker_publish_failures_total", "Broker operations that raised BrokerError", ["reason"]
)  # reason: unavailable, refused (nack), timeout


class QueueDepthCollector(Collector):
    """Reports `smtpgw_queue_depth{queue}` and, where the transport can tell (RabbitMQ: the
    `consumer_count` of a passive queue.declare, no management plugin needed),
    `smtpgw_queue_consumers{queue}`, by asking the transport at scrape time."""

    def __init__(
        self, queues: Iterable[str], depth: Callable[[str], int], consumers: Callable[[str], int] | None = None
    ) -> None:
        self._queues = list(queues)
        self._depth = depth
        self._consumers = consumers

    def collect(self) -> Iterable[GaugeMetricFamily]:
        family = GaugeMetricFamily("smtpgw_queue_depth", "Messages waiting per queue", labels=["queue"])
        for q in self._queues:
            try:
                family.add_metric([q], self._depth(q))
            except GatewayError:
                continue  # broker unreachable: leave the series out rather than fail the whole scrape
        yield family
        if self._consumers is not None:
            consumers = GaugeMetricFamily(
                "smtpgw_queue_consumers", "Consumers subscribed per queue, over all processes", labels=["queue"]
            )
            for q in self._queues:
                try:
                    consumers.add_metric([q], self._consumers(q))
                except GatewayError:
                    continue
            yield consumers


class UpdaterCollector(Collector):
    """The updater's state, read at scrape time from what `status()` returns, so the numbers are
    the same as `smtpgw update status` prints, also after an update run by hand in another process.

    `status()` returns {"max_age": seconds, "signatures": count or None, "components": {name:
    {"last_success": ts, "last_attempt": ts, "result": one of UPDATE_RESULTS or "", "version": str}}}.
    """

    def __init__(self, status: Callable[[], Mapping[str, Any]]) -> None:
        self._status = status

    def collect(self) -> Iterable[GaugeMetricFamily]:
        try:
            status = self._status()
        except (GatewayError, OSError):
            return
        success = GaugeMetricFamily(
            "smtpgw_updater_last_success_timestamp_seconds",
            "When an update of the component last succeeded (activated, or nothing new); 0: never",
            labels=["component"],
        )
        attempt = GaugeMetricFamily(
            "smtpgw_updater_last_attempt_timestamp_seconds", "When an update was last tried", labels=["component"]
        )
        result = GaugeMetricFamily(
            "smtpgw_updater_last_attempt_result", "Result of the last attempt (1 for it, 0 for the others)",
            labels=["component", "result"],
        )  # fmt: skip
        version = GaugeMetricFamily(
            "smtpgw_updater_active_version_info", "Active version per component (1)", labels=["component", "version"]
        )
        for name, c in sorted(status.get("components", {}).items()):
            success.add_metric([name], float(c.get("last_success") or 0))
            attempt.add_metric([name], float(c.get("last_attempt") or 0))
            for r in UPDATE_RESULTS:
                result.add_metric([name, r], 1.0 if c.get("result") == r else 0.0)
            if c.get("version"):
                version.add_metric([name, str(c["version"])], 1.0)
        yield from (success, attempt, result, version)
        yield GaugeMetricFamily(
            "smtpgw_updater_max_age_seconds", "[updater] max_age: longest acceptable time without a successful update",
            value=float(status.get("max_age", 0)),
        )  # fmt: skip
        if status.get("signatures") is not None:
            yield GaugeMetricFamily(
                "smtpgw_updater_signatures", "Signatures in the active signature set", value=float(status["signatures"])
            )


class _Quiet(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:  # a scrape is not an event
        pass


def serve(host: str, port: int, registry: CollectorRegistry = REGISTRY, health: Health | None = None) -> None:
    """Expose /metrics over HTTP from a daemon thread, and with `health` its /healthz and /readyz
    (shared/health.py): one port for whatever watches the process."""
    metrics = make_wsgi_app(registry)

    def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        path = environ.get("PATH_INFO", "")
        if health is None or path not in ("/healthz", "/readyz"):
            return metrics(environ, start_response)  # type: ignore[no-any-return]
        problems = health.stalled() if path == "/healthz" else health.unready()
        body = ("\n".join(problems) if problems else "ok").encode() + b"\n"
        status = "503 Service Unavailable" if problems else "200 OK"
        start_response(status, [("Content-Type", "text/plain; charset=utf-8"), ("Content-Length", str(len(body)))])
        return [body]

    # As prometheus_client's own server: the address family of what `host` resolves to first.
    family, *_, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0]
    server: type[ThreadingWSGIServer] = type("MetricsServer", (ThreadingWSGIServer,), {"address_family": family})
    httpd: ThreadingWSGIServer = make_server(str(address[0]), port, app, server, handler_class=_Quiet)
    threading.Thread(target=httpd.serve_forever, name="metrics", daemon=True).start()
