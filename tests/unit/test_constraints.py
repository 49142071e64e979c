"""Tests for request parsing and validation (vmhost.constraints)."""

from __future__ import annotations

import base64
import dataclasses
import ipaddress
import os
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from hypothesis import given, settings
from hypothesis import strategies as st

import charm
from vmhost.config import ComposeParams
from vmhost.constraints import (
    build_spec,
    format_interfaces,
    format_storage,
    guest_interface_name,
    parse_hugepages,
    parse_interfaces,
    parse_pinned_cores,
    parse_storage,
    spec_hash,
    validate_name,
    validate_request_id,
    validate_ssh_public_key,
)
from vmhost.model import (
    DiskSpec,
    HugepageRequest,
    InterfaceMode,
    InterfaceSpec,
    InvalidRequestError,
    VmSpec,
)
from vmhost.topology import format_cpu_list


def _openssh(key: Any) -> str:
    return (
        key.public_key()
        .public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
        .decode()
    )


def _ssh_string(data: bytes) -> bytes:
    return len(data).to_bytes(4, "big") + data


def _sk_key(key_type: str) -> str:
    """A security-key public key in wire format: type, key fields, then the application."""
    if key_type.startswith("sk-ssh-ed25519"):
        fields = _ssh_string(os.urandom(32))
    else:
        fields = _ssh_string(b"nistp256") + _ssh_string(b"\x04" + os.urandom(64))
    blob = _ssh_string(key_type.encode()) + fields + _ssh_string(b"ssh:")
    return f"{key_type} {base64.b64encode(blob).decode()} yubikey"


KEYS = {
    "ssh-ed25519": _openssh(ed25519.Ed25519PrivateKey.generate()) + " alice@example",
    "ssh-rsa": _openssh(rsa.generate_private_key(public_exponent=65537, key_size=2048)),
    "ecdsa-sha2-nistp256": _openssh(ec.generate_private_key(ec.SECP256R1())),
    "ecdsa-sha2-nistp384": _openssh(ec.generate_private_key(ec.SECP384R1())),
    "ecdsa-sha2-nistp521": _openssh(ec.generate_private_key(ec.SECP521R1())),
    "sk-ssh-ed25519@openssh.com": _sk_key("sk-ssh-ed25519@openssh.com"),
    "sk-ecdsa-sha2-nistp256@openssh.com": _sk_key("sk-ecdsa-sha2-nistp256@openssh.com"),
}


def _error(func: Any, *args: Any, **kwargs: Any) -> InvalidRequestError:
    with pytest.raises(InvalidRequestError) as info:
        func(*args, **kwargs)
    return info.value


def _as_compose_vm(field: str, value: Any) -> Any:
    """A value as compose-vm hands it to the workload.

    A MAAS string is read by the vm_host library's grammar first (charm.wire_request);
    anything else goes as it is.
    """
    if not isinstance(value, str):
        return value
    return getattr(
        ComposeParams.model_validate({"name": "vm", "memory": 64, field: value}).read_by(
            charm.wire_request
        ),
        field,
    )


def _build(**kwargs: Any) -> VmSpec:
    """build_spec with storage and interfaces as compose-vm hands them over."""
    for field in ("storage", "interfaces"):
        if field in kwargs:
            kwargs[field] = _as_compose_vm(field, kwargs[field])
    return build_spec(**kwargs)


def _refusal(parse: Any, field: str, value: Any) -> str:
    """What compose-vm says of a bad value, from the library's grammar or the workload."""
    return _refused(lambda: parse(_as_compose_vm(field, value)), field)


def _refused(call: Any, field: str) -> str:
    """The refusal `call` ends with, naming `field` (the charm's or the workload's)."""
    with pytest.raises((ValueError, InvalidRequestError)) as info:
        call()
    text = str(info.value)
    if isinstance(info.value, InvalidRequestError):
        assert info.value.field == field
    assert text.startswith(f"{field}: ")
    return text


# --------------------------------------------------------------------------------------------
# Names


@pytest.mark.parametrize("name", ["a", "0", "web-1", "a" * 63, "db-0-x", "9lives"])
def test_valid_names(name: str):
    assert validate_name(name) == name


@pytest.mark.parametrize(
    "name", ["", "Web", "-a", "a-", "a" * 64, "a_b", "a.b", "a b", "a/b", "é", 5, None, "a\n"]
)
def test_invalid_names(name: Any):
    error = _error(validate_name, name, field="pool")
    assert error.field == "pool"
    assert "lower-case" in str(error) or "must be a string" in str(error)


