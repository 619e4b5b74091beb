"""Waiting on a child without holding slots (SPEC 4.8).

``wait_for(child)`` inside a keyed run:

1. checks for a recursive-wait deadlock: when the child would run on the caller's own
   queue or partition, the waiting ancestors already there plus the caller must not
   exceed its limit (:class:`RecursiveWaitDeadlock`, raised before anything is published);
2. steps out of every slot the run holds (``release.lua``, in the same round trip as
   ``wait.lua`` listing it as waiting): they are free for other runs, the child among
   them, and its place as a waiter is renewed by the heartbeat so nothing it needs to
   resume expires;
3. publishes the child with the chain of waiting ancestors and a note of who waits;
4. blocks until the child is ready, without Celery's "never call result.get() within a
   task" guard (lifted for this call only, with ``disable_sync_subtasks=False``), and
   fails with :class:`WaitStarvation` if every worker process that could run the child is
   itself blocked waiting;
5. takes its slots back ahead of runs that have not started: when the child ends it marks
   the parent *ready* before its own result is stored, and from then on fresh runs count
   the parent's reservation as taken (``acquire.lua``). A releaser wakes the parent through
   a list it blocks on, so resuming is not left to polling.
"""

from __future__ import annotations

import logging
import time
from typing import Any, Optional

from celery import current_task
from celery.canvas import Signature
from celery.exceptions import TimeoutError as CeleryTimeoutError

from . import gate, signals
from .admission import RunSpec, plan_for
from .config import CkeysConfig, get_config
from .errors import CoordinationUnavailable, RecursiveWaitDeadlock, WaitStarvation, describe
from .heartbeat import Holding, heartbeat
from .introspect import declared_limits, effective_limit
from .naming import WAKE, Names
from .publish import HEADER_RESUME, HEADER_WAIT_CHAIN, prepare
from .store import WAITING, Slot, Store, store_for

logger = logging.getLogger("celery_ckeys.wait")


def wait_for(target: Any, timeout: Optional[float] = None, *, task: Any = None) -> Any:
    """Wait for ``target`` (a signature, which is published, or an ``AsyncResult``).

    Returns the child's result or raises its exception, as ``.get()`` does; raises
    Celery's ``TimeoutError`` after ``timeout`` seconds. Inside a keyed run the run's
    slots are given back while it waits and taken back before this returns or raises.
    """
    current = task if task is not None else current_task
    request = getattr(current, "request", None) if current is not None else None
    if current is None or request is None or request.called_directly or request.id is None:
        result = target.apply_async() if isinstance(target, Signature) else target
        return result.get(timeout=timeout)
    if request.is_eager:
        result = target.apply() if isinstance(target, Signature) else target
        return result.get(timeout=timeout, disable_sync_subtasks=False)
    return _Wait(current, request, target, timeout).run()


