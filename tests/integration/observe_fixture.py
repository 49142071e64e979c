"""A real exporter process and a real Prometheus on loopback, for the observability tests.

- `start_exporter(tmp, **settings)` runs `python -m vmhost.exporter` the way the charm does
  without systemd (`exporter.ensure_running` with a pid file), on a free loopback port, and
  waits until it answers.
- `Prometheus` runs Debian's prometheus binary on a free loopback port, scraping given targets
  every second with the Juju topology labels the OpenTelemetry Collector adds, and with the
  charm's alert rules loaded.
"""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from vmhost import exporter

REPO = Path(__file__).resolve().parents[2]
PROMETHEUS = shutil.which("prometheus") or "/usr/bin/prometheus"
PROMTOOL = shutil.which("promtool") or "/usr/bin/promtool"
RULES = REPO / "src" / "prometheus_alert_rules" / "vm-host.rules"
TOPOLOGY = {
    "juju_model": "observe-test",
    "juju_model_uuid": "00000000-0000-4000-8000-000000000014",
    "juju_application": "vm-host",
    "juju_unit": "vm-host/0",
    "juju_charm": "vm-host",
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def http_get(url: str, timeout: float = 5) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:  # noqa: S310 - loopback test URL
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        with e:
            return e.code, e.read().decode()


def wait_for(check: Any, timeout: float, what: str, interval: float = 0.5) -> Any:
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        try:
            last = check()
        except (OSError, ValueError) as exc:
            last = exc
        else:
            if last:
                return last
        time.sleep(interval)
    pytest.fail(f"{what} not reached within {timeout} s (last: {last!r})")


@dataclass
class Exporter:
    """A running exporter started through ensure_running (no systemd: a pid file)."""

    config: exporter.ExporterSettings
    paths: dict[str, Path]

    @property
    def url(self) -> str:
        return f"http://{self.config.listen}"

    def ensure(self, config: exporter.ExporterSettings | None = None) -> str:
        if config is not None:
            self.config = config
        return exporter.ensure_running(
            self.config,
            settings_path=self.paths["settings"],
            systemd_run_dir=self.paths["no-systemd"],
            pid_path=self.paths["pid"],
            log_path=self.paths["log"],
            python=sys.executable,
        )

    def pid(self) -> int:
        return wait_for(lambda: exporter.running_pid(self.paths["pid"]), 10, "exporter pid file")

    def log(self) -> str:
        return self.paths["log"].read_text() if self.paths["log"].exists() else ""

    def wait_answering(self, timeout: float = 30) -> None:
        wait_for(lambda: http_get(f"{self.url}/metrics")[0] == 200, timeout, "exporter answers")

    def stop(self) -> None:
        exporter.stop(
            systemd_run_dir=self.paths["no-systemd"],
            pid_path=self.paths["pid"],
            settings_path=self.paths["settings"],
        )


def start_exporter(tmp: Path, **settings: Any) -> Exporter:
    tmp.mkdir(parents=True, exist_ok=True)
    paths = {
        "settings": tmp / "exporter.json",
        "no-systemd": tmp / "no-systemd",
        "pid": tmp / "exporter.pid",
        "log": tmp / "exporter.log",
    }
    config = exporter.ExporterSettings(
        **{
            "listen": f"127.0.0.1:{free_port()}",
            "interval": 1,
            "refusals_path": str(tmp / "refusals.json"),
            "image_cache_dir": str(tmp / "images"),
            **settings,
        }
    )
    running = Exporter(config, paths)
    running.ensure()
    running.wait_answering()
    return running


class Prometheus:
    """Debian's Prometheus on loopback, scraping every second, with vm-host's rules."""

    def __init__(self, tmp: Path, targets: list[str]):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        tmp.mkdir(parents=True, exist_ok=True)
        config = {
            "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
            "rule_files": [str(RULES)],
            "scrape_configs": [
                {
                    "job_name": "vm-host",
                    "static_configs": [{"targets": targets, "labels": TOPOLOGY}],
                }
            ],
        }
        self.config_path = tmp / "prometheus.yml"
        self.config_path.write_text(yaml.safe_dump(config))
        self.log_path = tmp / "prometheus.log"
        self._log = open(self.log_path, "wb")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            [
                PROMETHEUS,
                f"--config.file={self.config_path}",
                f"--storage.tsdb.path={tmp / 'data'}",
                f"--web.listen-address=127.0.0.1:{self.port}",
                "--storage.tsdb.retention.time=1h",
            ],
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )
        wait_for(lambda: http_get(f"{self.url}/-/ready")[0] == 200, 60, "prometheus ready")

    def query(self, expr: str) -> list[dict[str, Any]]:
        url = f"{self.url}/api/v1/query?{urllib.parse.urlencode({'query': expr})}"
        status, body = http_get(url)
        data = json.loads(body)
        if status != 200 or data.get("status") != "success":
            raise AssertionError(f"query {expr!r} failed: {body}")
        return data["data"]["result"]

    def value(self, expr: str) -> float:
        result = self.query(expr)
        assert len(result) == 1, f"{expr!r} gave {result}"
        return float(result[0]["value"][1])

    def rules_loaded(self) -> list[str]:
        _status, body = http_get(f"{self.url}/api/v1/rules")
        groups = json.loads(body)["data"]["groups"]
        return [r["name"] for g in groups for r in g["rules"]]

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self._log.close()
