"""The producer side: turn ckeys options into message headers, validated before publishing.

Publishing needs only the broker. Nothing here talks to the coordination Redis: a
trigger-time limit travels in the ``concurrency_queue`` header and is recorded by the
worker when the run starts.
"""

from __future__ import annotations

import functools
import inspect
from typing import Any, Callable, Mapping, Optional, Sequence

from .errors import InvalidConcurrencyKey, InvalidConcurrencyQueue
from .queues import ConcurrencyQueue, coerce_queue
from .validation import check_key, check_policy, check_priority, check_tags

HEADER_KEY = "concurrency_key"
HEADER_QUEUE = "concurrency_queue"
HEADER_PRIORITY = "concurrency_priority"
HEADER_POLICY = "concurrency_policy"
HEADER_TAGS = "ckeys_tags"
HEADER_DEFERRALS = "ckeys_deferrals"
HEADER_FIRST_DEFERRED = "ckeys_first_deferred"
HEADER_TICKET = "ckeys_ticket"
HEADER_WAIT_CHAIN = "ckeys_wait_chain"
HEADER_RESUME = "ckeys_resume"

#: Headers of one stay in line (docs/protocol.md 2.1): a countdown deferral and a park keep
#: them, a retry, autoretry or replace starts without them (the gate strips them from the
#: request once the run is admitted).
PER_STAY = (HEADER_TICKET, HEADER_DEFERRALS, HEADER_FIRST_DEFERRED)
#: Every header celery_ckeys reads on the worker.
ALL_HEADERS = (HEADER_KEY, HEADER_QUEUE, HEADER_PRIORITY, HEADER_POLICY, HEADER_TAGS,
               HEADER_WAIT_CHAIN, HEADER_RESUME, *PER_STAY)


def deferred_headers(headers: Mapping[str, Any], now: float) -> dict[str, Any]:
    """The headers of a deferred copy (countdown or park): one more deferral, and the time
    of the first, which is the run's place in a line. The ticket stays (same stay)."""
    out = dict(headers)
    out[HEADER_DEFERRALS] = int(headers.get(HEADER_DEFERRALS) or 0) + 1
    first = headers.get(HEADER_FIRST_DEFERRED)
    out[HEADER_FIRST_DEFERRED] = first if isinstance(first, (int, float)) else round(now, 3)
    return out


def copy_expiry(headers: dict[str, Any]) -> tuple[bool, Any]:
    """``(True, the run's own expires or None)`` when this copy's ``expires`` is the
    handoff's copy life (``ckeys_ticket`` = ``[ticket, home, 1, own expires]``), not the
    run's; ``(False, None)`` otherwise. Every message made from the copy (a park, a retry,
    autoretry, replace) must carry the run's own expiry, never the copy's."""
    raw = headers.get(HEADER_TICKET)
    if isinstance(raw, (list, tuple)) and len(raw) >= 3 and raw[2] == 1:
        return True, raw[3] if len(raw) >= 4 else None
    return False, None


def strip_stay(request: Any) -> None:
    """The run is admitted: what Celery publishes from its request from now on (retry,
    autoretry, replace) is a fresh run, not another copy of this stay in line, and expires
    when the run itself does."""
    headers = getattr(request, "headers", None)
    ours, own = copy_expiry(headers if isinstance(headers, dict) else {})
    if ours:
        request.expires = own
    for name in PER_STAY:
        if isinstance(headers, dict):
            headers.pop(name, None)
        if name in request.__dict__:
            delattr(request, name)

HEADER_FOR_OPTION = {
    "concurrency_key": HEADER_KEY,
    "concurrency_queue": HEADER_QUEUE,
    "concurrency_priority": HEADER_PRIORITY,
    "concurrency_policy": HEADER_POLICY,
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

    Raises ``celery_ckeys.InvalidConcurrencyKey`` or another ``ValueError`` before
    anything is published.
    """
    has_options = any(name in options for name in HEADER_FOR_OPTION)
    given = options.get("headers")
    if not has_options and not given and (task is None or (
            task.concurrency_key is None and not getattr(task, "concurrency_priority", 0)
            and getattr(task, "concurrency_policy", "wait") == "wait")):
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

    _option_with_default(options, headers, task, "concurrency_priority", HEADER_PRIORITY, 0,
                         check_priority)
    _option_with_default(options, headers, task, "concurrency_policy", HEADER_POLICY, "wait",
                         check_policy)

    _check_computed_limit(task, headers)

    tags = options.pop("tags", None)
    if tags is not None:
        headers[HEADER_TAGS] = check_tags(tags)
    elif HEADER_TAGS in headers:
        check_tags(headers[HEADER_TAGS])

    if headers:
        options["headers"] = headers


def _option_with_default(options: dict[str, Any], headers: dict[str, Any], task: Any,
                         option: str, header: str, neutral: Any,
                         check: Callable[[Any], Any]) -> None:
    """An option given at the call, else the task's own default (no header when it is the
    neutral value), checked and carried as ``header``; a header given directly is checked."""
    value = options.pop(option, None)
    if value is None and task is not None and header not in headers:
        declared = getattr(task, option, neutral)
        value = declared if declared != neutral else None
    if value is not None:
        headers[header] = check(value)
    elif header in headers:
        check(headers[header])


def _check_computed_limit(task: Any, headers: Mapping[str, Any]) -> None:
    """A limit the task's queue computes for the run's key is computed once here, so that a
    callable that raises or returns a bad limit fails the publish, not the run."""
    queue = getattr(task, "_ckeys_queue", None)
    key = headers.get(HEADER_KEY)
    if isinstance(queue, ConcurrencyQueue) and queue.computed and isinstance(key, str):
        given = headers.get(HEADER_QUEUE)
        if given is None or coerce_queue(given).name == queue.name:
            queue.limit_for(key)


def queue_header(queue: Any) -> dict[str, Any]:
    spec = coerce_queue(queue)
    if spec.computed:
        raise InvalidConcurrencyQueue(
            f"queue {spec.name!r} computes its limit: declare it on the task"
            " (concurrency_queue=...) and give only its name when triggering", queue=spec.name)
    header: dict[str, Any] = {"name": spec.name}
    if spec.limit is not None:
        header["limit"] = spec.limit
    if spec.total_limit is not None:
        header["total_limit"] = spec.total_limit
    if spec.weights:
        header["weights"] = dict(spec.weights)
    if spec.rate is not None:
        header["rate"] = spec.rate
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
