"""libvirt access over SSH: the access user and the managed block of its authorized_keys.

Managers (MAAS, Terraform, other charms) reach libvirt as `qemu+ssh://<user>@<host>/system`.
Each key vm-host authorizes is written with `restrict` and a forced command that only connects
to the libvirt socket, so a key never gives a shell, a pty or forwarding.

The managed block of authorized_keys is the ledger: every line carries its source in the
comment field (`vm-host:config`, `vm-host:relation:<id>:<unit>`, `vm-host:action:<name>`), so
keys added by an action survive every hook without charm state, and each source's keys can be
removed exactly. Lines outside the block belong to the operator and are never touched.

The access user is deleted on removal only when vm-host created it (a marker file in its home
says so) and no operator lines remain outside the block; otherwise only the block goes.
"""

from __future__ import annotations

import base64
import contextlib
import grp
import hashlib
import logging
import os
import pwd
import re
import subprocess
import tempfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import jinja2

from vmhost import host, sshkeys
from vmhost.model import InvalidRequestError, VmHostError

logger = logging.getLogger(__name__)

BLOCK_BEGIN = "# BEGIN vm-host managed keys"
BLOCK_END = "# END vm-host managed keys"
BLOCK_NOTE = "# Lines between these markers are managed by vm-host; edits here are overwritten."


VIRT_SSH_HELPER = "/usr/bin/virt-ssh-helper"
NETCAT = "/usr/bin/nc"
LIBVIRT_SOCKET = "/run/libvirt/libvirt-sock"

USERADD = "/usr/sbin/useradd"
USERMOD = "/usr/sbin/usermod"
USERDEL = "/usr/sbin/userdel"
USER_SHELL = "/bin/sh"
"""sshd runs a forced command through the user's login shell, so it must be a real shell;
the forced command on every key (and the sshd Match block) is what keeps it from a prompt."""
CREATED_MARKER = ".vm-host-created"

SSHD_DROP_IN = Path("/etc/ssh/sshd_config.d/vm-host.conf")
TEMPLATES = Path(__file__).resolve().parents[2] / "templates"

_USER_RE = re.compile(r"^[a-z_][a-z0-9_-]{0,30}$")
_ACTION_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._@-]{0,63}$")
_SOURCE_RE = re.compile(
    r"^(config"
    r"|relation:[0-9]{1,9}:[a-z][a-z0-9-]{0,62}(/[0-9]{1,9})?"
    r"|action:[A-Za-z0-9][A-Za-z0-9._@-]{0,63})$"
)
_FINGERPRINT_RE = re.compile(r"^SHA256:[A-Za-z0-9+/]{43}$")

_SOURCE_FIELD = {"config": "ssh-authorized-keys", "relation": "ssh-public-key", "action": "key"}


# ---------------------------------------------------------------------------------------------
# Keys


@dataclass(frozen=True, order=True)
class AuthorizedKey:
    """A validated public key and where it came from.

    Ordered by source, then key, so the managed block is written in a stable order whatever
    order the sources were gathered in.
    """

    source: str
    """"config", "relation:<id>:<unit>" or "action:<name>"."""
    key_type: str
    blob: str
    """The base64 key body, exactly as validated."""

    @property
    def fingerprint(self) -> str:
        """The SHA256 fingerprint in ssh-keygen's notation ("SHA256:...")."""
        digest = hashlib.sha256(base64.b64decode(self.blob)).digest()
        return "SHA256:" + base64.b64encode(digest).decode().rstrip("=")

    @property
    def public_key(self) -> str:
        """The key as "<type> <base64>", without options or comment."""
        return f"{self.key_type} {self.blob}"

    @property
    def action_name(self) -> str | None:
        """The action name for keys added by the authorize action, else None."""
        return self.source.removeprefix("action:") if self.source.startswith("action:") else None


SYSTEM_ACCOUNTS = frozenset(
    {
        "root", "ubuntu", "admin", "daemon", "bin", "sys", "sync", "games", "man", "lp",
        "mail", "news", "uucp", "proxy", "www-data", "backup", "list", "irc", "gnats",
        "nobody", "sshd", "syslog", "messagebus", "libvirt", "libvirt-qemu",
        "libvirt-dnsmasq", "lxd", "kvm", "sudo", "adm", "juju",
    }
)  # fmt: skip
"""Accounts (and group names) that must never become the access user: sshd would confine all
their SSH logins to libvirt, or useradd would fail on the existing group in every hook."""


