"""Host setup for a libvirt VM host: packages, libvirtd configuration, daemon, huge pages.

Nothing here imports ops; the charm calls these functions from its reconcile loop and the tests
call them directly. Every function is idempotent so a re-run hook changes nothing.
"""

from __future__ import annotations

import dataclasses
import enum
import logging
import os
import platform
import subprocess
import tempfile
from collections.abc import Callable, Iterable
from pathlib import Path

import jinja2
from charmlibs import apt, systemd

from vmhost.model import VmHostError
from vmhost.settings import HugepageSetting

logger = logging.getLogger(__name__)

DEFAULT_POOL_NAME = "vm-host"
"""Storage pool used for disks that name no pool."""
DEFAULT_POOL_PATH = "/var/lib/vm-host/images"
"""Directory of the default pool; the libvirt backend's ensure_pool creates it."""

LIBVIRTD_CONF_PATH = Path("/etc/libvirt/libvirtd.conf")
LIBVIRTD_SERVICE = "libvirtd"
MANAGED_BY = "Managed by the vm-host charm."

SYSTEMD_RUN_DIR = Path("/run/systemd/system")
"""Exists exactly when systemd is PID 1 (sd_booted(3))."""


def packages_for_arch(machine: str | None = None) -> list[str]:
    """Return the Debian/Ubuntu packages a libvirt VM host needs on this architecture.

    QEMU's system emulator package is named after the architecture family; the rest is common.
    genisoimage builds the cloud-init NoCloud seed images.
    """
    machine = machine or platform.machine()
    qemu = "qemu-system-arm" if machine in ("aarch64", "arm64") else "qemu-system-x86"
    return [
        "libvirt-daemon-system",
        "libvirt-clients",
        qemu,
        "qemu-utils",
        "genisoimage",
        "gpgv",
    ]


IMAGE_KEYRING_PACKAGES = ("ubuntu-cloudimage-keyring", "ubuntu-keyring")
"""The package holding /usr/share/keyrings/ubuntu-cloudimage-keyring.gpg: Ubuntu's own, then
Debian's (which ships the same keyring in ubuntu-keyring)."""


def install_packages() -> None:
    """Install the hypervisor packages through apt (a no-op when they are present).

    Raises:
        VmHostError: apt failed; the message carries apt's reason.
    """
    packages = packages_for_arch()
    try:
        apt.add_package(packages, update_cache=True)
    except (apt.PackageError, apt.PackageNotFoundError) as e:
        raise VmHostError(f"installing {', '.join(packages)} failed: {e}") from e
    install_image_keyring()


def install_image_keyring() -> str | None:
    """Install the Ubuntu cloud image keyring (image-keyring's default); return the package.

    None when neither package exists here: fetching then says the keyring is missing and
    names image-keyring, so an offline mirror can bring its own key.
    """
    for package in IMAGE_KEYRING_PACKAGES:
        try:
            apt.add_package(package)
        except (apt.PackageError, apt.PackageNotFoundError, KeyError) as e:
            # KeyError: charmlibs.apt on a package apt knows of but has no candidate for
            # (Debian lists ubuntu-keyring without a version).
            logger.info("image keyring package %s not installed: %r", package, e)
            continue
        return package
    logger.warning("no package of %s could be installed", ", ".join(IMAGE_KEYRING_PACKAGES))
    return None


def render_libvirtd_conf(templates_dir: Path) -> str:
    """Render libvirtd.conf so the "libvirt" group reaches the read-write socket without polkit."""
    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(str(templates_dir)),
        autoescape=False,  # noqa: S701 - a config file, not markup; no request data reaches it
        undefined=jinja2.StrictUndefined,
        keep_trailing_newline=True,
    )
    return env.get_template("libvirtd.conf.j2").render(managed_by=MANAGED_BY)


def write_if_changed(path: Path, content: str, mode: int = 0o644) -> bool:
    """Write a file atomically when its content differs; return whether it changed.

    The temporary file lives in the same directory, so the rename is atomic and a reader never
    sees half a file. The mode is applied even when the content is already right, so a file
    whose permissions drifted is repaired without counting as a change (no daemon restart).
    """
    data = content.encode()
    try:
        current = path.read_bytes()
    except FileNotFoundError:
        current = None
    if current == data:
        if (path.stat().st_mode & 0o7777) != mode:
            path.chmod(mode)
        return False
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return True


