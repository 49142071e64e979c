"""An in-memory backend for charm unit tests: same protocol, no hypervisor."""

from __future__ import annotations

import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

from vmhost import imagecache, images
from vmhost.backends import BackendUnavailableError
from vmhost.constraints import spec_hash
from vmhost.model import (
    HostTopology,
    NicAttachment,
    Placement,
    StoragePool,
    VmHostError,
    VmRecord,
    VmSpec,
    VmState,
    VmStats,
)


@dataclass
class FakeImageStore:
    """An image pool in a dict: add_image keeps the volume name it is given and records it."""

    directory: Path
    bases: dict[str, images.CachedImage] = field(default_factory=dict)
    users: dict[str, list[str]] = field(default_factory=dict)
    """What image_users returns (set by the test)."""
    calls: list[str] = field(default_factory=list)

    def cached_images(self) -> list[images.CachedImage]:
        return sorted(self.bases.values(), key=lambda b: (b.name, images.version_key(b.version)))

    def staging_dir(self) -> Path:
        path = self.directory / "staging"
        path.mkdir(parents=True, exist_ok=True)
        return path

    def add_image(self, file: Path, volume: str) -> images.CachedImage:
        self.calls.append(f"add:{volume}")
        target = self.directory / volume
        file.replace(target)
        base = images.parse_base_volume(volume, str(target), target.stat().st_size)
        assert base is not None
        self.bases[volume] = base
        return base

    def remove_image(self, volume: str) -> None:
        self.calls.append(f"remove:{volume}")
        del self.bases[volume]

    def image_users(self) -> dict[str, list[str]]:
        return self.users

    def cache(self, name: str, version: str = "20261201", sha256: str = "a" * 64) -> None:
        """Put a base in the pool as if it had been fetched."""
        image = images.parse_name(name)
        volume = images.base_volume_name(image, "x86_64", version, sha256)
        base = images.parse_base_volume(volume, str(self.directory / volume), 10_000_000)
        assert base is not None
        self.bases[volume] = base


