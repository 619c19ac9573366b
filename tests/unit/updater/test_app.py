"""The updater's wiring: schedule, announcements, status and metrics (services/updater/app.py)."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import CollectorRegistry

from services.updater.app import Announcer, Updater, collector, format_status, next_delay, read_status
from services.updater.state import Outcome, Result, State, save_state
from shared.config import Config, ScannerConfig, UpdaterConfig
from shared.envelope import Envelope
from shared.rules import RULES_LOADED, RULES_UPDATED
from shared.transport import Handler, Queue, Transport


class InProcess(Transport):
    """The transport contract's in-process events, without queues."""

    def publish(self, queue: Queue, envelope: Envelope, body: bytes) -> None:
        raise NotImplementedError

    def consume(self, queue: Queue, handler: Handler, workers: int) -> None:
        raise NotImplementedError

    def start(self) -> None:
        pass

    def stop(self, timeout: float = 30.0) -> None:
        pass

    def depth(self, queue: Queue) -> int:
        return 0

    def wait_idle(self, timeout: float) -> bool:
        return True


@pytest.mark.parametrize(
    ("interval", "jitter", "draw", "expected"),
    [(3600, 300, 0.0, 3600), (3600, 300, 0.5, 3750), (3600, 0, 0.9, 3600), (60, 60, 0.999, 119.94)],
)
def test_next_delay(interval: float, jitter: float, draw: float, expected: float) -> None:
    assert next_delay(interval, jitter, lambda: draw) == pytest.approx(expected)


def test_announcer_hears_the_scanners_that_failed() -> None:
    transport = InProcess()
    announce = Announcer(transport, window=60)  # in-process: answers arrive before publish returns

    def scanner(ok: bool, name: str) -> Any:
        def on_event(event: str, data: Mapping[str, object]) -> None:
            if event == RULES_UPDATED:
                report = {"requested": data["version"], "ok": ok, "error": "" if ok else "broken", "scanner": name}
                transport.publish_event(RULES_LOADED, report)

        return on_event

    transport.subscribe_events(scanner(True, "a"))
    assert announce("5") == []
    transport.subscribe_events(scanner(False, "b"))
    assert [r["scanner"] for r in announce("6")] == ["b"]


def test_announcer_without_transport() -> None:
    assert Announcer(None, 5)("1") == []


def config(tmp_path: Path, **updater: object) -> Config:
    settings = {"database_dir": str(tmp_path / "clamav"), "state_dir": str(tmp_path / "state"), **updater}
    return Config(scanner=ScannerConfig(rules_dir=str(tmp_path / "rules")), updater=UpdaterConfig(**settings))  # type: ignore[arg-type]


def test_nothing_configured_touches_nothing(tmp_path: Path) -> None:
    updater = Updater(config(tmp_path))
    assert [o.result for o in updater.update_now()] == [Result.SKIPPED, Result.SKIPPED]
    updater.start()
    updater.close()
    assert list(tmp_path.iterdir()) == []
    assert format_status(read_status(config(tmp_path))).startswith("nothing to update")


def test_status_and_metrics_say_the_same(tmp_path: Path) -> None:
    cfg = config(
        tmp_path, signature_urls=("https://x.test/a.ndb",), bundle_url="https://x.test/b.tar.gz", max_age=3600.0
    )
    version = tmp_path / "clamav.versions" / "20261118T110640Z-5e1f0c2a"
    version.mkdir(parents=True)
    (version / "smtpgw-version.json").write_text(
        '{"version": "20261118T110640Z-5e1f0c2a", "digest": "d", "signatures": 42, "sources": {}}'
    )
    os.symlink("clamav.versions/20261118T110640Z-5e1f0c2a", tmp_path / "clamav")
    state = State().record(Outcome("signatures", Result.ACTIVATED, "v"), 10_000.0)
    state = state.record(Outcome("rules", Result.REFUSED, "", "bad signature"), 10_500.0)
    save_state(str(tmp_path / "state"), state)

    status = read_status(cfg, now=12_000.0)
    assert status["signatures"] == 42
    sig, rules = status["components"]["signatures"], status["components"]["rules"]
    assert (sig["version"], sig["last_success"], sig["overdue"]) == ("20261118T110640Z-5e1f0c2a", 10_000.0, False)
    assert (rules["version"], rules["result"], rules["last_success"], rules["overdue"]) == ("", "refused", 0.0, True)
    text = format_status(status)
    assert "signatures    42" in text
    assert "bad signature" in text
    assert "OVERDUE" in text

    registry = CollectorRegistry()
    registry.register(collector(cfg))

    def sample(name: str, **labels: str) -> float | None:
        return registry.get_sample_value(name, labels)

    assert sample("smtpgw_updater_last_success_timestamp_seconds", component="signatures") == 10_000.0
    assert sample("smtpgw_updater_last_success_timestamp_seconds", component="rules") == 0.0
    assert sample("smtpgw_updater_last_attempt_result", component="rules", result="refused") == 1.0
    assert sample("smtpgw_updater_last_attempt_result", component="rules", result="activated") == 0.0
    assert (
        sample("smtpgw_updater_active_version_info", component="signatures", version="20261118T110640Z-5e1f0c2a") == 1
    )
    assert sample("smtpgw_updater_signatures") == 42
    assert sample("smtpgw_updater_max_age_seconds") == 3600


def test_update_now_records_each_component(tmp_path: Path) -> None:
    cfg = config(tmp_path, bundle_url="https://x.test/b.tar.gz", allow_unsigned=True)

    class Fails:
        component = "rules"

        def configured(self) -> bool:
            return True

        def update(self, withdrawn: Sequence[str] = ()) -> Outcome:
            raise RuntimeError("boom")

    updater = Updater(cfg)
    updater.rules = Fails()  # type: ignore[assignment]
    outcomes = updater.update_now()
    assert [(o.component, o.result) for o in outcomes] == [("signatures", Result.SKIPPED), ("rules", Result.FAILED)]
    assert "boom" in outcomes[1].detail
    assert read_status(cfg)["components"]["rules"]["result"] == "failed"