def validate_user_name(name: str) -> str:
    """Refuse user names that useradd or sshd would treat specially.

    Raises:
        InvalidRequestError: the name is not a plain lower-case POSIX account name, or it is a
            system or login account.
    """
    if not isinstance(name, str) or not _USER_RE.fullmatch(name):
        raise InvalidRequestError(
            "libvirt-user",
            f"{name!r} is not a valid user name: use 1-31 characters of a-z, 0-9, '_' and '-', "
            "starting with a letter or '_'",
        )
    if name in SYSTEM_ACCOUNTS:
        raise InvalidRequestError(
            "libvirt-user",
            f"{name!r} is a system or login account; sshd would confine all its SSH logins to "
            "libvirt: set a dedicated name such as 'virsh'",
        )
    return name


def validate_source(source: str) -> str:
    """Refuse source tags that could not be found again or would break the key line."""
    if not isinstance(source, str) or not _SOURCE_RE.fullmatch(source):
        raise InvalidRequestError(
            "source",
            f"{source!r} is not a key source: use 'config', 'relation:<id>:<unit>' or "
            "'action:<name>'",
        )
    return source


def validate_action_name(name: str) -> str:
    """Refuse names for action-added keys that cannot be written into a key comment."""
    if not isinstance(name, str) or not _ACTION_NAME_RE.fullmatch(name):
        raise InvalidRequestError(
            "name",
            f"{name!r} is not a valid key name: use 1-64 characters of letters, digits, "
            "'.', '_', '@' and '-', starting with a letter or digit",
        )
    return name


def _field_for(source: str) -> str:
    return _SOURCE_FIELD.get(source.split(":", 1)[0], "key")


def parse_public_key(text: str, source: str) -> AuthorizedKey:
    """Validate one OpenSSH public key line and tag it with its source.

    The comment is dropped (the source tag replaces it), and anything that would let a key line
    carry its own options (command=, permitopen=, ...) is refused: the options on every line
    are vm-host's.

    Args:
        text: "<type> <base64> [comment]".
        source: where the key came from; see `validate_source`.

    Raises:
        InvalidRequestError: the key is refused; the field names its source (config
            "ssh-authorized-keys", relation "ssh-public-key", action "key") and the message
            says why.
    """
    validate_source(source)
    key_type, blob, _comment = sshkeys.parse_key_line(text, _field_for(source))
    return AuthorizedKey(source=source, key_type=key_type, blob=blob)


