"""Shared unit test fixtures: fixture paths, and the in-memory host for charm tests."""

import dataclasses
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, settings
from ops import testing
from tests.fixtures import FIXTURES

import charm
from fake_backend import FakeBackend
from vmhost import access, exporter, host, refusals
from vmhost.layout import HostLayout
from vmhost.model import PAGE_2M_KIB, HostNic, HostTopology, NicKind, VmHostError
from vmhost.topology import parse_capabilities

# Property tests check behaviour, not speed (bench/ measures speed): on a loaded 2-CPU machine
# Hypothesis's timing checks would fail tests whose properties hold.
settings.register_profile("vm-host", deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile("vm-host")


@pytest.fixture(autouse=True)
def layout(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> HostLayout:
    """The charm's state on the host (relation journal, image fetch state) in a temporary dir."""
    got = HostLayout(
        journal_dir=tmp_path / "relations", image_state_dir=str(tmp_path / "image-fetch")
    )
    monkeypatch.setattr(charm.VmHostCharm, "layout", got)
    return got


@pytest.fixture(autouse=True)
def _refusals_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Placement refusals are counted in a file; tests count into their own."""
    path = tmp_path / "refusals.json"
    monkeypatch.setattr(refusals, "REFUSALS_PATH", path)
    return path


class FakeExporter:
    """Records what the charm asks of the exporter service (no process is started)."""

    def __init__(self):
        self.started: list[exporter.ExporterSettings] = []
        self.stopped = 0

    def ensure_running(self, config: exporter.ExporterSettings, **_kw: object) -> str:
        self.started.append(config)
        return "started (fake)"

    def stop(self, **_kw: object) -> None:
        self.stopped += 1


@pytest.fixture(autouse=True)
def fake_exporter(monkeypatch: pytest.MonkeyPatch) -> FakeExporter:
    """The charm's exporter service calls, recorded instead of run."""
    fake = FakeExporter()
    monkeypatch.setattr(exporter, "ensure_running", fake.ensure_running)
    monkeypatch.setattr(exporter, "stop", fake.stop)
    return fake


def _no_daemon(what: str):
    def refuse(*_args: object, **_kw: object):
        raise AssertionError(
            f"a unit test reached charm.{what}, which talks to this machine's daemons;"
            " use the `backend` fixture (or fake_trust) instead"
        )

    return refuse


@pytest.fixture(autouse=True)
def _no_real_hypervisor(monkeypatch: pytest.MonkeyPatch) -> None:
    """No unit test reaches libvirtd or LXD.

    The backend and trust factories refuse until a test's fixture replaces them with a
    recording fake.
    """
    monkeypatch.setattr(charm, "make_backend", _no_daemon("make_backend"))
    monkeypatch.setattr(charm, "make_trust", _no_daemon("make_trust"))


@pytest.fixture
def fixtures_dir() -> Path:
    """Return the fixtures directory (libvirt-caps/, lxd-resources/)."""
    return FIXTURES


# ---------------------------------------------------------------------------------------------
# The charm in ops.testing: an in-memory backend, host and authorized_keys


CAPS = "x86-2node-smt-24cpu.xml"


@pytest.fixture
def topology(fixtures_dir: Path) -> HostTopology:
    return make_topology()


TEST_BRIDGE = "br0"
"""The test host's one bridge, its default network in charm tests (see `ctx`)."""


def make_topology() -> HostTopology:
    """The two-node test host, with 64 free 2M pages on node 1 and one bridge, br0."""
    topo = parse_capabilities((FIXTURES / "libvirt-caps" / CAPS).read_text())
    # 64 free 2M pages on node 1 only, so hugepage requests have somewhere to go.
    nodes = tuple(
        replace(n, hugepages_total={PAGE_2M_KIB: 64}, hugepages_free={PAGE_2M_KIB: 64})
        if n.id == 1
        else n
        for n in topo.nodes
    )
    return replace(topo, nodes=nodes, nics=(HostNic(TEST_BRIDGE, kind=NicKind.BRIDGE),))


@pytest.fixture
def backend(topology, monkeypatch: pytest.MonkeyPatch) -> FakeBackend:
    fake = FakeBackend(host=topology)
    fake.ensure_pool(host.DEFAULT_POOL_NAME, host.DEFAULT_POOL_PATH)  # as after install
    fake.calls.clear()
    monkeypatch.setattr(charm, "make_backend", lambda config, layout=None: fake)
    return fake


class FakeHost:
    """Records host set-up calls; the kernel grants `granted` huge pages when set."""

    def __init__(self):
        self.calls: list[str] = []
        self.granted: int | None = None
        self.running = True
        self.recorded_backend: str | None = None
        self.pages: dict[tuple[int, int | None], int] = {}
        """What the kernel holds, per (size, node): what set_hugepages was granted."""
        self.mounted: list[str] = []
        """What ensure_hugetlbfs_mounts reports it mounted (nothing: every mount exists)."""
        self.mount_error: str | None = None
        self.mount_sizes: list[list[int]] = []
        """The configured page sizes ensure_hugetlbfs_mounts was asked about, per call."""
        self.restart_asked: list[bool] = []
        """ensure_libvirtd's config_changed argument, per call."""

    def backend_choice(self, backend):
        if self.recorded_backend is None:
            self.recorded_backend = backend
        return None if self.recorded_backend == backend else self.recorded_backend

    def lxd(self, channel, *, install):
        self.calls.append(f"ensure_lxd:{channel}:{install}")
        if self.running:
            return host.DaemonState(True, host.DaemonManager.EXTERNAL)
        return host.DaemonState(False, host.DaemonManager.NONE, message="LXD is not running")

    def install(self):
        self.calls.append("install")

    def write(self, path, content, mode=0o644):
        self.calls.append(f"write:{path}")
        assert "unix_sock_group" in content
        return False

    def ensure(self, changed):
        self.calls.append("ensure_libvirtd")
        self.restart_asked.append(changed)
        if self.running:
            return host.DaemonState(True, host.DaemonManager.EXTERNAL)
        return host.DaemonState(False, host.DaemonManager.NONE, message="libvirtd is not running")

    def hugepages(self, size_kib, count, node=None, sysfs_root="/sys"):
        self.calls.append(f"hugepages:{size_kib}:{count}:{node}")
        if node == 7:
            raise VmHostError("hugepages: 2048 KiB pages are not available on NUMA node 7")
        granted = count if self.granted is None else self.granted
        self.pages[(size_kib, node)] = granted
        return granted

    def hugepages_now(self, size_kib, node=None, sysfs_root="/sys"):
        if node == 7:
            raise VmHostError("hugepages: 2048 KiB pages are not available on NUMA node 7")
        return self.pages.get((size_kib, node), 0)

    def recorded(self):
        return self.recorded_backend

    def mounts(self, sizes):
        self.mount_sizes.append(sorted(set(sizes)))
        if self.mount_error:
            raise VmHostError(self.mount_error)
        return list(self.mounted)


OPERATOR_LINE = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOperatorOwnLineOutsideBlock op\n"
HELPER = "/usr/bin/virt-ssh-helper qemu:///system"


class FakeAccess:
    """An authorized_keys file in memory, behind the real key parsing and rendering."""

    def __init__(self):
        self.text = (
            "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOperatorOwnLineOutsideBlockAAAAAAAAAAA op\n"
        )
        self.users: list[str] = []
        self.removed = False

    def ensure_user(self, name="virsh", *, adopt=False):
        access.validate_user_name(name)
        self.users.append(name)
        return name

    def current_keys(self, user):
        return access.managed_keys(self.text)

    def write(self, keys):
        self.text = access.render_authorized_keys(
            self.text, keys, command="/usr/bin/virt-ssh-helper qemu:///system"
        )

    def sync_keys(self, user, keys):
        kept = [k for k in self.current_keys(user) if k.action_name is not None]
        self.write([*keys, *kept])
        return True

    def authorize_key(self, user, key_text, name):
        key = access.parse_public_key(key_text, f"action:{name}")
        self.write([*self.current_keys(user), key])
        return key

    def revoke_key(self, user, wanted):
        keys = self.current_keys(user)
        gone = [k for k in keys if k.action_name == wanted or k.fingerprint == wanted]
        if not gone:
            raise access.InvalidRequestError("key", f"no key named {wanted!r}")
        self.write([k for k in keys if k not in gone])
        return gone

    def remove_access(self, user):
        self.removed = True
        return False


@pytest.fixture
def fake_host(monkeypatch: pytest.MonkeyPatch) -> FakeHost:
    return install_fake_host(monkeypatch)


def install_fake_host(monkeypatch: pytest.MonkeyPatch) -> FakeHost:
    """Patch the host module with a fresh FakeHost (for tests that cannot use fixtures)."""
    fake = FakeHost()
    monkeypatch.setattr(host, "install_packages", fake.install)
    monkeypatch.setattr(host, "write_if_changed", fake.write)
    monkeypatch.setattr(host, "ensure_libvirtd", fake.ensure)
    monkeypatch.setattr(host, "set_hugepages", fake.hugepages)
    monkeypatch.setattr(host, "reload_sshd", lambda: False)
    monkeypatch.setattr(host, "check_backend_choice", fake.backend_choice)
    monkeypatch.setattr(host, "recorded_backend", fake.recorded)
    monkeypatch.setattr(host, "hugepages_now", fake.hugepages_now)
    monkeypatch.setattr(host, "ensure_lxd", fake.lxd)
    monkeypatch.setattr(host, "ensure_hugetlbfs_mounts", fake.mounts)
    return fake


@pytest.fixture
def fake_access(monkeypatch: pytest.MonkeyPatch) -> FakeAccess:
    return install_fake_access(monkeypatch)


def install_fake_access(monkeypatch: pytest.MonkeyPatch) -> FakeAccess:
    """Patch the access module with a fresh FakeAccess (for tests that cannot use fixtures)."""
    fake = FakeAccess()
    monkeypatch.setattr(access, "ensure_user", fake.ensure_user)
    monkeypatch.setattr(access, "user_problem", lambda name, adopt=False: None)
    monkeypatch.setattr(access, "current_keys", fake.current_keys)
    monkeypatch.setattr(access, "sync_keys", fake.sync_keys)
    monkeypatch.setattr(access, "authorize_key", fake.authorize_key)
    monkeypatch.setattr(access, "revoke_key", fake.revoke_key)
    monkeypatch.setattr(access, "remove_access", fake.remove_access)
    monkeypatch.setattr(access, "ensure_sshd_drop_in", lambda user: False)
    monkeypatch.setattr(access, "remove_sshd_drop_in", lambda: False)
    monkeypatch.setattr(access, "ssh_host_public_keys", lambda: ["ssh-ed25519 AAAAhostkey"])
    return fake


def _charm_yaml(name: str) -> dict[str, object]:
    return yaml.safe_load((Path(charm.CHARM_DIR) / name).read_text())


MODEL_UUID = "5f0c1d2e-3a4b-4c5d-8e6f-7a8b9c0d1e2f"
"""One model for every hook of a test: ops.testing gives each State a new random model uuid,
and VM owners carry it (a VM of another model is never touched)."""


class OneModelContext(testing.Context[charm.VmHostCharm]):
    """A Context whose hooks all run in the model MODEL_UUID, as Juju's would."""

    def run(self, event: Any, state: testing.State) -> testing.State:  # type: ignore[override]
        model = dataclasses.replace(state.model, uuid=MODEL_UUID)
        return super().run(event, dataclasses.replace(state, model=model))


@pytest.fixture
def ctx() -> testing.Context[charm.VmHostCharm]:
    """The charm, whose default-network defaults to the test host's bridge br0.

    A VM needs a NIC, and a fresh host has no default network; the charm tests that are not
    about networks compose on br0 as if the operator had set it. Tests of the refusal set
    default-network to "" in their state.
    """
    return make_ctx()


def make_ctx(**kwargs: Any) -> OneModelContext:
    """A charm Context as the `ctx` fixture gives it (kwargs: unit_id and the like)."""
    config = _charm_yaml("config.yaml")
    config["options"]["default-network"]["default"] = TEST_BRIDGE  # type: ignore[index]
    return OneModelContext(
        charm.VmHostCharm,
        meta=_charm_yaml("metadata.yaml"),
        actions=_charm_yaml("actions.yaml"),
        config=config,
        **kwargs,
    )
