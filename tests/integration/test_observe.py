"""Metrics, dashboard and NUMA map against the real libvirtd, Prometheus and Chromium: no mocks.

The exporter runs as its own process (started the way the charm starts it without systemd),
a real Prometheus scrapes it every second while the test composes and deletes VMs on the real
libvirtd, and the values Prometheus stored are compared with show-resources' data for the same
moment. Every dashboard query is evaluated against that Prometheus. Headless Chromium loads the
NUMA map and the DOM is checked against the placements libvirt reports.
"""

from __future__ import annotations

import html.parser
import json
import os
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from tests.integration.observe_fixture import (
    REPO,
    TOPOLOGY,
    Exporter,
    Prometheus,
    http_get,
    start_exporter,
    wait_for,
)

from vmhost import exporter, report
from vmhost.backends.libvirt import LibvirtBackend
from vmhost.model import DiskSpec, Policy, Rejection, VmSpec
from vmhost.placement import plan

pytestmark = [pytest.mark.integration]

POLICY = Policy(reserved_memory_mib=0)
DASHBOARD = REPO / "src" / "grafana_dashboards" / "vm-host.json"
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
SCREENSHOT_OUT = os.environ.get("VMHOST_SCREENSHOT_OUT", "")
"""Also write the NUMA map screenshot here (the README's docs/numa-map.png is made this way)."""


def exporter_pid(running: Exporter) -> int | None:
    return exporter.running_pid(running.paths["pid"])


def _compose(backend: LibvirtBackend, pool: str, name: str, **kw: object) -> None:
    spec = VmSpec(
        name=name,
        vcpus=int(kw.pop("vcpus", 1)),  # type: ignore[arg-type]
        memory_mib=64,
        disks=(DiskSpec("root", 1, pool),),
        owner="action",
        **kw,  # type: ignore[arg-type]
    )
    placement = plan(backend.topology(), [v.placement for v in backend.list_vms()], spec, POLICY)
    if isinstance(placement, Rejection):
        pytest.fail(f"the allocator refused {name} on this host: {placement}")
    backend.compose(spec, placement, (), pool)


@pytest.fixture(scope="module")
def observed(backend: LibvirtBackend, test_pool: str) -> Iterator[tuple[Exporter, Prometheus]]:
    tmp = Path(tempfile.mkdtemp(prefix="vmhost-test-observe-"))
    running = start_exporter(tmp / "exporter", reserved_memory=0)
    prometheus = Prometheus(tmp / "prometheus", [running.config.listen])
    try:
        yield running, prometheus
    finally:
        prometheus.stop()
        running.stop()
        shutil.rmtree(tmp, ignore_errors=True)


def _show_resources(backend: LibvirtBackend) -> dict:
    return report.resources_json(backend.topology(), backend.list_vms(), POLICY)


def _stored_vm_count(prometheus: Prometheus) -> float:
    result = prometheus.query("sum(vmhost_vms)")
    return float(result[0]["value"][1]) if result else -1


def _wait_vms(prometheus: Prometheus, backend: LibvirtBackend) -> None:
    """Wait until Prometheus has scraped a reading taken after the last change."""
    expected = len(backend.list_vms())
    wait_for(lambda: _stored_vm_count(prometheus) == expected, 30, f"{expected} VMs scraped")
    time.sleep(2.5)  # a full interval more, so every series is from the new reading


