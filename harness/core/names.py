"""Names that become parts of paths (task, mechanism, scale, variant): plain names only."""

from __future__ import annotations

import re
from typing import Any

SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


class UnsafeName(ValueError):
    """A name that becomes part of a path is not a plain name."""


def check_safe_name(kind: str, value: Any) -> str:
    """``value`` if it is a plain file name (letters, digits, ``_.-``, not starting with a
    dot); else UnsafeName, before any path is built from it."""
    text = str(value)
    if not SAFE_NAME.match(text) or ".." in text:
        raise UnsafeName(f"{kind}={text!r} is not a plain name (letters, digits, '_', '.', '-'; no '..' or '/')")
    return text