@pytest.mark.parametrize("value", ["a", "db-0", "-", "a" * 40, "0-"])
def test_valid_request_ids(value: str):
    assert validate_request_id(value) == value


@pytest.mark.parametrize("value", ["", "A", "a" * 41, "a_b", "a b", 1])
def test_invalid_request_ids(value: Any):
    error = _error(validate_request_id, value)
    assert error.field == "id"


# --------------------------------------------------------------------------------------------
# Storage


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        # REFERENCE.md's MAAS example.
        ("root:80(ssd),data:400", (DiskSpec("root", 80, "ssd"), DiskSpec("data", 400))),
        ("root:20", (DiskSpec("root", 20),)),
        (
            " root : 20 ( fast ) , Data_2 : 1 ",
            (DiskSpec("root", 20, "fast"), DiskSpec("Data_2", 1)),
        ),
        # MAAS allowed the label to be left out.
        ("80(ssd),400", (DiskSpec("root", 80, "ssd"), DiskSpec("disk1", 400))),
        ("root:65536", (DiskSpec("root", 65536),)),
        ("", ()),
        (None, ()),
        ([], ()),
        (
            [{"label": "root", "size-gb": 30, "pool": "fast"}, {"label": "logs", "size-gb": "5"}],
            (DiskSpec("root", 30, "fast"), DiskSpec("logs", 5)),
        ),
        ([{"size-gb": 10}], (DiskSpec("root", 10),)),
    ],
)
def test_parse_storage(value: Any, expected: tuple[DiskSpec, ...]):
    assert parse_storage(_as_compose_vm("storage", value)) == expected


@pytest.mark.parametrize(
    ("value", "phrase"),
    [
        ("root:80(ssd,fast)", "must name exactly one pool"),
        ("root:80()", "must name exactly one pool"),
        ("root:0", "size-gb: must be at least 1"),
        ("root:65537", "size-gb: must be at most 65536"),
        ("root:1.5", "whole number"),
        ("root:-1", "whole number"),
        ("root:big", "whole number"),
        ("root:", "must be a whole number of GB"),
        ("root:10,root:20", "disk labels must be unique; repeated: root"),
        ("-x:10", "label"),
        ("root:10(Bad_Pool)", "lower-case"),
        ("root:10(ssd", "unbalanced '('"),
        ("root:10,,data:5", "'disk1' must be a whole number of GB"),
        ("a:b:10", "label:size(pool)"),
        ([{"label": "root"}], "needs size-gb"),
        ([{"label": "root", "size-gb": 10, "tags": ["x"]}], "unsupported keys tags"),
        ([{"label": "root", "size-gb": True}], "whole number"),
        (["root:10"], "must be an object"),
        (42, "expected a list of disks"),
        (",".join(f"d{i}:1" for i in range(65)), "at most 64"),
    ],
)
def test_parse_storage_rejects(value: Any, phrase: str):
    assert phrase in _refusal(parse_storage, "storage", value)


_labels = st.from_regex(r"[a-zA-Z0-9][a-zA-Z0-9_-]{0,20}", fullmatch=True)
_pools = st.none() | st.from_regex(r"[a-z0-9]([a-z0-9-]{0,10}[a-z0-9])?", fullmatch=True)
_disks = st.lists(
    st.builds(DiskSpec, label=_labels, size_gb=st.integers(1, 65536), pool=_pools),
    min_size=1,
    max_size=8,
    unique_by=lambda d: d.label,
)


@given(_disks)
def test_storage_round_trip(disks: list[DiskSpec]):
    assert parse_storage(_as_compose_vm("storage", format_storage(disks))) == tuple(disks)


