"""The exporter: metrics from the show-resources data, the NUMA map page, the HTTP side."""

from __future__ import annotations

import html.parser
import threading
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from fake_backend import FakeBackend
from vmhost import exporter, metrics, refusals, report
from vmhost.model import (
    PAGE_2M_KIB,
    CellPlacement,
    HostNic,
    HostTopology,
    InvalidRequestError,
    NicKind,
    Placement,
    Policy,
    StoragePool,
    VfAssignment,
    VmRecord,
    VmState,
    VmStats,
)

POLICY = Policy(reserved_cpus=frozenset({0, 12}), reserved_memory_mib=1024)
REAL_ENSURE_RUNNING = exporter.ensure_running
"""conftest replaces the service calls for charm tests; this module tests the real one."""


def _vms(topology: HostTopology) -> list[VmRecord]:
    node0 = topology.node(0)
    node1 = topology.node(1)
    cpus0 = [c for c in node0.cpu_ids if c not in POLICY.reserved_cpus][:2]
    cpus1 = list(node1.cpu_ids[:1])
    return [
        VmRecord(
            name="pinned-a",
            uuid="u1",
            state=VmState.RUNNING,
            owner="relation:3:app",
            placement=Placement(
                vcpus=2,
                memory_mib=2048,
                cells=(CellPlacement(host_node=0, vcpus=2, memory_mib=2048, cpus=tuple(cpus0)),),
            ),
            volumes=("vm-host/pinned-a-root",),
            interfaces=({"label": "0", "mac": "52:54:00:00:00:01", "attached-to": "ens9"},),
        ),
        VmRecord(
            name="huge-b",
            uuid="u2",
            state=VmState.FAILED,
            placement=Placement(
                vcpus=1,
                memory_mib=64,
                cells=(
                    CellPlacement(
                        host_node=1,
                        vcpus=1,
                        memory_mib=64,
                        cpus=tuple(cpus1),
                        hugepage_size_kib=PAGE_2M_KIB,
                        hugepages=32,
                    ),
                ),
                vfs=(VfAssignment(nic="ens9", count=1),),
            ),
        ),
        VmRecord(
            name="floating-c",
            uuid="u3",
            state=VmState.STOPPED,
            managed=False,
            placement=Placement(vcpus=3, memory_mib=1000),
        ),
    ]


@pytest.fixture
def host(topology: HostTopology) -> HostTopology:
    nics = (HostNic(name="ens9", numa_node=0, sriov_total_vfs=8, sriov_enabled_vfs=4),)
    pools = (
        StoragePool(
            name="vm-host",
            capacity_bytes=100 * 10**9,
            allocation_bytes=95 * 10**9,
            available_bytes=5 * 10**9,
        ),
    )
    return replace(topology, nics=nics, pools=pools, hypervisor_version="9.0.0")


@pytest.fixture
def sample(host: HostTopology) -> metrics.Sample:
    return metrics.Sample(
        taken_at=1700000000.0,
        duration_s=0.25,
        version="9.0.0",
        topology=host,
        vms=tuple(_vms(host)),
        stats=(VmStats(name="pinned-a", cpu_seconds=12.5, memory_used_bytes=10 * 2**20),),
        image_cache_bytes=1234,
    )


