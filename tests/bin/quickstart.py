"""Drive the vm-host charm against this machine's libvirt: set up, compose a VM that boots.

The charm runs exactly as under Juju (install, config-changed, then actions), through
ops.testing's Context; nothing in the workload is replaced, so the VM is real. Its image is
the charm's default-image (ubuntu@24.04): from cloud-images.ubuntu.com when that answers and
its keyring is installed, otherwise (an offline machine) from the tiny test guest
(tests/guest/build-tiny-image) published as ubuntu@24.04 in a signed mirror on 127.0.0.1, the
one the tests use. After composing, the guest's own report (what it read inside: CPUs, NUMA
nodes, MACs, its cloud-init seed) is printed from the serial console log.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

from ops import testing

import charm
from vmhost import images
from vmhost.backends.libvirt import LibvirtBackend

REPO = Path(__file__).resolve().parents[2]
GUEST = REPO / "tests" / "guest"
MIRROR_DIR = Path("/var/cache/vm-host-tests/quickstart-mirror")
REPORT_TIMEOUT_S = 240


def _load(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(f"vmhost_guest_{name}", GUEST / f"{name}.py")
    assert spec
    assert spec.loader
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def default_source_reachable() -> bool:
    """Whether cloud-images.ubuntu.com answers and its keyring is installed."""
    if not Path(images.DEFAULT_KEYRING).exists():
        return False
    url = images.DEFAULT_SOURCE + "streams/v1/index.sjson"
    try:
        with urllib.request.urlopen(url, timeout=5):  # noqa: S310 - a fixed https URL
            return True
    except OSError:
        return False


@contextlib.contextmanager
def image_source() -> Iterator[dict[str, str]]:
    """The image options: the default source, or the local signed mirror while it is served."""
    if default_source_reachable():
        print(f"image source: {images.DEFAULT_SOURCE}")
        yield {}
        return
    built = subprocess.run(
        ["bash", str(GUEST / "build-tiny-image")], check=True, capture_output=True, text=True
    )
    tiny = Path(built.stdout.strip().splitlines()[-1])
    mirror = _load("mirror")
    MIRROR_DIR.mkdir(parents=True, exist_ok=True)
    keyring = mirror.publish(tiny, MIRROR_DIR)
    with mirror.serve(MIRROR_DIR) as url:
        print(
            f"image source: {images.DEFAULT_SOURCE} is not reachable from here; serving the "
            f"tiny test guest as ubuntu@24.04 from a signed mirror at {url}"
        )
        yield {"image-source": url, "image-keyring": str(keyring)}


def guest_report(name: str) -> str:
    """The guest's own report from its console log (the tiny guest), or the log's tail."""
    report = _load("report")
    backend = LibvirtBackend()
    deadline = time.monotonic() + REPORT_TIMEOUT_S
    text = ""
    while time.monotonic() < deadline:
        text = backend.console_log(name, 2000)
        try:
            return json.dumps(report.parse(text), indent=1, sort_keys=True)
        except report.NoReportError:
            pass
        if "login:" in text:
            break
        time.sleep(1)
    return "\n".join(text.splitlines()[-40:]) or "(nothing on the console yet)"


DEFAULT_REQUEST = {
    "name": "quickstart-vm",
    "memory": 512,
    "pinned-cores": "1",
    "storage": "root:4",
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
    with image_source() as image_config:
        return run(request, image_config | json.loads(args.config), delete=args.delete)


def run(request: dict, config: dict, *, delete: bool) -> int:
    """Set up, compose, print the guest's report and the resource table."""
    ctx = testing.Context(charm.VmHostCharm)
    bridge = None if delete else _default_network(config)
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
    if delete:
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
    print()
    print(f"[{time.monotonic() - started:5.1f}s] the guest's own report (from its console):")
    print(guest_report(request["name"]))
    print(f"[{time.monotonic() - started:5.1f}s] images cached on this host:")
    listed, _ = _run(ctx, state, "list-images")
    print(listed["table"] if listed else "(list-images failed)")

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
