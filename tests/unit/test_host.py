"""Host setup on temporary trees: file writes, libvirtd.conf, daemon decisions, huge pages."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest
from charmlibs import apt, systemd

from vmhost import host
from vmhost.backends.libvirt import TEMPLATES_DIR
from vmhost.model import VmHostError
from vmhost.settings import parse_hugepages_setting


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_write_if_changed_creates_with_mode(tmp_path: Path) -> None:
    path = tmp_path / "sub" / "key"
    assert host.write_if_changed(path, "secret\n", 0o600) is True
    assert path.read_text() == "secret\n"
    assert mode(path) == 0o600


def test_write_if_changed_reports_no_change(tmp_path: Path) -> None:
    path = tmp_path / "f.conf"
    host.write_if_changed(path, "a\n")
    before = path.stat().st_ino
    assert host.write_if_changed(path, "a\n") is False
    assert path.stat().st_ino == before  # not rewritten
    assert host.write_if_changed(path, "b\n") is True
    assert path.read_text() == "b\n"
    assert mode(path) == 0o644


def test_write_if_changed_repairs_mode_without_a_change(tmp_path: Path) -> None:
    path = tmp_path / "key"
    host.write_if_changed(path, "k", 0o600)
    path.chmod(0o644)
    assert host.write_if_changed(path, "k", 0o600) is False
    assert mode(path) == 0o600


def test_write_if_changed_leaves_no_temporary_files(tmp_path: Path) -> None:
    for content in ("1", "2", "2"):
        host.write_if_changed(tmp_path / "f", content)
    assert [p.name for p in tmp_path.iterdir()] == ["f"]


def test_render_libvirtd_conf() -> None:
    text = host.render_libvirtd_conf(TEMPLATES_DIR)
    lines = [line for line in text.splitlines() if line and not line.startswith("#")]
    settings = {k.strip(): v.strip() for k, _, v in (line.partition("=") for line in lines)}
    assert settings == {
        "unix_sock_group": '"libvirt"',
        "unix_sock_rw_perms": '"0770"',
        "auth_unix_rw": '"none"',
        "unix_sock_ro_perms": '"0777"',
    }
    assert text.splitlines()[0] == f"# {host.MANAGED_BY}"


def test_ensure_libvirt_script_uses_the_template_settings() -> None:
    # The test harness starts libvirtd with the template's socket lines (grep on ^unix_sock_
    # and ^auth_unix_): every setting must be on such a line or the harness would drop it.
    text = (TEMPLATES_DIR / "libvirtd.conf.j2").read_text()
    settings = [line for line in text.splitlines() if line and not line.startswith("#")]
    assert settings
    assert all(line.startswith(("unix_sock_", "auth_unix_")) for line in settings)


def test_packages_for_arch() -> None:
    assert "qemu-system-x86" in host.packages_for_arch("x86_64")
    arm = host.packages_for_arch("aarch64")
    assert "qemu-system-arm" in arm
    assert "qemu-system-x86" not in arm
    assert {"libvirt-daemon-system", "qemu-utils", "genisoimage"} <= set(arm)


def make_sysfs(root: Path, sizes: dict[int, int], node: int | None = None) -> Path:
    base = (
        root / "kernel/mm/hugepages"
        if node is None
        else root / f"devices/system/node/node{node}/hugepages"
    )
    for size, count in sizes.items():
        d = base / f"hugepages-{size}kB"
        d.mkdir(parents=True)
        (d / "nr_hugepages").write_text(f"{count}\n")
    return base


def test_set_hugepages_global(tmp_path: Path) -> None:
    base = make_sysfs(tmp_path, {2048: 0, 1048576: 0})
    assert host.set_hugepages(2048, 64, sysfs_root=str(tmp_path)) == 64
    assert (base / "hugepages-2048kB/nr_hugepages").read_text().strip() == "64"
    assert (base / "hugepages-1048576kB/nr_hugepages").read_text().strip() == "0"


def test_set_hugepages_per_node(tmp_path: Path) -> None:
    base = make_sysfs(tmp_path, {1048576: 0}, node=1)
    assert host.set_hugepages(1048576, 4, node=1, sysfs_root=str(tmp_path)) == 4
    assert (base / "hugepages-1048576kB/nr_hugepages").read_text().strip() == "4"


def test_set_hugepages_refuses_unknown_size_and_negative(tmp_path: Path) -> None:
    make_sysfs(tmp_path, {2048: 0})
    with pytest.raises(VmHostError, match="1048576 KiB pages are not available on this host"):
        host.set_hugepages(1048576, 1, sysfs_root=str(tmp_path))
    with pytest.raises(VmHostError, match="NUMA node 3"):
        host.set_hugepages(2048, 1, node=3, sysfs_root=str(tmp_path))
    with pytest.raises(VmHostError, match="0 or more"):
        host.set_hugepages(2048, -1, sysfs_root=str(tmp_path))


def test_process_running(tmp_path: Path) -> None:
    for pid, comm in ((1, "init"), (42, "libvirtd"), (77, "virtlogd")):
        (tmp_path / str(pid)).mkdir()
        (tmp_path / str(pid) / "comm").write_text(comm + "\n")
    (tmp_path / "self").mkdir()
    assert host.process_running("libvirtd", tmp_path)
    assert not host.process_running("lxd", tmp_path)


def test_ensure_libvirtd_without_systemd_uses_a_running_daemon(tmp_path: Path) -> None:
    state = host.ensure_libvirtd(
        config_changed=True, systemd_run_dir=tmp_path / "absent", is_running=lambda: True
    )
    assert state.running
    assert state.manager == host.DaemonManager.EXTERNAL
    assert not state.restarted
    assert "restart it" in state.message


def test_ensure_libvirtd_without_systemd_reports_a_stopped_daemon(tmp_path: Path) -> None:
    state = host.ensure_libvirtd(
        config_changed=False, systemd_run_dir=tmp_path / "absent", is_running=lambda: False
    )
    assert not state.running
    assert state.manager == host.DaemonManager.NONE
    assert "not running" in state.message


class FakeSystemctl:
    def __init__(self, running: bool):
        self.running = running
        self.calls: list[tuple[str, str]] = []

    def install(self, monkeypatch: pytest.MonkeyPatch) -> None:
        def record(verb: str):
            def call(*args: str) -> bool:
                self.calls.append((verb, *args))  # type: ignore[arg-type]
                return True

            return call

        monkeypatch.setattr(systemd, "service_enable", record("enable"))
        monkeypatch.setattr(systemd, "service_restart", record("restart"))
        monkeypatch.setattr(systemd, "service_running", lambda _name: self.running)


@pytest.mark.parametrize(
    ("changed", "running", "restarted"),
    [(True, True, True), (False, True, False), (False, False, True)],
)
def test_ensure_libvirtd_with_systemd_restarts_only_when_needed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, changed: bool, running: bool, restarted: bool
) -> None:
    fake = FakeSystemctl(running)
    fake.install(monkeypatch)
    state = host.ensure_libvirtd(
        config_changed=changed, systemd_run_dir=tmp_path, is_running=lambda: running
    )
    assert state.manager == host.DaemonManager.SYSTEMD
    assert state.running
    assert state.restarted is restarted
    assert ("enable", "libvirtd") in fake.calls
    assert (("restart", "libvirtd") in fake.calls) is restarted


def test_ensure_libvirtd_with_systemd_reports_failure(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def fail(*_args: str) -> bool:
        raise systemd.SystemdError("unit libvirtd.service not found")

    monkeypatch.setattr(systemd, "service_enable", fail)
    state = host.ensure_libvirtd(config_changed=True, systemd_run_dir=tmp_path)
    assert not state.running
    assert "not found" in state.message


def test_default_pool_constants() -> None:
    assert host.DEFAULT_POOL_NAME == "vm-host"
    assert host.DEFAULT_POOL_PATH == "/var/lib/vm-host/images"


def test_hugepage_problems_read_what_the_kernel_holds(tmp_path: Path) -> None:
    make_sysfs(tmp_path, {2048: 0})
    wanted = parse_hugepages_setting("2M:64")
    root = str(tmp_path)
    assert host.hugepage_problems(wanted, root) == [
        "kernel granted 0 of 64 huge pages of 2 MiB host-wide"
    ]
    host.set_hugepages(2048, 64, sysfs_root=root)
    assert host.hugepages_now(2048, sysfs_root=root) == 64
    assert host.hugepage_problems(wanted, root) == []
    (missing,) = host.hugepage_problems(parse_hugepages_setting("2M:1@3"), root)
    assert "not available on NUMA node 3" in missing


def test_recorded_backend_reads_without_writing(tmp_path: Path) -> None:
    marker = tmp_path / "backend"
    assert host.recorded_backend(marker) is None
    assert not marker.exists()
    assert host.check_backend_choice("lxd", marker) is None
    assert host.recorded_backend(marker) == "lxd"


def test_image_keyring_falls_back_past_a_package_apt_knows_without_a_version(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # On Debian, apt knows ubuntu-keyring by name but has no candidate: charmlibs.apt then
    # raises KeyError('Version'), which once made the install hook fail.
    tried: list[str] = []

    def add_package(name: str) -> None:
        tried.append(name)
        if name == "ubuntu-cloudimage-keyring":
            raise apt.PackageNotFoundError(name)
        raise KeyError("Version")

    monkeypatch.setattr(apt, "add_package", add_package)
    assert host.install_image_keyring() is None
    assert tried == ["ubuntu-cloudimage-keyring", "ubuntu-keyring"]

    tried.clear()
    monkeypatch.setattr(apt, "add_package", tried.append)
    assert host.install_image_keyring() == "ubuntu-cloudimage-keyring"
    assert tried == ["ubuntu-cloudimage-keyring"]


# ---- hugetlbfs mounts for libvirt's huge-page guests

MOUNTS_2M_ONLY = (
    "sysfs /sys sysfs rw,nosuid,nodev,noexec,relatime 0 0\n"
    "hugetlbfs /dev/hugepages hugetlbfs rw,relatime,pagesize=2M 0 0\n"
)


def test_hugetlbfs_mounts_reads_page_sizes_as_the_kernel_prints_them() -> None:
    text = (
        MOUNTS_2M_ONLY
        + "hugetlbfs /dev/hugepages1G hugetlbfs rw,relatime,pagesize=1024M 0 0\n"
        + "none /mnt/huge hugetlbfs rw,relatime 0 0\n"
        + "tmpfs /run tmpfs rw,pagesize=1G 0 0\n"
    )
    assert host.hugetlbfs_mounts(text) == {2048: "/dev/hugepages", 1048576: "/dev/hugepages1G"}
    assert host.hugetlbfs_mounts("h /huge hugetlbfs rw,pagesize=1G 0 0\n") == {1048576: "/huge"}
    # No pagesize= option: the default huge page size.
    assert host.hugetlbfs_mounts("none /mnt/huge hugetlbfs rw 0 0\n", 1048576) == {
        1048576: "/mnt/huge"
    }


def test_mount_unit_for_1g_pages() -> None:
    where = host.hugetlbfs_mount_point(1048576)
    assert where == Path("/dev/hugepages1G")
    assert host.hugetlbfs_mount_point(2048) == Path("/dev/hugepages")
    assert host.mount_unit_name(where) == "dev-hugepages1G.mount"
    unit = host.render_hugetlbfs_mount_unit(1048576, where)
    for line in (
        "What=hugetlbfs",
        "Where=/dev/hugepages1G",
        "Type=hugetlbfs",
        "Options=pagesize=1G",
        "Before=sysinit.target libvirtd.service",
        "ConditionPathExists=/sys/kernel/mm/hugepages/hugepages-1048576kB",
        "WantedBy=sysinit.target",
    ):
        assert line in unit.splitlines(), line


class RecordedRun:
    """Records the commands ensure_hugetlbfs_mounts runs; fails with `stderr` when set."""

    def __init__(self, stderr: str = ""):
        self.commands: list[list[str]] = []
        self.stderr = stderr

    def __call__(self, cmd: list[str], **_kw: object):
        import subprocess

        self.commands.append(cmd)
        if self.stderr:
            raise subprocess.CalledProcessError(32, cmd, "", self.stderr)
        return subprocess.CompletedProcess(cmd, 0, "", "")


def test_missing_1g_mount_is_mounted_without_systemd(tmp_path: Path) -> None:
    mounts = tmp_path / "mounts"
    mounts.write_text(MOUNTS_2M_ONLY)
    make_sysfs(tmp_path / "sys", {2048: 0, 1048576: 0})
    run = RecordedRun()
    kwargs = {
        "sysfs_root": str(tmp_path / "sys"),
        "mounts_path": mounts,
        "mount_root": tmp_path / "dev",
        "systemd_run_dir": tmp_path / "no-systemd",
        "run": run,
    }
    made = host.ensure_hugetlbfs_mounts([2048, 1048576], **kwargs)  # type: ignore[arg-type]
    where = tmp_path / "dev" / "hugepages1G"
    assert made == [f"{where} (1G)"]
    assert run.commands == [
        ["mount", "-t", "hugetlbfs", "-o", "pagesize=1G", "hugetlbfs", str(where)]
    ]
    assert where.is_dir()
    # Once the kernel lists the mount, nothing more is done (no libvirtd restart either).
    mounts.write_text(MOUNTS_2M_ONLY + f"hugetlbfs {where} hugetlbfs rw,pagesize=1024M 0 0\n")
    assert host.ensure_hugetlbfs_mounts([2048, 1048576], **kwargs) == []  # type: ignore[arg-type]
    assert len(run.commands) == 1


def test_sizes_the_kernel_holds_get_a_mount_even_when_not_configured(tmp_path: Path) -> None:
    mounts = tmp_path / "mounts"
    mounts.write_text(MOUNTS_2M_ONLY)
    make_sysfs(tmp_path / "sys", {2048: 0, 1048576: 4})  # hugepagesz=1G hugepages=4 at boot
    run = RecordedRun()
    made = host.ensure_hugetlbfs_mounts(
        [],
        sysfs_root=str(tmp_path / "sys"),
        mounts_path=mounts,
        mount_root=tmp_path / "dev",
        systemd_run_dir=tmp_path / "no-systemd",
        run=run,  # type: ignore[arg-type]
    )
    assert made == [f"{tmp_path / 'dev' / 'hugepages1G'} (1G)"]
    assert host.held_hugepage_sizes(str(tmp_path / "sys")) == {1048576}


def test_missing_mount_becomes_an_enabled_unit_under_systemd(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[tuple[str, ...]] = []
    monkeypatch.setattr(systemd, "daemon_reload", lambda: calls.append(("daemon-reload",)))
    monkeypatch.setattr(systemd, "service_enable", lambda *a: calls.append(("enable", *a)))
    mounts = tmp_path / "mounts"
    mounts.write_text(MOUNTS_2M_ONLY)
    make_sysfs(tmp_path / "sys", {2048: 0, 1048576: 0})
    run = RecordedRun()
    made = host.ensure_hugetlbfs_mounts(
        [1048576],
        sysfs_root=str(tmp_path / "sys"),
        mounts_path=mounts,
        systemd_run_dir=tmp_path,
        unit_dir=tmp_path / "units",
        run=run,  # type: ignore[arg-type]
    )
    assert made == ["/dev/hugepages1G (1G)"]
    unit = tmp_path / "units" / "dev-hugepages1G.mount"
    assert unit.read_text() == host.render_hugetlbfs_mount_unit(1048576, Path("/dev/hugepages1G"))
    assert mode(unit) == 0o644
    assert calls == [("daemon-reload",), ("enable", "--now", "dev-hugepages1G.mount")]
    assert run.commands == []  # systemd mounts it, not a direct mount


def test_failed_mount_names_the_mount_point_and_the_consequence(tmp_path: Path) -> None:
    mounts = tmp_path / "mounts"
    mounts.write_text(MOUNTS_2M_ONLY)
    make_sysfs(tmp_path / "sys", {2048: 0, 1048576: 0})
    with pytest.raises(VmHostError) as failed:
        host.ensure_hugetlbfs_mounts(
            [1048576],
            sysfs_root=str(tmp_path / "sys"),
            mounts_path=mounts,
            mount_root=tmp_path / "dev",
            systemd_run_dir=tmp_path / "no-systemd",
            run=RecordedRun("mount: permission denied"),  # type: ignore[arg-type]
        )
    message = str(failed.value)
    assert f"on {tmp_path / 'dev' / 'hugepages1G'} failed: mount: permission denied" in message
    assert "cannot back guests with 1G pages" in message