class _Wait:
    def __init__(self, task: Any, request: Any, target: Any, timeout: Optional[float]) -> None:
        self.task = task
        self.app = task.app
        self.request = request
        self.target = target
        self.timeout = timeout
        self.config: CkeysConfig = get_config(self.app)
        self.store: Store = store_for(self.config)
        self.active = gate.active_run(request.id)
        self.chain: list[str] = list(gate.headers_of(request).get(HEADER_WAIT_CHAIN) or [])

    @property
    def held(self) -> tuple[Slot, ...]:
        return self.active.holding.slots if self.active is not None else ()

    def my_tag(self) -> Optional[str]:
        specific = [s for s in self.held if s.kind != "env"]
        return specific[0].tag if specific else None

    def run(self) -> Any:
        signature = self.target if isinstance(self.target, Signature) else None
        child_queue = None
        if signature is not None:
            signature = signature.clone()
            self.check_deadlock(signature)
            child_queue = _broker_queue(self.app, signature)
        tags = [s.tag for s in self.held]
        waiting = self.step_out(tags)
        error: Optional[BaseException] = None
        result = self.target
        started = time.monotonic()
        try:
            if signature is not None:
                result = signature.apply_async(**self.child_options(signature, tags))
            self.block(result, child_queue)
        except (CeleryTimeoutError, WaitStarvation) as exc:
            error = exc
        finally:
            if signals.wait_finished.receivers:
                outcome = "done" if error is None else (
                    "timeout" if isinstance(error, CeleryTimeoutError) else "starved")
                signals.wait_finished.send(sender=self.task, task_id=self.request.id,
                                           child_id=getattr(result, "id", None),
                                           seconds=round(time.monotonic() - started, 3),
                                           outcome=outcome)
            self.resume(tags, waiting)
        if error is not None:
            raise error
        return result.get(disable_sync_subtasks=False, propagate=True)

    # -- 1. deadlock ---------------------------------------------------------------
    def check_deadlock(self, signature: Signature) -> None:
        mine = self.my_tag()
        if mine is None:
            return
        child_task = self.app.tasks.get(signature.task)
        if child_task is None or not getattr(child_task, "_ckeys_keyed", False):
            return
        options = dict(signature.options)
        prepare(options, task=child_task, args=signature.args, kwargs=signature.kwargs)
        spec = gate.run_spec(child_task, dict(options.get("headers") or {}), signature.args,
                             signature.kwargs)
        plan = plan_for(self.config, self.store.names, spec)
        if plan is None:
            return
        child_slot = plan.primary_slot
        limit = self.limit_of(child_slot, spec)
        if limit is None:
            if child_slot.kind != "partition" or spec.key is None:
                return
            child_slot, limit = plan.slots[1], 1  # the key mutex that stands in
        if child_slot.tag != mine:
            return
        depth = self.chain.count(mine) + 1
        if depth > limit:
            what = child_slot.label
            raise RecursiveWaitDeadlock(
                f"recursive wait deadlock on {what} (limit {limit}): {depth} runs in this chain"
                f" would be waiting on it at once. Raise its limit, or run the child on another"
                f" queue", queue=what, limit=limit, depth=depth, task_id=self.request.id)

    def limit_of(self, slot: Slot, spec: RunSpec) -> Optional[int]:
        if slot.kind == "key":
            return 1
        if slot.kind == "env":
            return self.config.environment_burst_limit
        assert spec.queue is not None
        if spec.queue_from_trigger and spec.queue.limit is not None:
            recorded: Optional[int] = spec.queue.limit
        else:
            recorded = self.store.queue_limit(spec.queue.name)
        declared = spec.declared_limit if spec.declared_limit is not None else spec.queue.limit
        if declared is None:
            declared = declared_limits(self.app).get(spec.queue.name)
        return effective_limit(self.config, recorded, declared)

    # -- 2. step out ---------------------------------------------------------------
    def step_out(self, tags: list[str]) -> Optional[Holding]:
        if self.active is None or not tags:
            return None
        holding = self.active.holding
        heartbeat.remove(holding)
        self.store.step_out(holding.slots, self.request.id)
        waiting = Holding(store=self.store, owner=self.request.id, task_name=self.task.name,
                          slots=holding.slots, role=WAITING)
        heartbeat.add(waiting)
        if signals.slots_released.receivers:
            signals.slots_released.send(sender=self.task, task_id=self.request.id,
                                        slots=[s.label for s in holding.slots], reason="waiting")
        logger.debug("run %s waits; it gave back %s", self.request.id,
                     ", ".join(s.label for s in holding.slots))
        return waiting

    # -- 3. publish ----------------------------------------------------------------
    def child_options(self, signature: Signature, tags: list[str]) -> dict[str, Any]:
        headers = dict(signature.options.get("headers") or {})
        mine = self.my_tag()
        headers[HEADER_WAIT_CHAIN] = self.chain + ([mine] if mine else [])
        if tags:
            headers[HEADER_RESUME] = {"owner": self.request.id, "tags": tags}
        return {"headers": headers}

    # -- 4. block ------------------------------------------------------------------
    def block(self, result: Any, child_queue: Optional[str]) -> None:
        deadline = None if self.timeout is None else time.monotonic() + self.timeout
        registry = BlockedRegistry(self.store)
        starving_since: Optional[float] = None
        poll = self.config.wait_poll_interval
        registry.enter(self.request.id, self.request.hostname or "")
        try:
            while not result.ready():
                now = time.monotonic()
                if deadline is not None and now >= deadline:
                    raise CeleryTimeoutError(
                        f"wait_for: the child {result.id} did not finish within {self.timeout}s")
                if registry.starving(child_queue) and result.state == "PENDING":
                    starving_since = starving_since if starving_since is not None else now
                    if now - starving_since >= self.config.starvation_grace:
                        raise WaitStarvation(
                            f"wait_for in {self.request.id}: every worker process that could run"
                            f" the child {result.id} (broker queue {child_queue or 'any'}) is itself"
                            f" blocked in wait_for, so the child can never start. Give the workers"
                            f" more processes than runs that wait at once, or route children to"
                            f" workers of their own", task_id=self.request.id, child=result.id,
                            queue=child_queue)
                else:
                    starving_since = None
                registry.renew(self.request.id)
                time.sleep(poll)
        finally:
            registry.leave(self.request.id)

    # -- 5. resume -----------------------------------------------------------------
    def resume(self, tags: list[str], waiting: Optional[Holding]) -> None:
        if waiting is None or self.active is None:
            return
        heartbeat.remove(waiting)
        owner = self.request.id
        plan, holder = self.active.plan, self.active.holder
        attempt = 0
        while True:
            attempt += 1
            try:
                self.store.wait_op("ready", tags, owner)
                result = self.store.acquire(plan.slots, owner, holder, primary=plan.primary,
                                            mode="resume")
            except CoordinationUnavailable as exc:
                if attempt % 20 == 1:
                    logger.error("run %s cannot resume yet: %s", owner, describe(exc))
                time.sleep(0.5)
                continue
            if result.ok:
                break
            if attempt % 100 == 1 and attempt > 1:
                logger.info("run %s is waiting to resume: %s is full", owner,
                            result.blocked.label if result.blocked else "a slot")
            assert result.blocked is not None
            self._wait_for_wake(result.blocked)
        self.store.wait_op("leave", tags, owner)
        gate.hold(self.task, self.request, self.store, plan, result, holder)

    def _wait_for_wake(self, slot: Slot) -> None:
        wake = Names.redis_key(slot.tag, WAKE)
        try:
            self.store.guarded(lambda c: c.blpop([wake], timeout=1))
        except CoordinationUnavailable:
            time.sleep(0.5)