# --------------------------------------------------------------------------------------------
# Interfaces


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        # REFERENCE.md's MAAS example.
        (
            "eth0:space=oam;eth1:subnet_cidr=10.0.5.0/24;data:vid=100",
            (
                InterfaceSpec("eth0", space="oam"),
                InterfaceSpec("eth1", subnet="10.0.5.0/24"),
                InterfaceSpec("data", vlan=100),
            ),
        ),
        ("0:space=oam", (InterfaceSpec("0", space="oam"),)),
        (
            "eth0:subnet=fd00::/64,ip=fd00::5",
            (InterfaceSpec("eth0", subnet="fd00::/64", ip="fd00::5"),),
        ),
        ("eth0:ip=10.0.5.9", (InterfaceSpec("eth0", ip="10.0.5.9"),)),
        ("eth0:vlan=0", (InterfaceSpec("eth0", vlan=0),)),
        (
            "eth0:mode=MACVTAP,parent=enp1s0f0",
            (InterfaceSpec("eth0", mode=InterfaceMode.MACVTAP, parent="enp1s0f0"),),
        ),
        ("eth0:bridge=br-oam", (InterfaceSpec("eth0", bridge="br-oam"),)),
        (
            "eth0:bridge=br0,mode=bridge",
            (InterfaceSpec("eth0", bridge="br0", mode=InterfaceMode.BRIDGE),),
        ),
        (
            "sr:mode=sriov,parent=ens1f0,numa_strict=true",
            (InterfaceSpec("sr", mode=InterfaceMode.SRIOV, parent="ens1f0", numa_strict=True),),
        ),
        ("eth0:", (InterfaceSpec("eth0"),)),
        ("", ()),
        (None, ()),
        (
            [
                {"label": "eth0", "space": "oam", "mode": "bridge"},
                {"label": "data", "vlan": 100, "subnet-cidr": "10.1.0.0/16", "ip": None},
                {"label": "sr", "mode": "sriov", "parent": "ens1f0", "numa-strict": True},
            ],
            (
                InterfaceSpec("eth0", space="oam", mode=InterfaceMode.BRIDGE),
                InterfaceSpec("data", vlan=100, subnet="10.1.0.0/16"),
                InterfaceSpec("sr", mode=InterfaceMode.SRIOV, parent="ens1f0", numa_strict=True),
            ),
        ),
    ],
)
def test_parse_interfaces(value: Any, expected: tuple[InterfaceSpec, ...]):
    assert parse_interfaces(_as_compose_vm("interfaces", value)) == expected


@pytest.mark.parametrize(
    ("value", "phrase"),
    [
        ("eth0:fabric=f1", "the MAAS key 'fabric' is not supported"),
        ("eth0:type=sriov", "MAAS key 'type'"),
        ("eth0:tag=fast", "MAAS key 'tag'"),
        ("eth0:not_space=dmz", "MAAS key 'not_space'"),
        ("eth0:colour=red", "key 'colour' is not supported by vm-host (supported: bridge"),
        ("eth0:space=oam;", "is not 'label:key=value"),
        ("eth0", "is not 'label:key=value"),
        (":space=oam", "interface label '' must match"),
        ("eth0:space", "is not key=value"),
        ("eth0:space=", "is not key=value"),
        ("eth0:space=oam;eth0:vid=1", "interface labels must be unique; repeated: eth0"),
        ("0:space=a;eth0:space=b", "both name guest interface 'eth0'"),
        ("1:space=a;01:space=b", "both name guest interface 'eth1'"),
        ("_x:space=oam", "interface label '_x' must match"),
        ("averyveryverylonglabel:space=oam", "longer than the 15 characters"),
        ("eth0:subnet=10.0.5.1/24", "did you mean 10.0.5.0/24"),
        ("eth0:subnet=10.0.5.0", "needs a prefix length"),
        ("eth0:subnet_cidr=banana", "CIDR"),
        ("eth0:vid=4095", "vlan: must be at most 4094"),
        ("eth0:vlan=-1", "must be a VLAN id (0-4094)"),
        ("eth0:vlan=1,vid=2", "vlan is given more than once"),
        ("eth0:ip=10.0.5.300", "must be an IPv4 or IPv6 address"),
        ("eth0:subnet=10.0.5.0/24,ip=10.0.6.1", "not inside subnet"),
        ("eth0:mode=macvlan", "mode: Input should be 'bridge', 'macvtap' or 'sriov'"),
        ("eth0:bridge=br0,parent=eth1", "give bridge (a bridged NIC) or parent"),
        ("eth0:bridge=br0,mode=sriov", "bridge attaches with mode bridge"),
        ("eth0:parent=eth1,mode=bridge", "parent is for mode macvtap or sriov"),
        ("eth0:mode=macvtap,numa_strict=true", "numa-strict applies only to mode sriov"),
        ("eth0:mode=sriov,numa_strict=maybe", "true or false"),
        ("eth0:bridge=thisbridgeiswaytoolong", "must be a host interface name"),
        ("eth0:bridge=br/0", "must be a host interface name"),
        ("eth0:bridge=br:0", "must be a host interface name"),
        ("eth0:parent=-eth1", "must be a host interface name"),
        ("eth0:space=o am", "must be a Juju space name"),
        ("eth0:space=OAM", "must be a Juju space name"),
        ("eth0:space=a--b", "must be a Juju space name"),
        ("eth0:vlan=4094,vid=4094", "vlan is given more than once"),
        ([{"space": "oam"}], "must be an object with a label"),
        (["eth0:space=oam"], "must be an object with a label"),
        ([{"label": "eth0", "fabric": "x"}], "MAAS key 'fabric'"),
        ([{"label": "eth0", "vlan": True}], "whole number"),
        ([{"label": "eth0", "ip": 167772161}], "must be a string"),
        ({"eth0": "space=oam"}, "expected a list of interfaces"),
        (";".join(f"e{i}:" for i in range(33)), "at most 32"),
    ],
)
def test_parse_interfaces_rejects(value: Any, phrase: str):
    assert phrase in _refusal(parse_interfaces, "interfaces", value)


