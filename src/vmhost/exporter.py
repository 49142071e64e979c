"""The metrics exporter and NUMA map: a process of its own, started by the charm.

`python -m vmhost.exporter --settings /etc/vm-host/exporter.json` reads the hypervisor every
`interval` seconds in a background thread and serves, on `listen`:

- `/metrics`: Prometheus text (prometheus_client), built from the last reading (vmhost.metrics);
- `/` and `/vm/<name>`: the NUMA map, server-rendered HTML that refreshes itself.

Nothing it serves changes anything (GET and HEAD only). When the hypervisor goes away it keeps
answering, with `vmhost_up 0` and one log line per failed reading, never a traceback.

The charm writes the settings file and keeps the process running (`ensure_running`): a systemd
unit where systemd is PID 1, otherwise a detached process with a pid file that every
update-status checks. Neither path waits on the hypervisor, so no hook blocks on the exporter.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import http.server
import ipaddress
import json
import logging
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Literal

import jinja2
import pydantic

from vmhost import images, metrics, networks, refusals, report, settings
from vmhost.backends import Backend
from vmhost.model import HostNic, HostTopology, InvalidRequestError, Policy, VmRecord
from vmhost.placement import usage
from vmhost.topology import format_cpu_list

logger = logging.getLogger(__name__)

SERVICE_NAME = "vm-host-exporter"
SETTINGS_PATH = Path("/etc/vm-host/exporter.json")
UNIT_PATH = Path(f"/etc/systemd/system/{SERVICE_NAME}.service")
PID_PATH = Path(f"/run/{SERVICE_NAME}.pid")
LOG_PATH = Path(f"/var/log/{SERVICE_NAME}.log")
SETSID = "/usr/bin/setsid"
IMAGE_CACHE_DIR = Path(images.IMAGE_POOL_PATH)
"""Where cached base images live: the vm-host-images pool (not the default storage pool)."""
TEMPLATES_DIR = Path(__file__).resolve().parents[2] / "templates"
DEFAULT_LISTEN = "127.0.0.1:9540"
_VM_PATH = re.compile(r"^/vm/([A-Za-z0-9][A-Za-z0-9_.-]{0,62})$")


def parse_listen(text: str) -> tuple[str, int]:
    """Parse `metrics-listen` ("127.0.0.1:9540", "[::1]:9540", ":9540" for every address)."""
    host, sep, port = text.strip().rpartition(":")
    if not sep or not port.isdigit() or not 0 < int(port) < 65536:
        raise InvalidRequestError(
            "metrics-listen", f"{text!r} is not ADDRESS:PORT, for example '127.0.0.1:9540'"
        )
    host = host.strip("[]")
    if host:
        try:
            ipaddress.ip_address(host)
        except ValueError:
            raise InvalidRequestError(
                "metrics-listen",
                f"{host!r} is not an IP address; give one of this machine's addresses, "
                "127.0.0.1 (the collector runs on the same machine) or nothing for all",
            ) from None
    return host, int(port)


class ExporterSettings(pydantic.BaseModel):
    """What the exporter needs from the charm config; the charm writes it as JSON."""

    model_config = pydantic.ConfigDict(frozen=True, extra="ignore", defer_build=True)

    backend: Literal["libvirt", "lxd"] = "libvirt"
    libvirt_uri: str = "qemu:///system"
    lxd_project: str = "vm-host"
    listen: str = DEFAULT_LISTEN
    interval: float = pydantic.Field(default=30.0, ge=1, le=3600)
    cpu_overcommit_ratio: float = 1.0
    memory_overcommit_ratio: float = 1.0
    reserved_cpus: str = ""
    reserved_memory: int = 1024
    smt_policy: str = "prefer"
    hugepages: str = ""
    refusals_path: str = str(refusals.REFUSALS_PATH)
    image_cache_dir: str = str(IMAGE_CACHE_DIR)

    @pydantic.field_validator("listen")
    @classmethod
    def _listen(cls, value: str) -> str:
        try:
            parse_listen(value)
        except InvalidRequestError as exc:
            raise ValueError(str(exc)) from None
        return value

    @property
    def policy(self) -> Policy:
        """The placement rules (the same the charm gives show-resources)."""
        return settings.make_policy(
            cpu_overcommit_ratio=self.cpu_overcommit_ratio,
            memory_overcommit_ratio=self.memory_overcommit_ratio,
            reserved_cpus=self.reserved_cpus,
            reserved_memory_mib=self.reserved_memory,
            smt_policy=self.smt_policy,
        )

    def to_json(self) -> str:
        """The settings file's content (stable, so an unchanged config rewrites nothing)."""
        return json.dumps(self.model_dump(), sort_keys=True, indent=1) + "\n"