def _matches_show_resources(prometheus: Prometheus, data: dict, timeout: float = 30) -> None:
    """Check Prometheus against show-resources until it holds (scrapes lag behind a change)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            _check_against_show_resources(prometheus, data)
            return
        except AssertionError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.5)


def _check_against_show_resources(prometheus: Prometheus, data: dict) -> None:
    for node in data["nodes"]:
        n = node["id"]
        cpus = node["cpus"]
        assert prometheus.value(f'vmhost_cpus{{node="{n}",state="pinned"}}') == len(cpus["pinned"])
        assert (
            prometheus.value(f'vmhost_cpus{{node="{n}",state="shared-pool"}}')
            == (cpus["shared-pool"])
        )
        assert prometheus.value(f'vmhost_cpus_free_for_pinning{{node="{n}"}}') == cpus["free"]
        assert prometheus.value(f'sum(vmhost_cpus{{node="{n}"}})') == cpus["total"]
        memory = node["memory-mib"]
        for state in ("reserved", "bound", "free"):
            assert (
                prometheus.value(f'vmhost_memory_bytes{{node="{n}",state="{state}"}}')
                == memory[state] * 2**20
            )
        for h in node["hugepages"]:
            q = f'vmhost_hugepages{{node="{n}",size="{h["size"]}",state="free"}}'
            assert prometheus.value(q) == h["free"]
    shared = data["shared"]
    assert prometheus.value("vmhost_shared_vcpus_allocated") == shared["vcpus-allocated"]
    assert prometheus.value("vmhost_shared_vcpus_capacity") == shared["vcpus-capacity"]
    assert prometheus.value("vmhost_shared_memory_allocated_bytes") == (
        shared["memory-allocated-mib"] * 2**20
    )
    for pool in data["pools"]:
        q = f'vmhost_storage_pool_capacity_bytes{{pool="{pool["name"]}"}}'
        assert prometheus.value(q) == pool["capacity-bytes"]


@pytest.mark.usefixtures("clean_host")
def test_prometheus_values_follow_compose_and_delete(
    backend: LibvirtBackend, test_pool: str, observed: tuple[Exporter, Prometheus]
) -> None:
    running, prometheus = observed
    _wait_vms(prometheus, backend)
    before = _show_resources(backend)
    _matches_show_resources(prometheus, before)

    _compose(backend, test_pool, "vmhost-test-obs-pinned", pinned_count=1)
    _compose(backend, test_pool, "vmhost-test-obs-shared")
    _wait_vms(prometheus, backend)
    during = _show_resources(backend)
    _matches_show_resources(prometheus, during)
    assert sum(len(n["cpus"]["pinned"]) for n in during["nodes"]) == (
        sum(len(n["cpus"]["pinned"]) for n in before["nodes"]) + 1
    )
    assert prometheus.value('vmhost_vm_vcpus{vm="vmhost-test-obs-shared"}') == 1
    assert prometheus.value('vmhost_vm_pinned{vm="vmhost-test-obs-pinned"}') == 1
    # libvirt's bulk stats for the running domains
    assert prometheus.value('vmhost_vm_cpu_seconds_total{vm="vmhost-test-obs-pinned"}') > 0
    assert prometheus.value('vmhost_vm_memory_used_bytes{vm="vmhost-test-obs-shared"}') > 0
    owned = prometheus.value(
        f'sum(vmhost_vms{{owner="action",pool="{test_pool}",state="running"}})'
    )
    assert owned == 2
    assert (
        prometheus.value(
            f'vmhost_up{{juju_unit="{TOPOLOGY["juju_unit"]}",juju_model="{TOPOLOGY["juju_model"]}"}}'
        )
        == 1
    )

    backend.delete("vmhost-test-obs-pinned")
    _wait_vms(prometheus, backend)
    after = _show_resources(backend)
    _matches_show_resources(prometheus, after)
    assert not prometheus.query('vmhost_vm_vcpus{vm="vmhost-test-obs-pinned"}')
    assert "VmHostStoragePoolFull" in prometheus.rules_loaded()
    assert "Traceback" not in running.log()


def _fill(expr: str) -> str:
    values = {
        "$juju_model_uuid": TOPOLOGY["juju_model_uuid"],
        "$juju_model": TOPOLOGY["juju_model"],
        "$juju_application": TOPOLOGY["juju_application"],
        "$juju_unit": TOPOLOGY["juju_unit"],
        "$node": "0",
        "$__rate_interval": "30s",
    }
    for name, value in values.items():
        expr = expr.replace(name, value)
    assert "$" not in expr, expr
    return expr


@pytest.mark.usefixtures("clean_host")
def test_every_dashboard_query_returns_a_series(
    backend: LibvirtBackend, test_pool: str, observed: tuple[Exporter, Prometheus]
) -> None:
    _running, prometheus = observed
    _compose(backend, test_pool, "vmhost-test-obs-dash", pinned_count=1)
    _wait_vms(prometheus, backend)
    time.sleep(3)  # rate() over the VM counters needs a few scrapes of the new VM
    dashboard = json.loads(DASHBOARD.read_text())
    names = {v["name"] for v in dashboard["templating"]["list"]}
    assert {"prometheusds", "juju_model", "juju_model_uuid", "juju_application", "juju_unit"} <= (
        names
    )
    queries = [
        (panel["title"], target["expr"])
        for panel in dashboard["panels"]
        for target in panel.get("targets", [])
    ]
    assert len(queries) >= 15
    empty = [(title, expr) for title, expr in queries if not prometheus.query(_fill(expr))]
    assert not empty, f"dashboard queries without a series: {empty}"
    for var in dashboard["templating"]["list"]:
        query = var.get("query")
        if isinstance(query, dict) and query["query"].startswith("label_values("):
            inner = query["query"].removeprefix("label_values(").rsplit(",", 1)
            label = inner[1].strip(" )")
            assert prometheus.query(f"count by ({label}) ({_fill(inner[0])})"), var["name"]


class _Cells(html.parser.HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.node: str | None = None
        self.cells: dict[str, tuple[str | None, str | None, str | None]] = {}

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = dict(attrs)
        if tag == "section" and a.get("data-node") is not None:
            self.node = a["data-node"]
        if a.get("data-cpu") is not None:
            self.cells[a["data-cpu"] or ""] = (self.node, a.get("data-state"), a.get("data-vm"))


def _chromium(*args: str, profile: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [CHROMIUM, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", *args],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


@pytest.mark.usefixtures("clean_host")
def test_numa_map_in_headless_chromium(
    backend: LibvirtBackend, test_pool: str, observed: tuple[Exporter, Prometheus], tmp_path: Path
) -> None:
    running, prometheus = observed
    _compose(backend, test_pool, "vmhost-test-map-a", pinned_count=1)
    _compose(backend, test_pool, "vmhost-test-map-floating")
    _wait_vms(prometheus, backend)
    vms = backend.list_vms()

    dom = _chromium("--dump-dom", f"{running.url}/", profile=tmp_path / "profile-dom")
    assert dom.returncode == 0, dom.stderr[-2000:]
    parser = _Cells()
    parser.feed(dom.stdout)
    topology = backend.topology()
    assert set(parser.cells) == {str(c) for c in topology.cpus}
    pinned_seen = 0
    for vm in vms:
        for cell in vm.placement.cells:
            for cpu in cell.cpus:
                assert parser.cells[str(cpu)] == (str(cell.host_node), "pinned", vm.name)
                pinned_seen += 1
    assert pinned_seen >= 1
    assert "vmhost-test-map-floating" in dom.stdout  # listed under the shared pool

    status, page = http_get(f"{running.url}/vm/vmhost-test-map-a")
    assert status == 200
    assert 'id="vm-details"' in page

    shot = tmp_path / "numa-map.png"
    result = _chromium(
        "--hide-scrollbars",
        "--window-size=1280,900",
        f"--screenshot={shot}",
        f"{running.url}/",
        profile=tmp_path / "profile-shot",
    )
    assert result.returncode == 0, result.stderr[-2000:]
    data = shot.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    assert len(data) > 10_000
    if SCREENSHOT_OUT:
        Path(SCREENSHOT_OUT).write_bytes(data)


def test_exporter_is_supervised_and_survives_the_hypervisor_going_away(
    backend: LibvirtBackend, tmp_path: Path
) -> None:
    # A libvirt URI whose socket does not exist: the exporter's real libvirt client fails to
    # connect exactly as it does when libvirtd stops.
    gone = start_exporter(tmp_path, libvirt_uri="qemu:///system?socket=/run/vmhost-test-gone")
    try:
        status, text = http_get(f"{gone.url}/metrics")
        assert status == 200
        assert "vmhost_up 0.0" in text
        status, page = http_get(f"{gone.url}/")
        assert status == 200
        assert 'id="hypervisor-down"' in page
        time.sleep(2.5)  # a few more failed readings
        log = gone.log()
        assert "hypervisor not readable" in log
        assert log.count("hypervisor not readable") == 1  # logged once, not every reading
        assert "Traceback" not in log

        # update-status: a running exporter with unchanged settings is left alone
        first = gone.pid()
        assert gone.ensure() == "running"
        assert gone.pid() == first
        # a changed setting restarts it
        assert gone.ensure(gone.config.model_copy(update={"interval": 2.0})) == "restarted"
        gone.wait_answering()
        second = gone.pid()
        assert second != first
        # a dead exporter is started again
        os.kill(second, signal.SIGKILL)
        wait_for(lambda: exporter_pid(gone) is None, 10, "exporter gone")
        assert gone.ensure() == "started"
        gone.wait_answering()
    finally:
        gone.stop()
    assert not gone.paths["pid"].exists()
    assert not gone.paths["settings"].exists()
