"""``KeyedTask``: the base class users put on their tasks (``@app.task(base=KeyedTask)``)."""

from __future__ import annotations

import inspect
import os
from functools import partial
from typing import Any, Callable, ClassVar, Optional, Union

from billiard.exceptions import Terminated, TimeLimitExceeded, WorkerLostError
from celery import Task
from celery.exceptions import Ignore
from celery.worker.request import Request

from . import gate
from .errors import InvalidConcurrencyKey, InvalidConcurrencyQueue
from .publish import install, prepare
from .queues import ConcurrencyQueue, QueueLike, coerce_queue
from .validation import check_limit, check_policy, check_priority
from .worker import after_exit

KeySpec = Union[str, Callable[..., str]]

# How a pool process can end without running the gate's ``finally``.
_PROCESS_GONE = (WorkerLostError, TimeLimitExceeded, Terminated, SystemExit, KeyboardInterrupt)
# Of those, the ends Celery treats as a lost worker (requeued by task_reject_on_worker_lost).
_WORKER_LOST = (WorkerLostError, SystemExit, KeyboardInterrupt)


class KeyedRequest(Request):  # type: ignore[misc]
    """Worker request class of keyed tasks; lives in the worker's main process.

    When a pool process dies under a run (SIGKILL, OOM, hard time limit, revoke with
    terminate) nothing runs in that process, so the main process frees the run's units.
    Billiard reports a hard time limit (and Celery a terminate) *before* the process is
    gone, so the release waits until it is: two bodies never overlap.
    """

    #: on_failure saw the pool process lost (WorkerLostError and its kin): see reject
    _ckeys_lost = False

    def on_failure(self, exc_info: Any, send_failed_event: bool = True,
                   return_ok: bool = False) -> Any:
        exc = getattr(exc_info, "exception", None)
        exc = getattr(exc, "exc", exc)  # ExceptionWithTraceback
        pid = self.worker_pid
        if isinstance(exc, _PROCESS_GONE) and pid and pid != os.getpid():
            self._ckeys_lost = isinstance(exc, _WORKER_LOST)  # see reject
            release = partial(gate.release_lost, self.task, self.id, self.hostname or "", pid,
                              dict(self.request_dict), self.args, self.kwargs, type(exc).__name__)
            after_exit(pid, release)
        return super().on_failure(exc_info, send_failed_event=send_failed_event,
                                  return_ok=return_ok)

    def reject(self, requeue: bool = False) -> None:
        if requeue and self._ckeys_lost and not self.acknowledged:
            # Celery puts the message of a lost process back (task_reject_on_worker_lost):
            # a memo that process left after its body ended, its result not stored, would
            # drop the redelivery. Only here: Celery does not requeue when the result was
            # stored already, or it publishes a retry instead.
            gate.comes_back(self.task, self.id, dict(self.request_dict), self.args, self.kwargs)
        super().reject(requeue=requeue)


