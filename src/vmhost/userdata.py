"""A requester's cloud-init user data: what kind it is, and how it joins the charm's own.

cloud-init acts only on user data it recognises (by its first line, or by a MIME part's
content type) and ignores the rest without a word, so a request whose user data cloud-init
would ignore is refused here, naming the field, instead of booting a guest that silently
skipped it. The charm's own #cloud-config (hostname, SSH keys) is joined to the requester's
as MIME multipart: every part the requester sent reaches cloud-init unchanged.
"""

from __future__ import annotations

import email
import email.message
import email.policy
import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from email.mime.multipart import MIMEMultipart
from email.mime.nonmultipart import MIMENonMultipart

import yaml

from vmhost.model import InvalidRequestError

__all__ = ["CHARM_MERGE_TYPE", "Part", "check", "join", "parts", "sets_hostname"]

FIELD = "user-data"

_PREFIXES = (
    # Longest first: "#cloud-config-archive" also starts with "#cloud-config".
    ("#cloud-config-archive", "text/cloud-config-archive"),
    ("#cloud-config-jsonp", "text/cloud-config-jsonp"),
    ("#cloud-config", "text/cloud-config"),
    ("#cloud-boothook", "text/cloud-boothook"),
    ("#include-once", "text/x-include-once-url"),
    ("#include", "text/x-include-url"),
    ("#part-handler", "text/part-handler"),
    ("## template: jinja", "text/jinja2"),
    ("#!", "text/x-shellscript"),
)
_KNOWN_TYPES = frozenset(t for _, t in _PREFIXES)
_MIME_START = ("content-type:", "mime-version:")

CHARM_MERGE_TYPE = "list(append)+dict(no_replace,recurse_list)+str()"
"""How cloud-init merges the charm's part, which comes last, into the requester's config:
lists are appended (the requester's ssh_authorized_keys and the charm's both stay), keys the
requester set keep the requester's value, keys it left out get the charm's."""


@dataclass(frozen=True)
class Part:
    """One piece of user data with the MIME type cloud-init handles it by."""

    content_type: str
    text: str
    filename: str = ""
    merge_type: str = ""


def _kind(text: str) -> str | None:
    """The MIME type cloud-init gives user data by its first line, None when it has none."""
    for prefix, content_type in _PREFIXES:
        if text.startswith(prefix):
            return content_type
    return None


def _hint() -> str:
    return (
        "start it with #cloud-config, #! (a script), #include, #cloud-boothook or "
        "#cloud-config-archive, or give MIME multipart with text/cloud-config or "
        "text/x-shellscript parts"
    )


def _check_cloud_config(text: str, where: str) -> None:
    try:
        loaded = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        at = f" at line {mark.line + 1}" if mark is not None else ""
        raise InvalidRequestError(
            FIELD, f"{where}#cloud-config is not valid YAML{at}; fix the YAML"
        ) from None
    if loaded is not None and not isinstance(loaded, dict):
        raise InvalidRequestError(
            FIELD, f"{where}#cloud-config must be a YAML mapping (key: value lines)"
        )


def _mime_parts(text: str) -> list[Part]:
    message = email.message_from_string(text, policy=email.policy.compat32)
    if not message.is_multipart():
        raise InvalidRequestError(
            FIELD, f"MIME user data must be multipart (Content-Type: multipart/mixed); {_hint()}"
        )
    found: list[Part] = []
    leaves = (sub for sub in message.walk() if not sub.is_multipart())
    for index, sub in enumerate(leaves, start=1):
        content_type = sub.get_content_type()
        payload = sub.get_payload(decode=True)
        if not isinstance(payload, bytes):
            payload = b""
        charset = sub.get_content_charset() or "utf-8"
        try:
            body = payload.decode(charset)
        except (LookupError, UnicodeDecodeError):
            raise InvalidRequestError(
                FIELD, f"MIME part {index} is not text in its declared charset {charset!r}"
            ) from None
        if content_type in ("text/plain", "text/x-not-multipart"):
            # cloud-init types such parts by their first line, as it does plain user data.
            content_type = _kind(body) or content_type
        if content_type not in _KNOWN_TYPES:
            raise InvalidRequestError(
                FIELD,
                f"MIME part {index} has type {content_type!r}, which cloud-init ignores; "
                f"{_hint()}",
            )
        if content_type == "text/cloud-config":
            _check_cloud_config(body, f"MIME part {index}: ")
        found.append(
            Part(
                content_type,
                body,
                filename=sub.get_filename() or "",
                merge_type=str(sub.get("Merge-Type") or sub.get("X-Merge-Type") or ""),
            )
        )
    if not found:
        raise InvalidRequestError(FIELD, "MIME user data has no parts")
    return found


def parts(text: str) -> list[Part]:
    """Split a requester's user data into the parts cloud-init will act on.

    Raises:
        InvalidRequestError: cloud-init would ignore it, or a part of it (an unknown first
            line or MIME type), or its #cloud-config is not a YAML mapping.
    """
    head = text.lstrip()[:64].lower()
    if head.startswith(_MIME_START):
        return _mime_parts(text)
    kind = _kind(text)
    if kind is None:
        first = text.splitlines()[0][:40] if text.strip() else ""
        raise InvalidRequestError(
            FIELD, f"cloud-init would ignore user data starting {first!r}; {_hint()}"
        )
    if kind == "text/cloud-config":
        _check_cloud_config(text, "")
    return [Part(kind, text)]


def check(text: str) -> str:
    """Return the user data unchanged once cloud-init is known to act on all of it."""
    parts(text)
    return text


def sets_hostname(found: Sequence[Part]) -> bool:
    """Whether a #cloud-config part of the requester's sets `hostname` or `fqdn` itself."""
    for part in found:
        if part.content_type != "text/cloud-config":
            continue
        loaded = yaml.safe_load(part.text)
        if isinstance(loaded, dict) and ({"hostname", "fqdn"} & set(loaded)):  # pyright: ignore[reportUnknownArgumentType]
            return True
    return False


def join(requested: Sequence[Part], charm: Part) -> str:
    """The MIME multipart user data: the requester's parts in order, then the charm's.

    The boundary is derived from the content, so the same request gives the same seed.
    """
    every = [*requested, charm]
    digest = hashlib.sha256("\0".join(p.content_type + p.text for p in every).encode())
    outer = MIMEMultipart(boundary=f"==vm-host-{digest.hexdigest()[:32]}==")
    for index, part in enumerate(every):
        maintype, _, subtype = part.content_type.partition("/")
        charset = "us-ascii" if part.text.isascii() else "utf-8"
        sub = MIMENonMultipart(maintype, subtype, charset=charset)
        sub.set_payload(part.text, charset=charset)
        sub.add_header(
            "Content-Disposition", "attachment", filename=part.filename or f"part-{index:03d}"
        )
        if part.merge_type:
            sub.add_header("Merge-Type", part.merge_type)
        outer.attach(sub)
    return outer.as_string(policy=email.policy.compat32)
