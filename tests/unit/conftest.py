"""Shared unit test fixtures: fixture paths, the host layout under tmp_path, the charm's host."""

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
from fake_accounts import RecordedAccounts, access_layout
from fake_backend import FakeBackend
from vmhost import access, exporter, host, refusals
from vmhost.layout import HostLayout
from vmhost.model import PAGE_2M_KIB, HostNic, HostTopology, NicKind, VmHostError
from vmhost.topology import parse_capabilities

# Property tests check behaviour, not speed (bench/ measures speed): on a loaded 2-CPU machine
# Hypothesis's timing checks would fail tests whose properties hold.
settings.register_profile("vm-host", deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile("vm-host")


OPERATOR_LINE = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOperatorOwnLineOutsideBlockAAAAAAAAAAA op\n"
"""The operator's own line in the access user's authorized_keys (outside vm-host's block)."""


def make_layout(root: Path) -> HostLayout:
    """The charm's state on the host under `root`, with the access user as after install.

    The relation journal, image fetch state, the access user's home, the sshd drop-in and
    host keys are directories and files under `root`; LXD's socket is `root`/lxd.socket (no
    daemon answers there unless a test serves a fake_lxd.FakeLxd on it). The access user
    "virsh" exists as vm-host made it, with an operator's own line in its authorized_keys.
    """
    got = HostLayout(
        journal_dir=root / "relations",
        image_state_dir=str(root / "image-fetch"),
        access=access_layout(root / "host"),
        lxd_socket=str(root / "lxd.socket"),
    )
    user = access.ensure_user("virsh", layout=got.access)
    user.authorized_keys.write_text(OPERATOR_LINE)
    accounts(got).calls.clear()
    return got


def accounts(layout: HostLayout) -> RecordedAccounts:
    """The recorded account changes of a test layout."""
    recorded = layout.access.accounts
    assert isinstance(recorded, RecordedAccounts)
    return recorded


@pytest.fixture(autouse=True)
def layout(
    tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch
) -> HostLayout:
    """The charm's state on the host in a temporary directory of its own (see `make_layout`).

    Apart from the test's tmp_path, which stays the test's own.
    """
    got = make_layout(tmp_path_factory.mktemp("host-layout"))
    monkeypatch.setattr(charm.VmHostCharm, "layout", got)
    return got


class HostAccess:
    """The test host's libvirt access as the real vmhost.access code left it."""

    def __init__(self, layout: HostLayout, user: str = "virsh"):
        self.layout = layout.access
        self.user = user
        self.accounts = accounts(layout)

    @property
    def text(self) -> str:
        """The access user's authorized_keys ("" when it has none)."""
        found = self.accounts.lookup(self.user)
        if found is None or not found.authorized_keys.exists():
            return ""
        return found.authorized_keys.read_text()

    @property
    def command(self) -> str:
        """The forced command every managed key runs on this host."""
        return access.forced_command(self.layout)


@pytest.fixture
def host_access(layout: HostLayout) -> HostAccess:
    """The access user's files under the test layout, for assertions."""
    return HostAccess(layout)


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
            " use the `backend` fixture instead"
        )

    return refuse


@pytest.fixture(autouse=True)
def _no_real_hypervisor(monkeypatch: pytest.MonkeyPatch) -> None:
    """No unit test reaches libvirtd or LXD.

    The backend factory refuses until a test's fixture replaces it with the in-memory
    backend; LXD's trust store is opened at the layout's socket (a fake LXD or nothing).
    """
    monkeypatch.setattr(charm, "make_backend", _no_daemon("make_backend"))


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
        granted = count if self.granted is None else self.granted
        self.pages[(size_kib, node)] = granted
        return granted

    def hugepages_now(self, size_kib, node=None, sysfs_root="/sys"):
        return self.pages.get((size_kib, node), 0)

    def recorded(self):
        return self.recorded_backend

    def reload_sshd(self):
        self.calls.append("reload_sshd")
        return True

    def mounts(self, sizes):
        self.mount_sizes.append(sorted(set(sizes)))
        if self.mount_error:
            raise VmHostError(self.mount_error)
        return list(self.mounted)


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
    monkeypatch.setattr(host, "reload_sshd", fake.reload_sshd)
    monkeypatch.setattr(host, "check_backend_choice", fake.backend_choice)
    monkeypatch.setattr(host, "recorded_backend", fake.recorded)
    monkeypatch.setattr(host, "hugepages_now", fake.hugepages_now)
    monkeypatch.setattr(host, "ensure_lxd", fake.lxd)
    monkeypatch.setattr(host, "ensure_hugetlbfs_mounts", fake.mounts)
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
