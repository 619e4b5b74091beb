"""The reference scenarios as Celery tasks.

* ``enrich``: contact enrichment; never two runs for the same contact at once
  (a concurrency key derived from the arguments).
* ``generate_pull_request``: one slot per free user, three per paid user (a queue
  chosen when the run is triggered, partitioned per user).
* ``rebuild_search_index``: one at a time, across all workers (``concurrency_limit=1``).
* ``build_report`` waits for ``render_chart`` on the same limit-1 queue; the parent gives
  its slot back while it waits, so the child can run.
"""

from __future__ import annotations

import time
from typing import Any

from celery_ckeys import ConcurrencyQueue, KeyedTask

from .app import app
from .observe import observer

FREE_USERS = ConcurrencyQueue("free-users", limit=1)
PAID_USERS = ConcurrencyQueue("paid-users", limit=3)
REPORTS = ConcurrencyQueue("reports", limit=1)


@app.task(base=KeyedTask, concurrency_key="contact:{contact_id}")
def enrich(contact_id: str, work_seconds: float = 0.05) -> dict[str, Any]:
    with observer().running("enrichment", f"contact:{contact_id}", "enrichment (all)"):
        time.sleep(work_seconds)  # the call to the enrichment API
    return {"contact_id": contact_id, "enriched": True}


@app.task(base=KeyedTask, concurrency_limit=1)
def generate_pull_request(user_id: str, plan: str, work_seconds: float = 0.2) -> str:
    with observer().running("pull requests", f"{plan}-users[{user_id}]", f"{plan}-users (all)"):
        time.sleep(work_seconds)  # the call to the model
    return f"PR for {user_id}"


def trigger_pull_request(user_id: str, is_free_user: bool, work_seconds: float = 0.2) -> Any:
    """What the backend does: free users get 1 slot each, paid users 3 each."""
    queue = FREE_USERS if is_free_user else PAID_USERS
    plan = "free" if is_free_user else "paid"
    return generate_pull_request.apply_async((user_id, plan, work_seconds), concurrency_queue=queue,
                                             concurrency_key=user_id, tags=[f"plan:{plan}"])


@app.task(base=KeyedTask, concurrency_limit=1)
def rebuild_search_index(batch: int, work_seconds: float = 0.1) -> int:
    with observer().running("one at a time", "rebuild_search_index"):
        time.sleep(work_seconds)
    return batch


@app.task(bind=True, base=KeyedTask, concurrency_queue=REPORTS)
def build_report(self: Any, report_id: int) -> dict[str, Any]:
    with observer().running("parent waits on child", "reports (executing)"):
        time.sleep(0.05)
    # gives this run's slot on "reports" back while the chart renders on that same queue
    chart = self.wait_for(render_chart.s(report_id))
    with observer().running("parent waits on child", "reports (executing)"):
        time.sleep(0.05)
    return {"report": report_id, "chart": chart}


@app.task(base=KeyedTask, concurrency_queue=REPORTS)
def render_chart(report_id: int) -> str:
    with observer().running("parent waits on child", "reports (executing)"):
        time.sleep(0.1)
    return f"chart-{report_id}.png"


for _task, _scenario in ((enrich, "enrichment"), (generate_pull_request, "pull requests"),
                         (rebuild_search_index, "one at a time"), (build_report, "parent waits on child"),
                         (render_chart, "parent waits on child")):
    _task.scenario = _scenario
