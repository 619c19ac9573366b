"""The Grafana dashboard (etc/grafana/) and its provisioning (deploy/grafana/): the dashboard names
only metrics smtpgw exports, every query is valid PromQL (promtool), and the provisioning points
at the datasource and the directory the dashboard uses."""

from __future__ import annotations

import json
import re
import subprocess
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client import REGISTRY

from shared.metrics import QueueDepthCollector, UpdaterCollector

ROOT = Path(__file__).resolve().parents[2]
DASHBOARD = ROOT / "etc" / "grafana" / "smtpgw-dashboard.json"
PROVISIONING = ROOT / "deploy" / "grafana" / "provisioning"
DATASOURCE_REFS = {
    ("prometheus", "prometheus"),
    ("prometheus", "$datasource"),
    ("prometheus", "${datasource}"),
    ("grafana", "-- Grafana --"),  # the built-in annotations
}
# The series names each metric type exposes. `_created` is left out: multiprocess mode
# (`run all --split`) does not export it, so a panel on it would go blank there.
SUFFIXES = {"counter": ("_total",), "gauge": ("",), "histogram": ("_bucket", "_sum", "_count")}
METRIC = re.compile(r"\bsmtpgw_\w+")


@pytest.fixture
def dashboard() -> dict[str, Any]:
    data: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return data


def panels(dashboard: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """Every panel, rows included, and those inside collapsed rows."""
    for panel in dashboard["panels"]:
        yield panel
        yield from panel.get("panels", [])


def queries(dashboard: dict[str, Any]) -> list[tuple[dict[str, Any], dict[str, Any]]]:
    return [(p, t) for p in panels(dashboard) for t in p.get("targets", [])]


def datasource_refs(node: Any) -> Iterator[dict[str, str]]:
    """Every `datasource` object anywhere in the dashboard: panels, targets, variables, annotations."""
    if isinstance(node, dict):
        if isinstance(node.get("datasource"), dict):
            yield node["datasource"]
        for value in node.values():
            yield from datasource_refs(value)
    elif isinstance(node, list):
        for value in node:
            yield from datasource_refs(value)


def exported_names() -> set[str]:
    """Every series name smtpgw exports, taken from the metric objects rather than from source text:
    the metrics shared.metrics registers at import, and the scrape-time collectors (queue depth,
    updater status) run once on a state that makes them report every family they have."""
    status = {"max_age": 1, "signatures": 1, "components": {"signatures": {"version": "1"}}}
    collectors = [REGISTRY, QueueDepthCollector(["scan"], lambda q: 0, lambda q: 0), UpdaterCollector(lambda: status)]
    families = [f for c in collectors for f in c.collect() if f.name.startswith("smtpgw_")]
    return {f.name + suffix for f in families for suffix in SUFFIXES[f.type]}


def unknown_metrics(text: str) -> set[str]:
    return set(METRIC.findall(text)) - exported_names()


def promql(expr: str, variables: Iterable[str]) -> str:
    """`expr` with Grafana's variables replaced by values PromQL accepts; an undefined variable
    raises KeyError, as Grafana would leave it in the query unreplaced."""
    values = {"__rate_interval": "5m", "__interval": "1m", "__range": "1h"} | {v: ".+" for v in variables}
    return re.sub(r"\$\{?(\w+)\}?", lambda m: values[m[1]], expr)


def test_every_panel_has_an_id_a_title_and_a_query(dashboard: dict[str, Any]) -> None:
    assert (dashboard["uid"], dashboard["title"]) == ("smtpgw", "smtpgw")
    ids = [p["id"] for p in panels(dashboard)]
    assert len(ids) == len(set(ids)), ids
    graphs = [p for p in panels(dashboard) if p["type"] != "row"]
    assert graphs
    for panel in graphs:
        assert panel["title"].strip(), panel["id"]
        assert panel.get("description", "").strip(), panel["title"]
        assert panel["targets"], panel["title"]
        assert all(t["expr"].strip() for t in panel["targets"]), panel["title"]


def test_every_metric_named_is_exported() -> None:
    # The whole file, not only the panels' exprs: the variables' queries name a metric too.
    assert unknown_metrics(DASHBOARD.read_text()) == set()


def test_a_metric_not_exported_is_caught() -> None:
    # The usual slips: a counter without _total, a histogram without its series suffix.
    assert unknown_metrics("smtpgw_receiver_messages_total smtpgw_queue_depth smtpgw_updater_signatures") == set()
    assert unknown_metrics("rate(smtpgw_receiver_messages[5m]) + smtpgw_scan_duration_seconds") == {
        "smtpgw_receiver_messages",
        "smtpgw_scan_duration_seconds",
    }


def test_every_query_is_valid_promql(dashboard: dict[str, Any], promtool: str, tmp_path: Path) -> None:
    variables = [v["name"] for v in dashboard["templating"]["list"]]
    rules = [
        {"record": f"grafana:panel_{p['id']}_{t['refId']}", "expr": promql(t["expr"], variables)}
        for p, t in queries(dashboard)
    ]
    path = tmp_path / "dashboard_rules.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "smtpgw-dashboard", "rules": rules}]}))
    done = subprocess.run([promtool, "check", "rules", str(path)], capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"SUCCESS: {len(rules)} rules found" in done.stdout


def test_the_provisioning_points_at_prometheus_and_the_dashboards(dashboard: dict[str, Any]) -> None:
    (source,) = yaml.safe_load((PROVISIONING / "datasources" / "prometheus.yml").read_text())["datasources"]
    assert {k: source[k] for k in ("name", "uid", "type", "url", "isDefault")} == {
        "name": "Prometheus",
        "uid": "prometheus",
        "type": "prometheus",
        "url": "http://prometheus:9090",
        "isDefault": True,
    }
    (provider,) = yaml.safe_load((PROVISIONING / "dashboards" / "smtpgw.yml").read_text())["providers"]
    assert (provider["type"], provider["options"]["path"]) == ("file", "/var/lib/grafana/dashboards")
    assert {"name": "datasource", "type": "datasource", "query": "prometheus"}.items() <= next(
        v for v in dashboard["templating"]["list"] if v["name"] == "datasource"
    ).items()
    refs = {(r["type"], r["uid"]) for r in datasource_refs(dashboard)}
    assert refs <= DATASOURCE_REFS, refs - DATASOURCE_REFS
