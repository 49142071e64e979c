"""The charm's typed inputs: its options (config.yaml) and action parameters (actions.yaml).

Pydantic models the charm loads with `load_config` and `load_params`, so a bad value is
refused with the option's name and the fix before anything on the host changes.
"""

from __future__ import annotations

import functools
import types
from collections.abc import Callable, Mapping
from typing import Literal

import pydantic

from vmhost import (
    access,
    constraints,
    exporter,
    host,
    imagecache,
    images,
    lifecycle,
    networks,
    pools,
    settings,
)
from vmhost.model import InvalidRequestError, Policy

__all__ = [
    "PER_HOST_OPTIONS",
    "CharmConfig",
    "ComposeParams",
    "ConsoleLogParams",
    "KeyParams",
    "NameParams",
    "PowerParams",
    "ReassignParams",
    "RevokeParams",
    "StopParams",
    "TrustParams",
    "load_for_host",
    "parse_networks",
    "pydantic_message",
]


def load_for_host(
    read: Callable[[], CharmConfig], unit: str, hostname: str
) -> tuple[CharmConfig | None, str]:
    """The options as this host sees them, or None and why they are invalid (naming the option).

    Args:
        read: reads the options (the charm's `load_config(CharmConfig)`).
        unit: this unit's name, for the per-host maps.
        hostname: this machine's name, likewise.
    """
    try:
        return read().for_host(unit, hostname), ""
    except pydantic.ValidationError as exc:
        return None, pydantic_message(exc)
    except InvalidRequestError as exc:
        return None, str(exc)


def pydantic_message(exc: pydantic.ValidationError) -> str:
    """Turn a pydantic error into "option: what is wrong (got X)" with hyphenated names."""
    parts = []
    for error in exc.errors():
        name = "-".join(str(p) for p in error["loc"]).replace("_", "-") or "input"
        message = error["msg"].removeprefix("Value error, ")
        given = error.get("input")
        if isinstance(given, (str, int, float, bool)) and not isinstance(given, dict):
            message = f"{message} (got {given!r})"
        parts.append(f"{name}: {message}")
    return "; ".join(parts)


def _image_name(value: str) -> str:
    """The canonical image name, or ValueError (pydantic names the option)."""
    if "/" in value:
        raise ValueError(
            f"{value!r} is a host path; give an image name (ubuntu@24.04, 24.04 or noble) or "
            "local:NAME for a file in local-image-dir"
        )
    try:
        return images.parse_name(value).name
    except InvalidRequestError as exc:
        raise ValueError(str(exc).removeprefix("image: ")) from exc


@functools.lru_cache(maxsize=4)
def parse_networks(text: str) -> Mapping[str, networks.NetworkMapping]:
    """The `networks` option, parsed once per hook (config validation and every use)."""
    return types.MappingProxyType(networks.parse_networks_config(text))


PER_HOST_OPTIONS = ("reserved_cpus", "hugepages", "networks", "allowed_host_interfaces")
"""Options that may hold a per-host map ({unit or hostname: value, "*": default})."""