class BlockedRegistry:
    """Which runs are blocked in ``wait_for`` on which worker, for starvation checks."""

    def __init__(self, store: Store) -> None:
        self.store = store
        tag = store.names.workers()
        self.blocked = Names.redis_key(tag, "b")
        self.where = Names.redis_key(tag, "bw")
        self.registry = Names.redis_key(tag, "reg")
        self.lease_ms = 30_000
        self._last_check = 0.0
        self._last_answer = False

    def enter(self, owner: str, hostname: str) -> None:
        def _do(client: Any) -> None:
            pipe = client.pipeline(transaction=False)
            pipe.hset(self.where, owner, hostname)
            pipe.execute()

        self.store.guarded(_do)
        self.renew(owner)

    def renew(self, owner: str) -> None:
        try:
            self.store.guarded(lambda c: c.eval(
                "local t = redis.call('TIME'); local now = t[1] * 1000 + math.floor(t[2] / 1000);"
                " redis.call('ZADD', KEYS[1], now + tonumber(ARGV[2]), ARGV[1]);"
                " redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now);"
                " redis.call('PEXPIRE', KEYS[1], ARGV[2]); redis.call('PEXPIRE', KEYS[2], ARGV[2])",
                2, self.blocked, self.where, owner, self.lease_ms))
        except CoordinationUnavailable:
            pass

    def leave(self, owner: str) -> None:
        def _do(client: Any) -> None:
            pipe = client.pipeline(transaction=False)
            pipe.zrem(self.blocked, owner)
            pipe.hdel(self.where, owner)
            pipe.execute()

        try:
            self.store.guarded(_do)
        except CoordinationUnavailable:
            pass

    def starving(self, queue: Optional[str]) -> bool:
        """True when every live worker process that consumes ``queue`` is blocked waiting."""
        now = time.monotonic()
        if now - self._last_check < 0.5:
            return self._last_answer
        self._last_check = now
        try:
            self._last_answer = self._starving(queue)
        except CoordinationUnavailable:
            self._last_answer = False
        return self._last_answer

    def _starving(self, queue: Optional[str]) -> bool:
        import json

        def _read(client: Any) -> list[Any]:
            # one tag (the namespace's workers), so this pipeline is fine under Cluster too
            pipe = client.pipeline(transaction=False)
            pipe.hgetall(self.registry)
            pipe.zrange(self.blocked, 0, -1, withscores=True)
            pipe.hgetall(self.where)
            return [client.time(), *pipe.execute()]

        (sec, usec), workers, blocked, where = self.store.guarded(_read)
        now_ms = int(sec) * 1000 + int(usec) // 1000
        capacity: dict[str, int] = {}
        for raw_host, raw_info in workers.items():
            info = json.loads(raw_info)
            if info.get("expires", 0) < now_ms:
                continue
            if queue is None or queue in info.get("queues", []):
                capacity[_text(raw_host)] = int(info.get("concurrency", 0))
        total = sum(capacity.values())
        if total <= 0:
            return False  # no live worker for the child at all: not starvation, just none yet
        where = {_text(k): _text(v) for k, v in where.items()}
        waiting = sum(1 for owner, expiry in blocked
                      if expiry > now_ms and where.get(_text(owner)) in capacity)
        return waiting >= total


def _text(value: Any) -> str:
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)


def _broker_queue(app: Any, signature: Signature) -> Optional[str]:
    """The broker queue the child will be delivered to, as Celery's router decides it."""
    try:
        route = app.amqp.router.route(dict(signature.options), signature.task, signature.args,
                                      signature.kwargs)
        queue = route.get("queue")
        name = getattr(queue, "name", queue)
        return str(name) if name else str(app.conf.task_default_queue)
    except Exception:  # routers are user code; fall back to "any worker"
        return None