class DaemonManager(enum.StrEnum):
    """Who keeps libvirtd running."""

    SYSTEMD = "systemd"
    SNAP = "snap"
    EXTERNAL = "external"
    """Running, started by someone else (tests, an adopted host): used as it is."""
    NONE = "none"
    """Not running and no systemd to start it."""


@dataclasses.dataclass(frozen=True)
class DaemonState:
    """What ensure_libvirtd found and did, for status and logs."""

    running: bool
    manager: DaemonManager
    restarted: bool = False
    message: str = ""


def process_running(name: str, proc_root: Path = Path("/proc")) -> bool:
    """Return whether a process with this command name exists (what pgrep -x does)."""
    for entry in proc_root.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if (entry / "comm").read_text().strip() == name:
                return True
        except OSError:
            continue  # the process ended while we looked
    return False


def ensure_libvirtd(
    config_changed: bool,
    *,
    systemd_run_dir: Path = SYSTEMD_RUN_DIR,
    is_running: Callable[[], bool] | None = None,
) -> DaemonState:
    """Make sure libvirtd runs with the current configuration, touching it as little as possible.

    Under systemd the unit is enabled and restarted only when the configuration changed (or it
    is down), so a hook that changes nothing never interrupts the daemon. Without systemd the
    charm never daemonizes libvirtd itself: a running daemon is used as it is, and a missing one
    is reported so the operator (or the test harness) can start it.

    Args:
        config_changed: whether libvirtd.conf was just rewritten.
        systemd_run_dir: the directory whose existence means systemd is PID 1.
        is_running: probe for a running libvirtd; defaults to a /proc scan.
    """
    running = (is_running or (lambda: process_running("libvirtd")))()
    if systemd_run_dir.is_dir():
        try:
            systemd.service_enable(LIBVIRTD_SERVICE)
            if config_changed or not systemd.service_running(LIBVIRTD_SERVICE):
                systemd.service_restart(LIBVIRTD_SERVICE)
                return DaemonState(True, DaemonManager.SYSTEMD, True, "libvirtd restarted")
        except systemd.SystemdError as e:
            return DaemonState(False, DaemonManager.SYSTEMD, False, f"libvirtd: {e}")
        return DaemonState(True, DaemonManager.SYSTEMD, False, "libvirtd running")
    if running:
        message = "libvirtd running (not managed by systemd; used as it is)"
        if config_changed:
            message += "; restart it to apply the new libvirtd.conf"
        return DaemonState(True, DaemonManager.EXTERNAL, False, message)
    return DaemonState(
        False,
        DaemonManager.NONE,
        False,
        "libvirtd is not running and there is no systemd to start it",
    )


def _hugepage_file(size_kib: int, node: int | None, sysfs_root: str) -> Path:
    if node is None:
        base = Path(sysfs_root) / "kernel/mm/hugepages"
    else:
        base = Path(sysfs_root) / f"devices/system/node/node{node}/hugepages"
    return base / f"hugepages-{size_kib}kB" / "nr_hugepages"


def _existing_hugepage_file(size_kib: int, node: int | None, sysfs_root: str) -> Path:
    path = _hugepage_file(size_kib, node, sysfs_root)
    if not path.exists():
        where = "this host" if node is None else f"NUMA node {node}"
        raise VmHostError(
            f"hugepages: {size_kib} KiB pages are not available on {where} ({path} missing)"
        )
    return path


def hugepages_now(size_kib: int, node: int | None = None, sysfs_root: str = "/sys") -> int:
    """Return how many huge pages of one size the kernel holds (host-wide or on one node).

    Raises:
        VmHostError: the kernel has no such page size or node.
    """
    return int(_existing_hugepage_file(size_kib, node, sysfs_root).read_text().strip())


