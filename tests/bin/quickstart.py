"""Drive the vm-host charm against this machine's libvirt: set up, compose a pinned VM, report.

The charm runs exactly as under Juju (install, config-changed, then actions), through
ops.testing's Context; nothing in the workload is replaced, so the VM is real.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

from ops import testing

import charm

DEFAULT_REQUEST = {
    "name": "quickstart-vm",
    "memory": 256,
    "pinned-cores": "1",
    "storage": "root:1",
}


def _default_network(config: dict[str, object]) -> str | None:
    """The bridge of libvirt's `default` NAT network (started when needed), for the VM's NIC.

    A VM without `interfaces` gets its NIC on config `default-network`; a fresh host has none,
    so the quick start uses libvirt's own NAT network unless --config names one.
    """
    if config.get("default-network") or config.get("networks"):
        return None
    import libvirt

    conn = libvirt.open("qemu:///system")
    try:
        net = conn.networkLookupByName("default")
        if not net.isActive():
            net.create()
        return net.bridgeName()
    except libvirt.libvirtError as e:
        print(
            f"libvirt's default network is not usable ({e.get_error_message()}); pass "
            """--config '{"default-network": "<a host bridge>"}'""",
            file=sys.stderr,
        )
        return None
    finally:
        conn.close()


def _run(ctx: testing.Context[charm.VmHostCharm], state: testing.State, action: str, **params):
    try:
        ctx.run(ctx.on.action(action, params=params), state)
    except testing.ActionFailed as failed:
        return None, failed.message
    return ctx.action_results or {}, ""


def main() -> int:
    """Set the host up, compose the requested VM and print the resource table."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--request", help="compose-vm parameters as JSON", default=None)
    parser.add_argument("--config", help="charm config as JSON", default="{}")
    parser.add_argument("--delete", action="store_true", help="delete the VM and stop")
    args = parser.parse_args()
    request = json.loads(args.request) if args.request else dict(DEFAULT_REQUEST)
    ctx = testing.Context(charm.VmHostCharm)
    config = json.loads(args.config)
    bridge = None if args.delete else _default_network(config)
    if bridge:
        config["default-network"] = bridge
        print(f"the VM's NIC goes on {bridge} (libvirt's default NAT network)")
    state = testing.State(config=config, leader=True)

    started = time.monotonic()
    state = ctx.run(ctx.on.install(), state)
    state = ctx.run(ctx.on.config_changed(), state)
    print(f"[{time.monotonic() - started:5.1f}s] unit status: {state.unit_status}")
    if not isinstance(state.unit_status, testing.ActiveStatus):
        print("the host is not ready; see the status above", file=sys.stderr)
        return 1

    listed, _ = _run(ctx, state, "list-vms")
    exists = listed is not None and any(
        vm["name"] == request["name"] for vm in json.loads(listed["json"])
    )
    if exists:
        _, error = _run(ctx, state, "delete-vm", name=request["name"])
        print(
            f"[{time.monotonic() - started:5.1f}s] deleted the previous {request['name']}"
            + (f" (failed: {error})" if error else "")
        )
    if args.delete:
        return 0

    print(f"[{time.monotonic() - started:5.1f}s] compose-vm {json.dumps(request)}")
    t0 = time.monotonic()
    results, error = _run(ctx, state, "compose-vm", **request)
    if results is None:
        print(f"compose-vm failed: {error}", file=sys.stderr)
        return 1
    print(f"[{time.monotonic() - started:5.1f}s] composed in {time.monotonic() - t0:.1f}s:")
    for key in ("name", "uuid", "state", "volumes"):
        print(f"  {key}: {results.get(key, '')}")
    print(f"  placement: {results['placement']}")

    resources, error = _run(ctx, state, "show-resources")
    if resources is None:
        print(f"show-resources failed: {error}", file=sys.stderr)
        return 1
    print()
    print(resources["table"])
    print()
    status = ctx.run(ctx.on.update_status(), state).unit_status
    print(f"unit status: {status}")
    print(f"inspect: virsh dumpxml {request['name']} | grep -A6 cputune")
    if request["name"] == DEFAULT_REQUEST["name"]:
        print("remove:  bash tests/bin/quickstart --delete")
    else:
        named = json.dumps({"name": request["name"]})
        print(f"remove:  bash tests/bin/quickstart --delete --request '{named}'")
    return 0


if __name__ == "__main__":
    sys.exit(main())
