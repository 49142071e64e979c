"""Reading MIME multipart user data back in tests."""

from __future__ import annotations

import email


def mime_parts(text: str) -> list[tuple[str, str, dict[str, str]]]:
    """(content type, decoded text, headers) of each leaf part of MIME user data."""
    message = email.message_from_string(text)
    assert message.get_content_type() == "multipart/mixed"
    found: list[tuple[str, str, dict[str, str]]] = []
    for part in message.walk():
        if not part.is_multipart():
            payload = part.get_payload(decode=True)
            assert isinstance(payload, bytes)
            found.append((part.get_content_type(), payload.decode(), dict(part.items())))
    return found
