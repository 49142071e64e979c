"""The charm's observability wiring: the exporter service and the cos-agent databag."""

from __future__ import annotations

import json

from ops import testing

from vmhost import cos_agent


def test_exporter_runs_with_the_charm_options(ctx, backend, fake_host, fake_exporter):
    config = {"metrics-listen": ":9100", "metrics-interval": 10, "reserved-cpus": "0-1"}
    ctx.run(ctx.on.config_changed(), testing.State(config=config))
    [settings] = fake_exporter.started
    assert settings.listen == ":9100"
    assert settings.interval == 10
    assert settings.reserved_cpus == "0-1"
    assert settings.backend == "libvirt"


def test_update_status_keeps_the_exporter_running(ctx, backend, fake_host, fake_exporter):
    ctx.run(ctx.on.update_status(), testing.State())
    assert len(fake_exporter.started) == 1


def test_exporter_runs_while_the_hypervisor_is_unreachable(ctx, backend, fake_host, fake_exporter):
    backend.reachable = False
    out = ctx.run(ctx.on.update_status(), testing.State())
    assert out.unit_status.name == "waiting"
    assert len(fake_exporter.started) == 1  # it answers vmhost_up 0 meanwhile


def test_bad_metrics_listen_blocks_naming_the_option(ctx, backend, fake_host, fake_exporter):
    out = ctx.run(ctx.on.config_changed(), testing.State(config={"metrics-listen": "nowhere"}))
    assert out.unit_status.name == "blocked"
    assert "metrics-listen" in out.unit_status.message
    assert not fake_exporter.started


def test_exporter_failure_does_not_fail_the_hook(ctx, backend, fake_host, monkeypatch):
    from vmhost import exporter

    def broken(_config, **_kw):
        raise OSError("no space left on device")

    monkeypatch.setattr(exporter, "ensure_running", broken)
    out = ctx.run(ctx.on.config_changed(), testing.State())
    assert out.unit_status.name == "active"


def test_cos_agent_databag(ctx, backend, fake_host):
    relation = testing.Relation("cos-agent", remote_app_name="opentelemetry-collector")
    out = ctx.run(
        ctx.on.relation_changed(relation),
        testing.State(relations={relation}, config={"metrics-listen": "127.0.0.1:9541"}),
    )
    bag = out.get_relation(relation.id).local_unit_data
    data = json.loads(bag["config"])
    assert data["metrics_scrape_jobs"][0]["static_configs"] == [{"targets": ["127.0.0.1:9541"]}]
    assert data["metrics_scrape_jobs"][0]["job_name"] == "vm-host_0_vm-host"
    assert [cos_agent.decode_dashboard(d)["uid"] for d in data["dashboards"]] == [
        "vm-host-overview"
    ]
    rules = data["metrics_alert_rules"]["groups"][0]["rules"]
    assert all(r["labels"]["juju_application"] == "vm-host" for r in rules)
    assert data["log_alert_rules"] == {}
    assert data["log_slots"] == []


def test_remove_stops_the_exporter(ctx, backend, fake_host, fake_exporter):
    ctx.run(ctx.on.remove(), testing.State())
    assert fake_exporter.stopped == 1
