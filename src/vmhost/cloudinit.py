"""cloud-init data for a VM: user data with its SSH keys, and network config by MAC.

Both backends hand the same documents to the guest (libvirt in a NoCloud seed image, LXD in
cloud-init.* keys), so a VM is configured the same way wherever it runs.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import yaml

from vmhost.constraints import guest_interface_name
from vmhost.model import InvalidRequestError, NicAttachment, VmSpec


def needs_cloud_init(spec: VmSpec, nics: Sequence[NicAttachment]) -> bool:
    """Whether the VM gets any cloud-init data (user data, SSH keys or a static address)."""
    return bool(spec.user_data or spec.ssh_public_keys or any(n.ip for n in nics))


def user_data(spec: VmSpec) -> str:
    """The user data, with the request's SSH keys merged into #cloud-config.

    Raises:
        InvalidRequestError: keys given with user data that is not #cloud-config, or
            #cloud-config that is not a YAML mapping.
    """
    text = spec.user_data or "#cloud-config\n"
    if not spec.ssh_public_keys:
        return text
    if not text.startswith("#cloud-config"):
        raise InvalidRequestError(
            "ssh-public-keys",
            "can only be combined with #cloud-config user-data; put the keys in the "
            "user-data instead",
        )
    config = yaml.safe_load(text) or {}
    if not isinstance(config, dict):
        raise InvalidRequestError("user-data", "#cloud-config must be a YAML mapping")
    keys: list[Any] = list(config.get("ssh_authorized_keys") or [])  # pyright: ignore[reportUnknownArgumentType]
    keys += [k for k in spec.ssh_public_keys if k not in keys]
    config["ssh_authorized_keys"] = keys
    return "#cloud-config\n" + yaml.safe_dump(config, sort_keys=False)


def network_config(nics: Sequence[NicAttachment]) -> str:
    """Network config version 2, matching each NIC by MAC (not by the guest's device names).

    NICs without a static address use DHCP.
    """
    ethernets: dict[str, Any] = {}
    for nic in nics:
        name = nic.guest_name or guest_interface_name(nic.label)
        entry: dict[str, Any] = {"match": {"macaddress": nic.mac}, "set-name": name}
        if nic.ip:
            entry["addresses"] = [nic.ip]
        else:
            entry["dhcp4"] = True
        ethernets[name] = entry
    return yaml.safe_dump({"version": 2, "ethernets": ethernets}, sort_keys=False)