class CharmConfig(pydantic.BaseModel):
    """The charm's options (config.yaml), validated before anything on the host changes."""

    model_config = pydantic.ConfigDict(frozen=True, extra="ignore")

    backend: Literal["libvirt", "lxd"] = "libvirt"
    cpu_overcommit_ratio: float = 1.0
    memory_overcommit_ratio: float = 1.0
    disk_overcommit_ratio: float = 1.0
    reserved_cpus: str = ""
    reserved_memory: int = pydantic.Field(1024, ge=0)
    hugepages: str = ""
    smt_policy: Literal["prefer", "isolate", "require"] = "prefer"
    default_storage_pool: str = ""
    default_root_disk_size: int = pydantic.Field(20, ge=1, le=65536)
    networks: str = ""
    default_network: str = ""
    allowed_host_interfaces: str = ""
    release_policy: Literal["delete", "keep"] = "delete"
    libvirt_user: str = "virsh"
    libvirt_user_adopt: bool = False
    ssh_authorized_keys: str = ""
    lxd_project: str = "vm-host"
    lxd_snap_channel: str = "5.21/stable"
    https_port: int = pydantic.Field(8443, ge=1, le=65535)
    metrics_listen: str = exporter.DEFAULT_LISTEN
    metrics_interval: int = pydantic.Field(30, ge=5, le=3600)
    local_image_dir: str = images.DEFAULT_LOCAL_DIR
    default_image: str = "ubuntu@24.04"
    image_source: str = images.DEFAULT_SOURCE
    image_keyring: str = images.DEFAULT_KEYRING
    image_source_unsigned: bool = False
    images: str = ""
    virt_type: Literal["auto", "kvm", "qemu"] = "auto"
    resource_pools: str = ""
    default_pool: str = pools.DEFAULT_POOL
    app_pools: str = ""

    @pydantic.field_validator(
        "cpu_overcommit_ratio", "memory_overcommit_ratio", "disk_overcommit_ratio"
    )
    @classmethod
    def _ratio(cls, value: float) -> float:
        if not 0 < value <= 10:
            raise ValueError("must be greater than 0 and at most 10; 1.0 means no overcommit")
        return value

    @pydantic.field_validator("reserved_cpus")
    @classmethod
    def _reserved_cpus(cls, value: str) -> str:
        settings.check_per_host("reserved-cpus", value, settings.parse_reserved_cpus)
        return value

    @pydantic.field_validator("hugepages")
    @classmethod
    def _hugepages(cls, value: str) -> str:
        settings.check_per_host("hugepages", value, settings.parse_hugepages_setting)
        return value

    @pydantic.field_validator("default_storage_pool")
    @classmethod
    def _pool(cls, value: str) -> str:
        if value:
            constraints.validate_name(value, "default-storage-pool")
        return value

    @pydantic.field_validator("networks")
    @classmethod
    def _networks(cls, value: str) -> str:
        settings.check_per_host("networks", value, parse_networks)
        return value

    @pydantic.field_validator("allowed_host_interfaces")
    @classmethod
    def _allowed_host_interfaces(cls, value: str) -> str:
        settings.check_per_host(
            "allowed-host-interfaces", value, networks.parse_allowed_interfaces
        )
        return value

    @property
    def allowed_interfaces(self) -> frozenset[str]:
        """Host interfaces relation requests may name (after for_host: this host's)."""
        return networks.parse_allowed_interfaces(self.allowed_host_interfaces)

    def for_host(self, unit: str, hostname: str) -> CharmConfig:
        """These options with this machine's entry of each per-host map (see settings)."""
        update = {}
        for name in PER_HOST_OPTIONS:
            option = name.replace("_", "-")
            update[name] = settings.for_host(option, getattr(self, name), unit, hostname)
        return self.model_copy(update=update)

    @pydantic.field_validator("resource_pools")
    @classmethod
    def _resource_pools(cls, value: str) -> str:
        pools.parse_resource_pools(value)
        return value

    @pydantic.field_validator("default_pool")
    @classmethod
    def _default_pool(cls, value: str) -> str:
        return pools.validate_pool_name(value.strip(), "default-pool")

    @pydantic.field_validator("app_pools")
    @classmethod
    def _app_pools(cls, value: str, info: pydantic.ValidationInfo) -> str:
        if "resource_pools" in info.data and "default_pool" in info.data:
            pools.load(info.data["resource_pools"], info.data["default_pool"], value)
        else:
            pools.parse_app_pools(value)
        return value

    @property
    def pool_config(self) -> pools.Pools:
        """The resource pools these options describe (parsed once per text)."""
        return pools.load(self.resource_pools, self.default_pool, self.app_pools)

    @pydantic.field_validator("default_network")
    @classmethod
    def _default_network(cls, value: str) -> str:
        value = value.strip()
        if value and not (
            constraints.SPACE_PATTERN.fullmatch(value)
            or constraints.HOST_DEVICE_PATTERN.fullmatch(value)
        ):
            raise ValueError(
                "must be a space name of the networks option or a host bridge name "
                "(letters, digits, '.', '_', '-'; at most 15 characters), or empty"
            )
        return value

    @pydantic.field_validator("libvirt_user")
    @classmethod
    def _user(cls, value: str) -> str:
        return access.validate_user_name(value)

    @pydantic.field_validator("lxd_project")
    @classmethod
    def _project(cls, value: str) -> str:
        return constraints.validate_project(value)

    @pydantic.field_validator("default_image")
    @classmethod
    def _default_image(cls, value: str) -> str:
        return _image_name(value) if value.strip() else ""

    @pydantic.field_validator("images")
    @classmethod
    def _images(cls, value: str) -> str:
        return ",".join(dict.fromkeys(_image_name(n) for n in settings.split_names(value)))

    @pydantic.field_validator("image_source")
    @classmethod
    def _image_source(cls, value: str) -> str:
        if not value.startswith(("http://", "https://", "file://")):
            raise ValueError(
                "must be an http://, https:// or file:// URL of a simplestreams tree, for "
                f"example {images.DEFAULT_SOURCE}"
            )
        return value

    @pydantic.field_validator("image_keyring")
    @classmethod
    def _image_keyring(cls, value: str) -> str:
        if not value.startswith("/"):
            raise ValueError("must be the absolute path of a GPG keyring")
        return value

    @pydantic.field_validator("local_image_dir")
    @classmethod
    def _local_image_dir(cls, value: str) -> str:
        if not value.startswith("/") or "\0" in value or ".." in value.split("/"):
            raise ValueError("must be an absolute directory path without '..'")
        return value

    @pydantic.field_validator("metrics_listen")
    @classmethod
    def _listen(cls, value: str) -> str:
        exporter.parse_listen(value)
        return value

    @property
    def exporter_settings(self) -> exporter.ExporterSettings:
        """What the metrics exporter reads (the same policy show-resources uses)."""
        return exporter.ExporterSettings(
            backend=self.backend,
            lxd_project=self.lxd_project,
            listen=self.metrics_listen,
            interval=self.metrics_interval,
            cpu_overcommit_ratio=self.cpu_overcommit_ratio,
            memory_overcommit_ratio=self.memory_overcommit_ratio,
            reserved_cpus=self.reserved_cpus,
            reserved_memory=self.reserved_memory,
            smt_policy=self.smt_policy,
            hugepages=self.hugepages,
        )

    @property
    def image_settings(self) -> imagecache.Settings:
        """Where images come from and how they are trusted (the image-* options).

        The cache pool and fetch state are the host layout's (HostLayout.image_settings).
        """
        return imagecache.Settings(
            source=images.Source(
                self.image_source, self.image_keyring, self.image_source_unsigned
            ),
            arch=images.host_arch(),
            local_dir=self.local_image_dir,
        )

    @property
    def kept_images(self) -> list[str]:
        """The images update-status keeps fetched (option images)."""
        return settings.split_names(self.images)

    @property
    def policy(self) -> Policy:
        """The placement rules these options describe."""
        return settings.make_policy(
            cpu_overcommit_ratio=self.cpu_overcommit_ratio,
            memory_overcommit_ratio=self.memory_overcommit_ratio,
            reserved_cpus=self.reserved_cpus,
            reserved_memory_mib=self.reserved_memory,
            smt_policy=self.smt_policy,
        )

    @property
    def storage_pool(self) -> str:
        """The pool for disks that name none."""
        return self.default_storage_pool or host.DEFAULT_POOL_NAME


