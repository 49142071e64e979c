"""The cos-agent databag, checked against the interface's documented provider schema."""

from __future__ import annotations

import json

import pydantic
import pytest

from vmhost import cos_agent

TOPOLOGY = cos_agent.Topology(
    model="lab",
    model_uuid="1a2b3c4d-0000-4000-8000-000000000000",
    application="vm-host",
    unit="vm-host/0",
    charm_name="vm-host",
)


class ProviderUnitData(pydantic.BaseModel):
    """The cos_agent provider unit data as the interface documents it (all fields required)."""

    model_config = pydantic.ConfigDict(extra="forbid")

    metrics_alert_rules: dict
    log_alert_rules: dict
    dashboards: list[str]
    metrics_scrape_jobs: list[dict]
    log_slots: list[str]


def test_databag_matches_the_interface_schema():
    bag = cos_agent.databag(cos_agent.build(TOPOLOGY, "127.0.0.1:9540"))
    assert list(bag) == ["config"]
    data = ProviderUnitData.model_validate_json(bag["config"])
    assert data.log_alert_rules == {}
    assert data.log_slots == []
    [job] = data.metrics_scrape_jobs
    assert job == {
        "job_name": "vm-host_0_vm-host",
        "metrics_path": "/metrics",
        "static_configs": [{"targets": ["127.0.0.1:9540"]}],
    }
    [dashboard] = [cos_agent.decode_dashboard(d) for d in data.dashboards]
    assert dashboard["uid"] == "vm-host-overview"
    assert any(v["name"] == "prometheusds" for v in dashboard["templating"]["list"])
    groups = data.metrics_alert_rules["groups"]
    assert [g["name"] for g in groups] == ["lab_1a2b3c4d_vm-host_vm-host_alerts"]
    alerts = {r["alert"]: r for r in groups[0]["rules"]}
    assert {
        "VmHostExporterDown",
        "VmHostHypervisorUnreadable",
        "VmHostHugepagesExhausted",
        "VmHostPinnedCpusExhausted",
        "VmHostStoragePoolFull",
        "VmHostVmFailed",
        "VmHostVmPaused",
        "VmHostHugepagesNotGranted",
    } == set(alerts)
    for rule in alerts.values():
        assert rule["labels"]["juju_application"] == "vm-host"
        assert rule["labels"]["juju_model_uuid"] == TOPOLOGY.model_uuid
        assert rule["labels"]["severity"] in ("warning", "critical")
        assert rule["expr"]


@pytest.mark.parametrize(
    ("listen", "target"),
    [
        (":9540", "localhost:9540"),
        ("10.0.0.5:9100", "10.0.0.5:9100"),
        ("[::1]:9540", "[::1]:9540"),
    ],
)
def test_scrape_target(listen: str, target: str):
    assert cos_agent.scrape_target(listen) == target


def test_dashboard_round_trip():
    raw = json.dumps({"title": "x"}).encode()
    assert cos_agent.decode_dashboard(cos_agent.encode_dashboard(raw)) == {"title": "x"}
