"""The Celery app the tests run in real ``celery worker`` subprocesses.

Each test gets its own broker database and ckeys namespace, passed in the environment.
Task bodies report to a *probe* in the coordination Redis: how many runs of each label
execute at this moment, the highest number ever seen, and an event log, all updated
atomically by Lua so that overlap is measured exactly, without clocks.
"""

from __future__ import annotations

import functools
import json
import os
import signal
import time
from contextlib import contextmanager
from typing import Any, Iterator, Optional

import redis
from celery import Celery
from celery.exceptions import Ignore, Reject
from celery.signals import task_postrun

from celery_ckeys import ConcurrencyQueue, KeyedTask, wait_for
from celery_ckeys import signals as ckeys_signals
from celery_ckeys.contrib.testing import ProcessLocalRedis

ENTER = """
for i, label in ipairs(KEYS) do
  local c = redis.call('HINCRBY', ARGV[1] .. ':cur', label, 1)
  local m = tonumber(redis.call('HGET', ARGV[1] .. ':max', label) or '0')
  if c > m then redis.call('HSET', ARGV[1] .. ':max', label, c) end
end
redis.call('RPUSH', ARGV[1] .. ':log', ARGV[2])
return 1
"""
EXIT = """
for i, label in ipairs(KEYS) do
  redis.call('HINCRBY', ARGV[1] .. ':cur', label, -1)
end
redis.call('RPUSH', ARGV[1] .. ':log', ARGV[2])
return 1
"""


class Probe:
    def __init__(self, url: str, namespace: str) -> None:
        self.redis = ProcessLocalRedis(url)  # the workers' main processes report too
        self.prefix = f"probe:{namespace}"

    @property
    def client(self) -> redis.Redis:
        return self.redis.client

    def _enter(self, keys: list[str], args: list[str]) -> None:
        self.client.eval(ENTER, len(keys), *keys, *args)

    def _exit(self, keys: list[str], args: list[str]) -> None:
        self.client.eval(EXIT, len(keys), *keys, *args)

    @contextmanager
    def running(self, labels: list[str], task_id: str, extra: Optional[dict[str, Any]] = None
                ) -> Iterator[None]:
        info = {"id": task_id, "labels": labels, "pid": os.getpid(), **(extra or {})}
        self._enter(keys=labels, args=[self.prefix, json.dumps(
            {"ev": "start", "t": time.time(), **info})])
        try:
            yield
        finally:
            self._exit(keys=labels, args=[self.prefix, json.dumps(
                {"ev": "end", "t": time.time(), **info})])

    def note(self, **event: Any) -> None:
        self.client.rpush(f"{self.prefix}:log", json.dumps(event))


def make_app(broker: str, backend: str, redis_url: str, namespace: str,
             conf: Optional[dict[str, Any]] = None, probe_url: Optional[str] = None) -> Celery:
    app = Celery("ckt", broker=broker, backend=backend, set_as_current=False)
    app.conf.update(
        ckeys_redis_url=redis_url,
        ckeys_namespace=namespace,
        ckeys_retry_countdown=0.3,
        result_expires=3600,
        broker_connection_retry_on_startup=True,
        worker_hijack_root_logger=False,
        task_track_started=False,
    )
    app.conf.update(conf or {})
    probe = Probe(probe_url or redis_url, namespace)
    register(app, probe)
    if app.conf.get("ckt_outage_after_hold"):
        outage_after_first_hold(redis_url, app.conf.ckt_outage_after_hold)
    return app


def outage_after_first_hold(redis_url: str, flag: str) -> None:
    """Shut the coordination Redis down right after the first run took its units, before
    anything else of the gate runs (``flag`` is a file: only the first hold does it)."""
    from celery_ckeys import gate

    def observer(event: str, task: Any, token: str) -> None:
        if event != "hold" or os.path.exists(flag):
            return
        open(flag, "w").close()
        try:
            redis.Redis.from_url(redis_url).shutdown(nosave=True)
        except redis.ConnectionError:
            pass  # the server closes the connection as it goes

    gate.hold_observers.append(observer)