class ComposeParams(pydantic.BaseModel):
    """Parameters of the compose-vm action (actions.yaml)."""

    model_config = pydantic.ConfigDict(frozen=True, extra="forbid", defer_build=True)

    name: str
    memory: int
    cores: int | None = None
    pinned_cores: str | int | list[int] | None = None
    """As given ("4", "2,3,6-7"); the charm hands compose_vm the library's 4 or [2, 3, 6, 7]."""
    numa_nodes: int | None = None
    hugepages: str | None = None
    storage: str | list[dict[str, object]] | None = None
    """The MAAS string as given; the charm hands compose_vm the library's list of disks."""
    interfaces: str | list[dict[str, object]] | None = None
    """The MAAS string as given; the charm hands compose_vm the library's list of NICs."""
    image: str | None = None
    user_data: str | None = None
    ssh_public_keys: str | list[str] | None = None
    """As given (comma-separated); the charm hands compose_vm the library's list."""
    hostname: str | None = None
    tags: str | list[str] | None = None
    """As given (comma-separated); the charm hands compose_vm the library's list."""
    pool: str | None = None
    dry_run: bool = False

    def as_request(self) -> dict[str, object]:
        """These parameters as a vm_host relation request, for the charm to read with the library.

        Wire keys, the action's string forms made the library's: pinned-cores 4 or [2, 3, 6, 7],
        tags and keys as lists of items given one per line or comma-separated.

        Raises:
            InvalidRequestError: pinned-cores is neither a count nor a CPU list.
        """
        count, cpus = constraints.parse_pinned_cores(self.pinned_cores)
        wire: dict[str, object] = {
            "id": "compose-vm",
            "cores": self.cores,
            "memory": self.memory,
            "pinned-cores": list(cpus) if cpus else count or None,
            "numa-nodes": self.numa_nodes,
            "hugepages": self.hugepages,
            "storage": self.storage,
            "interfaces": self.interfaces,
            "image": self.image,
            "user-data": self.user_data,
            "ssh-public-keys": _as_list(self.ssh_public_keys),
            "tags": _as_list(self.tags),
            "pool": self.pool,
            "hostname": self.hostname,
        }
        return {k: v for k, v in wire.items() if v is not None and v != ""}

    def read_by(
        self, read_request: Callable[[Mapping[str, object]], Mapping[str, object]]
    ) -> ComposeParams:
        """These parameters as `read_request` (the vm_host library's reading) reads as_request.

        The fields whose form the reading changes take its wire form: what the workload gets.

        Raises:
            ValueError: the reading refused them, naming the field.
            InvalidRequestError: pinned-cores is neither a count nor a CPU list.
        """
        request = read_request(self.as_request())
        return self.model_copy(
            update={key.replace("-", "_"): request.get(key) for key in _READ_BY_LIBRARY}
        )


