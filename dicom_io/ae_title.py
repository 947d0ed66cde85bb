"""DICOM application entity titles (AE VR, PS3.5 6.2)."""

from __future__ import annotations

import re

# Up to 16 characters of the default repertoire, no backslash or control characters.
_AE_TITLE = re.compile(r"^[\x20-\x5b\x5d-\x7e]{1,16}$")


def validate_ae_title(value: str, name: str) -> str:
    """Return ``value`` without its insignificant surrounding spaces; raise ValueError naming ``name``."""
    if not isinstance(value, str):
        raise TypeError(f"{name} must be a str, got {type(value).__name__}")
    title = value.strip()
    if not _AE_TITLE.match(title):
        raise ValueError(f"{name} must be 1-16 printable ASCII characters other than a backslash, got {value!r}")
    return title