# ---------------------------------------------------------------------------------------------
# Reading the hypervisor


def make_backend(config: ExporterSettings) -> Backend:
    """Build the backend the settings name (imported lazily, as the charm does)."""
    if config.backend == "lxd":
        from vmhost.backends.lxd import LxdBackend

        return LxdBackend(project=config.lxd_project)
    from vmhost.backends.libvirt import LibvirtBackend

    return LibvirtBackend(uri=config.libvirt_uri)


def directory_bytes(path: Path) -> int:
    """Bytes of the regular files under a directory (0 when it does not exist)."""
    total = 0
    for root, _dirs, files in os.walk(path):
        for name in files:
            with contextlib.suppress(OSError):
                total += os.lstat(os.path.join(root, name)).st_size
    return total


def read_sample(backend: Backend, image_cache_dir: Path | None = None) -> metrics.Sample:
    """Read the hypervisor once; any failure becomes a sample with `error` set."""
    start = time.monotonic()
    try:
        version = backend.version()
        topology = backend.topology()
        vms = tuple(backend.list_vms())
        stats = tuple(backend.vm_stats())
    except Exception as exc:
        close = getattr(backend, "close", None)  # drop a broken libvirt connection
        if close is not None:
            with contextlib.suppress(Exception):
                close()
        return metrics.Sample(
            taken_at=time.time(),
            duration_s=time.monotonic() - start,
            error=f"{type(exc).__name__}: {exc}".splitlines()[0],
        )
    cache = directory_bytes(image_cache_dir) if image_cache_dir is not None else 0
    return metrics.Sample(
        taken_at=time.time(),
        duration_s=time.monotonic() - start,
        version=version,
        topology=topology,
        vms=vms,
        stats=stats,
        image_cache_bytes=cache,
    )