def set_hugepages(
    size_kib: int, count: int, node: int | None = None, sysfs_root: str = "/sys"
) -> int:
    """Ask the kernel for `count` huge pages of one size and return how many it granted.

    The kernel grants fewer when memory is fragmented; the caller must use the returned number
    (and the allocator reads free pages from the host anyway), never the requested one.

    Args:
        size_kib: page size in KiB (2048, 1048576).
        count: pages wanted, host-wide (node None) or on one NUMA node.
        node: NUMA node id, or None for the host-wide pool.
        sysfs_root: root of sysfs (a temporary tree in tests).

    Raises:
        VmHostError: the count is negative, or the kernel has no such page size or node.
    """
    if count < 0:
        raise VmHostError(f"hugepages: count must be 0 or more, got {count}")
    path = _existing_hugepage_file(size_kib, node, sysfs_root)
    path.write_text(f"{count}\n")
    granted = int(path.read_text().strip())
    if granted < count:
        logger.warning("kernel granted %d of %d %d KiB huge pages", granted, count, size_kib)
    return granted


def reserve_hugepages(settings: Iterable[HugepageSetting]) -> None:
    """Ask the kernel for each configured size and count (what it grants shows in status)."""
    for setting in settings:
        try:
            set_hugepages(setting.size_kib, setting.count, setting.node)
        except VmHostError as exc:
            logger.warning("%s", exc)


def hugepage_problems(settings: Iterable[HugepageSetting], sysfs_root: str = "/sys") -> list[str]:
    """What the kernel holds short of the configured reservations, one sentence each."""
    problems = []
    for setting in settings:
        try:
            held = hugepages_now(setting.size_kib, setting.node, sysfs_root)
        except VmHostError as exc:
            problems.append(str(exc))
            continue
        if held < setting.count:
            where = "host-wide" if setting.node is None else f"on node {setting.node}"
            problems.append(
                f"kernel granted {held} of {setting.count} huge pages of "
                f"{setting.size_kib // 1024} MiB {where}"
            )
    return problems


PROC_MOUNTS = Path("/proc/mounts")
SYSTEMD_UNIT_DIR = Path("/etc/systemd/system")
HUGETLBFS_ROOT = Path("/dev")
"""Where missing hugetlbfs mounts go: /dev/hugepages (2M, systemd's own) and /dev/hugepages1G."""


def _pagesize_kib(value: str) -> int | None:
    """A hugetlbfs `pagesize=` value as the kernel prints it ("2M", "1024M", "1G") in KiB."""
    units = {"K": 1, "M": 1024, "G": 1024 * 1024}
    value = value.strip().upper()
    if value[-1:] in units and value[:-1].isdigit():
        return int(value[:-1]) * units[value[-1]]
    return int(value) // 1024 if value.isdigit() else None


def hugetlbfs_mounts(mounts_text: str, default_kib: int = 2048) -> dict[int, str]:
    """Page size (KiB) to mount point of every hugetlbfs mount in a /proc/mounts text.

    A mount without `pagesize=` holds the default huge page size (`default_kib`).
    """
    found: dict[int, str] = {}
    for line in mounts_text.splitlines():
        fields = line.split()
        if len(fields) < 4 or fields[2] != "hugetlbfs":
            continue
        size: int | None = default_kib
        for option in fields[3].split(","):
            if option.startswith("pagesize="):
                size = _pagesize_kib(option.removeprefix("pagesize="))
        if size is not None:
            found.setdefault(size, fields[1])
    return found


def held_hugepage_sizes(sysfs_root: str = "/sys") -> set[int]:
    """Page sizes (KiB) of which the kernel holds pages now, host-wide (any node)."""
    sizes = set()
    for entry in (Path(sysfs_root) / "kernel/mm/hugepages").glob("hugepages-*kB"):
        try:
            count = int((entry / "nr_hugepages").read_text().strip())
        except (OSError, ValueError):
            continue
        if count > 0:
            sizes.add(int(entry.name.removeprefix("hugepages-").removesuffix("kB")))
    return sizes


def _size_label(size_kib: int) -> str:
    return f"{size_kib // 1048576}G" if size_kib % 1048576 == 0 else f"{size_kib // 1024}M"


