"""Where vm-host keeps its state on the host: images, the journal, access, LXD's socket.

The image cache pool and fetch state, the relation journal, libvirt access (the access user's
accounts, the sshd drop-in, host keys) and LXD's unix socket.

One record, made once per hook by the charm and handed to everything that builds a backend or
touches those places, so that nothing reads the locations from module globals at run time. A
deployed charm always uses the defaults; a test on the real daemons gives its charm (and the
backend it builds) its own names and directories instead of patching modules.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from vmhost import imagecache, images
from vmhost.access import SYSTEM, AccessLayout
from vmhost.relation import journal

__all__ = ["HostLayout"]


@dataclasses.dataclass(frozen=True)
class HostLayout:
    """The host's vm-host locations; every default is today's production location."""

    image_pool: str = images.IMAGE_POOL
    """The libvirt directory pool of cached base images."""
    image_pool_path: str = images.IMAGE_POOL_PATH
    """That pool's directory (staging files are made beside it, on the same filesystem)."""
    image_state_dir: str = imagecache.STATE_DIR
    """Progress and lock files of image fetches (hooks and background workers share them)."""
    journal_dir: Path = journal.JOURNAL_DIR
    """The relation journal: relations this unit saw broken, units seen leaving."""
    access: AccessLayout = SYSTEM
    """The access user's accounts and home, the sshd drop-in, the host's SSH keys."""
    lxd_socket: str | None = None
    """LXD's unix socket; None finds the snap's or Debian's (lxd_trust.find_socket)."""

    def image_settings(self, settings: imagecache.Settings) -> imagecache.Settings:
        """Return image settings (source, arch, local dir) with this layout's locations."""
        return dataclasses.replace(
            settings,
            state_dir=self.image_state_dir,
            pool=self.image_pool,
            pool_path=self.image_pool_path,
        )