class Sampler:
    """Reads the hypervisor every `interval` seconds in a daemon thread; keeps the last reading."""

    def __init__(
        self,
        read: Callable[[], metrics.Sample],
        interval: float,
    ):
        self._read = read
        self.interval = interval
        self._sample: metrics.Sample | None = None
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._last_error = ""

    def current(self) -> metrics.Sample | None:
        """The last reading (None before the first)."""
        with self._lock:
            return self._sample

    def read_now(self) -> metrics.Sample:
        """Take one reading and keep it; log a change between readable and not, once."""
        sample = self._read()
        with self._lock:
            self._sample = sample
        if sample.error and sample.error != self._last_error:
            logger.warning("hypervisor not readable: %s", sample.error)
        elif not sample.error and self._last_error:
            logger.info("hypervisor readable again")
        self._last_error = sample.error
        return sample

    def start(self) -> None:
        """Read once now, then every interval in the background."""
        self.read_now()
        self._thread = threading.Thread(target=self._run, name="sampler", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.read_now()

    def stop(self) -> None:
        """Stop the background thread."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)


# ---------------------------------------------------------------------------------------------
# The NUMA map


STATE_COLOURS = {
    "free": "#d9f2d9",
    "shared-pool": "#bcd7f5",
    "reserved": "#9e9e9e",
    "held-idle": "#f2e6c9",
}


def vm_colour(name: str) -> str:
    """A stable colour per VM name, dark enough for white text."""
    hue = int.from_bytes(hashlib.sha256(name.encode()).digest()[:2], "big") % 360
    return f"hsl({hue}, 60%, 38%)"


def _vm_view(vm: VmRecord, host_nics: Sequence[HostNic]) -> dict[str, Any]:
    nodes = set(vm.placement.host_nodes)
    # The same off-node rule as show-resources and list-vms (report.vm_nics: a bridge is where
    # its ports are), plus the PFs the placement takes VFs of.
    off_node = {n["host-device"] for n in report.vm_nics(vm, host_nics) if n["off-node"]}
    for vf in vm.placement.vfs:
        pf_nodes = set(networks.device_nodes(host_nics, vf.nic))
        if nodes and pf_nodes and not pf_nodes <= nodes:
            off_node.add(vf.nic)
    return {
        "name": vm.name,
        "colour": vm_colour(vm.name),
        "state": vm.state.value,
        "owner": metrics.vm_owner(vm),
        "vcpus": vm.placement.vcpus,
        "memory_mib": vm.placement.memory_mib,
        "nodes": sorted(nodes),
        "cpus": format_cpu_list(vm.placement.pinned_cpus) or "shared",
        "spans": len(nodes) > 1,
        "off_node_nics": sorted(off_node),
        "hugepages": report.placement_data(vm.placement)["hugepages"],
        "interfaces": [dict(i) for i in vm.interfaces],
        "volumes": list(vm.volumes),
    }


def _percent(part: float, whole: float) -> float:
    return round(100.0 * part / whole, 2) if whole > 0 else 0.0


def page_context(
    sample: metrics.Sample | None,
    policy: Policy,
    interval: float,
    focus: str | None = None,
) -> dict[str, Any]:
    """Everything the NUMA map template draws, from one sample (the show-resources data)."""
    base: dict[str, Any] = {
        "refresh": max(5, round(interval)),
        "focus": focus,
        "colours": STATE_COLOURS,
        "up": sample is not None and sample.up,
        "error": "no reading yet" if sample is None else sample.error,
        "taken_at": time.strftime(
            "%Y-%m-%d %H:%M:%S UTC", time.gmtime(sample.taken_at if sample else time.time())
        ),
    }
    if sample is None or not sample.up or sample.topology is None:
        return base
    topology = sample.topology
    vms = list(sample.vms)
    data = report.resources_json(topology, vms, policy)
    host_usage = usage(topology, [vm.placement for vm in vms], policy)
    states = {n.node: n.cpu_states for n in host_usage.nodes}
    views = {vm.name: _vm_view(vm, topology.nics) for vm in vms}
    owner_of: dict[int, str] = {}
    for vm in vms:
        for cpu in vm.placement.pinned_cpus:
            owner_of.setdefault(cpu, vm.name)
    nodes = []
    for node_data in data["nodes"]:
        node = topology.node(node_data["id"])
        by_id = {c.id: c for c in node.cpus}
        cores: dict[tuple[int, ...], list[int]] = {}
        for cpu in node.cpus:
            siblings = tuple(sorted(s for s in cpu.siblings if s in by_id) or (cpu.id,))
            cores.setdefault(siblings, [])
            cores[siblings].append(cpu.id)
        grid = []
        for core in sorted(cores, key=lambda c: c[0]):
            threads = []
            for cpu_id in sorted(set(core) | set(cores[core])):
                state = states[node.id].get(cpu_id, "free")
                vm_name = owner_of.get(cpu_id) if state == "pinned" else None
                threads.append(
                    {
                        "id": cpu_id,
                        "state": state,
                        "vm": vm_name,
                        "colour": vm_colour(vm_name) if vm_name else STATE_COLOURS[state],
                    }
                )
            grid.append(threads)
        memory = node_data["memory-mib"]
        general = memory["general"] or 1
        nodes.append(
            {
                "id": node.id,
                "cpus": node_data["cpus"],
                "grid": grid,
                "memory": memory,
                "memory_bar": [
                    ("reserved", memory["reserved"], _percent(memory["reserved"], general)),
                    ("bound", memory["bound"], _percent(memory["bound"], general)),
                    ("free", memory["free"], _percent(memory["free"], general)),
                ],
                "hugepages": [
                    {
                        **h,
                        "bar": [
                            ("allocated", h["allocated"], _percent(h["allocated"], h["total"])),
                            (
                                "reserved",
                                h["unavailable"],
                                _percent(h["unavailable"], h["total"]),
                            ),
                            ("free", h["free"], _percent(h["free"], h["total"])),
                        ],
                    }
                    for h in node_data["hugepages"]
                ],
                "vms": [views[name] for name in node_data["vms"] if name in views],
                "nics": _nics_on(topology, data, node.id),
            }
        )
    pools = [
        {**p, "used_percent": _percent(p["allocation-bytes"], p["capacity-bytes"])}
        for p in data["pools"]
    ]
    return {
        **base,
        "backend": data["backend"],
        "version": data["version"],
        "nodes": nodes,
        "shared": data["shared"],
        "floating": [views[n] for n in data["shared"]["floating-vms"] if n in views],
        "nics_elsewhere": _nics_on(topology, data, None),
        "pools": pools,
        "vm": views.get(focus) if focus else None,
    }


def _nics_on(topology: HostTopology, data: dict[str, Any], node: int | None) -> list[dict]:
    vfs = {n["name"]: n for n in report.sriov_nics(data)}
    shown = []
    for nic in sorted(topology.nics, key=lambda n: n.name):
        if nic.numa_node != node or nic.kind.value == "vf":
            continue
        if node is None and nic.kind.value != "physical" and nic.name not in vfs:
            continue  # bridges, taps and other virtual links have no node; not worth a row
        shown.append(
            {
                "name": nic.name,
                "kind": nic.kind.value,
                "vfs": vfs.get(nic.name),
                "children": sorted(
                    n.name for n in topology.nics if n.kind.value == "vf" and n.parent == nic.name
                ),
            }
        )
    return shown


def _environment(templates_dir: Path) -> jinja2.Environment:
    return jinja2.Environment(
        loader=jinja2.FileSystemLoader(str(templates_dir)),
        autoescape=True,
        undefined=jinja2.StrictUndefined,
    )


def render_page(context: dict[str, Any], templates_dir: Path = TEMPLATES_DIR) -> str:
    """Render the NUMA map (autoescaped: VM names and owners come from requesters)."""
    return _environment(templates_dir).get_template("numa-map.html.j2").render(**context)


# ---------------------------------------------------------------------------------------------
# HTTP


class Server:
    """The exporter's HTTP side: /metrics, / and /vm/<name>, read-only."""

    def __init__(
        self,
        config: ExporterSettings,
        sampler: Sampler,
        templates_dir: Path = TEMPLATES_DIR,
    ):
        from prometheus_client import CollectorRegistry

        self.config = config
        self.sampler = sampler
        self.templates_dir = templates_dir
        self.policy = config.policy
        self.hugepages = settings.parse_hugepages_setting(config.hugepages)
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(_Collector(self))
        host, port = parse_listen(config.listen)
        handler = _handler_for(self)
        server_class = _server_class(host)
        self.httpd = server_class((host, port), handler)

    @property
    def port(self) -> int:
        """The port actually bound (tests ask for port 0)."""
        return int(self.httpd.server_address[1])

    def metrics_text(self) -> bytes:
        """The Prometheus exposition of the last reading."""
        from prometheus_client import generate_latest

        return generate_latest(self.registry)

    def page(self, focus: str | None = None) -> str:
        """The NUMA map (of the whole host, or with one VM's details)."""
        context = page_context(self.sampler.current(), self.policy, self.config.interval, focus)
        return render_page(context, self.templates_dir)

    def serve_forever(self) -> None:
        """Answer requests until shutdown() is called."""
        self.httpd.serve_forever(poll_interval=0.5)

    def shutdown(self) -> None:
        """Stop answering and release the port."""
        self.httpd.shutdown()
        self.httpd.server_close()


class _Collector:
    def __init__(self, server: Server):
        self._server = server

    def collect(self) -> Any:
        counts = refusals.read(Path(self._server.config.refusals_path))
        return metrics.families(
            self._server.sampler.current(),
            self._server.policy,
            self._server.hugepages,
            counts,
        )


def _server_class(host: str) -> type[http.server.ThreadingHTTPServer]:
    class _Server(http.server.ThreadingHTTPServer):
        daemon_threads = True
        allow_reuse_address = True
        address_family = socket.AF_INET6 if ":" in host else socket.AF_INET

    return _Server


def _handler_for(server: Server) -> type[http.server.BaseHTTPRequestHandler]:
    class _Handler(http.server.BaseHTTPRequestHandler):
        server_version = "vm-host-exporter"
        sys_version = ""

        def log_message(self, format: str, *args: Any) -> None:
            logger.debug("%s " + format, self.address_string(), *args)

        def _send(self, code: int, body: bytes, content_type: str) -> None:
            self.send_response(code)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.send_header("Cache-Control", "no-store")
            self.send_header("X-Content-Type-Options", "nosniff")
            self.send_header(
                "Content-Security-Policy", "default-src 'none'; style-src 'unsafe-inline'"
            )
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(body)

        def do_GET(self) -> None:
            from prometheus_client import CONTENT_TYPE_LATEST

            path = self.path.split("?", 1)[0]
            html = "text/html; charset=utf-8"
            try:
                if path == "/metrics":
                    self._send(200, server.metrics_text(), CONTENT_TYPE_LATEST)
                elif path == "/":
                    self._send(200, server.page().encode(), html)
                elif match := _VM_PATH.match(path):
                    sample = server.sampler.current()
                    names = {vm.name for vm in sample.vms} if sample else set()
                    if match[1] not in names:
                        self._send(404, b"no such VM on this host\n", "text/plain")
                    else:
                        self._send(200, server.page(match[1]).encode(), html)
                else:
                    self._send(404, b"not found: try /, /vm/<name> or /metrics\n", "text/plain")
            except Exception as exc:
                logger.warning("error answering %s: %s: %s", path, type(exc).__name__, exc)
                self._send(500, b"internal error\n", "text/plain")

        do_HEAD = do_GET  # noqa: N815 - http.server's name

    return _Handler


# ---------------------------------------------------------------------------------------------
# Keeping the process running (called by the charm)


def _pythonpath() -> str:
    """The import path of this process (the charm's src, lib and venv), for the exporter."""
    return os.pathsep.join(p for p in sys.path if p and os.path.isdir(p))


def unit_file(
    python: str = sys.executable,
    pythonpath: str | None = None,
    settings_path: Path = SETTINGS_PATH,
) -> str:
    """The systemd unit that runs the exporter."""
    path = pythonpath if pythonpath is not None else _pythonpath()
    return (
        "[Unit]\n"
        "Description=vm-host metrics exporter and NUMA map\n"
        "After=network.target libvirtd.service\n\n"
        "[Service]\n"
        f'Environment="PYTHONPATH={path}"\n'
        f"ExecStart={python} -m vmhost.exporter --settings {settings_path}\n"
        "Restart=always\n"
        "RestartSec=5\n"
        "NoNewPrivileges=true\n\n"
        "[Install]\n"
        "WantedBy=multi-user.target\n"
    )


def _is_exporter(pid: int) -> bool:
    try:
        return b"vmhost.exporter" in Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False


def running_pid(pid_path: Path = PID_PATH) -> int | None:
    """The pid of the running exporter the pid file names, or None (gone, or not an exporter)."""
    try:
        pid = int(pid_path.read_text().strip())
    except (OSError, ValueError):
        return None
    return pid if _is_exporter(pid) else None


def _stop_pid(pid: int, timeout_s: float = 5.0) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and _is_exporter(pid):
        time.sleep(0.1)
    if _is_exporter(pid):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def ensure_running(
    config: ExporterSettings,
    *,
    settings_path: Path = SETTINGS_PATH,
    systemd_run_dir: Path = Path("/run/systemd/system"),
    unit_path: Path = UNIT_PATH,
    pid_path: Path = PID_PATH,
    log_path: Path = LOG_PATH,
    python: str = sys.executable,
) -> str:
    """Write the settings and make sure the exporter runs with them; return what was done.

    Restarts only when the settings (or the unit) changed or the process is gone, so a hook
    that changes nothing leaves a running exporter alone. Never waits for the exporter.
    """
    from vmhost import host

    changed = host.write_if_changed(settings_path, config.to_json(), 0o644)
    if systemd_run_dir.is_dir():
        from charmlibs import systemd

        unit_changed = host.write_if_changed(unit_path, unit_file(python, None, settings_path))
        if unit_changed:
            systemd.daemon_reload()
        systemd.service_enable(SERVICE_NAME)
        if changed or unit_changed or not systemd.service_running(SERVICE_NAME):
            systemd.service_restart(SERVICE_NAME)
            return "restarted (systemd)"
        return "running (systemd)"
    pid = running_pid(pid_path)
    if pid is not None and not changed:
        return "running"
    if pid is not None:
        _stop_pid(pid)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PYTHONPATH": _pythonpath()}
    command = [python, "-m", "vmhost.exporter", "--settings", str(settings_path)]
    with open(log_path, "ab") as log:
        # setsid -f: the exporter leaves the hook's session and is not the hook's child, so
        # it outlives the hook; it writes its own pid file once it runs.
        subprocess.run(
            [SETSID, "-f", *command, "--pid-file", str(pid_path)],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=log,
            env=env,
            check=True,
            timeout=30,
        )
    return "restarted" if pid is not None else "started"


def stop(
    *,
    systemd_run_dir: Path = Path("/run/systemd/system"),
    unit_path: Path = UNIT_PATH,
    pid_path: Path = PID_PATH,
    settings_path: Path = SETTINGS_PATH,
) -> None:
    """Stop the exporter and remove exactly the files ensure_running wrote."""
    if systemd_run_dir.is_dir() and unit_path.exists():
        from charmlibs import systemd

        with contextlib.suppress(systemd.SystemdError):
            systemd.service_stop(SERVICE_NAME)
            systemd.service_disable(SERVICE_NAME)
        unit_path.unlink(missing_ok=True)
        with contextlib.suppress(systemd.SystemdError):
            systemd.daemon_reload()
    pid = running_pid(pid_path)
    if pid is not None:
        _stop_pid(pid)
    pid_path.unlink(missing_ok=True)
    settings_path.unlink(missing_ok=True)


# ---------------------------------------------------------------------------------------------
# The process


def main(argv: Sequence[str] | None = None) -> int:
    """Run the exporter until SIGTERM/SIGINT."""
    parser = argparse.ArgumentParser(
        prog="vmhost.exporter", description="vm-host metrics exporter and NUMA map"
    )
    parser.add_argument("--settings", type=Path, default=SETTINGS_PATH)
    parser.add_argument("--templates", type=Path, default=TEMPLATES_DIR)
    parser.add_argument("--pid-file", type=Path, default=None)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    try:
        config = ExporterSettings.model_validate_json(args.settings.read_text())
        config.policy  # noqa: B018 - validates reserved-cpus and smt-policy up front
        settings.parse_hugepages_setting(config.hugepages)
    except (OSError, pydantic.ValidationError, InvalidRequestError) as exc:
        logger.error("cannot read settings %s: %s", args.settings, str(exc).splitlines()[0])
        return 2
    backend = make_backend(config)
    cache = Path(config.image_cache_dir)
    sampler = Sampler(lambda: read_sample(backend, cache), config.interval)
    try:
        server = Server(config, sampler, args.templates)
    except OSError as exc:
        logger.error("cannot listen on %s: %s", config.listen, exc)
        return 2
    stopping = threading.Event()

    def _stop(_signum: int, _frame: object) -> None:
        if not stopping.is_set():
            stopping.set()
            threading.Thread(target=server.shutdown, daemon=True).start()

    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    if args.pid_file is not None:
        args.pid_file.write_text(f"{os.getpid()}\n")
    sampler.start()
    logger.info("serving on %s (reading the hypervisor every %ss)", config.listen, config.interval)
    server.serve_forever()
    sampler.stop()
    if args.pid_file is not None:
        with contextlib.suppress(OSError):
            if args.pid_file.read_text().strip() == str(os.getpid()):
                args.pid_file.unlink()
    return 0


if __name__ == "__main__":
    sys.exit(main())
