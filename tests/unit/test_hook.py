"""One hook's sequence on the host, without ops: the steps in order, and where it stops."""

from __future__ import annotations

from pathlib import Path

from conftest import FakeHost
from fake_backend import FakeBackend
from vmhost import hook, imagecache, lxd_trust
from vmhost.config import CharmConfig


class Recorded:
    """The charm's relation steps, recorded."""

    def __init__(self):
        self.calls: list[str] = []

    def steps(self) -> hook.Steps:
        return hook.Steps(
            libvirt_access=lambda: self.calls.append("libvirt_access"),
            lxd_access=lambda: self.calls.append("lxd_access"),
            cos_agent=lambda: self.calls.append("cos_agent"),
            vms=lambda snapshot: self.calls.append(f"vms:{len(snapshot.vms)}"),
        )


def options(**values: object) -> CharmConfig:
    return CharmConfig.model_validate(values)


def run(config: CharmConfig, backend: FakeBackend, *, update_status: bool = False) -> Recorded:
    recorded = Recorded()
    hook.reconcile(
        config,
        hook.HostReader(lambda: backend),
        recorded.steps(),
        templates_dir=Path(__file__).resolve().parents[2] / "templates",
        image_settings=imagecache.Settings(),
        first_time=False,
        update_status=update_status,
        progress=lambda _what: None,
    )
    return recorded


def test_libvirt_access_comes_before_observability_and_the_vms(
    backend: FakeBackend, fake_host: FakeHost
):
    got = run(options(), backend)
    assert got.calls == ["libvirt_access", "cos_agent", "vms:0"]
    assert "ensure_libvirtd" in fake_host.calls


def test_lxd_access_comes_after_the_project_and_before_the_vms(
    backend: FakeBackend, fake_host: FakeHost
):
    got = run(options(backend="lxd"), backend)
    assert got.calls == ["cos_agent", "lxd_access", "vms:0"]
    assert backend.calls[-2:] == ["ensure_project:vm-host:vm-host", "recover"]


def test_config_the_host_contradicts_stops_before_huge_pages_and_vms(
    backend: FakeBackend, fake_host: FakeHost
):
    got = run(options(reserved_cpus="0-999", hugepages="2M:64"), backend)
    assert got.calls == ["libvirt_access", "cos_agent"]
    assert not [c for c in fake_host.calls if c.startswith("hugepages:")]
    assert "recover" not in backend.calls


def test_an_unreachable_hypervisor_stops_after_access_with_the_reason(
    backend: FakeBackend, fake_host: FakeHost
):
    backend.reachable = False
    reader = hook.HostReader(lambda: backend)
    assert reader.read() is None
    assert "fake: down" in reader.error
    got = run(options(), backend)
    assert got.calls == ["libvirt_access", "cos_agent"]


def test_a_backend_that_cannot_change_stops_everything(backend: FakeBackend, fake_host: FakeHost):
    fake_host.recorded_backend = "lxd"
    got = run(options(), backend)
    assert got.calls == []
    assert fake_host.calls == []


def test_the_host_is_read_once_and_again_only_when_asked(backend: FakeBackend):
    reader = hook.HostReader(lambda: backend)
    first = reader.read()
    assert reader.read() is first
    assert backend.calls.count("topology") == 1
    assert reader.read(refresh=True) is not first
    assert backend.calls.count("topology") == 2


def test_lxd_trust_that_cannot_be_opened_is_logged_not_raised(caplog):
    def no_lxd():
        raise lxd_trust.LxdError("LXD is not running: no unix socket at /nowhere")

    opened: list[int] = []
    got = hook.lxd_access(
        options(backend="lxd"), no_lxd, "10.0.0.5", [], open_port=opened.append, publish=True
    )
    assert got is None
    assert opened == []
    assert "LXD trust: LXD is not running" in caplog.text
