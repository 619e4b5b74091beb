"""celery_ckeys: concurrency keys and concurrency-limited queues for Celery.

    from celery_ckeys import KeyedTask, ConcurrencyQueue, wait_for

    @app.task(base=KeyedTask)
    def enrich(contact_id): ...

    enrich.apply_async(("cid_123",), concurrency_key="contact:cid_123")
"""

from __future__ import annotations

from . import signals as signals  # connects the publish backstop
from . import worker as _worker  # noqa: F401  connects the worker tuning handler
from .errors import (
    CkeysError,
    ConfigurationError,
    CoordinationUnavailable,
    InvalidConcurrencyKey,
    InvalidConcurrencyLimit,
    InvalidConcurrencyPolicy,
    InvalidConcurrencyPriority,
    InvalidConcurrencyQueue,
    InvalidTags,
    MalformedHeader,
    RecursiveWaitDeadlock,
    WaitStarvation,
)
from .publish import install
from .queues import ConcurrencyQueue
from .task import KeyedTask
from .throttle import throttle
from .waits import wait_for

__version__ = "0.1.0"

__all__ = [
    "CkeysError",
    "ConcurrencyQueue",
    "ConfigurationError",
    "CoordinationUnavailable",
    "InvalidConcurrencyKey",
    "InvalidConcurrencyLimit",
    "InvalidConcurrencyPolicy",
    "InvalidConcurrencyPriority",
    "InvalidConcurrencyQueue",
    "InvalidTags",
    "KeyedTask",
    "MalformedHeader",
    "RecursiveWaitDeadlock",
    "WaitStarvation",
    "install",
    "throttle",
    "wait_for",
]
