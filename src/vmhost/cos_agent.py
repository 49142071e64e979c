"""The provider side of the `cos_agent` interface: what the OpenTelemetry Collector reads.

A machine charm relates to the collector subordinate over `cos-agent` and publishes, in its
unit databag under the one key `config`, a JSON object with:

- `metrics_scrape_jobs`: Prometheus scrape_config objects; targets are on this machine, since
  the collector runs beside the charm;
- `metrics_alert_rules`: Prometheus rule groups (`{"groups": [...]}`), each rule carrying the
  Juju topology labels of this unit's application;
- `log_alert_rules`: Loki rule groups (vm-host has none: `{}`);
- `dashboards`: Grafana dashboards, each JSON document lzma-compressed and base64-encoded;
- `log_slots`: snap log slots to read (none: vm-host is not a snap).

This module builds that object from the files in src/ (pure apart from reading them); the
charm only writes it into the relation.
"""

from __future__ import annotations

import base64
import json
import lzma
from pathlib import Path
from typing import Any

import pydantic
import yaml

from vmhost.exporter import parse_listen

DATABAG_KEY = "config"
SRC_DIR = Path(__file__).resolve().parents[1]
RULES_DIR = SRC_DIR / "prometheus_alert_rules"
DASHBOARDS_DIR = SRC_DIR / "grafana_dashboards"


class Topology(pydantic.BaseModel):
    """The Juju topology of the publishing unit."""

    model_config = pydantic.ConfigDict(frozen=True, defer_build=True)

    model: str
    model_uuid: str
    application: str
    unit: str
    charm_name: str

    @property
    def identifier(self) -> str:
        """model_uuid-prefix_application, as topology-aware rule group names use it."""
        return f"{self.model}_{self.model_uuid[:8]}_{self.application}"

    def labels(self) -> dict[str, str]:
        """The juju_* labels (no unit: rules are per application)."""
        return {
            "juju_model": self.model,
            "juju_model_uuid": self.model_uuid,
            "juju_application": self.application,
            "juju_charm": self.charm_name,
        }


class CosAgentData(pydantic.BaseModel):
    """The object published under `config`; field names are the interface's."""

    model_config = pydantic.ConfigDict(extra="ignore", defer_build=True)

    metrics_alert_rules: dict[str, Any]
    log_alert_rules: dict[str, Any]
    dashboards: list[str]
    metrics_scrape_jobs: list[dict[str, Any]]
    log_slots: list[str]


def encode_dashboard(raw: bytes) -> str:
    """lzma-compress and base64-encode one dashboard, as the interface carries them."""
    return base64.b64encode(lzma.compress(raw)).decode()


def decode_dashboard(text: str) -> dict[str, Any]:
    """The inverse of encode_dashboard (for tests and debugging)."""
    return json.loads(lzma.decompress(base64.b64decode(text)))


def scrape_target(listen: str) -> str:
    """Where the collector on this machine reaches the exporter (`metrics-listen`)."""
    host, port = parse_listen(listen)
    if host in ("", "0.0.0.0", "::"):  # noqa: S104 - reading the setting, not binding
        host = "localhost"
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def alert_rules(topology: Topology, rules_dir: Path = RULES_DIR) -> dict[str, Any]:
    """Every rule group of the rules files, named per application, with the topology labels."""
    groups = []
    for path in sorted(rules_dir.glob("*.rules")) + sorted(rules_dir.glob("*.yaml")):
        document = yaml.safe_load(path.read_text()) or {}
        for group in document.get("groups", []):
            rules = []
            for rule in group.get("rules", []):
                labels = {**rule.get("labels", {}), **topology.labels()}
                rules.append({**rule, "labels": labels})
            groups.append(
                {"name": f"{topology.identifier}_{group['name']}_alerts", "rules": rules}
            )
    return {"groups": groups}


def build(
    topology: Topology,
    listen: str,
    rules_dir: Path = RULES_DIR,
    dashboards_dir: Path = DASHBOARDS_DIR,
) -> CosAgentData:
    """The data vm-host publishes on cos-agent."""
    dashboards = [
        encode_dashboard(path.read_bytes()) for path in sorted(dashboards_dir.glob("*.json"))
    ]
    job = {
        "job_name": f"{topology.application}_0_vm-host",
        "metrics_path": "/metrics",
        "static_configs": [{"targets": [scrape_target(listen)]}],
    }
    return CosAgentData(
        metrics_alert_rules=alert_rules(topology, rules_dir),
        log_alert_rules={},
        dashboards=dashboards,
        metrics_scrape_jobs=[job],
        log_slots=[],
    )


def databag(data: CosAgentData) -> dict[str, str]:
    """The unit databag content: the whole object as JSON under `config`."""
    return {DATABAG_KEY: data.model_dump_json()}