class KeyedTask(Task):  # type: ignore[misc]
    """A Celery task whose runs honour concurrency keys, limits and queues.

    Class options (pass them to ``@app.task``):

    - ``concurrency_key``: a default key, a ``str.format`` template over the task's
      arguments (``"contact:{contact_id}"``) or a callable taking the task's arguments.
      A key given when the run is triggered wins.
    - ``concurrency_limit``: at most this many runs of this task execute at once; the task
      gets its own queue, named after the task.
    - ``concurrency_queue``: a ``ConcurrencyQueue`` (or its name) shared with other tasks.
    - ``concurrency_priority``: the default priority of its runs in a line (int,
      -1000..1000, higher first; 0). ``apply_async(concurrency_priority=N)`` and
      ``.set(concurrency_priority=N)`` win.
    - ``concurrency_policy``: what a run does when its own key, partition or queue is full:
      ``"wait"`` (the default), ``"skip"``, ``"cancel_running"`` or ``"keep_latest"``
      (README, "Conflict policies"); ``apply_async(concurrency_policy=...)`` and
      ``.set(...)`` win.
    """

    abstract = True
    Request = KeyedRequest
    _ckeys_keyed: ClassVar[bool] = True

    concurrency_key: ClassVar[Optional[KeySpec]] = None
    concurrency_limit: ClassVar[Optional[int]] = None
    concurrency_queue: ClassVar[Optional[QueueLike]] = None
    concurrency_priority: ClassVar[int] = 0
    concurrency_policy: ClassVar[str] = "wait"
    _ckeys_queue: ClassVar[Optional[ConcurrencyQueue]] = None
    _ckeys_explicit_acks_late: ClassVar[bool] = False

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "acks_late" in cls.__dict__:
            cls._ckeys_explicit_acks_late = True
        key = cls.__dict__.get("concurrency_key")
        if key is not None and not (isinstance(key, str) or callable(key)):
            raise InvalidConcurrencyKey(
                f"concurrency_key of {cls.__name__} must be a format template (str) or a"
                f" callable, got {type(key).__name__}", key=key)
        if key is not None and not isinstance(key, str) and inspect.isfunction(key):
            # a plain function stored on the class would become a method of the task
            cls.concurrency_key = staticmethod(key)
        limit = cls.concurrency_limit
        queue = cls.concurrency_queue
        if limit is not None and queue is not None:
            raise InvalidConcurrencyQueue(
                f"{cls.__name__} sets both concurrency_limit and concurrency_queue; give the"
                " queue its limit instead: ConcurrencyQueue(name, limit=N)", queue=queue)
        if limit is not None:
            check_limit(limit)
            name = cls.__dict__.get("name")
            cls._ckeys_queue = ConcurrencyQueue(name, limit) if name else None
        if queue is not None:
            cls._ckeys_queue = coerce_queue(queue)
        check_priority(cls.concurrency_priority)
        check_policy(cls.concurrency_policy)

    @classmethod
    def on_bound(cls, app: Any) -> None:
        install(app)
        if cls.concurrency_limit is not None and cls._ckeys_queue is None and cls.name:
            cls._ckeys_queue = ConcurrencyQueue(cls.name, cls.concurrency_limit)
        from .worker import tune_task_class

        tune_task_class(cls, app)

    def apply_async(self, args: Any = None, kwargs: Any = None, task_id: Any = None,
                    producer: Any = None, link: Any = None, link_error: Any = None,
                    shadow: Any = None, **options: Any) -> Any:
        """As Celery's, plus ``concurrency_key=``, ``concurrency_queue=``,
        ``concurrency_priority=``, ``concurrency_policy=`` and ``tags=``.

        They are validated here, before anything is published, and travel as headers.
        """
        prepare(options, task=self, args=args, kwargs=kwargs)
        return super().apply_async(args, kwargs, task_id=task_id, producer=producer, link=link,
                                   link_error=link_error, shadow=shadow, **options)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        request = self.request
        if request.called_directly:
            # a plain function call, outside any worker: no coordination
            return super().__call__(*args, **kwargs)
        if request.is_eager:
            # task_always_eager / .apply(): the body runs without coordination (SPEC 4.11)
            return self.run(*args, **kwargs)
        try:
            return gate.run(self, args, kwargs)
        except Ignore as exc:
            if type(exc) is not Ignore:
                raise
            why = exc.args
        # Raised again here, outside the handler: Celery builds an ExceptionInfo of an Ignore
        # twice, formats it and pickles it to the main process, at a cost per frame of its
        # traceback, and every parked, deferred or dropped copy ends this way. From this
        # frame the traceback is two frames deep instead of the gate's six or more.
        raise Ignore(*why)

    def throttle(self, seconds: float) -> float:
        """Start no new run of this run's partition (or queue) for ``seconds``.

        See ``celery_ckeys.throttle``.
        """
        from .throttle import throttle

        return throttle(seconds, task=self)

    def wait_for(self, target: Any, timeout: Optional[float] = None) -> Any:
        """Wait for a child (a signature to publish, or an ``AsyncResult``) without holding slots.

        See ``celery_ckeys.wait_for``.
        """
        from .waits import wait_for

        return wait_for(target, timeout=timeout, task=self)
