"""One exception tree: everything celery_ckeys raises is a ``CkeysError``."""

from __future__ import annotations

from typing import Any, Optional


class CkeysError(Exception):
    """Base of every error raised by celery_ckeys.

    Context travels as attributes (``key``, ``task_id``, ``queue``...) so that
    handlers need not parse messages.
    """

    def __init__(self, message: str, **context: Any) -> None:
        super().__init__(message)
        self.context = context
        for name, value in context.items():
            setattr(self, name, value)

    def __reduce__(self) -> Any:
        # Exceptions cross process boundaries (result backends, billiard);
        # keep the context when they are pickled.
        return (_rebuild, (type(self), str(self), self.context))


def _rebuild(cls: type[CkeysError], message: str, context: dict[str, Any]) -> CkeysError:
    return cls(message, **context)


class InvalidConcurrencyKey(CkeysError, ValueError):
    """A concurrency key that is not a non-empty ``str`` of at most 256 characters."""


class InvalidConcurrencyQueue(CkeysError, ValueError):
    """A queue name or queue spec that cannot be used."""


class InvalidConcurrencyLimit(CkeysError, ValueError):
    """A limit that is not a positive integer."""


class InvalidConcurrencyPriority(CkeysError, ValueError):
    """A ``concurrency_priority`` that is not an ``int`` from -1000 to 1000."""


class InvalidConcurrencyPolicy(CkeysError, ValueError):
    """A ``concurrency_policy`` that is not one of ``"wait"``, ``"skip"``,
    ``"cancel_running"`` or ``"keep_latest"``."""


class InvalidTags(CkeysError, ValueError):
    """Tags that are not a list of at most 10 strings of at most 128 characters."""


class ConfigurationError(CkeysError, ValueError):
    """A ``ckeys_*`` setting with a bad value; ``setting`` names it."""


class MalformedHeader(CkeysError):
    """A run arrived with a ckeys header that no celery_ckeys producer would send.

    The run fails with this error and its body never runs unguarded.
    """


class CoordinationUnavailable(CkeysError):
    """The coordination Redis could not be reached; the run is deferred, never run unguarded."""


class RecursiveWaitDeadlock(CkeysError):
    """A wait on the run's own queue or partition deeper than its limit allows."""

    def __init__(self, message: str, *, queue: Optional[str] = None, limit: Optional[int] = None,
                 depth: Optional[int] = None, **context: Any) -> None:
        # optional, so that result backends can rebuild it from the message alone
        super().__init__(message, queue=queue, limit=limit, depth=depth, **context)


class WaitStarvation(CkeysError):
    """Every worker process that could run the awaited child is itself blocked waiting."""


def describe(exc: Optional[BaseException]) -> str:
    """A one-line description for logs that never includes a URL's password."""
    if exc is None:
        return "unknown error"
    from .redaction import redact

    return redact(f"{type(exc).__name__}: {exc}")
