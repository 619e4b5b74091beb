"""Keep passwords out of logs, CLI output and exception messages."""

from __future__ import annotations

import re

# scheme://user:password@host  and  scheme://:password@host
_URL_PASSWORD = re.compile(r"(?P<head>[A-Za-z][A-Za-z0-9+.-]*://[^:/@\s]*:)(?P<pw>[^@\s]+)(?=@)")


def redact(text: str) -> str:
    """Replace the password of every URL in ``text`` with ``***``."""
    return _URL_PASSWORD.sub(lambda m: m.group("head") + "***", text)