@pytest.mark.parametrize(
    ("label", "name"),
    [("0", "eth0"), ("12", "eth12"), ("007", "eth7"), ("data", "data"), ("\u00b2", "\u00b2")],
)
def test_guest_interface_name(label: str, name: str):
    assert guest_interface_name(label) == name


@st.composite
def _interface(draw: st.DrawFn, label: str) -> InterfaceSpec:
    space = draw(st.none() | st.from_regex(r"[a-z0-9]{1,5}(-[a-z0-9]{1,5}){0,2}", fullmatch=True))
    subnet = ip = None
    if draw(st.booleans()):
        network = ipaddress.ip_network(
            (draw(st.integers(0, 2**32 - 1)), draw(st.integers(8, 30))), strict=False
        )
        subnet = str(network)
        if draw(st.booleans()):
            ip = str(network.network_address + 1)
    elif draw(st.booleans()):
        ip = str(ipaddress.ip_address(draw(st.integers(0, 2**128 - 1))))
    vlan = draw(st.none() | st.integers(0, 4094))
    device = st.from_regex(r"[a-z][a-z0-9.-]{0,12}", fullmatch=True)
    attach = draw(st.sampled_from(["none", "mode", "bridge", "parent"]))
    mode = bridge = parent = None
    numa_strict = False
    if attach == "mode":
        mode = draw(st.sampled_from(list(InterfaceMode)))
    elif attach == "bridge":
        bridge = draw(device)
        mode = draw(st.sampled_from([None, InterfaceMode.BRIDGE]))
    elif attach == "parent":
        parent = draw(device)
        mode = draw(st.sampled_from([None, InterfaceMode.MACVTAP, InterfaceMode.SRIOV]))
    if mode is InterfaceMode.SRIOV:
        numa_strict = draw(st.booleans())
    return InterfaceSpec(
        label=label,
        space=space,
        subnet=subnet,
        vlan=vlan,
        ip=ip,
        mode=mode,
        bridge=bridge,
        parent=parent,
        numa_strict=numa_strict,
    )


@st.composite
def _interfaces(draw: st.DrawFn) -> list[InterfaceSpec]:
    labels = draw(
        st.lists(
            st.from_regex(r"[a-zA-Z][a-zA-Z0-9_-]{0,14}", fullmatch=True)
            | st.integers(0, 999).map(str),
            min_size=1,
            max_size=6,
            unique_by=guest_interface_name,
        )
    )
    return [draw(_interface(label)) for label in labels]


@given(_interfaces())
def test_interfaces_round_trip(interfaces: list[InterfaceSpec]):
    assert parse_interfaces(_as_compose_vm("interfaces", format_interfaces(interfaces))) == tuple(
        interfaces
    )


@given(_interfaces())
def test_structured_interfaces_match_string_form(interfaces: list[InterfaceSpec]):
    # Build the objects field by field, as a relation requirer would send them.
    structured: list[dict[str, Any]] = []
    for spec in interfaces:
        item: dict[str, Any] = {"label": spec.label}
        for f in dataclasses.fields(spec):
            value = getattr(spec, f.name)
            if f.name != "label" and value is not None and value is not False:
                item[f.name.replace("_", "-")] = (
                    value.value if isinstance(value, InterfaceMode) else value
                )
        structured.append(item)
    assert parse_interfaces(structured) == tuple(interfaces)


# --------------------------------------------------------------------------------------------
# Pinned cores and huge pages


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (4, (4, None)),
        ("4", (4, None)),
        (" 4 ", (4, None)),
        (1024, (1024, None)),
        ("2,3,6-7", (4, (2, 3, 6, 7))),
        ([7, 6, 3, 2], (4, (2, 3, 6, 7))),
        ([0], (1, (0,))),
        ("5-5", (1, (5,))),
        (None, (0, None)),
        ("", (0, None)),
    ],
)
def test_parse_pinned_cores(value: Any, expected: tuple[int, tuple[int, ...] | None]):
    assert parse_pinned_cores(value) == expected


