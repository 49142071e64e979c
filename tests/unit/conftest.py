"""Shared unit test fixtures."""

from pathlib import Path

import pytest

SHARED_FIXTURES = Path(__file__).resolve().parents[2].parent / "shared" / "fixtures"
"""Host data fixtures; CI clones the repository beside shared/, so resolve relative to it."""


@pytest.fixture
def fixtures_dir() -> Path:
    """Return the shared fixtures directory (libvirt-caps/, lxd-resources/)."""
    return SHARED_FIXTURES
