"""Keep passwords out of logs, CLI output, the dashboard and exception messages."""

from __future__ import annotations

import re

# scheme://user:password@host and scheme://:password@host. The password runs to the last
# "@" of the URL's authority, as urllib (and so redis-py) reads it: "x@y" is one password.
_URL_PASSWORD = re.compile(
    r"(?P<head>[A-Za-z][A-Za-z0-9+.-]*://[^:/@\s]*:)(?P<pw>[^\s/?#;,]+)(?=@)")
# ?password=... (redis-py reads the password from the query too)
_QUERY_PASSWORD = re.compile(r"(?P<head>[?&](?:password|passwd|pass|pwd)=)(?P<pw>[^&\s#;,]+)",
                             re.IGNORECASE)


def redact(text: str) -> str:
    """Replace the password of every URL in ``text`` with ``***``."""
    text = _URL_PASSWORD.sub(lambda m: m.group("head") + "***", text)
    return _QUERY_PASSWORD.sub(lambda m: m.group("head") + "***", text)