@pytest.mark.parametrize(
    ("value", "phrase"),
    [
        (0, "from 1 to 1024"),
        ("0", "from 1 to 1024"),
        (-2, "from 1 to 1024"),
        (1025, "from 1 to 1024"),
        ("-2", "bad CPU"),
        ("a,b", "bad CPU"),
        ("3-1", "end must not be below"),
        ("2,2", "CPU 2 is listed more than once"),
        ("0-3,2", "CPU 2 is listed more than once"),
        ([1, 1], "CPU 1 is listed more than once"),
        ([], "empty"),
        ([1, -1], "only CPU ids"),
        ([1, True], "only CPU ids"),
        (["1"], "only CPU ids"),
        ("70000-70001", "out of range"),
        (True, "is not a count"),
        (2.0, "is not a count"),
        ({"count": 2}, "is not a count"),
    ],
)
def test_parse_pinned_cores_rejects(value: Any, phrase: str):
    error = _error(parse_pinned_cores, value)
    assert error.field == "pinned-cores"
    assert phrase in str(error)
    assert "for example 4" in str(error)


@given(st.sets(st.integers(0, 4095), min_size=2, max_size=64))
def test_pinned_list_round_trip(cpus: set[int]):
    assert parse_pinned_cores(format_cpu_list(cpus)) == (len(cpus), tuple(sorted(cpus)))
    assert parse_pinned_cores(sorted(cpus, reverse=True)) == (len(cpus), tuple(sorted(cpus)))


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("2M", HugepageRequest.P2M),
        ("2m", HugepageRequest.P2M),
        ("1G", HugepageRequest.P1G),
        (" 1g ", HugepageRequest.P1G),
        ("any", HugepageRequest.ANY),
        ("ANY", HugepageRequest.ANY),
        (True, HugepageRequest.ANY),
        ("true", HugepageRequest.ANY),
        (False, None),
        ("false", None),
        ("", None),
        (None, None),
    ],
)
def test_parse_hugepages(value: Any, expected: HugepageRequest | None):
    assert parse_hugepages(value) == expected


@pytest.mark.parametrize("value", ["4K", "64K", "2", "2MB", "huge", 2, 1.0, ["2M"]])
def test_parse_hugepages_rejects(value: Any):
    error = _error(parse_hugepages, value)
    assert error.field == "hugepages"
    assert "use 2M, 1G or any" in str(error)


# --------------------------------------------------------------------------------------------
# build_spec


def test_build_spec_minimal_defaults():
    spec = build_spec(name="vm1", memory_mib=1024)
    assert spec == VmSpec(
        name="vm1",
        vcpus=1,
        memory_mib=1024,
        disks=(DiskSpec("root", 20),),
        interfaces=(),
        owner="action",
    )
    assert not spec.pinned


def test_build_spec_full():
    spec = _build(
        name="db-0",
        cores="4",
        memory_mib="8192",
        pinned_cores="2,3,6-7",
        numa_nodes=2,
        hugepages="1G",
        storage="root:40(fast),data:100",
        interfaces="eth0:space=oam;1:vid=100",
        image="noble",
        user_data="#cloud-config\n{}\n",
        ssh_public_keys=[KEYS["ssh-ed25519"], KEYS["ssh-rsa"]],
        owner="relation:7:app",
        request_id="db-0",
        default_root_gb=10,
        default_interface_bridge="br0",
    )
    assert spec.vcpus == 4
    assert spec.memory_mib == 8192
    assert (spec.pinned_count, spec.pinned_cpus) == (4, (2, 3, 6, 7))
    assert spec.numa_nodes == 2
    assert spec.hugepages is HugepageRequest.P1G
    assert spec.disks == (DiskSpec("root", 40, "fast"), DiskSpec("data", 100))
    assert [i.label for i in spec.interfaces] == ["eth0", "1"]
    assert spec.image == "ubuntu@24.04"
    assert spec.ssh_public_keys == (KEYS["ssh-ed25519"], KEYS["ssh-rsa"])
    assert (spec.owner, spec.request_id) == ("relation:7:app", "db-0")


def test_build_spec_pinned_count_sets_cores():
    spec = build_spec(name="p", memory_mib=2048, pinned_cores=6)
    assert (spec.vcpus, spec.pinned_count, spec.pinned_cpus) == (6, 6, None)


def test_build_spec_default_interface_on_bridge():
    spec = build_spec(name="n", memory_mib=512, default_interface_bridge="br-ex")
    assert spec.interfaces == (InterfaceSpec("eth0", bridge="br-ex", mode=InterfaceMode.BRIDGE),)
    requested = _build(
        name="n", memory_mib=512, interfaces="data:vid=5", default_interface_bridge="br-ex"
    )
    assert requested.interfaces == (InterfaceSpec("data", vlan=5),)