def _values(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def _exposition(sample: metrics.Sample | None, **kw) -> dict:
    from prometheus_client import CollectorRegistry, generate_latest

    registry = CollectorRegistry(auto_describe=False)

    class _C:
        def collect(self):
            return metrics.families(sample, POLICY, **kw)

    registry.register(_C())  # type: ignore[arg-type]
    return _values(generate_latest(registry).decode())


def test_metrics_agree_with_show_resources(sample: metrics.Sample):
    assert sample.topology is not None
    data = report.resources_json(sample.topology, list(sample.vms), POLICY)
    values = _exposition(sample)
    for node in data["nodes"]:
        n = str(node["id"])
        cpus = node["cpus"]
        assert values[("vmhost_cpus", (("node", n), ("state", "pinned")))] == len(cpus["pinned"])
        assert values[("vmhost_cpus_free_for_pinning", (("node", n),))] == cpus["free"]
        states = ("pinned", "reserved", "held-idle", "shared-pool")
        assert (
            sum(values[("vmhost_cpus", (("node", n), ("state", s)))] for s in states)
            == cpus["total"]
        )
        mem = node["memory-mib"]
        assert values[("vmhost_memory_bytes", (("node", n), ("state", "free")))] == (
            mem["free"] * 2**20
        )
        for h in node["hugepages"]:
            key = (("node", n), ("size", h["size"]), ("state", "allocated"))
            assert values[("vmhost_hugepages", key)] == h["allocated"]
    assert values[("vmhost_cpus", (("node", "1"), ("state", "pinned")))] == 1
    assert (
        values[("vmhost_hugepages", (("node", "1"), ("size", "2M"), ("state", "allocated")))] == 32
    )
    assert values[("vmhost_hugepage_vms", (("node", "1"), ("size", "2M")))] == 1
    shared = data["shared"]
    assert values[("vmhost_shared_vcpus_allocated", ())] == shared["vcpus-allocated"] == 3
    assert values[("vmhost_shared_memory_capacity_bytes", ())] == (
        shared["memory-capacity-mib"] * 2**20
    )
    pool = (("pool", "vm-host"), ("state", "allocated"))
    assert values[("vmhost_storage_pool_bytes", pool)] == 95 * 10**9
    vf = (("nic", "ens9"), ("node", "0"), ("state", "used"))
    assert values[("vmhost_sriov_vfs", vf)] == 1
    owner = (("owner", "relation:3:app"), ("pool", "vm-host"), ("state", "running"))
    assert values[("vmhost_vms", owner)] == 1
    unmanaged = (("owner", "unmanaged"), ("pool", "none"), ("state", "stopped"))
    assert values[("vmhost_vms", unmanaged)] == 1
    assert values[("vmhost_vm_cpu_seconds_total", (("vm", "pinned-a"),))] == 12.5
    assert values[("vmhost_image_cache_bytes", ())] == 1234
    assert values[("vmhost_scrape_duration_seconds", ())] == 0.25
    assert values[("vmhost_up", ())] == 1


def test_hugepages_not_granted(sample: metrics.Sample):
    from vmhost.settings import parse_hugepages_setting

    values = _exposition(sample, hugepages=parse_hugepages_setting("2M:100@1,1G:2"))
    assert values[("vmhost_hugepages_not_granted", (("node", "1"), ("size", "2M")))] == 36
    assert values[("vmhost_hugepages_configured", (("node", "all"), ("size", "1G")))] == 2
    assert values[("vmhost_hugepages_not_granted", (("node", "all"), ("size", "1G")))] == 2


def test_no_reading_or_unreachable_hypervisor_is_up_zero(topology: HostTopology):
    assert _exposition(None)[("vmhost_up", ())] == 0
    backend = FakeBackend(host=topology, reachable=False)
    sample = exporter.read_sample(backend)
    assert not sample.up
    assert "cannot connect" in sample.error
    values = _exposition(sample)
    assert values[("vmhost_up", ())] == 0
    assert not any(name == "vmhost_cpus" for name, _ in values)


def test_refusals_are_counted_by_class_and_once_per_retried_request(tmp_path: Path):
    path = tmp_path / "r.json"
    refusals.record("needs 4 pinned CPUs; node 0 has 2 free", path=path)
    refusals.record("needs 512 huge pages of 2M on node 1", request="r1", path=path)
    refusals.record("needs 512 huge pages of 2M on node 1", request="r1", path=path)
    refusals.record("SR-IOV interface eth1 asks for host NIC 'x'", path=path)
    counts = refusals.read(path)
    assert counts == {"cpu": 1, "hugepages": 1, "sriov": 1, "memory": 0, "other": 0}
    values = _exposition(None, refusal_counts=counts)
    assert values[("vmhost_placement_refusals_total", (("reason", "hugepages"),))] == 1
    assert refusals.classify("something else") == "other"
    assert refusals.classify("needs 4096 MiB of general memory; 0 left") == "memory"


def test_refusal_file_corrupt_reads_as_zero(tmp_path: Path):
    path = tmp_path / "r.json"
    path.write_text("{not json")
    assert set(refusals.read(path).values()) == {0}
    refusals.record("needs 9 pinned CPUs", path=path)
    assert refusals.read(path)["cpu"] == 1


@pytest.mark.parametrize(
    ("text", "expected"),
    [("127.0.0.1:9540", ("127.0.0.1", 9540)), (":9540", ("", 9540)), ("[::1]:80", ("::1", 80))],
)
def test_parse_listen(text: str, expected: tuple[str, int]):
    assert exporter.parse_listen(text) == expected


@pytest.mark.parametrize("text", ["9540", "localhost:9540", "127.0.0.1:0", "1.2.3.4:99999", ""])
def test_parse_listen_refuses(text: str):
    with pytest.raises(InvalidRequestError, match="metrics-listen"):
        exporter.parse_listen(text)


class _Cells(html.parser.HTMLParser):
    """Collect the CPU cells of the page: (node, cpu, state, vm)."""

    def __init__(self):
        super().__init__()
        self.node: str | None = None
        self.cells: list[tuple[str | None, str, str, str | None]] = []

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "section" and "data-node" in a:
            self.node = a["data-node"]
        if "data-cpu" in a:
            self.cells.append(
                (self.node, a["data-cpu"] or "", a["data-state"] or "", a.get("data-vm"))
            )


def test_page_draws_every_pinned_cpu_in_its_vm_cell(sample: metrics.Sample):
    page = exporter.render_page(exporter.page_context(sample, POLICY, 30))
    parser = _Cells()
    parser.feed(page)
    assert sample.topology is not None
    assert len(parser.cells) == len(sample.topology.cpus)
    drawn = {cpu: (node, vm) for node, cpu, _state, vm in parser.cells}
    for vm in sample.vms:
        for cell in vm.placement.cells:
            for cpu in cell.cpus:
                assert drawn[str(cpu)] == (str(cell.host_node), vm.name)
    reserved = {cpu for _n, cpu, state, _v in parser.cells if state == "reserved"}
    assert reserved == {"0", "12"}
    assert 'content="30"' in page


def test_page_marks_off_node_nic_and_escapes(sample: metrics.Sample):
    vms = list(sample.vms)
    vms[0] = replace(vms[0], owner="relation:1:<script>x</script>")
    # huge-b sits on node 1 and takes a VF of ens9, which is on node 0
    page = exporter.render_page(
        exporter.page_context(replace(sample, vms=tuple(vms)), POLICY, 30, focus="pinned-a")
    )
    assert "<script>" not in page
    assert "&lt;script&gt;" in page
    node1 = page.split('id="node-1"')[1].split("</section>")[0]
    assert "ens9 off-node" in node1


def test_page_when_hypervisor_down():
    sample = metrics.Sample(taken_at=0, duration_s=0.1, error="libvirtError: gone")
    page = exporter.render_page(exporter.page_context(sample, POLICY, 30))
    assert 'id="hypervisor-down"' in page
    assert "libvirtError: gone" in page


@pytest.fixture
def server(topology: HostTopology, tmp_path: Path) -> Iterator[exporter.Server]:
    backend = FakeBackend(host=topology)
    for vm in _vms(topology):
        backend.vms[vm.name] = vm
    config = exporter.ExporterSettings(
        listen="127.0.0.1:9540", refusals_path=str(tmp_path / "r.json"), reserved_cpus="0,12"
    )
    sampler = exporter.Sampler(lambda: exporter.read_sample(backend), 30)
    sampler.read_now()
    srv = _server_on_free_port(config, sampler)
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    yield srv
    srv.shutdown()
    backend.reachable = False


def _server_on_free_port(config: exporter.ExporterSettings, sampler: exporter.Sampler):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return exporter.Server(config.model_copy(update={"listen": f"127.0.0.1:{port}"}), sampler)


def _get(srv: exporter.Server, path: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{srv.port}{path}", timeout=5) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        with e:
            return e.code, e.read().decode()


def test_http_routes(server: exporter.Server):
    status, text = _get(server, "/metrics")
    assert status == 200
    assert _values(text)[("vmhost_up", ())] == 1
    assert _get(server, "/")[0] == 200
    status, page = _get(server, "/vm/pinned-a")
    assert status == 200
    assert 'id="vm-details"' in page
    assert _get(server, "/vm/nope")[0] == 404
    assert _get(server, "/vm/../etc/passwd")[0] == 404
    assert _get(server, "/other")[0] == 404
    request = urllib.request.Request(f"http://127.0.0.1:{server.port}/", method="POST", data=b"")
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(request, timeout=5)  # noqa: S310
    err.value.close()
    assert err.value.code == 501


def test_settings_file_round_trip(tmp_path: Path):
    config = exporter.ExporterSettings(interval=10, hugepages="2M:8")
    path = tmp_path / "s.json"
    path.write_text(config.to_json())
    assert exporter.ExporterSettings.model_validate_json(path.read_text()) == config
    with pytest.raises(ValueError, match="metrics-listen"):
        exporter.ExporterSettings(listen="nope")


def test_unit_file_runs_the_module():
    unit = exporter.unit_file("/venv/bin/python", "/charm/src:/charm/lib", Path("/etc/x.json"))
    assert "ExecStart=/venv/bin/python -m vmhost.exporter --settings /etc/x.json" in unit
    assert 'Environment="PYTHONPATH=/charm/src:/charm/lib"' in unit


LXD_METRICS = """\
# HELP lxd_cpu_seconds_total The total number of CPU time used in seconds.
# TYPE lxd_cpu_seconds_total counter
lxd_cpu_seconds_total{cpu="0",mode="user",name="vm1",project="vm-host"} 10.5
lxd_cpu_seconds_total{cpu="0",mode="system",name="vm1",project="vm-host"} 2
lxd_cpu_seconds_total{cpu="0",mode="idle",name="vm1",project="vm-host"} 900
lxd_cpu_seconds_total{cpu="1",mode="user",name="vm1",project="vm-host"} 1.5
# HELP lxd_memory_RSS_bytes The amount of anonymous and swap cache memory.
# TYPE lxd_memory_RSS_bytes gauge
lxd_memory_RSS_bytes{name="vm1",project="vm-host"} 1048576
# HELP lxd_disk_read_bytes_total The total number of bytes read.
# TYPE lxd_disk_read_bytes_total counter
lxd_disk_read_bytes_total{device="vda",name="vm1",project="vm-host"} 4096
lxd_disk_read_bytes_total{device="vdb",name="vm1",project="vm-host"} 4096
# HELP lxd_network_receive_bytes_total The amount of received bytes on a given interface.
# TYPE lxd_network_receive_bytes_total counter
lxd_network_receive_bytes_total{device="eth0",name="vm1",project="vm-host"} 300
lxd_network_receive_bytes_total{device="lo",name="vm1",project="vm-host"} 999
"""


def test_lxd_metrics_become_vm_stats():
    from vmhost.backends.lxd import stats_from_lxd_metrics

    [vm1] = stats_from_lxd_metrics(LXD_METRICS)
    assert vm1 == VmStats(
        name="vm1",
        cpu_seconds=14.0,
        memory_used_bytes=1048576,
        block_read_bytes=8192,
        net_rx_bytes=300,
    )


def test_libvirt_bulk_stats_record_becomes_vm_stats():
    from vmhost.backends.libvirt import stats_from_record

    record = {
        "state.state": 3,  # VIR_DOMAIN_PAUSED
        "cpu.time": 2_500_000_000,
        "balloon.rss": 2048,
        "block.count": 2,
        "block.0.rd.bytes": 10,
        "block.1.rd.bytes": 5,
        "block.0.wr.bytes": 7,
        "net.count": 1,
        "net.0.rx.bytes": 100,
        "net.0.tx.bytes": 50,
    }
    assert stats_from_record("vm", record) == VmStats(
        name="vm",
        cpu_seconds=2.5,
        memory_used_bytes=2048 * 1024,
        block_read_bytes=15,
        block_write_bytes=7,
        net_rx_bytes=100,
        net_tx_bytes=50,
        paused=True,
    )


def test_reading_counts_per_vm_stats(topology: HostTopology):
    backend = FakeBackend(host=topology, stats=[VmStats(name="a", cpu_seconds=1.0)])
    sample = exporter.read_sample(backend)
    assert sample.stats == (VmStats(name="a", cpu_seconds=1.0),)
    assert backend.calls.count("vm_stats") == 1


def test_ensure_running_under_systemd_restarts_only_on_change(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    from charmlibs import systemd

    calls: list[str] = []
    running = {"up": False}
    monkeypatch.setattr(systemd, "daemon_reload", lambda: calls.append("daemon-reload"))
    monkeypatch.setattr(systemd, "service_enable", lambda name: calls.append(f"enable {name}"))
    monkeypatch.setattr(systemd, "service_running", lambda name: running["up"])

    def restart(name: str) -> None:
        calls.append(f"restart {name}")
        running["up"] = True

    monkeypatch.setattr(systemd, "service_restart", restart)
    (tmp_path / "systemd").mkdir()
    settings_path = tmp_path / "exporter.json"
    unit_path = tmp_path / "vm-host-exporter.service"

    def ensure(config: exporter.ExporterSettings) -> str:
        return REAL_ENSURE_RUNNING(
            config,
            settings_path=settings_path,
            systemd_run_dir=tmp_path / "systemd",
            unit_path=unit_path,
        )

    config = exporter.ExporterSettings()
    assert ensure(config) == "restarted (systemd)"
    assert calls == ["daemon-reload", "enable vm-host-exporter", "restart vm-host-exporter"]
    assert "-m vmhost.exporter" in unit_path.read_text()
    assert exporter.ExporterSettings.model_validate_json(settings_path.read_text()) == (config)
    calls.clear()
    assert ensure(config) == "running (systemd)"
    assert calls == ["enable vm-host-exporter"]
    calls.clear()
    assert ensure(config.model_copy(update={"interval": 60.0})) == ("restarted (systemd)")
    assert calls == ["enable vm-host-exporter", "restart vm-host-exporter"]
    calls.clear()
    running["up"] = False  # died: update-status starts it again
    assert ensure(config.model_copy(update={"interval": 60.0})) == ("restarted (systemd)")


def test_map_marks_a_bridge_nic_off_node_as_show_resources_does(sample: metrics.Sample):
    # br0's only hardware port is ens9 (node 0): pinned-a (node 0) is local, huge-b (node 1)
    # is off-node through the bridge, as show-resources' vm-nics says.
    assert sample.topology is not None
    nics = (
        HostNic("br0", NicKind.BRIDGE),
        *(replace(n, master="br0") if n.name == "ens9" else n for n in sample.topology.nics),
    )
    on_bridge = {"label": "1", "mac": "52:54:00:00:00:09", "attached-to": "br0"}
    vms = [replace(vm, interfaces=(*vm.interfaces, on_bridge)) for vm in sample.vms[:2]]
    data = report.resources_json(replace(sample.topology, nics=nics), vms, POLICY)
    shown = {(n["vm"], n["host-device"]) for n in data["vm-nics"] if n["off-node"]}
    assert shown == {("huge-b", "br0")}
    views = {vm.name: exporter._vm_view(vm, nics) for vm in vms}
    assert views["pinned-a"]["off_node_nics"] == []
    assert views["huge-b"]["off_node_nics"] == ["br0", "ens9"]
