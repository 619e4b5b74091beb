"""The producer side: turn ckeys options into message headers, validated before publishing.

Publishing needs only the broker. Nothing here talks to the coordination Redis: a
trigger-time limit travels in the ``concurrency_queue`` header and is recorded by the
worker when the run starts.
"""

from __future__ import annotations

import functools
import inspect
from typing import Any, Callable, Mapping, Optional, Sequence

from .errors import InvalidConcurrencyKey
from .queues import coerce_queue
from .validation import check_key, check_tags

HEADER_KEY = "concurrency_key"
HEADER_QUEUE = "concurrency_queue"
HEADER_TAGS = "ckeys_tags"
HEADER_DEFERRALS = "ckeys_deferrals"
HEADER_FIRST_DEFERRED = "ckeys_first_deferred"
HEADER_WOKEN = "ckeys_woken"
HEADER_WAIT_CHAIN = "ckeys_wait_chain"
HEADER_RESUME = "ckeys_resume"

HEADER_FOR_OPTION = {
    "concurrency_key": HEADER_KEY,
    "concurrency_queue": HEADER_QUEUE,
    "tags": HEADER_TAGS,
}


def default_key(task: Any, args: Optional[Sequence[Any]],
                kwargs: Optional[Mapping[str, Any]]) -> Optional[str]:
    """The task's declared key for these arguments: a format template or a callable."""
    spec = getattr(task, "concurrency_key", None)
    if spec is None:
        return None
    args = tuple(args or ())
    kwargs = dict(kwargs or {})
    if callable(spec):
        value = spec(*args, **kwargs)
    else:
        bound = _signature(task).bind(*args, **kwargs)
        bound.apply_defaults()
        try:
            value = spec.format(**bound.arguments)
        except (KeyError, IndexError) as exc:
            raise InvalidConcurrencyKey(
                f"the concurrency_key template {spec!r} of {task.name} names {exc},"
                f" which is not an argument of the task", key=spec) from None
    return check_key(value)


def _signature(task: Any) -> inspect.Signature:
    cached = getattr(type(task), "_ckeys_signature", None)
    if cached is None:
        cached = inspect.signature(task.run)
        type(task)._ckeys_signature = cached
    return cached


def prepare(options: dict[str, Any], *, task: Any = None,
            args: Optional[Sequence[Any]] = None,
            kwargs: Optional[Mapping[str, Any]] = None) -> None:
    """Validate the ckeys options of one publish and move them into ``options["headers"]``.

    Raises :class:`~celery_ckeys.InvalidConcurrencyKey` or another ``ValueError`` before
    anything is published.
    """
    has_options = any(name in options for name in HEADER_FOR_OPTION)
    given = options.get("headers")
    if not has_options and not given and (task is None or task.concurrency_key is None):
        return
    headers = dict(given or {})
    key = options.pop("concurrency_key", None)
    if key is not None:
        headers[HEADER_KEY] = check_key(key)
    elif HEADER_KEY in headers:
        check_key(headers[HEADER_KEY])
    elif task is not None:
        computed = default_key(task, args, kwargs)
        if computed is not None:
            headers[HEADER_KEY] = computed

    queue = options.pop("concurrency_queue", None)
    if queue is not None:
        headers[HEADER_QUEUE] = queue_header(queue)
    elif HEADER_QUEUE in headers:
        coerce_queue(headers[HEADER_QUEUE])

    tags = options.pop("tags", None)
    if tags is not None:
        headers[HEADER_TAGS] = check_tags(tags)
    elif HEADER_TAGS in headers:
        check_tags(headers[HEADER_TAGS])

    if headers:
        options["headers"] = headers


def queue_header(queue: Any) -> dict[str, Any]:
    spec = coerce_queue(queue)
    header: dict[str, Any] = {"name": spec.name}
    if spec.limit is not None:
        header["limit"] = spec.limit
    return header


def install(app: Any) -> None:
    """Make ``app.send_task`` validate ckeys options and carry them as headers.

    ``KeyedTask`` installs this on the app it is bound to. Call it yourself on a
    producer-only app (one that defines no ``KeyedTask``) so that
    ``app.send_task(name, concurrency_key=K)`` raises on a bad key before publishing.
    """
    if getattr(app, "_ckeys_installed", False):
        return
    original: Callable[..., Any] = app.send_task

    @functools.wraps(original)
    def send_task(name: str, args: Any = None, kwargs: Any = None, **options: Any) -> Any:
        # KeyedTask.apply_async has already prepared its options.
        if not getattr(options.get("task_type"), "_ckeys_keyed", False):
            prepare(options)
        return original(name, args, kwargs, **options)

    app.send_task = send_task
    app._ckeys_installed = True