def hugetlbfs_mount_point(size_kib: int, root: Path = HUGETLBFS_ROOT) -> Path:
    """Where vm-host mounts hugetlbfs for one page size (2M: systemd's /dev/hugepages)."""
    return root / ("hugepages" if size_kib == 2048 else f"hugepages{_size_label(size_kib)}")


def mount_unit_name(where: Path) -> str:
    """The systemd mount unit for a mount point ("/dev/hugepages1G": "dev-hugepages1G.mount")."""
    return "-".join(part for part in where.parts if part != "/") + ".mount"


def render_hugetlbfs_mount_unit(size_kib: int, where: Path) -> str:
    """A systemd mount unit that mounts hugetlbfs of one page size, before libvirtd starts."""
    label = _size_label(size_kib)
    return (
        f"# {MANAGED_BY}\n"
        "[Unit]\n"
        f"Description=Huge pages of {label} for libvirt guests (vm-host)\n"
        "DefaultDependencies=no\n"
        "Before=sysinit.target libvirtd.service\n"
        f"ConditionPathExists=/sys/kernel/mm/hugepages/hugepages-{size_kib}kB\n"
        "\n"
        "[Mount]\n"
        "What=hugetlbfs\n"
        f"Where={where}\n"
        "Type=hugetlbfs\n"
        f"Options=pagesize={label}\n"
        "\n"
        "[Install]\n"
        "WantedBy=sysinit.target\n"
    )


def ensure_hugetlbfs_mounts(
    sizes: Iterable[int],
    *,
    sysfs_root: str = "/sys",
    mounts_path: Path = PROC_MOUNTS,
    mount_root: Path = HUGETLBFS_ROOT,
    systemd_run_dir: Path = SYSTEMD_RUN_DIR,
    unit_dir: Path = SYSTEMD_UNIT_DIR,
    run: Callable[..., subprocess.CompletedProcess[str]] = subprocess.run,
) -> list[str]:
    """Mount hugetlbfs for each page size libvirt may back guests with and has no mount for.

    libvirt backs a guest's memory with huge pages of one size only from a hugetlbfs mount of
    that size, found when libvirtd starts ("Unable to find any usable hugetlbfs mount"), and
    systemd mounts only the default size (/dev/hugepages). The sizes looked at are `sizes`
    (the `hugepages` option's) and every size the kernel holds pages of (a kernel command line
    `hugepagesz=1G hugepages=...`). Under systemd each missing mount becomes a mount unit,
    enabled so it is back before libvirtd after a reboot; without systemd it is mounted
    directly. Returns the mounts made ("/dev/hugepages1G (1G)"): libvirtd must restart to
    see them. Mounts that exist, of any path, are left alone.

    Raises:
        VmHostError: a mount failed; the message names it and the reason.
    """
    try:
        mounts = hugetlbfs_mounts(mounts_path.read_text())
    except OSError as exc:
        raise VmHostError(f"hugepages: cannot read {mounts_path}: {exc}") from exc
    wanted = set(sizes) | held_hugepage_sizes(sysfs_root)
    made = []
    for size_kib in sorted(wanted - set(mounts)):
        label = _size_label(size_kib)
        where = hugetlbfs_mount_point(size_kib, mount_root)
        try:
            if systemd_run_dir.is_dir():
                unit = mount_unit_name(where)
                write_if_changed(unit_dir / unit, render_hugetlbfs_mount_unit(size_kib, where))
                systemd.daemon_reload()
                systemd.service_enable("--now", unit)
            else:
                where.mkdir(parents=True, exist_ok=True)
                run(
                    [
                        "mount",
                        "-t",
                        "hugetlbfs",
                        "-o",
                        f"pagesize={label}",
                        "hugetlbfs",
                        str(where),
                    ],
                    check=True,
                    capture_output=True,
                    text=True,
                )
        except subprocess.CalledProcessError as exc:
            reason = (exc.stderr or "").strip() or f"exit {exc.returncode}"
            raise VmHostError(
                f"hugepages: mounting hugetlbfs (pagesize={label}) on {where} failed: {reason}; "
                f"libvirt cannot back guests with {label} pages until it is mounted"
            ) from exc
        except (systemd.SystemdError, OSError) as exc:
            raise VmHostError(
                f"hugepages: mounting hugetlbfs (pagesize={label}) on {where} failed: {exc}; "
                f"libvirt cannot back guests with {label} pages until it is mounted"
            ) from exc
        logger.info("mounted hugetlbfs (pagesize=%s) on %s for libvirt", label, where)
        made.append(f"{where} ({label})")
    return made


