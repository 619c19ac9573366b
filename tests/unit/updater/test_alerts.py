"""The alert rules in etc/prometheus/ are valid and fire when they should (promtool)."""

from __future__ import annotations

import subprocess
from pathlib import Path

RULES = Path(__file__).resolve().parents[3] / "etc" / "prometheus" / "smtpgw-alerts.yml"


LABELS = 'instance="gw:9101",job="smtpgw"'
OVERDUE = (
    "No update of signatures succeeded on gw:9101 within [updater] max_age."
    " `smtpgw update status` shows the last attempt and why it did not succeed."
)
REFUSED = (
    "The last signatures update was refused; the previous version stays in force."
    " `smtpgw update status` gives the reason."
)
HOLDING = (
    "For 15 minutes more messages than [receiver] in_flow_backlog have waited to be scanned or delivered."
    " Add scanner or delivery capacity, or look at clamd and the next hop."
)
# Series one sample per minute for 3 hours. Signatures never succeed; rules succeed every 30 minutes
# (the timestamp of the last success steps up by 1800 s every 30 samples).
UNIT_TESTS = f"""
rule_files:
  - {RULES}
evaluation_interval: 1m
tests:
  - interval: 1m
    input_series:
      - series: 'smtpgw_updater_max_age_seconds{{{LABELS}}}'
        values: '3600x180'
      - series: 'smtpgw_updater_last_success_timestamp_seconds{{component="signatures",{LABELS}}}'
        values: '0x180'
      - series: 'smtpgw_updater_last_success_timestamp_seconds{{component="rules",{LABELS}}}'
        values: '0x29 1800x29 3600x29 5400x29 7200x29 9000x29 10800'
      - series: 'smtpgw_updater_last_attempt_result{{component="signatures",result="refused",{LABELS}}}'
        values: '1x180'
      - series: 'smtpgw_updater_last_attempt_result{{component="rules",result="refused",{LABELS}}}'
        values: '0x180'
      - series: 'smtpgw_scanner_rules_reloads_total{{result="failed",{LABELS}}}'
        values: '0x60 1x119'
      - series: 'smtpgw_receiver_in_flow_delay_seconds_count{{{LABELS}}}'
        values: '0x30 0+20x60 1200x89'
    alert_rule_test:
      - eval_time: 30m
        alertname: SmtpgwUpdatesOverdue
        exp_alerts: []
      - eval_time: 70m
        alertname: SmtpgwUpdatesOverdue
        exp_alerts:
          - exp_labels: {{severity: warning, component: signatures, instance: "gw:9101", job: smtpgw}}
            exp_annotations:
              summary: "smtpgw signatures not updated for 1h 10m 0s"
              description: "{OVERDUE}"
      - eval_time: 1h
        alertname: SmtpgwUpdateRefused
        exp_alerts: []
      - eval_time: 2h30m
        alertname: SmtpgwUpdateRefused
        exp_alerts:
          - exp_labels: {{severity: warning, component: signatures, result: refused, instance: "gw:9101", job: smtpgw}}
            exp_annotations:
              summary: "smtpgw signatures update refused on gw:9101"
              description: "{REFUSED}"
      - eval_time: 50m
        alertname: SmtpgwScannerRulesNotLoaded
        exp_alerts: []
      - eval_time: 65m
        alertname: SmtpgwScannerRulesNotLoaded
        exp_alerts:
          - exp_labels: {{severity: warning, result: failed, instance: "gw:9101", job: smtpgw}}
            exp_annotations:
              summary: "smtpgw scanner on gw:9101 could not load new rules"
              description: "The scanner kept its previous rules; its log says why (\\"rule bundle not loaded\\")."
      - eval_time: 40m
        alertname: SmtpgwReceiverHoldingSenders
        exp_alerts: []
      - eval_time: 60m
        alertname: SmtpgwReceiverHoldingSenders
        exp_alerts:
          - exp_labels: {{severity: warning, instance: "gw:9101", job: smtpgw}}
            exp_annotations:
              summary: "smtpgw on gw:9101 is slowing senders down (flow control)"
              description: "{HOLDING}"
      - eval_time: 2h
        alertname: SmtpgwReceiverHoldingSenders
        exp_alerts: []
"""


def test_the_rules_are_valid(promtool: str) -> None:
    done = subprocess.run([promtool, "check", "rules", str(RULES)], capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "SUCCESS: 4 rules found" in done.stdout


def test_the_alerts_fire_when_they_should(promtool: str, tmp_path: Path) -> None:
    tests = tmp_path / "alerts_test.yml"
    tests.write_text(UNIT_TESTS)
    done = subprocess.run([promtool, "test", "rules", str(tests)], capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stdout + done.stderr
