"""A fake sysfs (and procfs) tree, built by the test in a temporary directory.

It holds the files vmhost.networks.discover_nics reads, so discovery runs on the test's host
description and never on the machine's /sys.
"""

from __future__ import annotations

import os
from pathlib import Path

from vmhost.model import HostNic
from vmhost.networks import discover_nics


class FakeSys:
    """A minimal /sys (and /proc) tree with the files discover_nics reads."""

    def __init__(self, root: Path):
        self.root = root
        self.net = root / "sys" / "class" / "net"
        self.devices = root / "sys" / "devices"
        self.proc = root / "proc"
        self.net.mkdir(parents=True)
        self.devices.mkdir(parents=True)

    def nic(
        self,
        name: str,
        *,
        mac: str | None = "52:54:00:00:00:01",
        pci: bool = False,
        numa: int | None = None,
        total_vfs: int | None = None,
        num_vfs: int | None = None,
        devtype: str | None = None,
        master: str | None = None,
        lower: str | None = None,
        bridge: bool = False,
        bonding: bool = False,
        physfn: str | None = None,
        operstate: str | None = None,
        speed: int | None = None,
    ) -> Path:
        path = self.net / name
        path.mkdir()
        if operstate is not None:
            (path / "operstate").write_text(operstate + "\n")
        if speed is not None:
            (path / "speed").write_text(f"{speed}\n")
        lines = [f"INTERFACE={name}", "IFINDEX=1"]
        if devtype:
            lines.insert(0, f"DEVTYPE={devtype}")
        (path / "uevent").write_text("\n".join(lines) + "\n")
        if mac is not None:
            (path / "address").write_text(mac + "\n")
        for flag, subdir in ((bridge, "bridge"), (bridge, "brif"), (bonding, "bonding")):
            if flag:
                (path / subdir).mkdir()
        if master:
            os.symlink(f"../{master}", path / "master")
            os.symlink(f"../{master}", path / f"upper_{master}")
        if lower:
            os.symlink(f"../{lower}", path / f"lower_{lower}")
        if pci or physfn:
            values = {"numa_node": numa, "sriov_totalvfs": total_vfs, "sriov_numvfs": num_vfs}
            self._device(path, values, physfn)
        return path

    def _device(self, path: Path, values: dict[str, int | None], physfn: str | None) -> None:
        dev = self.devices / f"pci-{path.name}"
        (dev / "net" / path.name).mkdir(parents=True)
        for filename, value in values.items():
            if value is not None:
                (dev / filename).write_text(f"{value}\n")
        if physfn:
            os.symlink(self.devices / f"pci-{physfn}", dev / "physfn")
        os.symlink(dev, path / "device")

    def proc_vlan(self, name: str, text: str) -> None:
        (self.proc / "net" / "vlan").mkdir(parents=True, exist_ok=True)
        (self.proc / "net" / "vlan" / name).write_text(text)

    def discover(
        self,
        addresses: dict[str, tuple[str, ...]] | None = None,
        vlan_links: dict[str, tuple[int, str | None]] | None = None,
    ) -> tuple[HostNic, ...]:
        return discover_nics(
            self.root / "sys",
            {} if addresses is None else addresses,
            proc_root=self.proc,
            vlan_links={} if vlan_links is None else vlan_links,
        )
