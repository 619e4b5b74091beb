"""What stands between the dashboard and a stranger: option checks, basic auth, the
hosts it answers to, the origin of actions, and the headers every response carries."""

from __future__ import annotations

import base64
import ipaddress
import math
import re
import secrets
from typing import Any, Awaitable, Callable, Optional
from urllib.parse import urlsplit

from ..errors import ConfigurationError
from ..redaction import redact

MIN_INTERVAL, MAX_INTERVAL = 0.1, 3600.0
#: the page runs its own script and styles only, and never inside another site's frame
SECURITY_HEADERS = [
    (b"content-security-policy", b"default-src 'self'; img-src 'self' data:;"
                                 b" frame-ancestors 'none'; form-action 'self'"),
    (b"x-frame-options", b"DENY"),
    (b"x-content-type-options", b"nosniff"),
    (b"referrer-policy", b"no-referrer"),
    (b"cache-control", b"no-store"),
]
#: names a browser may call the dashboard by when it runs without --basic-auth: anything
#: else is a DNS-rebinding page of another site, which must not read or act
LOOPBACK_HOSTS = ["127.0.0.1", "localhost", "::1", "[::1]"]


def where(url: str) -> str:
    """``scheme://host:port/db`` of a Redis URL: no user, password or query on the page."""
    try:
        parts = urlsplit(url)
        if parts.hostname and ";" not in url and "," not in url:
            port = f":{parts.port}" if parts.port else ""
            return f"{parts.scheme}://{parts.hostname}{port}{parts.path}"
    except ValueError:
        pass
    return re.sub(r"\?.*", "", redact(url))  # several hosts (Sentinel): masked, no query


def check_interval(interval: float) -> float:
    if not (isinstance(interval, (int, float)) and math.isfinite(interval)
            and MIN_INTERVAL <= interval <= MAX_INTERVAL):
        raise ConfigurationError(f"--interval is seconds between reads of Redis, from"
                                 f" {MIN_INTERVAL} to {MAX_INTERVAL}, not {interval!r}",
                                 setting="interval")
    return float(interval)


def check_basic_auth(value: Optional[str]) -> Optional[tuple[str, str]]:
    """``"user:password"`` as ``(user, password)``; a clear error for anything else."""
    if value is None:
        return None
    user, sep, password = value.partition(":")
    if not sep or not user or not password:
        raise ConfigurationError("--basic-auth takes user:password, both non-empty",
                                 setting="basic_auth")
    return user, password


def check_address(address: str, basic_auth: Optional[tuple[str, str]]) -> None:
    """Loopback needs nothing; any other address needs ``--basic-auth``."""
    try:
        loopback = ipaddress.ip_address(address).is_loopback
    except ValueError:
        loopback = address == "localhost"
    if not loopback and basic_auth is None:
        raise ConfigurationError(
            f"the dashboard binds to {address!r}, which is not loopback: give --basic-auth"
            " user:password (and put TLS in front of it)", setting="address")


def _authorized(header: Optional[str], auth: tuple[str, str]) -> Optional[str]:
    """The user name when the request's Basic credentials match, else None."""
    scheme, _, encoded = (header or "").partition(" ")
    if scheme.lower() != "basic":
        return None
    try:
        user, _, password = base64.b64decode(encoded, validate=True).decode().partition(":")
    except ValueError:  # binascii.Error, UnicodeDecodeError, non-ASCII text
        return None
    ok = secrets.compare_digest(user.encode(), auth[0].encode()) & \
        secrets.compare_digest(password.encode(), auth[1].encode())
    return user if ok else None


def same_origin(origin: Optional[str], host: Optional[str]) -> bool:
    """No Origin (not a browser's cross-site request), or the page's own."""
    return origin is None or (host is not None and urlsplit(origin).netloc == host)


def with_headers(web: Any) -> Any:
    """Add :data:`SECURITY_HEADERS` to every response."""
    async def headed(scope: dict[str, Any], receive: Callable[[], Awaitable[Any]],
                     send: Callable[[Any], Awaitable[None]]) -> None:
        async def send_headed(message: Any) -> None:
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []),
                                                   *SECURITY_HEADERS]}
            await send(message)
        await web(scope, receive, send_headed if scope["type"] == "http" else send)
    return headed


def with_basic_auth(web: Any, auth: tuple[str, str]) -> Any:
    """Every request, page or API, needs the credentials (checked in constant time)."""
    from starlette.responses import PlainTextResponse

    async def guarded(scope: dict[str, Any], receive: Callable[[], Awaitable[Any]],
                      send: Callable[[Any], Awaitable[None]]) -> None:
        if scope["type"] == "http":
            headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in scope["headers"]}
            user = _authorized(headers.get("authorization"), auth)
            if user is None:
                refusal = PlainTextResponse(
                    "authentication required", status_code=401,
                    headers={"WWW-Authenticate": 'Basic realm="celery_ckeys", charset="UTF-8"'})
                await refusal(scope, receive, send)
                return
            scope["ckeys_user"] = user
        await web(scope, receive, send)
    return guarded