def test_image_may_be_an_image_store_alias():
    assert build_spec(name="k", memory_mib=512, image="jammy-vm").image == "jammy-vm"


@pytest.mark.parametrize(
    ("given", "canonical"),
    [
        ("ubuntu@24.04", "ubuntu@24.04"),
        ("24.04", "ubuntu@24.04"),
        ("noble", "ubuntu@24.04"),
        ("Ubuntu@22.04", "ubuntu@22.04"),
        ("local:web-base", "local:web-base"),
    ],
)
def test_image_names_are_canonical(given: str, canonical: str):
    assert build_spec(name="k", memory_mib=512, image=given).image == canonical


@pytest.mark.parametrize(
    "path",
    [
        "/etc/shadow",
        "/var/lib/vm-host/images/other-vm-root",
        "../../etc/shadow",
        "images/noble.img",
        "local:../../etc/shadow",
        "~root/.ssh/id_rsa",
        "C:\\disk.img",
    ],
)
def test_host_paths_are_never_an_image(path: str):
    with pytest.raises(InvalidRequestError) as error:
        build_spec(name="k", memory_mib=512, image=path)
    assert error.value.field == "image"
    assert "host path" in str(error.value)
    assert "local:NAME" in str(error.value)


def test_build_spec_ssh_keys_as_one_string():
    text = f"{KEYS['ssh-ed25519']}\n\n{KEYS['ecdsa-sha2-nistp256']}\n{KEYS['ssh-ed25519']}\n"
    spec = build_spec(name="k", memory_mib=512, ssh_public_keys=text)
    assert spec.ssh_public_keys == (KEYS["ssh-ed25519"], KEYS["ecdsa-sha2-nistp256"])


@pytest.mark.parametrize("key_type", sorted(KEYS))
def test_every_supported_key_type(key_type: str):
    assert validate_ssh_public_key(KEYS[key_type]).startswith(key_type + " ")


@pytest.mark.parametrize(
    ("memory", "hugepages", "cells"),
    [
        (2048, "1G", 2),
        (4096, "1G", 4),
        (3072, "1G", 1),
        (64, "2M", 1),
        (128, "2M", 2),
        (130, "any", 1),
        (1 << 24, "1G", 16),
    ],
)
def test_hugepage_memory_accepted(memory: int, hugepages: str, cells: int):
    spec = build_spec(
        name="h", memory_mib=memory, cores=cells, numa_nodes=cells, hugepages=hugepages
    )
    assert spec.memory_mib == memory


BASE: dict[str, Any] = {"name": "vm", "memory_mib": 4096}

