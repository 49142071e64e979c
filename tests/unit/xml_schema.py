"""Checking rendered XML against libvirt's own schemas (virt-xml-validate, libvirt-clients)."""

import shutil
import subprocess
from pathlib import Path


def assert_valid(xml: str, tmp_path: Path, schema: str = "domain") -> None:
    """Fail unless virt-xml-validate accepts `xml` as a libvirt `schema` document."""
    validator = shutil.which("virt-xml-validate")
    assert validator is not None, (
        "virt-xml-validate is needed (apt install libvirt-clients libxml2-utils;"
        " tests/bin/ensure-libvirt.sh does it)"
    )
    path = tmp_path / f"{schema}.xml"
    path.write_text(xml)
    result = subprocess.run([validator, str(path), schema], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr + xml