def parse_public_keys(text: str, source: str) -> list[AuthorizedKey]:
    """Validate a multi-line key list (the `ssh-authorized-keys` config), one key per line.

    Blank lines and lines starting with '#' are skipped; the same key twice counts once.

    Raises:
        InvalidRequestError: on the first bad line, naming its line number.
    """
    keys: dict[str, AuthorizedKey] = {}
    for number, line in enumerate((text or "").splitlines(), start=1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        try:
            key = parse_public_key(line, source)
        except InvalidRequestError as exc:
            raise InvalidRequestError(exc.field, f"line {number}: {_reason(exc)}") from None
        keys.setdefault(key.public_key, key)
    return list(keys.values())


def _reason(exc: InvalidRequestError) -> str:
    return str(exc).removeprefix(f"{exc.field}: ")


# ---------------------------------------------------------------------------------------------
# The managed block


def forced_command(layout: AccessLayout | None = None) -> str:
    """Return the command every managed key is forced to run.

    virt-ssh-helper (libvirt >= 6.8) is preferred: it ships with the daemon, and speaks to the
    daemon for the URI it is given. nc to the daemon socket is MAAS's recipe, kept for hosts
    without it.
    """
    helper = (layout or SYSTEM).virt_ssh_helper
    if os.access(helper, os.X_OK):
        return f"{helper} qemu:///system"
    return f"{NETCAT} -q 0 -U {LIBVIRT_SOCKET}"


def render_key_line(key: AuthorizedKey, command: str) -> str:
    """Return the authorized_keys line for one managed key."""
    if '"' in command or sshkeys.CONTROL_RE.search(command):
        raise VmHostError(f"forced command {command!r} cannot be quoted in authorized_keys")
    return f'restrict,command="{command}" {key.key_type} {key.blob} vm-host:{key.source}'


def _is_managed_line(line: str) -> bool:
    return line in (BLOCK_NOTE, "") or (
        line.startswith('restrict,command="') and " vm-host:" in line
    )


def _split_block(existing: str) -> tuple[list[str], list[str], list[str]]:
    """Split authorized_keys into (before, block body, after).

    A begin marker without an end marker (a hand-edited file) takes only the managed-looking
    lines that follow it, so the block is replaced instead of duplicated and no operator line
    after it is lost.
    """
    lines = existing.splitlines()
    try:
        begin = lines.index(BLOCK_BEGIN)
    except ValueError:
        return lines, [], []
    try:
        end = lines.index(BLOCK_END, begin + 1)
    except ValueError:
        end = begin + 1
        while end < len(lines) and _is_managed_line(lines[end]):
            end += 1
        return lines[:begin], lines[begin + 1 : end], lines[end:]
    return lines[:begin], lines[begin + 1 : end], lines[end + 1 :]


def render_authorized_keys(
    existing: str, keys: Sequence[AuthorizedKey], command: str | None = None
) -> str:
    """Return authorized_keys with the managed block holding exactly `keys`.

    Pure: lines outside the block are kept as they are, in place; the block is replaced
    wholesale, appended when absent, or dropped when `keys` is empty; keys are written once
    each, sorted by source then key.
    """
    command = command or forced_command()
    before, _, after = _split_block(existing)
    body = [render_key_line(k, command) for k in sorted(set(keys))]
    block = [BLOCK_BEGIN, BLOCK_NOTE, *body, BLOCK_END] if body else []
    lines = before + block + after
    return "\n".join(lines) + "\n" if lines else ""


def managed_keys(text: str) -> list[AuthorizedKey]:
    """Read back the keys of the managed block (lines that do not parse are dropped)."""
    _, body, _ = _split_block(text)
    keys: list[AuthorizedKey] = []
    for line in body:
        if not line.startswith("restrict,command="):
            continue
        _, _, rest = line.partition('" ')
        parts = rest.split()
        if len(parts) != 3 or not parts[2].startswith("vm-host:"):
            continue
        try:
            keys.append(parse_public_key(f"{parts[0]} {parts[1]}", parts[2][len("vm-host:") :]))
        except InvalidRequestError:
            logger.warning("dropping an unreadable line from the managed authorized_keys block")
    return keys


# ---------------------------------------------------------------------------------------------
# The access user


@dataclass(frozen=True)
class AccessUser:
    """The local account managers log in as."""

    name: str
    uid: int
    gid: int
    home: Path

    @property
    def authorized_keys(self) -> Path:
        """Path of the user's authorized_keys."""
        return self.home / ".ssh" / "authorized_keys"


class Accounts(Protocol):
    """The host's account databases: passwd and group reads, useradd and friends."""

    def lookup(self, name: str) -> AccessUser | None:
        """The account of that name, None when there is none."""
        ...

    def login_shell(self, name: str) -> str:
        """The account's login shell ("" when it has none)."""
        ...

    def existing_groups(self, names: Iterable[str]) -> list[str]:
        """Those of `names` that are groups on this host, in order."""
        ...

    def groups_of(self, name: str) -> set[str]:
        """The supplementary groups the account is a member of."""
        ...

    def add_user(self, name: str, home: Path, shell: str, groups: Sequence[str]) -> None:
        """Create a system account with its own group and home (useradd)."""
        ...

    def lock(self, name: str) -> None:
        """Lock the account's password (usermod --lock)."""
        ...

    def add_to_groups(self, name: str, groups: Sequence[str]) -> None:
        """Append supplementary groups (usermod --append --groups)."""
        ...

    def delete_user(self, name: str) -> None:
        """Delete the account and its home (userdel --remove)."""
        ...


class SystemAccounts:
    """This machine's accounts: the passwd and group databases, useradd, usermod, userdel."""

    def lookup(self, name: str) -> AccessUser | None:
        """The account of that name from the passwd database."""
        try:
            entry = pwd.getpwnam(name)
        except KeyError:
            return None
        return AccessUser(entry.pw_name, entry.pw_uid, entry.pw_gid, Path(entry.pw_dir))

    def login_shell(self, name: str) -> str:
        """The account's login shell from the passwd database."""
        return pwd.getpwnam(name).pw_shell

    def existing_groups(self, names: Iterable[str]) -> list[str]:
        """Those of `names` the group database knows."""
        found = []
        for name in names:
            with contextlib.suppress(KeyError):
                grp.getgrnam(name)
                found.append(name)
        return found

    def groups_of(self, name: str) -> set[str]:
        """The groups listing the account as a member."""
        return {g.gr_name for g in grp.getgrall() if name in g.gr_mem}

    def add_user(self, name: str, home: Path, shell: str, groups: Sequence[str]) -> None:
        """Run useradd --system --create-home, with the account's own group."""
        command = [USERADD, "--system", "--create-home", "--home-dir", str(home)]
        command += ["--shell", shell, "--user-group"]
        if groups:
            command += ["--groups", ",".join(groups)]
        subprocess.run([*command, name], check=True, capture_output=True)

    def lock(self, name: str) -> None:
        """Run usermod --lock."""
        subprocess.run([USERMOD, "--lock", name], check=True, capture_output=True)

    def add_to_groups(self, name: str, groups: Sequence[str]) -> None:
        """Run usermod --append --groups."""
        subprocess.run(
            [USERMOD, "--append", "--groups", ",".join(groups), name],
            check=True,
            capture_output=True,
        )

    def delete_user(self, name: str) -> None:
        """Run userdel --remove."""
        subprocess.run([USERDEL, "--remove", name], check=True, capture_output=True)


@dataclass(frozen=True)
class AccessLayout:
    """Where libvirt access lives on the host; every default is the deployed location.

    A unit test points the paths at a temporary directory and records the account changes it
    cannot make (useradd needs the real passwd database).
    """

    accounts: Accounts = field(default_factory=SystemAccounts)
    home_root: Path = Path("/home")
    """Where a created access user's home goes."""
    sshd_drop_in: Path = SSHD_DROP_IN
    ssh_dir: Path = Path("/etc/ssh")
    """The host's SSH keys (ssh_host_*_key.pub), published so managers pin them."""
    virt_ssh_helper: str = VIRT_SSH_HELPER


SYSTEM = AccessLayout()
"""This machine's access locations (the deployed charm's)."""


def _lookup(name: str, layout: AccessLayout = SYSTEM) -> AccessUser | None:
    return layout.accounts.lookup(name)


def _existing_groups(names: Iterable[str], layout: AccessLayout = SYSTEM) -> list[str]:
    return layout.accounts.existing_groups(names)


def _ensure_dir(path: Path, user: AccessUser, mode: int) -> None:
    if path.is_symlink():
        raise VmHostError(f"{path} is a symlink; remove it so vm-host can manage SSH access")
    path.mkdir(mode=mode, exist_ok=True)
    os.chown(path, user.uid, user.gid)
    os.chmod(path, mode)


def _create_user(name: str, groups: Sequence[str], layout: AccessLayout) -> AccessUser:
    accounts = layout.accounts
    accounts.add_user(name, layout.home_root / name, USER_SHELL, groups)
    try:
        user = accounts.lookup(name)
        if user is None:  # pragma: no cover - useradd succeeded but the account is missing
            raise VmHostError(f"useradd reported success but user {name} does not exist")
        accounts.lock(name)
        (user.home / CREATED_MARKER).write_text(
            "This account was created by vm-host and is removed with it.\n"
        )
    except BaseException:
        with contextlib.suppress(Exception):
            accounts.delete_user(name)
        raise
    logger.info("created access user %s", name)
    return user


def _shell_problem(user: AccessUser, layout: AccessLayout = SYSTEM) -> str | None:
    shell = layout.accounts.login_shell(user.name)
    if not shell or Path(shell).name in ("nologin", "false") or not os.access(shell, os.X_OK):
        return (
            f"user {user.name} has login shell {shell or '(none)'}; sshd runs the forced "
            f"libvirt command through it, so keys would not work: run 'usermod --shell "
            f"{USER_SHELL} {user.name}' or set libvirt-user to a new name"
        )
    return None


def _keys_file_problem(user: AccessUser) -> str | None:
    if user.authorized_keys.is_symlink():
        return f"{user.authorized_keys} is a symlink; remove it so vm-host can manage keys"
    return None


def _account_problem(
    name: str, user: AccessUser | None, adopt: bool, layout: AccessLayout = SYSTEM
) -> str | None:
    """Why this account must not be created or taken over as the access user, or None."""
    if user is None:
        if _existing_groups([name], layout):
            return (
                f"a group named {name} already exists, so useradd cannot create user {name}: "
                "set libvirt-user to another name such as virsh"
            )
        return None
    if user.uid == 0:
        return f"user {name} has uid 0: set libvirt-user to a dedicated name such as virsh"
    if not adopt and not (user.home / CREATED_MARKER).exists():
        return (
            f"user {name} exists and was not created by vm-host: set libvirt-user-adopt=true "
            "to confine its SSH logins to libvirt, or set libvirt-user to a new name"
        )
    return None


def user_problem(name: str, adopt: bool = False, layout: AccessLayout = SYSTEM) -> str | None:
    """What keeps the access user from serving managers right now, None when nothing.

    Read-only: status asks this on every hook, `ensure_user` puts right what it can.
    """
    user = _lookup(name, layout)
    problem = _account_problem(name, user, adopt, layout)
    if problem:
        return problem
    if user is None:
        return f"user {name} does not exist and could not be created"
    return _shell_problem(user, layout) or _keys_file_problem(user)


def _adopt_user(user: AccessUser, groups: Sequence[str], layout: AccessLayout) -> None:
    problem = _shell_problem(user, layout)
    if problem:
        raise VmHostError(problem)
    member_of = layout.accounts.groups_of(user.name)
    missing = [g for g in groups if g not in member_of]
    if missing:
        layout.accounts.add_to_groups(user.name, missing)


def ensure_user(
    name: str = "virsh", *, adopt: bool = False, layout: AccessLayout = SYSTEM
) -> AccessUser:
    """Create the access user when missing and put its SSH directory in order.

    A created account is a locked system account (no password) with a marker in its home
    that lets `remove_access` delete it later. An existing account is adopted: it is put in
    the groups and its SSH file modes are put right, but its password is left alone and it is
    never deleted. Either way it joins libvirt and libvirt-qemu where they exist, with ~/.ssh
    at 0700 and authorized_keys at 0600. An existing account is adopted only when `adopt`
    (the libvirt-user-adopt option) says so: its SSH logins become libvirt-only.

    Raises:
        InvalidRequestError: the name is not a valid user name.
        VmHostError: the name is an existing group, uid 0, or an existing account without
            `adopt`; an adopted account cannot run the forced command (no login shell), or
            its SSH files are symlinks.
    """
    validate_user_name(name)
    groups = _existing_groups(("libvirt", "libvirt-qemu"), layout)
    user = _lookup(name, layout)
    problem = _account_problem(name, user, adopt, layout)
    if problem:
        raise VmHostError(problem)
    if user is None:
        user = _create_user(name, groups, layout)
    else:
        _adopt_user(user, groups, layout)
    ssh_dir = user.home / ".ssh"
    _ensure_dir(ssh_dir, user, 0o700)
    keys_file = user.authorized_keys
    problem = _keys_file_problem(user)
    if problem:
        raise VmHostError(problem)
    if not keys_file.exists():
        _write_atomic(keys_file, "", user)
    else:
        os.chown(keys_file, user.uid, user.gid)
        os.chmod(keys_file, 0o600)
    return user


UserRef = str | AccessUser
"""A user by name (looked up in the passwd database) or as an `AccessUser` already known."""


def _require_user(user: UserRef, layout: AccessLayout) -> AccessUser:
    if isinstance(user, AccessUser):
        return user
    validate_user_name(user)
    account = _lookup(user, layout)
    if account is None:
        raise VmHostError(f"access user {user} does not exist; it is created on install")
    return account


def _write_atomic(path: Path, text: str, user: AccessUser) -> None:
    fd, tmp = tempfile.mkstemp(prefix=".authorized_keys.", dir=path.parent)
    try:
        os.fchmod(fd, 0o600)
        os.fchown(fd, user.uid, user.gid)
        with os.fdopen(fd, "w") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def _read_keys_file(user: AccessUser) -> str:
    path = user.authorized_keys
    if path.is_symlink():
        raise VmHostError(f"{path} is a symlink; remove it so vm-host can manage keys")
    try:
        return path.read_text()
    except FileNotFoundError:
        return ""


def sync_authorized_keys(
    user: UserRef, keys: Sequence[AuthorizedKey], layout: AccessLayout = SYSTEM
) -> bool:
    """Make the managed block hold exactly `keys`; write (atomically, 0600) only on change.

    Returns:
        Whether the file changed.
    """
    account = _require_user(user, layout)
    existing = _read_keys_file(account)
    wanted = render_authorized_keys(existing, keys, forced_command(layout))
    if wanted == existing and account.authorized_keys.exists():
        return False
    _ensure_dir(account.authorized_keys.parent, account, 0o700)
    _write_atomic(account.authorized_keys, wanted, account)
    logger.info("authorized_keys of %s holds %d managed keys", account.name, len(set(keys)))
    return True


def current_keys(user: UserRef, layout: AccessLayout = SYSTEM) -> list[AuthorizedKey]:
    """Return the keys of the managed block, each with its source."""
    return managed_keys(_read_keys_file(_require_user(user, layout)))


def sync_keys(user: UserRef, keys: Sequence[AuthorizedKey], layout: AccessLayout = SYSTEM) -> bool:
    """Set the config and relation keys; keys added by the authorize action are kept.

    The charm calls this on every reconcile with the keys it gathered from config and the
    relation; a key whose source is gone (config line removed, unit departed) disappears.

    Raises:
        InvalidRequestError: a key in `keys` claims an action source; those are managed with
            `authorize_key` and `revoke_key` only.
    """
    for key in keys:
        if key.action_name is not None:
            raise InvalidRequestError("key", "action keys are added with authorize_key")
    kept = [k for k in current_keys(user, layout) if k.action_name is not None]
    return sync_authorized_keys(user, [*keys, *kept], layout)


def authorize_key(
    user: UserRef, key_text: str, name: str, layout: AccessLayout = SYSTEM
) -> AuthorizedKey:
    """Authorize a key under an action name; the same key and name again changes nothing.

    Raises:
        InvalidRequestError: the key is invalid, the name is taken by another key, or the key
            is already authorized under another action name.
    """
    validate_action_name(name)
    key = parse_public_key(key_text, f"action:{name}")
    keys = current_keys(user, layout)
    for other in keys:
        if other.action_name is None:
            continue
        if other.action_name == name and other.public_key != key.public_key:
            raise InvalidRequestError(
                "name", f"{name!r} already names another key; revoke it first or pick a new name"
            )
        if other.public_key == key.public_key and other.action_name != name:
            raise InvalidRequestError(
                "key", f"this key is already authorized as {other.action_name!r}"
            )
    sync_authorized_keys(user, [*keys, key], layout)
    return key


def revoke_key(
    user: UserRef, name_or_fingerprint: str, layout: AccessLayout = SYSTEM
) -> list[AuthorizedKey]:
    """Remove the action-added key with this name or SHA256 fingerprint.

    Keys from config or the relation are not revoked here (they would come back on the next
    hook); the error says where to remove them instead.

    Returns:
        The keys removed.

    Raises:
        InvalidRequestError: nothing matches, or the key comes from config or a relation.
    """
    wanted = (name_or_fingerprint or "").strip()
    is_fingerprint = bool(_FINGERPRINT_RE.fullmatch(wanted))
    if not is_fingerprint:
        validate_action_name(wanted)
    keys = current_keys(user, layout)

    def matches(key: AuthorizedKey) -> bool:
        return key.fingerprint == wanted if is_fingerprint else key.action_name == wanted

    removed = [k for k in keys if matches(k) and k.action_name is not None]
    if not removed:
        others = sorted({k.source for k in keys if matches(k)})
        if others:
            raise InvalidRequestError(
                "name",
                f"{wanted} comes from {', '.join(others)}, not from authorize-ssh-key; remove "
                "it from the ssh-authorized-keys config or the relation instead",
            )
        raise InvalidRequestError(
            "name", f"no key authorized by action matches {wanted!r}; see current_keys"
        )
    sync_authorized_keys(user, [k for k in keys if k not in removed], layout)
    return removed


def remove_access(user: UserRef, layout: AccessLayout = SYSTEM) -> bool:
    """Remove the managed block; delete the user too when vm-host created it.

    The user is deleted (with its home) only when the marker written by `ensure_user` is in its
    home and no lines remain outside the block, so an operator's own keys are never lost.

    Returns:
        Whether the user was deleted.
    """
    if isinstance(user, AccessUser):
        account = user
    else:
        validate_user_name(user)
        account = _lookup(user, layout)
        if account is None:
            return False
    if account.authorized_keys.exists():
        sync_authorized_keys(account, [], layout)
    leftover = [
        line
        for line in _read_keys_file(account).splitlines()
        if line.strip() and not line.startswith("#")
    ]
    if not (account.home / CREATED_MARKER).exists() or leftover:
        return False
    layout.accounts.delete_user(account.name)
    logger.info("deleted access user %s", account.name)
    return True


# ---------------------------------------------------------------------------------------------
# Related managers


class Client(Protocol):
    """One related manager's access request (the access library's AccessClient)."""

    @property
    def unit(self) -> str:
        """The remote unit."""
        ...

    @property
    def source(self) -> str:
        """The tag its key carries: "relation:<id>:<unit>"."""
        ...

    @property
    def ssh_public_key(self) -> str | None:
        """The key it asks to have authorized (libvirt)."""
        ...

    @property
    def certificate(self) -> str | None:
        """The certificate it asks to have trusted (LXD)."""
        ...

    @property
    def projects(self) -> tuple[str, ...] | None:
        """The LXD projects it asks for."""
        ...


def wanted_keys(
    user: UserRef, config_keys: str, clients: Iterable[Client], layout: AccessLayout = SYSTEM
) -> list[AuthorizedKey]:
    """The keys to authorize: the config's and every related manager's.

    A bad `ssh-authorized-keys` option keeps the config keys already authorized (a typo
    must not lock the operator out; status names the option); a manager's bad key is left
    out and logged.
    """
    try:
        keys = parse_public_keys(config_keys, "config")
    except InvalidRequestError as exc:
        logger.warning("%s", exc)
        keys = [k for k in current_keys(user, layout) if k.source == "config"]
    for client in clients:
        if not client.ssh_public_key:
            continue
        try:
            keys.append(parse_public_key(client.ssh_public_key, client.source))
        except InvalidRequestError as exc:
            logger.warning("not authorizing the key of %s: %s", client.unit, exc)
    return keys


def wanted_certificates(
    clients: Iterable[Client], project: str
) -> dict[str, tuple[str, Sequence[str]]]:
    """Unit -> (certificate, projects) to trust: always restricted to vm-host's project.

    A manager never gains access to projects vm-host does not own, whatever it asks for.
    """
    wanted: dict[str, tuple[str, Sequence[str]]] = {}
    for client in clients:
        if not client.certificate:
            continue
        if client.projects and set(client.projects) != {project}:
            logger.warning(
                "%s asked for projects %s; trusted for %s only",
                client.unit,
                ", ".join(client.projects),
                project,
            )
        wanted[client.unit] = (client.certificate, [project])
    return wanted


# ---------------------------------------------------------------------------------------------
# What clients need


def manager_address(
    backend: str, address: str | None, *, user: str, https_port: int
) -> str | None:
    """How managers reach this hypervisor: the libvirt URI or the LXD HTTPS URL."""
    if address is None:
        return None
    if backend == "libvirt":
        return libvirt_uri(user, address)
    url_host = f"[{address}]" if ":" in address else address
    return f"https://{url_host}:{https_port}"


def libvirt_uri(user: str, address: str, port: int = 22) -> str:
    """Return the qemu+ssh URI managers use; IPv6 addresses are bracketed."""
    validate_user_name(user)
    if not address or any(c in address for c in "/@?#[] \t\n"):
        raise InvalidRequestError("address", f"{address!r} is not a host name or IP address")
    if not 0 < int(port) < 65536:
        raise InvalidRequestError("port", f"{port} is not a TCP port")
    host = f"[{address}]" if ":" in address else address
    netloc = host if int(port) == 22 else f"{host}:{int(port)}"
    return f"qemu+ssh://{user}@{netloc}/system"


def ssh_host_public_keys(etc_ssh: str | os.PathLike[str] = "/etc/ssh") -> list[str]:
    """Return the host's SSH public keys ("<type> <base64>", comment dropped), sorted.

    Published so clients pin them instead of trusting on first use.
    """
    found = []
    for path in sorted(Path(etc_ssh).glob("ssh_host_*_key.pub")):
        parts = path.read_text().split()
        if len(parts) >= 2 and parts[0] in sshkeys.KEY_TYPES:
            found.append(f"{parts[0]} {parts[1]}")
    return found


def render_sshd_drop_in(user: str, command: str | None = None) -> str:
    """Return the sshd Match block that confines the access user whatever its keys say.

    Defence in depth: authorized_keys already restricts every managed key, but an operator's
    own line outside the block is confined too.
    """
    validate_user_name(user)
    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(TEMPLATES),
        autoescape=False,  # noqa: S701 - sshd_config, not markup; inputs are validated above
        undefined=jinja2.StrictUndefined,
        keep_trailing_newline=True,
    )
    return env.get_template("sshd-vm-host.conf.j2").render(
        user=user, command=command or forced_command()
    )