def register(app: Celery, probe: Probe) -> None:
    task = functools.partial(app.task, shared=False)

    def body(task: Any, labels: list[str], duration: float) -> dict[str, Any]:
        req = task.request
        with probe.running(labels, req.id, {"slots": getattr(req, "ckeys_slots", None)}):
            if duration:
                time.sleep(duration)
        return {
            "id": req.id,
            "retries": req.retries,
            "headers": req.headers,
            "slots": getattr(req, "ckeys_slots", None),
            "fence": getattr(req, "ckeys_fence", None),
            "routing_key": (req.delivery_info or {}).get("routing_key"),
            "pid": os.getpid(),
        }

    @task(bind=True, base=KeyedTask, name="ckt.work")
    def work(self: Any, labels: list[str], duration: float = 0.0) -> dict[str, Any]:
        return body(self, labels, duration)

    @task(bind=True, base=KeyedTask, name="ckt.plain_keyed", max_retries=0)
    def no_retries(self: Any, labels: list[str], duration: float = 0.0) -> dict[str, Any]:
        return body(self, labels, duration)

    @task(bind=True, name="ckt.plain")
    def plain(self: Any, labels: list[str], duration: float = 0.0) -> dict[str, Any]:
        return body(self, labels, duration)

    @task(bind=True, base=KeyedTask, name="ckt.templated", concurrency_key="contact:{contact_id}")
    def templated(self: Any, contact_id: str, duration: float = 0.0) -> dict[str, Any]:
        return body(self, [f"contact:{contact_id}"], duration)

    @task(bind=True, base=KeyedTask, name="ckt.by_callable",
              concurrency_key=lambda a, b, duration=0.0: f"pair:{a}-{b}")
    def by_callable(self: Any, a: str, b: str, duration: float = 0.0) -> dict[str, Any]:
        return body(self, [f"pair:{a}-{b}"], duration)

    @task(bind=True, base=KeyedTask, name="ckt.hold_until")
    def hold_until(self: Any, labels: list[str], gate: str) -> dict[str, Any]:
        """Holds its slots until the test opens ``gate`` (``Env.open_gate``), at most 60 s."""
        deadline = time.monotonic() + 60
        with probe.running(labels, self.request.id):
            while not probe.client.exists(f"{probe.prefix}:open:{gate}"):
                if time.monotonic() > deadline:
                    raise TimeoutError(f"gate {gate} was never opened")
                time.sleep(0.01)
        return {"id": self.request.id}

    @task(bind=True, base=KeyedTask, name="ckt.throttler")
    def throttler(self: Any, labels: list[str], seconds: float) -> dict[str, Any]:
        """Answers a 429: its partition starts nothing new for ``seconds``."""
        with probe.running(labels, self.request.id):
            until = self.throttle(seconds)
        return {"id": self.request.id, "until": until}

    @task(bind=True, base=KeyedTask, name="ckt.tiered", concurrency_queue=ConcurrencyQueue(
        "tiered", limit=lambda key: 2 if key.startswith("paid:") else 1))
    def tiered(self: Any, labels: list[str], duration: float = 0.0) -> dict[str, Any]:
        return body(self, labels, duration)

    @task(bind=True, base=KeyedTask, name="ckt.one_at_a_time", concurrency_limit=1)
    def one_at_a_time(self: Any, labels: list[str], duration: float = 0.0) -> dict[str, Any]:
        return body(self, labels, duration)

    @task(bind=True, base=KeyedTask, name="ckt.limited3", concurrency_limit=3)
    def limited3(self: Any, labels: list[str], duration: float = 0.0) -> dict[str, Any]:
        return body(self, labels, duration)

    shared = ConcurrencyQueue("shared", limit=2)

    @task(bind=True, base=KeyedTask, name="ckt.shared_a", concurrency_queue=shared)
    def shared_a(self: Any, labels: list[str], duration: float = 0.0) -> dict[str, Any]:
        return body(self, labels, duration)

    @task(bind=True, base=KeyedTask, name="ckt.shared_b", concurrency_queue=shared)
    def shared_b(self: Any, labels: list[str], duration: float = 0.0) -> dict[str, Any]:
        return body(self, labels, duration)

    # -- end paths ------------------------------------------------------------
    def end_body(self: Any, how: str, labels: list[str]) -> Any:
        with probe.running(labels, self.request.id):
            probe.note(ev="body", id=self.request.id, how=how, retries=self.request.retries,
                       pid=os.getpid())
            if how == "ok":
                return "ok"
            if how == "raise":
                raise RuntimeError("boom")
            if how == "retry":
                if self.request.retries == 0:
                    raise self.retry(countdown=0.2)
                return "retried"
            if how == "reject":
                raise Reject("rejected", requeue=False)
            if how == "requeue_once":
                if probe.client.set(f"{probe.prefix}:requeued:{self.request.id}", 1, nx=True):
                    raise Reject("not now, put me back", requeue=True)
                return "requeued"
            if how == "ignore":
                raise Ignore()
            if how == "sleep":
                time.sleep(60)
                return "slept"
            if how == "sigkill":
                os.kill(os.getpid(), signal.SIGKILL)
            if how == "sigterm":
                os.kill(os.getpid(), signal.SIGTERM)
                time.sleep(30)
        raise ValueError(how)

    @task(bind=True, base=KeyedTask, name="ckt.end", max_retries=1, default_retry_delay=0.2)
    def end(self: Any, how: str, labels: list[str]) -> Any:
        return end_body(self, how, labels)

    @task(bind=True, base=KeyedTask, name="ckt.end_limited", concurrency_limit=2, max_retries=1)
    def end_limited(self: Any, how: str, labels: list[str]) -> Any:
        return end_body(self, how, labels)

    @task(bind=True, base=KeyedTask, name="ckt.soft_limit", soft_time_limit=0.5)
    def soft_limit(self: Any, labels: list[str]) -> str:
        with probe.running(labels, self.request.id):
            probe.note(ev="body", id=self.request.id, pid=os.getpid())
            time.sleep(30)
        return "unreachable"

    @task(bind=True, base=KeyedTask, name="ckt.hard_limit", time_limit=1)
    def hard_limit(self: Any, labels: list[str]) -> str:
        probe.note(ev="body", id=self.request.id, pid=os.getpid())
        time.sleep(30)
        return "unreachable"

    # -- protocol events (test_protocol.py) -----------------------------------
    @task(bind=True, base=KeyedTask, name="ckt.autoretry", autoretry_for=(KeyError,),
          max_retries=1, default_retry_delay=0.2)
    def autoretry(self: Any, labels: list[str]) -> dict[str, Any]:
        with probe.running(labels, self.request.id, {"retries": self.request.retries}):
            if self.request.retries == 0:
                raise KeyError("first attempt fails")
        return {"retries": self.request.retries}

    @task(bind=True, base=KeyedTask, name="ckt.retry_later", max_retries=1)
    def retry_later(self: Any, labels: list[str], countdown: float) -> dict[str, Any]:
        """Retries once, ``countdown`` seconds later."""
        with probe.running(labels, self.request.id, {"retries": self.request.retries}):
            pass
        if self.request.retries == 0:
            raise self.retry(countdown=countdown)
        return {"retries": self.request.retries}

    @task(bind=True, base=KeyedTask, name="ckt.hard_limit_beating", time_limit=1)
    def hard_limit_beating(self: Any, labels: list[str]) -> str:
        """Reports that its body still runs, every 10 ms, until billiard kills it."""
        while True:
            probe.note(ev="alive", id=self.request.id, pid=os.getpid(), t=time.time())
            time.sleep(0.01)

    @task(bind=True, base=KeyedTask, name="ckt.kill_once")
    def kill_once(self: Any, labels: list[str], duration: float) -> str:
        """SIGKILLs its own pool process on its first execution only."""
        with probe.running(labels, self.request.id):
            if probe.client.set(f"{probe.prefix}:killed:{self.request.id}", 1, nx=True):
                os.kill(os.getpid(), signal.SIGKILL)
            time.sleep(duration)
        return "survived"

    class DiesBeforeItsResult(KeyedTask):
        abstract = True

        def __call__(self, *args: Any, **kwargs: Any) -> Any:
            out = super().__call__(*args, **kwargs)  # the gate has released (and left its memo)
            if probe.client.set(f"{probe.prefix}:killed:{self.request.id}", 1, nx=True):
                os.kill(os.getpid(), signal.SIGKILL)  # before Celery stores the result
            return out

    @task(bind=True, base=DiesBeforeItsResult, name="ckt.dies_before_its_result")
    def dies_before_its_result(self: Any, labels: list[str], duration: float) -> dict[str, Any]:
        """Its pool process dies once, after the body ended and before the result is stored."""
        return body(self, labels, duration)

    @task(bind=True, base=KeyedTask, name="ckt.dies_after_its_result")
    def dies_after_its_result(self: Any, labels: list[str], duration: float) -> dict[str, Any]:
        """Its pool process dies once, in task_postrun: after Celery stored the result."""
        return body(self, labels, duration)

    def die_after_the_result(sender: Any = None, task_id: Optional[str] = None,
                             state: Optional[str] = None, **_: Any) -> None:
        if getattr(sender, "name", None) == "ckt.dies_after_its_result" and state == "SUCCESS" \
                and probe.client.set(
                f"{probe.prefix}:killed:{task_id}", 1, nx=True):
            os.kill(os.getpid(), signal.SIGKILL)

    task_postrun.connect(die_after_the_result, weak=False, dispatch_uid="ckt.die_after_result")

    class ForkingTask(KeyedTask):
        abstract = True

        def __call__(self, *args: Any, **kwargs: Any) -> Any:
            parent = os.getpid()
            try:
                return super().__call__(*args, **kwargs)
            finally:
                if os.getpid() != parent:
                    os._exit(0)  # the forked child has left the gate; it must not go further

    @task(bind=True, base=ForkingTask, name="ckt.forker")
    def forker(self: Any, labels: list[str], duration: float) -> str:
        child = os.fork()
        if child == 0:
            raise RuntimeError("the forked child leaves through an exception")
        os.waitpid(child, 0)
        probe.note(ev="forked", id=self.request.id, child=child)
        with probe.running(labels, self.request.id):
            time.sleep(duration)
        return "parent done"

    # -- waits ----------------------------------------------------------------
    @task(bind=True, base=KeyedTask, name="ckt.parent")
    def parent(self: Any, labels: list[str], child_labels: list[str], child_opts: dict[str, Any],
               depth: int = 1, duration: float = 0.0, child_duration: float = 0.3,
               timeout: Optional[float] = None, child_how: str = "ok") -> Any:
        with probe.running(labels, self.request.id, {"phase": "before"}):
            if duration:
                time.sleep(duration)
        if depth > 1:
            sig = parent.s(child_labels, child_labels, child_opts, depth=depth - 1,
                           duration=duration, child_duration=child_duration, child_how=child_how)
        else:
            sig = child.s(child_labels, child_duration, child_how)
        sig = sig.set(**child_opts)
        probe.note(ev="wait", id=self.request.id)
        result = self.wait_for(sig, timeout=timeout)
        probe.note(ev="resumed", id=self.request.id)
        with probe.running(labels, self.request.id, {"phase": "after"}):
            pass
        return {"child": result, "slots": getattr(self.request, "ckeys_slots", None)}

    @task(bind=True, base=KeyedTask, name="ckt.child", max_retries=3, default_retry_delay=0.2)
    def child(self: Any, labels: list[str], duration: float = 0.3, how: str = "ok") -> Any:
        with probe.running(labels, self.request.id, {"retries": self.request.retries}):
            time.sleep(duration)
        if how == "raise":
            raise KeyError("child failed")
        if how == "retry" and self.request.retries == 0:
            raise self.retry()
        return {"id": self.request.id, "slots": getattr(self.request, "ckeys_slots", None)}

    @task(bind=True, base=KeyedTask, name="ckt.guard_check")
    def guard_check(self: Any, labels: list[str]) -> dict[str, Any]:
        value = self.wait_for(child.s(labels, 0.1))
        try:
            child.delay(labels, 0.0).get(timeout=10)
            guard = "lifted"
        except RuntimeError as exc:
            guard = str(exc)
        return {"value": value, "guard": guard}

    @task(name="ckt.free_waiter")
    def free_waiter(labels: list[str], child_labels: list[str]) -> Any:
        return wait_for(child.s(child_labels, 0.2))

    @task(bind=True, base=KeyedTask, name="ckt.spawn")
    def spawn(self: Any, labels: list[str]) -> Any:
        """Publishes a child from inside a keyed run, to show children inherit nothing."""
        with probe.running(labels, self.request.id):
            sub = work.apply_async(([f"child-of:{self.request.id}"], 0.0))
        return sub.id

    # -- chaos: a journal that survives a coordination Redis restart ----------
    journal = ProcessLocalRedis(os.environ.get("CKT_JOURNAL") or app.conf.broker_url)

    @task(bind=True, base=KeyedTask, name="ckt.chaos", autoretry_for=(KeyError,), max_retries=3,
          default_retry_delay=0.05)
    def chaos(self: Any, labels: list[str], duration: float, how: str = "ok") -> str:
        """``how``: "ok"; "retry" (self.retry() once); "auto" (raise for autoretry_for once).
        Every execution journals its start and end; the end says whether it was final."""
        key = f"journal:{app.conf.ckeys_namespace}"
        info = {"id": self.request.id, "pid": os.getpid(), "labels": labels}
        journal.client.rpush(key, json.dumps({"ev": "start", "t": time.time(), **info}))
        time.sleep(duration)
        again = how in ("retry", "auto") and self.request.retries == 0
        journal.client.rpush(key, json.dumps({"ev": "end", "t": time.time(), "final": not again, **info}))
        if again and how == "retry":
            raise self.retry(countdown=0.05)
        if again:
            raise KeyError("first attempt")
        return "ok"

    # -- signals: the worker reports them to the probe ------------------------
    def report(name: str) -> Any:
        def receiver(sender: Any = None, **kw: Any) -> None:
            kw.pop("signal", None)
            probe.note(ev="signal", name=name, task=getattr(sender, "name", None),
                       **{k: v for k, v in kw.items() if isinstance(v, (str, int, float, list))})
        return receiver

    for name in ("slots_acquired", "run_deferred", "slots_released"):
        getattr(ckeys_signals, name).connect(report(name), weak=False)


def _from_env() -> Optional[Celery]:
    if "CKT_BROKER" not in os.environ:
        return None
    return make_app(os.environ["CKT_BROKER"], os.environ["CKT_BACKEND"], os.environ["CKT_REDIS"],
                    os.environ["CKT_NS"], json.loads(os.environ.get("CKT_CONF", "{}")),
                    probe_url=os.environ.get("CKT_PROBE"))


app = _from_env()