_READ_BY_LIBRARY = ("pinned-cores", "storage", "interfaces", "ssh-public-keys", "tags")
"""The compose-vm parameters whose form the library's reading changes."""


def _as_list(value: str | list[str] | None) -> list[str] | None:
    return constraints.split_items(value) if isinstance(value, str) else value


class ListVmsParams(pydantic.BaseModel):
    """Parameters of list-vms: filters, each optional."""

    model_config = pydantic.ConfigDict(frozen=True, extra="forbid", defer_build=True)

    owner: str | None = None
    tag: str | None = None
    state: Literal["pending", "running", "stopped", "failed"] | None = None
    pool: str | None = None


class ReassignParams(pydantic.BaseModel):
    """Parameters of reassign-vm (actions.yaml)."""

    model_config = pydantic.ConfigDict(frozen=True, extra="forbid", defer_build=True)

    app: str
    id: str
    relation_id: int | None = None


class NameParams(pydantic.BaseModel):
    """Parameters of actions that take only a name (delete-vm, remove-trusted-client, ...)."""

    model_config = pydantic.ConfigDict(frozen=True, extra="forbid", defer_build=True)

    name: str


class ConsoleLogParams(pydantic.BaseModel):
    """Parameters of console-log."""

    model_config = pydantic.ConfigDict(frozen=True, extra="forbid", defer_build=True)

    name: str
    lines: int = pydantic.Field(100, ge=1, le=100_000)


class PowerParams(pydantic.BaseModel):
    """Parameters of start-vm."""

    model_config = pydantic.ConfigDict(frozen=True, extra="forbid", defer_build=True)

    name: str
    owner: str | None = None


class StopParams(PowerParams):
    """Parameters of stop-vm and restart-vm."""

    timeout: int = pydantic.Field(lifecycle.DEFAULT_STOP_TIMEOUT_S, ge=1)
    force: bool = False

    @pydantic.field_validator("timeout")
    @classmethod
    def _timeout(cls, value: int) -> int:
        if value > lifecycle.MAX_STOP_TIMEOUT_S:
            raise ValueError(f"must be at most {lifecycle.MAX_STOP_TIMEOUT_S} seconds")
        return value


class KeyParams(pydantic.BaseModel):
    """Parameters of authorize-ssh-key."""

    model_config = pydantic.ConfigDict(frozen=True, extra="forbid", defer_build=True)

    name: str
    key: str


class RevokeParams(pydantic.BaseModel):
    """Parameters of revoke-ssh-key."""

    model_config = pydantic.ConfigDict(frozen=True, extra="forbid", defer_build=True)

    key: str


class TrustParams(pydantic.BaseModel):
    """Parameters of add-trusted-client."""

    model_config = pydantic.ConfigDict(frozen=True, extra="forbid", defer_build=True)

    name: str
    certificate: str


class SyncImagesParams(pydantic.BaseModel):
    """Parameters of sync-images."""

    model_config = pydantic.ConfigDict(frozen=True, extra="forbid", defer_build=True)

    names: str = ""