INVALID: list[tuple[dict[str, Any], str, str]] = [
    ({"name": "VM"}, "name", "lower-case"),
    ({"name": None}, "name", "must be a string"),
    ({"memory_mib": 63}, "memory", "from 64 to 16777216"),
    ({"memory_mib": (1 << 24) + 1}, "memory", "from 64 to 16777216"),
    ({"memory_mib": "4G"}, "memory", "whole number"),
    ({"memory_mib": 4096.0}, "memory", "whole number"),
    ({"memory_mib": None}, "memory", "whole number"),
    ({"cores": 0}, "cores", "from 1 to 1024"),
    ({"cores": 1025}, "cores", "from 1 to 1024"),
    ({"cores": True}, "cores", "whole number"),
    ({"cores": 3, "pinned_cores": 4}, "cores", "every vCPU of a pinned VM gets a host CPU"),
    ({"cores": 3, "pinned_cores": "0-3"}, "cores", "make them equal or leave cores out"),
    ({"pinned_cores": 0}, "pinned-cores", "from 1 to 1024"),
    ({"pinned_cores": "x"}, "pinned-cores", "bad CPU"),
    ({"numa_nodes": 0}, "numa-nodes", "from 1 to 64"),
    ({"numa_nodes": 65, "cores": 100}, "numa-nodes", "from 1 to 64"),
    ({"numa_nodes": 2}, "numa-nodes", "need at least 2 vCPUs"),
    ({"numa_nodes": 3, "pinned_cores": 2}, "numa-nodes", "need at least 3 vCPUs"),
    (
        {"numa_nodes": 2, "cores": 2, "memory_mib": 127},
        "numa-nodes",
        "less than 64 MiB per guest cell",
    ),
    ({"hugepages": "3M"}, "hugepages", "use 2M, 1G or any"),
    ({"hugepages": "1G", "memory_mib": 3000}, "memory", "use 2048 or 3072"),
    ({"hugepages": "1G", "memory_mib": 1000}, "memory", "use 1024"),
    (
        {"hugepages": "1G", "memory_mib": 3072, "numa_nodes": 2, "cores": 2},
        "memory",
        "multiple of 2048 MiB; use 2048 or 4096",
    ),
    ({"hugepages": "2M", "memory_mib": 4097}, "memory", "use 4096 or 4098"),
    ({"hugepages": "any", "memory_mib": 65}, "memory", "multiple of 2 MiB; use 64 or 66"),
    ({"storage": "root:10(a,b)"}, "storage", "must name exactly one pool"),
    ({"storage": "root:0"}, "storage", "size-gb: must be at least 1"),
    ({"storage": "root:10,Data:5,data:5"}, "storage", "give the same volume name 'vm-data'"),
    ({"storage": "root:10,a_b:5,a-b:5"}, "storage", "give the same volume name 'vm-a-b'"),
    ({"storage": "root:10,data-:5"}, "storage", "gets volume name 'vm-data-'"),
    ({"name": "v" * 60, "storage": "root:10"}, "storage", "shorten the VM name or the label"),
    ({"interfaces": "eth0:fabric=x"}, "interfaces", "the MAAS key 'fabric' is not supported"),
    ({"default_interface_bridge": "no/slash"}, "interfaces", "not a valid host interface"),
    ({"image": "no spaces.img"}, "image", "not an image name"),
    ({"image": "a/../b"}, "image", "host path"),
    ({"image": "/var/lib/../../etc/shadow"}, "image", "host path"),
    ({"image": "/var/lib/x\n.img"}, "image", "host path"),
    ({"image": "local:Bad Name"}, "image", "local image name"),
    ({"image": 5}, "image", "must be a string"),
    ({"user_data": "x" * (64 * 1024 + 1)}, "user-data", "the limit is 65536"),
    ({"user_data": ["#cloud-config"]}, "user-data", "must be a string"),
    ({"ssh_public_keys": ["ssh-dss AAAAB3NzaC1kc3M="]}, "ssh-public-keys", "unknown key type"),
    (
        {"ssh_public_keys": ["restrict " + KEYS["ssh-ed25519"]]},
        "ssh-public-keys",
        "options are not allowed",
    ),
    ({"ssh_public_keys": ["ssh-ed25519 not!base64"]}, "ssh-public-keys", "not valid base64"),
    (
        {"ssh_public_keys": ["ssh-ed25519 " + KEYS["ssh-rsa"].split()[1]]},
        "ssh-public-keys",
        "says it is 'ssh-rsa', not 'ssh-ed25519'",
    ),
    ({"ssh_public_keys": ["ssh-ed25519"]}, "ssh-public-keys", "no base64 body"),
    ({"ssh_public_keys": [KEYS["ssh-ed25519"] + "\rx"]}, "ssh-public-keys", "control character"),
    ({"ssh_public_keys": [7]}, "ssh-public-keys", "must be a string"),
    ({"ssh_public_keys": 7}, "ssh-public-keys", "list of public key lines"),
    ({"ssh_public_keys": [KEYS["ssh-ed25519"]] * 101}, "ssh-public-keys", "at most 100"),
    ({"request_id": "Bad Id"}, "id", "1-40 lower-case"),
]


@pytest.mark.parametrize(
    ("overrides", "field", "phrase"), INVALID, ids=[f"{f}:{p}" for _, f, p in INVALID]
)
def test_build_spec_rejects(overrides: dict[str, Any], field: str, phrase: str):
    assert phrase in _refused(lambda: _build(**(BASE | overrides)), field)


def test_spec_hash_is_stable_and_ignores_owner():
    a = _build(name="vm", memory_mib=1024, storage="root:10", owner="action")
    b = build_spec(
        name="vm",
        memory_mib="1024",
        storage=[{"label": "root", "size-gb": 10}],
        owner="relation:3:app",
        request_id="r1",
    )
    assert len(spec_hash(a)) == 16
    assert int(spec_hash(a), 16) >= 0
    assert spec_hash(a) == spec_hash(b)
    # Literal digests: a change to the encoding would make every relation request look
    # changed after an upgrade, so it must be deliberate.
    assert spec_hash(VmSpec(name="vm", vcpus=1, memory_mib=1024)) == "40ab9bf57be65acb"
    full = VmSpec(
        name="vm",
        vcpus=2,
        memory_mib=2048,
        pinned_count=2,
        pinned_cpus=(2, 3),
        hugepages=HugepageRequest.P2M,
        disks=(DiskSpec("root", 10, "ssd"),),
        interfaces=(InterfaceSpec("eth0", vlan=5, mode=InterfaceMode.SRIOV),),
        owner="relation:1:x",
        request_id="r",
    )
    assert spec_hash(full) == "aea03294d8f648e1"


