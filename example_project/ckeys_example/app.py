"""The Celery app. Configure it with environment variables, as a real project would.

``REDIS_URL``   broker, result backend and coordination state (default: a local Redis)
``CKEYS_NAMESPACE``, ``CKEYS_QUEUE``, ``CKEYS_DEFERRAL``, ``CKEYS_COUNTDOWN``: see the README.
"""

from __future__ import annotations

import os

from celery import Celery

REDIS_URL = os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0")

app = Celery("ckeys_example", broker=REDIS_URL, backend=REDIS_URL,
             include=["ckeys_example.tasks"])
app.conf.update(
    # where the coordination state lives; here the broker's Redis, in its own namespace
    ckeys_redis_url=REDIS_URL,
    ckeys_namespace=os.environ.get("CKEYS_NAMESPACE", "ckeys-example"),
    ckeys_deferral=os.environ.get("CKEYS_DEFERRAL", "countdown"),
    ckeys_retry_countdown=float(os.environ.get("CKEYS_COUNTDOWN", "10")),
    task_default_queue=os.environ.get("CKEYS_QUEUE", "celery"),
    broker_connection_retry_on_startup=True,
    result_expires=3600,
)
