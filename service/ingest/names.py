"""Archive member names: validating and splitting them, and telling OS junk from content.

A name that could escape the extraction folder or fool a reader is refused, never rewritten.
"""

from __future__ import annotations

import re
import unicodedata

from service.ingest.errors import _refuse_member

_MAX_NAME_BYTES = 255  # one path component, as most file systems allow

_JUNK_DIRS = frozenset({"__macosx"})
_JUNK_FILES = frozenset({"thumbs.db", "ehthumbs.db", "desktop.ini"})
_BIDI_CONTROLS = frozenset("\u200e\u200f\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069")
_DRIVE_LETTER = re.compile(r"^[A-Za-z]:")


def _member_parts(name: str) -> tuple[str, ...]:
    """Validate an archive member name and split it into NFC-normalized components.

    ``.`` and empty components (``./cat/1.jpg``, trailing slashes) are dropped; anything
    that could escape the extraction folder or fool a reader is refused, not rewritten.
    """
    nfc = unicodedata.normalize("NFC", name)
    if "\x00" in nfc:
        raise _refuse_member(name, "contains a NUL byte")
    if "\\" in nfc:
        raise _refuse_member(name, "contains a backslash (Windows separators and escapes are refused)")
    if nfc.startswith("/"):
        raise _refuse_member(name, "is an absolute path")
    if _DRIVE_LETTER.match(nfc):
        raise _refuse_member(name, "is an absolute Windows path (drive letter)")
    parts = tuple(p for p in nfc.split("/") if p not in ("", "."))
    if ".." in parts:
        raise _refuse_member(name, "contains a '..' component (path traversal)")
    for part in parts:
        if any("\ud800" <= c <= "\udfff" for c in part):
            raise _refuse_member(name, "has a name that is not valid UTF-8")
        if any(unicodedata.category(c) == "Cc" or c in _BIDI_CONTROLS for c in part):
            raise _refuse_member(name, "contains control characters in its name")
        if len(part.encode("utf-8")) > _MAX_NAME_BYTES:
            raise _refuse_member(name, f"has a name component longer than {_MAX_NAME_BYTES} bytes")
    return parts


def _junk_reason(parts: tuple[str, ...]) -> str | None:
    for part in parts[:-1]:
        if part.casefold() in _JUNK_DIRS:
            return "macOS metadata (__MACOSX)"
        if part.startswith("."):
            return f"inside hidden folder {part!r}"
    last = parts[-1]
    if last.casefold() in _JUNK_DIRS:
        return "macOS metadata (__MACOSX)"
    if last.startswith("."):
        return "hidden file"
    if last.casefold() in _JUNK_FILES:
        return f"OS junk file ({last})"
    return None
