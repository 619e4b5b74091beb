"""Checks for every user-supplied key, queue, limit and tag.

They run at the call, before anything is published, and again on the worker for
headers that came from producers outside this package.
"""

from __future__ import annotations

import re
from typing import Any

from .errors import (
    InvalidConcurrencyKey,
    InvalidConcurrencyLimit,
    InvalidConcurrencyPolicy,
    InvalidConcurrencyPriority,
    InvalidConcurrencyQueue,
    InvalidTags,
)

MAX_KEY_LENGTH = 256
MAX_QUEUE_NAME_LENGTH = 256
MAX_TAGS = 10
MAX_TAG_LENGTH = 128
#: Priorities and weights are bounded so that a line's scores stay exact (lua/lib.lua BAND).
MAX_PRIORITY = 1000
MAX_WEIGHT = 100


def check_key(value: Any) -> str:
    """Return ``value`` if it is a usable concurrency key, else raise ``InvalidConcurrencyKey``."""
    if not isinstance(value, str):
        raise InvalidConcurrencyKey(
            f"concurrency_key must be a str, got {type(value).__name__}: {value!r}", key=value)
    if not value:
        raise InvalidConcurrencyKey("concurrency_key must not be empty", key=value)
    if len(value) > MAX_KEY_LENGTH:
        raise InvalidConcurrencyKey(
            f"concurrency_key is {len(value)} characters long; the maximum is {MAX_KEY_LENGTH}",
            key=value)
    return value


def check_limit(value: Any, *, what: str = "concurrency_limit") -> int:
    """Return ``value`` if it is a positive ``int`` (not a bool), else raise ``ValueError``."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidConcurrencyLimit(
            f"{what} must be a positive integer, got {type(value).__name__}: {value!r}", limit=value)
    if value < 1:
        raise InvalidConcurrencyLimit(f"{what} must be a positive integer, got {value!r}", limit=value)
    return value


def check_priority(value: Any) -> int:
    """Return ``value`` if it is an ``int`` from -MAX_PRIORITY to MAX_PRIORITY."""
    if isinstance(value, bool) or not isinstance(value, int) or abs(value) > MAX_PRIORITY:
        raise InvalidConcurrencyPriority(
            f"concurrency_priority must be an int from {-MAX_PRIORITY} to {MAX_PRIORITY},"
            f" got {type(value).__name__}: {value!r}", priority=value)
    return value


_RATE_UNITS = {"s": 1000, "m": 60_000, "h": 3_600_000}


def check_rate(value: Any) -> str:
    """Celery's rate syntax (``"10/s"``, ``"100/m"``, ``"5/h"``; ``N`` alone is per second)
    as ``"n/window_ms"``; anything else raises ``InvalidConcurrencyLimit``."""
    found = re.fullmatch(r"\s*(\d+)\s*(?:/\s*([smh]))?\s*", value) if isinstance(value, str) else None
    if isinstance(value, int) and not isinstance(value, bool):
        found = re.fullmatch(r"(\d+)()", str(value))
    if found is None or int(found.group(1)) < 1:
        raise InvalidConcurrencyLimit(
            f"a rate is N/s, N/m or N/h with N a positive integer, got {value!r}", limit=value)
    return f"{int(found.group(1))}/{_RATE_UNITS[found.group(2) or 's']}"


#: What a run does when its own slot (its key, partition or queue) is full.
POLICIES = ("wait", "skip", "cancel_running", "keep_latest")


def check_policy(value: Any) -> str:
    """Return ``value`` if it is one of ``POLICIES``."""
    if not isinstance(value, str) or value not in POLICIES:
        raise InvalidConcurrencyPolicy(
            f"concurrency_policy must be one of {', '.join(map(repr, POLICIES))},"
            f" got {type(value).__name__}: {value!r}", policy=value)
    return value


def check_weight(value: Any, *, key: Any) -> int:
    """Return ``value`` if it is an ``int`` from 1 to MAX_WEIGHT (the turns ``key`` gets a round)."""
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_WEIGHT:
        raise InvalidConcurrencyLimit(
            f"the weight of key {key!r} must be an int from 1 to {MAX_WEIGHT},"
            f" got {type(value).__name__}: {value!r}", limit=value)
    return value


def check_queue_name(value: Any) -> str:
    if not isinstance(value, str):
        raise InvalidConcurrencyQueue(
            f"a concurrency queue name must be a str, got {type(value).__name__}: {value!r}",
            queue=value)
    if not value:
        raise InvalidConcurrencyQueue("a concurrency queue name must not be empty", queue=value)
    if len(value) > MAX_QUEUE_NAME_LENGTH:
        raise InvalidConcurrencyQueue(
            f"a concurrency queue name is {len(value)} characters long;"
            f" the maximum is {MAX_QUEUE_NAME_LENGTH}", queue=value)
    return value


def check_tags(value: Any) -> list[str]:
    if isinstance(value, (str, bytes)) or not isinstance(value, (list, tuple)):
        raise InvalidTags(f"tags must be a list of str, got {type(value).__name__}: {value!r}", tags=value)
    if len(value) > MAX_TAGS:
        raise InvalidTags(f"at most {MAX_TAGS} tags are allowed, got {len(value)}", tags=value)
    for tag in value:
        if not isinstance(tag, str) or not tag:
            raise InvalidTags(f"every tag must be a non-empty str, got {tag!r}", tags=value)
        if len(tag) > MAX_TAG_LENGTH:
            raise InvalidTags(
                f"tag {tag[:20]!r}... is {len(tag)} characters long; the maximum is {MAX_TAG_LENGTH}",
                tags=value)
    return list(value)
