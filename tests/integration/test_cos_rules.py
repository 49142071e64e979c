"""Alert rules, their promtool unit tests and the published scrape job, checked by promtool."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
import yaml
from tests.integration.observe_fixture import PROMTOOL, REPO, RULES

from vmhost import cos_agent

pytestmark = [pytest.mark.integration]

RULE_TESTS = REPO / "tests" / "alerts" / "vm-host.test.yaml"
TOPOLOGY = cos_agent.Topology(
    model="lab",
    model_uuid="1a2b3c4d-0000",
    application="vm-host",
    unit="vm-host/0",
    charm_name="vm-host",
)


def _promtool(*args: str) -> str:
    result = subprocess.run([PROMTOOL, *args], capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


def test_promtool_check_rules() -> None:
    assert "SUCCESS: 8 rules found" in _promtool("check", "rules", str(RULES))


def test_promtool_test_rules_one_test_per_alert() -> None:
    tests = yaml.safe_load(RULE_TESTS.read_text())["tests"]
    alerts = {r["alert"] for g in yaml.safe_load(RULES.read_text())["groups"] for r in g["rules"]}
    tested = {t["alertname"] for test in tests for t in test["alert_rule_test"]}
    assert tested == alerts
    assert "SUCCESS" in _promtool("test", "rules", str(RULE_TESTS))


def test_published_rules_and_scrape_job_are_valid_prometheus(tmp_path: Path) -> None:
    data = json.loads(cos_agent.databag(cos_agent.build(TOPOLOGY, ":9540"))["config"])
    rules = tmp_path / "published.rules"
    rules.write_text(yaml.safe_dump(data["metrics_alert_rules"]))
    assert "SUCCESS: 8 rules found" in _promtool("check", "rules", str(rules))
    config = tmp_path / "prometheus.yml"
    config.write_text(
        yaml.safe_dump({"scrape_configs": data["metrics_scrape_jobs"], "rule_files": [str(rules)]})
    )
    assert "SUCCESS" in _promtool("check", "config", str(config))
