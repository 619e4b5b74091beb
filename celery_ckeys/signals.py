"""celery_ckeys's own Celery signals, and the Celery signal handlers it connects.

Custom signals (connect to them as to any Celery signal):

    from celery_ckeys.signals import slots_acquired, run_deferred, slots_released

    @run_deferred.connect
    def on_deferred(sender, task_id, blocked_by, holder, countdown, **kw): ...

- ``slots_acquired``: sender=task; ``task_id``, ``slots`` (labels), ``fence``, ``waited``
  A run took every slot it needs (a key, a queue or partition slot, the environment)
  and its body is about to run; ``waited`` is the seconds since its first deferral (0
  when it was never deferred); ``fence`` is ``None`` when the coordination Redis could
  not be read at that instant (the run goes ahead). ``key_acquired`` is the same signal.
- ``run_deferred``: sender=task; ``task_id``, ``blocked_by`` (label of the full slot),
  ``holder`` (task id of a run holding it, or ``""``), ``countdown`` (seconds, or
  ``None`` when parked), ``reason`` (``"busy"`` or ``"unavailable"``)
  A run could not get its slots and was deferred; it did not execute.
- ``slots_released``: sender=task or ``None``; ``task_id``, ``slots`` (labels), ``reason``
  (``"finished"``, ``"waiting"`` or ``"worker-lost"``)
  A run's slots were given back.
- ``wait_finished``: sender=task; ``task_id``, ``child_id``, ``seconds``, ``outcome``
  (``"done"``, ``"timeout"`` or ``"starved"``)
  A run stopped blocking in ``wait_for`` (it then takes its slots back).

- ``run_skipped``: sender=task; ``task_id``, ``blocked_by``, ``holder``
  A run with ``concurrency_policy="skip"`` found its slot full and did not run (REVOKED).
- ``run_cancelled``: sender=task; ``task_id`` (the run cancelled), ``by``, ``blocked_by``
  A run with ``"cancel_running"`` revoked (terminated) the run holding its slot.
- ``run_replaced``: sender=task; ``task_id`` (the run replaced), ``by``, ``blocked_by``
  A run with ``"keep_latest"`` replaced a run of its task waiting on its slot (REVOKED).

Receivers run in the process where the event happens: the pool process for all but
``slots_released`` with reason ``"worker-lost"``, which the worker's main process sends.
"""

from __future__ import annotations

from typing import Any

from celery.signals import before_task_publish
from celery.utils.dispatch import Signal

slots_acquired = Signal(name="ckeys_slots_acquired",
                        providing_args={"task_id", "slots", "fence", "waited"})
key_acquired = slots_acquired
run_deferred = Signal(name="ckeys_run_deferred",
                      providing_args={"task_id", "blocked_by", "holder", "countdown", "reason"})
run_skipped = Signal(name="ckeys_run_skipped", providing_args={"task_id", "blocked_by", "holder"})
run_cancelled = Signal(name="ckeys_run_cancelled", providing_args={"task_id", "by", "blocked_by"})
run_replaced = Signal(name="ckeys_run_replaced", providing_args={"task_id", "by", "blocked_by"})
slots_released = Signal(name="ckeys_slots_released",
                        providing_args={"task_id", "slots", "reason"})
wait_finished = Signal(name="ckeys_wait_finished",
                       providing_args={"task_id", "child_id", "seconds", "outcome"})

# Options that may arrive as message properties (``app.send_task(name, concurrency_key=K)``
# bypasses the task class) and must travel as headers for the worker to see them.
PROPERTY_OPTIONS = ("concurrency_key", "concurrency_queue", "concurrency_priority",
                    "concurrency_policy", "tags")


@before_task_publish.connect(weak=False, dispatch_uid="celery_ckeys.move_properties")
def _move_properties_to_headers(headers: Any = None, properties: Any = None, **_: Any) -> None:
    """Backstop for producers that never went through ``celery_ckeys.install``.

    Nothing can be raised from here (Celery logs and swallows receiver errors), so it only
    moves values; the worker then validates them and fails a run whose header is bad.
    """
    if not properties or headers is None:
        return
    from .publish import HEADER_FOR_OPTION

    for option in PROPERTY_OPTIONS:
        if option in properties:
            value = properties.pop(option)
            headers.setdefault(HEADER_FOR_OPTION[option], value)