def reload_sshd(systemd_run_dir: Path = SYSTEMD_RUN_DIR) -> bool:
    """Reload sshd so a changed vm-host drop-in applies; returns whether it was reloaded.

    Ubuntu names the unit "ssh", other distributions "sshd". Without systemd the sshd that
    runs was started by someone else, who must reload it; that is logged, not forced.
    """
    if systemd_run_dir.is_dir():
        from charmlibs import systemd

        for unit in ("ssh", "sshd"):
            try:
                systemd.service_reload(unit)
            except systemd.SystemdError:
                continue
            return True
        logger.warning("could not reload ssh or sshd through systemd")
        return False
    logger.info("sshd drop-in changed; no systemd here, reload sshd to apply it")
    return False


SNAPD_SOCKET = Path("/run/snapd.socket")
BACKEND_MARKER = Path("/var/lib/vm-host/backend")
"""Records the backend chosen at install: VMs of the other one would be stranded by a switch."""


def ensure_lxd(channel: str, *, install: bool, snapd_socket: Path = SNAPD_SOCKET) -> DaemonState:
    """Install LXD from the snap where snapd exists, or adopt an LXD that already runs.

    The snap is installed or moved to `channel` only when `install` is set (install and
    upgrade hooks), so ordinary hooks never refresh LXD under running VMs.
    """
    from vmhost.lxd_trust import LxdError, find_socket

    if snapd_socket.exists() and install:
        from charmlibs import snap

        try:
            snap.ensure_installed("lxd", channel)
        except snap.Error as exc:
            return DaemonState(False, DaemonManager.SNAP, message=f"lxd snap ({channel}): {exc}")
    try:
        find_socket()
    except LxdError as exc:
        hint = "" if snapd_socket.exists() else "; snapd is absent: install and start LXD"
        return DaemonState(False, DaemonManager.NONE, message=f"{exc}{hint}")
    manager = DaemonManager.SNAP if snapd_socket.exists() else DaemonManager.EXTERNAL
    return DaemonState(True, manager, message="LXD running")


def check_backend_choice(backend: str, marker: Path = BACKEND_MARKER) -> str | None:
    """Record the backend on first use; return the recorded one when `backend` differs."""
    try:
        recorded = marker.read_text().strip()
    except FileNotFoundError:
        write_if_changed(marker, f"{backend}\n", 0o644)
        return None
    return None if recorded == backend else recorded


def recorded_backend(marker: Path = BACKEND_MARKER) -> str | None:
    """The backend this host was installed with, None before the first install."""
    try:
        return marker.read_text().strip() or None
    except FileNotFoundError:
        return None


def setup_libvirt(
    hugepage_sizes_kib: Iterable[int],
    templates_dir: Path,
    *,
    install: bool,
    progress: Callable[[str], None] = lambda _: None,
) -> DaemonState:
    """Install (on install and upgrade) and configure libvirt; restart only on a change.

    The hugetlbfs mounts libvirt backs huge-page guests from (one per page size) count as its
    configuration: libvirtd finds them only when it starts.
    """
    if install:
        progress("installing libvirt and QEMU")
        install_packages()
    changed = write_if_changed(LIBVIRTD_CONF_PATH, render_libvirtd_conf(templates_dir), 0o644)
    try:
        mounted = ensure_hugetlbfs_mounts(list(hugepage_sizes_kib))
    except VmHostError as exc:
        logger.warning("%s", exc)
        mounted = []
    if mounted:
        logger.info("hugetlbfs mounted for libvirt: %s", ", ".join(mounted))
    daemon = ensure_libvirtd(changed or bool(mounted))
    if not daemon.running:
        logger.warning("%s", daemon.message)
    return daemon