@pytest.mark.parametrize(
    "change",
    [
        {"memory_mib": 2048},
        {"cores": 2},
        {"pinned_cores": 1},
        {"hugepages": "2M"},
        {"storage": "root:11"},
        {"interfaces": "eth0:space=oam"},
        {"image": "ubuntu@24.04"},
        {"user_data": "#cloud-config"},
        {"ssh_public_keys": [KEYS["ssh-ed25519"]]},
        {"name": "vm2"},
    ],
)
def test_spec_hash_changes_with_the_vm(change: dict[str, Any]):
    base = {"name": "vm", "memory_mib": 1024, "storage": "root:10"}
    assert spec_hash(_build(**base)) != spec_hash(_build(**(base | change)))


def test_spec_hash_ignores_fields_at_their_default():
    spec = VmSpec(name="vm", vcpus=1, memory_mib=1024, interfaces=(InterfaceSpec("eth0"),))
    same = dataclasses.replace(
        spec, interfaces=(InterfaceSpec("eth0", numa_strict=False),), ssh_public_keys=()
    )
    assert spec_hash(spec) == spec_hash(same)


# --------------------------------------------------------------------------------------------
# build_spec on arbitrary input


_json = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=30),
    lambda children: (
        st.lists(children, max_size=4)
        | st.dictionaries(st.text(max_size=10), children, max_size=4)
    ),
    max_leaves=10,
)
_plausible = {
    "name": st.sampled_from(["vm", "a-b", "Bad", ""]),
    "cores": st.sampled_from([None, 1, 2, "3", 0]),
    "memory_mib": st.sampled_from([64, 1024, "2048", 3000, 63]),
    "pinned_cores": st.sampled_from([None, 2, "0-1", [0, 1], "2,2", 0]),
    "numa_nodes": st.sampled_from([None, 1, 2, 3]),
    "hugepages": st.sampled_from([None, "2M", "1G", "any", True, "x"]),
    "storage": st.sampled_from([None, "root:10", "root:10(a,b)", [{"size-gb": 5}]]),
    "interfaces": st.sampled_from([None, "eth0:space=x", "0:vid=9;data:mode=sriov", "e:"]),
    "image": st.sampled_from([None, "/i", "i", "/../x"]),
    "user_data": st.sampled_from([None, "", "#cloud-config"]),
    "ssh_public_keys": st.sampled_from([(), [KEYS["ssh-rsa"]], ["x"], "x"]),
    "request_id": st.sampled_from(["", "r-1", "R"]),
}


REQUEST_FIELDS = {
    "name",
    "cores",
    "memory",
    "pinned-cores",
    "numa-nodes",
    "hugepages",
    "storage",
    "interfaces",
    "image",
    "user-data",
    "ssh-public-keys",
    "id",
}


@settings(max_examples=500, deadline=None)
@given(
    st.fixed_dictionaries(
        {},
        optional={key: strategy | _json for key, strategy in _plausible.items()},
    )
)
def test_build_spec_raises_only_invalid_request(request: dict[str, Any]):
    kwargs = {"name": "vm", "memory_mib": 1024} | request
    spec: VmSpec | None = None
    field: str | None = None
    try:
        spec = build_spec(**kwargs)
    except InvalidRequestError as error:
        field = error.field
    if spec is None:
        assert field in REQUEST_FIELDS
        return
    assert isinstance(spec, VmSpec)
    assert 1 <= spec.vcpus <= 1024
    assert spec.numa_nodes <= spec.vcpus
    assert spec.disks
    assert len(spec_hash(spec)) == 16
    assert isinstance(hash(spec), int)  # frozen and made of tuples: usable as a key


def test_huge_pinned_cpu_range_is_refused_without_expanding():
    error = _error(parse_pinned_cores, "0-4294967295")
    assert error.field == "pinned-cores"
    assert "out of range" in str(error)
    many = _error(parse_pinned_cores, ",".join(["0-65535"] * 50))
    assert "more than the" in str(many)


def test_reserved_cpus_beyond_the_limit_are_a_config_error():
    from vmhost.settings import parse_reserved_cpus

    with pytest.raises(InvalidRequestError, match="reserved-cpus"):
        parse_reserved_cpus("0-4294967295")
