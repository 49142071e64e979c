"""The charm as Juju receives it: `charmcraft pack` (tests/bin/pack-charm) and its artifact.

Packing runs once per session (about a minute with charmcraft cached; see the script for what
it sets up on a Debian machine). VMHOST_PACKED_CHARM names an existing .charm to check instead.
The packed venv is imported by the Python 3.12 it was built for, with nothing but the unpacked
charm on sys.path (-I -S: no user or system site-packages), so a dependency missing from the
artifact cannot hide behind one installed on this machine. No daemon is touched.

Where packing cannot run (not root, no unshare, no Python 3.12, charmcraft not installable),
the tests skip with the reason, and fail with it when CI is set.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import zipfile
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
PACK = REPO / "tests" / "bin" / "pack-charm"
CANNOT_RUN = 2  # pack-charm's exit status when this machine cannot pack


def _cannot_pack(reason: str) -> None:
    if os.environ.get("CI"):
        pytest.fail(f"charmcraft pack cannot run here: {reason}")
    pytest.skip(f"charmcraft pack cannot run here: {reason}")


def _python312(out: Path) -> str:
    recorded = out / "build-python"
    if recorded.exists():
        return recorded.read_text().strip()
    return os.environ.get("VMHOST_PACK_PYTHON") or shutil.which("python3.12") or ""


@pytest.fixture(scope="module")
def packed(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """The .charm and the Python 3.12 to import its venv with."""
    given = os.environ.get("VMHOST_PACKED_CHARM")
    if given:
        charm = Path(given)
        return charm, _python312(charm.parent)
    if os.geteuid() != 0:
        _cannot_pack("needs root (destructive-mode build, unshare -m)")
    for tool in ("unshare", "mount", "git", "uv"):
        if shutil.which(tool) is None:
            _cannot_pack(f"{tool} is not on PATH")
    out = tmp_path_factory.mktemp("packed")
    proc = subprocess.run(
        ["bash", str(PACK), str(out)], capture_output=True, text=True, check=False, timeout=1200
    )
    tail = "\n".join((proc.stderr + proc.stdout).splitlines()[-40:])
    if proc.returncode == CANNOT_RUN:
        _cannot_pack(tail)
    assert proc.returncode == 0, f"tests/bin/pack-charm failed ({proc.returncode}):\n{tail}"
    charm = Path(proc.stdout.strip().splitlines()[-1])
    assert charm.is_file(), f"pack-charm named {charm}, which does not exist"
    return charm, _python312(out)


@pytest.fixture(scope="module")
def unpacked(packed: tuple[Path, str], tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("unpacked")
    with zipfile.ZipFile(packed[0]) as archive:
        archive.extractall(root)
    return root


def test_artifact_holds_what_juju_reads(packed: tuple[Path, str]) -> None:
    with zipfile.ZipFile(packed[0]) as archive:
        names = set(archive.namelist())
        for name in ("metadata.yaml", "config.yaml", "actions.yaml"):
            assert name in names, f"{name} missing from {packed[0].name}"
            assert archive.read(name) == (REPO / name).read_bytes(), f"{name} differs from repo"
        manifest = yaml.safe_load(archive.read("manifest.yaml"))
        dispatch = archive.getinfo("dispatch")
        dispatch_text = archive.read("dispatch").decode()

    assert manifest["charmcraft-version"]
    assert manifest["bases"] == [
        {"name": "ubuntu", "channel": "24.04", "architectures": ["amd64"]}
    ], manifest
    assert (dispatch.external_attr >> 16) & 0o111 == 0o111, oct(dispatch.external_attr >> 16)
    assert dispatch_text.startswith("#!"), dispatch_text[:80]
    assert "src/charm.py" in dispatch_text, dispatch_text

    templates = {p.name for p in (REPO / "templates").iterdir() if p.is_file()}
    assert templates, "the repo has no templates/"
    assert {n.removeprefix("templates/") for n in names if n.startswith("templates/")} >= templates
    for name in ("src/charm.py", "src/vmhost/__init__.py", "lib/charms/vm_host/v0/vm_host.py"):
        assert name in names, f"{name} missing from {packed[0].name}"
    assert any(n.startswith("venv/lib/python3.12/site-packages/libvirtmod") for n in names), (
        "libvirt-python's extension is not in venv/ (built for Python 3.12)"
    )


def test_packed_venv_imports_under_python312(packed: tuple[Path, str], unpacked: Path) -> None:
    python = packed[1]
    if not python:
        _cannot_pack("no Python 3.12 to import the packed venv with")
    site = unpacked / "venv" / "lib" / "python3.12" / "site-packages"
    assert site.is_dir(), f"no {site.relative_to(unpacked)} in the artifact"
    # Import the dependencies, then every module of the charm's own code, from the artifact only.
    script = """
import importlib, pkgutil, sys
sys.path[:0] = sys.argv[1:]
assert sys.version_info[:2] == (3, 12), sys.version
import libvirt, pylxd, jinja2, pydantic, ops, yaml, cryptography, prometheus_client
import charms.vm_host.v0.vm_host, charms.vm_host.v0.vm_host_access
import vmhost
names = [m.name for m in pkgutil.walk_packages(vmhost.__path__, "vmhost.")]
for name in names:
    importlib.import_module(name)
import charm
for mod in (libvirt, pylxd, jinja2, pydantic, ops, vmhost, charm):
    print(mod.__name__, mod.__file__)
print("modules", len(names))
"""
    proc = subprocess.run(
        [
            python,
            "-I",
            "-S",
            "-c",
            script,
            str(site),
            str(unpacked / "src"),
            str(unpacked / "lib"),
        ],
        capture_output=True,
        text=True,
        check=False,
        timeout=120,
        cwd=unpacked,
    )
    assert proc.returncode == 0, proc.stderr
    imported = dict(line.split(" ", 1) for line in proc.stdout.splitlines())
    for name in ("libvirt", "pylxd", "jinja2", "pydantic", "ops", "vmhost", "charm"):
        assert imported[name].startswith(str(unpacked)), (name, imported[name])
    assert int(imported["modules"]) >= 20, proc.stdout
