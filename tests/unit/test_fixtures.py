"""The committed host documents are exactly what tests/fixtures/generate.py writes."""

from __future__ import annotations

import json
import xml.etree.ElementTree as ET

from tests.fixtures import LIBVIRT_CAPS, LXD_RESOURCES
from tests.fixtures.generate import documents, main


def test_committed_fixtures_match_the_generator() -> None:
    assert main(["--check"]) == 0


def test_every_committed_fixture_is_generated() -> None:
    committed = set(LIBVIRT_CAPS.glob("*.xml")) | set(LXD_RESOURCES.glob("*.json"))
    assert committed == set(documents())


def test_documents_are_well_formed() -> None:
    for path, text in documents().items():
        if path.suffix == ".xml":
            assert ET.fromstring(text).tag == "capabilities", path.name
        else:
            assert isinstance(json.loads(text), dict), path.name
