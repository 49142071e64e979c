"""cloud-init data for a VM: user data with its hostname and SSH keys, network config by MAC.

Both backends hand the same documents to the guest (libvirt in a NoCloud seed image, LXD in
cloud-init.* keys), so a VM is configured the same way wherever it runs.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import yaml

from vmhost import userdata
from vmhost.constraints import guest_interface_name
from vmhost.model import NicAttachment, VmSpec


def needs_cloud_init(spec: VmSpec, nics: Sequence[NicAttachment]) -> bool:
    """Whether the VM gets cloud-init data (user data, SSH keys, a hostname, a static IP)."""
    return bool(spec.user_data or spec.ssh_public_keys or spec.hostname or any(n.ip for n in nics))


def hostname(spec: VmSpec) -> str:
    """The guest's hostname: the requested one, else the VM's name."""
    return spec.hostname or spec.name


def charm_config(spec: VmSpec, *, set_hostname: bool = True) -> str:
    """vm-host's own #cloud-config: the hostname, and the keys for the image's default user.

    Top-level `ssh_authorized_keys` is cloud-init's way to authorize keys for the image's
    default user (ubuntu on Ubuntu images), whatever that user is called. `set_hostname`
    False leaves the hostname to the requester's own #cloud-config.
    """
    name = hostname(spec)
    config: dict[str, Any] = {}
    if set_hostname:
        config["hostname"] = name.partition(".")[0]
        if "." in name:
            config["fqdn"] = name
    if spec.ssh_public_keys:
        config["ssh_authorized_keys"] = list(spec.ssh_public_keys)
    # No line wrapping: a key stays on one line, as people grep for it.
    return "#cloud-config\n" + yaml.safe_dump(config, sort_keys=False, width=1 << 20)


def user_data(spec: VmSpec) -> str:
    """The VM's user data: vm-host's #cloud-config, joined to the requester's when it has some.

    Without user data from the requester it is vm-host's #cloud-config alone. With it, MIME
    multipart: the requester's parts first, exactly as sent, then vm-host's, merged by
    cloud-init so the requester's values win and lists (SSH keys) are appended.

    Raises:
        InvalidRequestError: user data cloud-init would ignore (build_spec refuses it first).
    """
    if not spec.user_data:
        return charm_config(spec)
    requested = userdata.parts(spec.user_data)
    # A hostname set in the requester's #cloud-config is theirs whole (hostname and fqdn).
    own = charm_config(spec, set_hostname=not userdata.sets_hostname(requested))
    charm_part = userdata.Part(
        "text/cloud-config", own, filename="vm-host.cfg", merge_type=userdata.CHARM_MERGE_TYPE
    )
    return userdata.join(requested, charm_part)


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