@dataclass
class FakeBackend:
    """Keeps VMs and pools in dicts; records every call so tests can assert on them."""

    host: HostTopology
    reachable: bool = True
    virt_type: str | None = None
    fail_compose: str = ""
    """When set, compose raises VmHostError with this text (after validating nothing)."""
    vms: dict[str, VmRecord] = field(default_factory=dict)
    pools: dict[str, StoragePool] = field(default_factory=dict)
    calls: list[str] = field(default_factory=list)
    name: str = "libvirt"
    stats: list[VmStats] = field(default_factory=list)
    """What vm_stats returns (set by the test)."""
    orphans: list[str] = field(default_factory=list)
    """Messages the next recover() returns (what a killed compose left, set by the test)."""
    recovered: list[str] = field(default_factory=list)
    images: FakeImageStore | None = None
    """The image cache (None: like LXD, the hypervisor resolves image names itself)."""

    def image_store(self) -> FakeImageStore | None:
        return self.images

    image_waits: dict[str, str] = field(default_factory=dict)
    """Without an image cache (like LXD): what prepare_image answers per name (set by the
    test; absent means ready)."""

    def prepare_image(
        self,
        name: str,
        settings: imagecache.Settings,
        *,
        wait: bool,
        log: Callable[[str], None] | None = None,
    ) -> str | None:
        self._check()
        self.calls.append(f"prepare_image:{name}:{'wait' if wait else 'background'}")
        if self.images is not None:  # the real cache code on the fake pool
            if wait:
                imagecache.ensure(self.images, name, settings, log=log)
                return None
            return imagecache.background(self.images, settings, name)
        return None if wait else self.image_waits.get(name)

    def probe_image(self, name: str, settings: imagecache.Settings) -> str:
        self._check()
        self.calls.append(f"probe_image:{name}")
        if self.images is not None:  # the real cache code on the fake pool
            return imagecache.probe(self.images, name, settings)
        return f"{name}: ready (fake store)"

    ignores_acpi: set[str] = field(default_factory=set)
    """VMs whose guest does not answer a shutdown request (stop needs the plug pulled)."""
    consoles: dict[str, str] = field(default_factory=dict)
    """What each VM printed on its serial console (set by the test)."""
    learnt: dict[str, dict[str, list[str]]] = field(default_factory=dict)
    """What guest_addresses returns: VM name -> MAC -> addresses (set by the test)."""
    composed: dict[str, tuple[VmSpec, tuple[NicAttachment, ...]]] = field(default_factory=dict)
    """Name -> the spec and NICs compose was called with."""

    def _check(self) -> None:
        if not self.reachable:
            raise BackendUnavailableError("cannot connect to qemu:///system (fake: down)")

    def version(self) -> str:
        self._check()
        return "9.0.0"

    def topology(self) -> HostTopology:
        self._check()
        self.calls.append("topology")
        return replace(self.host, pools=tuple(self.pools.values()))

    def list_vms(self) -> list[VmRecord]:
        self._check()
        self.calls.append("list_vms")
        return sorted(self.vms.values(), key=lambda v: v.name)

    def ensure_pool(self, name: str, path: str) -> None:
        self._check()
        self.calls.append(f"ensure_pool:{name}")
        self.pools.setdefault(
            name,
            StoragePool(
                name=name, capacity_bytes=100 * 10**9, available_bytes=100 * 10**9, path=path
            ),
        )

    def ensure_project(self, project: str | None = None, storage_pool: str = "default") -> bool:
        self._check()
        self.calls.append(f"ensure_project:{project}:{storage_pool}")
        return False

    def compose(
        self,
        spec: VmSpec,
        placement: Placement,
        nics: Sequence[NicAttachment],
        default_pool: str,
    ) -> VmRecord:
        self._check()
        self.calls.append(f"compose:{spec.name}")
        self.composed[spec.name] = (spec, tuple(nics))
        if self.fail_compose:
            raise VmHostError(self.fail_compose)
        if spec.name in self.vms:
            raise VmHostError(f"domain {spec.name} exists")
        record = VmRecord(
            name=spec.name,
            uuid=str(uuid.uuid5(uuid.NAMESPACE_DNS, spec.name)),
            state=VmState.RUNNING,
            placement=placement,
            owner=spec.owner,
            request_id=spec.request_id,
            spec_hash=spec_hash(spec),
            volumes=tuple(f"{d.pool or default_pool}/{spec.name}-{d.label}" for d in spec.disks),
            tags=spec.tags,
            pool=spec.pool,
            interfaces=tuple(
                {
                    "label": n.label,
                    "mac": n.mac or f"52:54:00:00:00:{i:02x}",
                    "attached-to": n.source,
                    **({"ip": n.ip} if n.ip else {}),
                    **({"space": n.space} if n.space else {}),
                    **({"subnet": n.subnet} if n.subnet else {}),
                }
                for i, n in enumerate(nics)
            ),
            autostart=True,
        )
        self.vms[spec.name] = record
        return record

    def delete(self, name: str) -> list[str]:
        self._check()
        self.calls.append(f"delete:{name}")
        if name not in self.vms:
            raise VmHostError(f"no domain {name}")
        return list(self.vms.pop(name).volumes)

    def set_owner(self, name: str, owner: str) -> None:
        self._check()
        self.calls.append(f"set_owner:{name}:{owner}")
        if name not in self.vms or not self.vms[name].managed:
            raise VmHostError(f"no vm-host domain {name}")
        self.vms[name] = replace(self.vms[name], owner=owner)

    def _get(self, name: str) -> VmRecord:
        self._check()
        if name not in self.vms:
            raise VmHostError(f"VM {name!r} does not exist on this host")
        return self.vms[name]

    def recover(self) -> list[str]:
        self._check()
        self.calls.append("recover")
        found, self.orphans = self.orphans, []
        self.recovered += found
        return found

    def recent_recoveries(self) -> list[str]:
        return list(self.recovered)

    def console_log(self, name: str, lines: int = 100) -> str:
        self._check()
        self.calls.append(f"console_log:{name}:{lines}")
        if name not in self.vms:
            raise VmHostError(f"VM {name!r} does not exist on this host")
        return "\n".join(self.consoles.get(name, "").splitlines()[-lines:])

    def guest_addresses(self, names: Sequence[str]) -> dict[str, dict[str, list[str]]]:
        self._check()
        self.calls.append(f"guest_addresses:{','.join(names)}")
        return {n: dict(self.learnt[n]) for n in names if n in self.learnt}

    def vm_stats(self) -> list[VmStats]:
        self._check()
        self.calls.append("vm_stats")
        return list(self.stats)

    def start(self, name: str) -> None:
        self.calls.append(f"start:{name}")
        self.vms[name] = replace(self._get(name), state=VmState.RUNNING)

    def stop(self, name: str, timeout_s: float = 30.0, *, then_destroy: bool = True) -> bool:
        self.calls.append(f"stop:{name}:{timeout_s:g}:{'destroy' if then_destroy else 'wait'}")
        vm = self._get(name)
        ignored = vm.state is VmState.RUNNING and name in self.ignores_acpi and timeout_s > 0
        if ignored and not then_destroy:
            return False
        self.vms[name] = replace(vm, state=VmState.STOPPED)
        return True

    def set_autostart(self, name: str, enabled: bool) -> None:
        self.calls.append(f"autostart:{name}:{'on' if enabled else 'off'}")
        self.vms[name] = replace(self._get(name), autostart=enabled)