def ensure_sshd_drop_in(
    user: str, path: Path | None = None, *, layout: AccessLayout = SYSTEM
) -> bool:
    """Write the sshd drop-in when it differs; the caller reloads sshd when this returns True."""
    text = render_sshd_drop_in(user, forced_command(layout))
    path = path or layout.sshd_drop_in
    with contextlib.suppress(FileNotFoundError):
        if path.read_text() == text:
            return False
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".vm-host.", dir=path.parent)
    with os.fdopen(fd, "w") as handle:
        handle.write(text)
    os.chmod(tmp, 0o644)
    os.replace(tmp, path)
    return True


def remove_sshd_drop_in(path: Path | None = None, *, layout: AccessLayout = SYSTEM) -> bool:
    """Delete the sshd drop-in on removal; the caller reloads sshd when this returns True."""
    path = path or layout.sshd_drop_in
    try:
        path.unlink()
    except FileNotFoundError:
        return False
    return True


def describe_keys(keys: Sequence[AuthorizedKey]) -> list[dict[str, str]]:
    """The authorized keys as list-access shows them: name, fingerprint, type and source.

    The source says where to remove a key: "config" (the ssh-authorized-keys option),
    "relation" (the access relation of the named unit), "action" (revoke-ssh-key by name).
    """
    out = []
    for key in sorted(keys):
        kind, _, rest = key.source.partition(":")
        name = rest.partition(":")[2] if kind == "relation" else rest
        out.append(
            {
                "name": name,
                "fingerprint": key.fingerprint,
                "type": key.key_type,
                "source": kind,
            }
        )
    return out


def reconcile(
    name: str,
    *,
    adopt: bool,
    config_keys: str,
    clients: Iterable[Client],
    layout: AccessLayout = SYSTEM,
) -> bool:
    """Authorize exactly the keys of config, of related managers and of actions.

    Keys added by the authorize-ssh-key action live in the managed block itself (tagged with
    their source), so they survive every reconcile without unit state. Returns False (and
    logs why) when the access user cannot be had: then nothing is changed.
    """
    try:
        user = ensure_user(name, adopt=adopt, layout=layout)
    except (VmHostError, InvalidRequestError) as exc:
        logger.warning("libvirt-user: %s", exc)
        return False
    if ensure_sshd_drop_in(name, layout=layout):
        host.reload_sshd()
    sync_keys(user, wanted_keys(user, config_keys, clients, layout), layout)
    return True


def remove_all(user: str, layout: AccessLayout = SYSTEM) -> None:
    """On unit removal: the access user's managed keys and the sshd drop-in go."""
    remove_access(user, layout)
    if remove_sshd_drop_in(layout=layout):
        host.reload_sshd()
