"""Worker-level settings that keyed tasks depend on.

A worker that prefetches keyed runs it cannot start hoards them: with
``ckeys_tune_worker`` (the default) keyed tasks acknowledge late and the worker
prefetches one message per process, and holds at most ``ckeys_eta_task_limit`` deferred
(ETA) messages in memory where Celery supports ``worker_eta_task_limit`` (5.6+).
Settings you chose yourself are kept; a conflicting one is logged.
"""

from __future__ import annotations

import logging
from typing import Any

from celery.signals import celeryd_init

logger = logging.getLogger("celery_ckeys.worker")

CELERY_DEFAULT_PREFETCH = 4


def _tune_enabled(app: Any) -> bool:
    value = app.conf.get("ckeys_tune_worker", True)
    return value is not False


def tune_task_class(cls: Any, app: Any) -> None:
    """Keyed tasks acknowledge late unless the task sets ``acks_late`` itself."""
    if _tune_enabled(app) and not getattr(cls, "_ckeys_explicit_acks_late", False):
        cls.acks_late = True


def _has_keyed_tasks(app: Any) -> bool:
    return any(getattr(task, "_ckeys_keyed", False) for task in app.tasks.values())


@celeryd_init.connect(weak=False, dispatch_uid="celery_ckeys.tune_worker")
def _tune_worker(sender: Any = None, instance: Any = None, conf: Any = None, **_: Any) -> None:
    app = getattr(instance, "app", None)
    if app is None or conf is None or not _has_keyed_tasks(app):
        return
    from .config import get_config
    from .errors import ConfigurationError

    try:
        config = get_config(app)  # every ckeys_* setting is checked before the worker starts
    except ConfigurationError as exc:
        logger.critical("celery_ckeys: %s", exc)
        # SystemExit passes through Celery's signal dispatch; an Exception would be swallowed
        raise SystemExit(f"celery_ckeys: {exc}") from None
    if not _tune_enabled(app):
        return
    multiplier = conf.get("worker_prefetch_multiplier", CELERY_DEFAULT_PREFETCH)
    if multiplier == CELERY_DEFAULT_PREFETCH:
        conf.worker_prefetch_multiplier = 1
        logger.info("celery_ckeys: worker_prefetch_multiplier set to 1 so that a worker does"
                    " not hoard keyed runs it cannot start (ckeys_tune_worker=False keeps"
                    " Celery's default)")
    elif multiplier != 1:
        logger.warning("celery_ckeys: worker_prefetch_multiplier=%s lets a worker hold keyed"
                       " runs it cannot start; 1 is recommended", multiplier)
    if "worker_eta_task_limit" in conf and conf.get("worker_eta_task_limit") is None \
            and config.eta_task_limit is not None:
        conf.worker_eta_task_limit = config.eta_task_limit
