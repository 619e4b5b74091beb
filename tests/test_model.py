"""The protocol of docs/protocol.md against a model, on the real scripts and a real Redis.

A hypothesis state machine plays workers, the broker and Celery's lifecycle events
against :class:`~celery_ckeys.store.Store` (one redis-server) and
:class:`~celery_ckeys.cluster.ClusterStore` (a 3-master cluster): runs arrive, are
duplicated (redelivery), park, get woken, start, renew, finish, retry, wait on children and
resume, lose their process, lose their lease, get revoked, see limits change under them,
see time pass (TTLs and expiry scores run out as Redis would let them),
meet countdown and handoff workers side by side, and live through Redis forgetting its
scripts. After every step it checks safety (section 8 of the protocol: S1 capacity,
S2 exclusion, S3 one copy, S4 ownership); at the end of every example it stops the events,
drains the system, and checks liveness (L2: every run that was not revoked executed, none
twice without a fault in between) and bounds (B1: nothing is left in Redis but expiring
memos and deferral records, and the recorded limits).
"""

from __future__ import annotations

import itertools
import json
import os
import uuid
from dataclasses import dataclass, field, replace
from typing import Any, Iterator, Optional

import pytest
from hypothesis import HealthCheck, Phase, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)
from servers import Cluster

from celery_ckeys.admission import Plan, RunSpec, plan_for, slot_for_tag
from celery_ckeys.cluster import ClusterStore
from celery_ckeys.config import from_conf
from celery_ckeys.embedded import RedisServer
from celery_ckeys.naming import UNITS, Names, parse_tag
from celery_ckeys.queues import ConcurrencyQueue
from celery_ckeys.slots import Slot
from celery_ckeys.store import Store, Wake, token_prefix

EXAMPLES = int(os.environ.get("CKT_MODEL_EXAMPLES", "60"))
RATE = "2/30000"  # a rate the model sets on q: 2 starts per 30 s (time_passes moves 20-35 s)
BAND, TURN = 2 ** 40, 10000  # a line's score modulo BAND is its turn (lib.lua line_score)
_ns = itertools.count()

# The runs' shapes: a key mutex, a partition of queue "q" (limit changes live), a keyless
# run of "q", and a key that a partition run uses too.
KINDS = ("key", "part", "queue")
KEYS = ("a", "b")


@dataclass
class Msg:
    """A copy of a run in the broker."""

    run: str
    ticket: str = ""
    home: Optional[str] = None
    first_ms: int = 0
    #: a woken copy (and any copy made of it) expires a copy life after its wake
    born: Optional[int] = None


@dataclass
class Execution:
    slots: tuple[Slot, ...]
    token: str
    ticket: str
    host: str
    stale: bool = False  # its lease was lost (a fault); it may still finish, and free nothing
    born: Optional[int] = None  # the copy it runs from (for its redelivery's expiry)


@dataclass
class Run:
    id: str
    kind: str
    key: str
    priority: int = 0
    policy: str = "wait"  # issue 13's conflict policy: "wait", "skip" or "keep_latest"
    replaced: bool = False  # keep_latest took it out of its line: it must never run
    executions: int = 0
    faults: int = 0
    done: bool = False
    revoked: bool = False
    running: Optional[Execution] = None
    # wait_for
    waiting: Optional[Execution] = None  # the units it stepped out of, and its wait token
    wait_token: str = ""
    child: Optional[str] = None
    parent: Optional[str] = None
    finished_tickets: set[str] = field(default_factory=set)
    uncoordinated: bool = False
    retries: int = 0


class Protocol(RuleBasedStateMachine):
    """One example: a fresh namespace on the shared server (or cluster)."""

    url: str = ""
    cluster: bool = False

    @initialize(env_limit=st.sampled_from([None, 2]), limit=st.sampled_from([None, 1, 2]),
                total=st.sampled_from([None, 1, 2]))
    def setup(self, env_limit: Optional[int], limit: Optional[int],
              total: Optional[int]) -> None:
        conf = {"ckeys_redis_url": self.url, "ckeys_lock_ttl": 60, "ckeys_retry_countdown": 1,
                "ckeys_handoff_claim_timeout": 5, "ckeys_environment_limit": env_limit,
                "ckeys_burst_factor": 1.0, "ckeys_redis_cluster": self.cluster}
        self.config = from_conf(conf, default_namespace=f"model-{next(_ns)}")
        self.store: Store = (ClusterStore if self.cluster else Store)(self.config)
        self.store.client.flushall()  # a private server: each example starts from nothing
        self.store.on_wakes = self.published
        self.names = Names(self.config.namespace)
        self.runs: dict[str, Run] = {}
        self.broker: list[Msg] = []
        self.limits_seen: set[Optional[int]] = {limit}
        self.totals_seen: set[Optional[int]] = {total}
        self.store.set_queue_limit("q", limit)
        self.store.set_queue_limit("q", total, field="total")
        self.hosts = itertools.count()
        self.ops: list[str] = []
        self.hour = 0  # the model's clock, in copy lives (ckeys_handoff_copy_ttl)
        self.turns: dict[str, dict[tuple[int, str], int]] = {}  # line -> (priority, key) -> joined

    # -- the world around the store -------------------------------------------------
    def published(self, wakes: list[Wake]) -> None:
        for wake in wakes:
            run = json.loads(wake.message)["run"]
            self.ops.append(f"  woke {run} {wake.ticket} at {wake.tag}")
            self.broker.append(Msg(run, ticket=wake.ticket, home=wake.tag, born=self.hour))

    def note(self, text: str) -> None:
        self.ops.append(text)

    def plan(self, run: Run) -> Plan:
        if run.kind == "key":
            spec = RunSpec("t", key=run.key)
        elif run.kind == "part":
            spec = RunSpec("t", key=run.key, queue=ConcurrencyQueue("q"))
        else:
            spec = RunSpec("t", queue=ConcurrencyQueue("q"))
        plan = plan_for(self.config, spec)
        return plan if plan is not None else Plan(slots=())

    def slots_of(self, run: Run, home: Optional[str]) -> tuple[Slot, ...]:
        plan = self.plan(run)
        if home is None or home in plan.tags:
            return plan.slots
        slot = slot_for_tag(self.config, self.names, home)
        return plan.slots if slot is None else (*plan.slots, replace(slot, home_only=True))

    def token(self, run: Run, host: str, ticket: str) -> str:
        return json.dumps([run.id, host, 1, uuid.uuid4().hex[:8], ticket, "t", 0, []],
                          separators=(",", ":"))

    def live_units(self, tag: str) -> int:
        state = self.store.read_slot(tag)
        if state.simple is not None:
            return 1
        return sum(1 for _, expiry in state.units if expiry > state.now_ms)

    def limit_now(self, slot: Slot) -> Optional[int]:
        return self.store.resolve_limits([slot])[0] if slot.when_unlimited is None else 1

    # -- rules -------------------------------------------------------------------------
    @rule(kind=st.sampled_from(KINDS), key=st.sampled_from(KEYS), priority=st.sampled_from([0, 5]),
          policy=st.sampled_from(["wait", "wait", "skip", "keep_latest"]))
    def submit(self, kind: str, key: str, priority: int, policy: str) -> None:
        run = Run(id=f"r{len(self.runs)}", kind=kind, key=key, priority=priority, policy=policy)
        self.runs[run.id] = run
        self.broker.append(Msg(run.id))

    @precondition(lambda self: self.broker)
    @rule(data=st.data(), handoff=st.booleans(), resend=st.sampled_from([False, False, True]))
    def deliver(self, data: st.DataObject, handoff: bool, resend: bool) -> None:
        """A worker (countdown or handoff: a mixed deployment) takes a copy from the broker;
        ``resend``: the reply of its acquire is lost and the store sends the call again."""
        msg = self.broker.pop(data.draw(st.integers(0, len(self.broker) - 1)))
        self.admit(msg, handoff, resend)

    def admit(self, msg: Msg, handoff: bool, resend: bool = False) -> None:
        try:
            self._admit(msg, handoff, resend)
        except AssertionError as exc:
            if "--- what happened" in str(exc):
                raise
            raise AssertionError(f"{exc}\n--- what happened:\n" + "\n".join(self.ops)) from None

    def _admit(self, msg: Msg, handoff: bool, resend: bool) -> None:
        run = self.runs[msg.run]
        if msg.born is not None and msg.born < self.hour:
            # Celery discards the expired copy (task_revoked, expired); the expiry was the
            # handoff's own, so nothing else happens: its run is still in Redis
            self.ops.append(f"expired copy {msg}")
            return
        slots = self.slots_of(run, msg.home)
        if run.revoked:
            # Celery discards it before the body (task_revoked): what it had goes
            self.store.forfeit(slots, run.id, msg.ticket)
            return
        if not slots:
            self.start(run, Execution((), "", msg.ticket, "none"))
            return
        host = f"h{next(self.hosts)}"
        token = self.token(run, host, msg.ticket)
        new_ticket = msg.ticket or uuid.uuid4().hex[:16]

        policy = run.policy if not msg.ticket else "wait"  # as gate.admit
        place = replace(self.plan(run).place(msg.first_ms, run.priority),
                        replace=policy == "keep_latest")

        def attempt(message: str, primary: int = 1) -> Any:
            return self.store.acquire(slots, run.id, token, ticket=msg.ticket,
                                      new_ticket=new_ticket, message=message, place=place,
                                      primary=primary, home=msg.home)
        lines_before = {s.tag: self.line_of(s.tag) for s in slots}
        result = None
        if policy == "skip":  # a look first, which changes nothing when it is blocked
            result = attempt("", primary=-1)
            if (result.status == "blocked" and result.blocked == self.plan(run).slots[0]
                    and result.limit > 0 and not result.rate_wait_ms and result.holder != run.id):
                self.ops.append(f"skip {run.id}: {result.blocked.label} is full")
                run.revoked = True
                return
            if not result.ok:
                result = None
        if result is None:
            # a copy woken from a line goes back to a line whatever the worker's deferral
            result = attempt("?" if handoff or msg.ticket else "")
            if result.status == "needs_message":
                result = attempt(json.dumps({"run": run.id, "task": "t"}))
            if resend and result.status == "admitted":
                again = attempt("?" if handoff or msg.ticket else "")
                assert again.status == "admitted" and again.taken == result.taken, (
                    f"{run.id}: the same acquire sent again was {again.status}")
                self.ops.append(f"  the acquire of {run.id} was sent again: admitted")
        for gone in result.replaced:  # keep_latest: REVOKED, never to run
            self.ops.append(f"  {run.id} replaced {gone}")
            self.runs[gone].revoked = self.runs[gone].replaced = True
        self.check_turns(slots, lines_before)
        self.ops.append(f"admit {run.id} {msg} handoff={handoff}: {result.status} {result.why}"
                        f" {[s.label for s in result.taken]} blocked="
                        f"{result.blocked.label if result.blocked else None} parked={result.parked}")
        if result.status == "admitted":
            for slot in result.taken:  # S1: a unit was created only below the limit
                limit = self.limit_now(slot)
                assert limit is None or self.live_units(slot.tag) <= limit, (slot.label, limit)
                # fresh runs never pass a line (a woken or kept run was first in its own)
                passed = [t for t in lines_before[slot.tag] if t != run.id]
                assert result.claimed or not passed, f"{run.id} passed {passed} on {slot.label}"
            self.start(run, Execution(result.taken, token, msg.ticket, host, born=msg.born))
        elif result.status == "dropped":
            if result.why == "dup":  # S3: only a copy whose ticket holds, waits or finished
                busy = (run.running or run.waiting)
                assert msg.ticket and ((busy is not None and busy.ticket == msg.ticket)
                                       or msg.ticket in run.finished_tickets), (run, msg)
            else:  # "parked": its message is safe in a line or a reservation
                assert self.in_redis(run), (run, msg)
        elif result.status == "blocked" and not result.parked:
            self.broker.append(Msg(run.id, msg.ticket, msg.home, msg.first_ms or 1, msg.born))

    def check_turns(self, slots: tuple[Slot, ...], before: dict[str, list[str]]) -> None:
        """No key starves in a fair line (lib.lua line_score): a run joins at most one turn
        per run of its own key that joined since the line last emptied, past the line's
        current turn, whatever the other keys have waiting."""
        for slot in slots:
            if not slot.fair:
                continue
            joined = self.turns.setdefault(slot.tag, {})
            if not before[slot.tag]:
                joined.clear()  # an empty line has no turns left to give
            raw = self.store.client.zrange(Names.redis_key(slot.tag, "p"), 0, -1, withscores=True)
            for member, score in raw:
                who = member.decode() if isinstance(member, bytes) else member
                if who in before[slot.tag]:
                    continue
                joiner = self.runs[who]
                key = (joiner.priority, "" if joiner.kind == "queue" else joiner.key)
                now = float(self.store.client.hget(Names.redis_key(slot.tag, "i"),
                                                   f"#v:{joiner.priority}") or 0)
                turn = float(score) % BAND
                assert turn <= now + TURN * joined.get(key, 0), (
                    f"{who} of {key} joined {slot.label} at turn {turn}, past"
                    f" {now} + {joined.get(key, 0)} turns of its own key")
                joined[key] = joined.get(key, 0) + 1

    def line_of(self, tag: str) -> list[str]:
        raw = self.store.client.zrange(Names.redis_key(tag, "p"), 0, -1)
        return [x.decode() if isinstance(x, bytes) else x for x in raw]

    def slot_tags(self) -> list[str]:
        return [t for t in self.store.scan_tags()
                if (p := parse_tag(t)) is not None
                and p.kind in ("env", "key", "queue", "partition", "total")]

    def in_redis(self, run: Run) -> bool:
        return any(run.id in self.store.read_slot(tag).messages for tag in self.slot_tags())

    def start(self, run: Run, execution: Execution) -> None:
        if not execution.slots:
            # an unlimited queue: nothing to coordinate; Celery's own at-least-once applies
            run.uncoordinated = True
            run.executions += 1
            run.done = True
            return
        assert not run.replaced, f"{run.id} runs after keep_latest replaced it"
        # S3: one copy at a time (a stale one lost its lease: that is a fault)
        assert run.running is None or run.running.stale, f"{run.id} executes twice at once"
        assert run.waiting is None, f"{run.id} started while it waits in wait_for"
        run.running = execution
        run.executions += 1

    def running_runs(self) -> list[Run]:
        return [r for r in self.runs.values() if r.running is not None]

    @precondition(lambda self: self.running_runs())
    @rule(data=st.data())
    def finish(self, data: st.DataObject) -> None:
        run = data.draw(st.sampled_from(self.running_runs()))
        self.end(run)

    def end(self, run: Run) -> None:
        execution = run.running
        assert execution is not None
        self.note(f"end {run.id} ticket={execution.ticket} stale={execution.stale}")
        parent = self.runs.get(run.parent or "")
        if parent is not None and parent.waiting is not None and not execution.stale:
            self.store.ready(parent.waiting.slots, parent.id, parent.wait_token)
        self.store.release(execution.slots, run.id, execution.token, execution.ticket)
        run.running = None
        # a run whose lease lapsed still ran its body to the end: it executed
        run.done = True
        if execution.ticket:
            run.finished_tickets.add(execution.ticket)

    @precondition(lambda self: self.running_runs())
    @rule(data=st.data())
    def retry(self, data: st.DataObject) -> None:
        """self.retry(): the run ends and a fresh copy (no ticket) is published."""
        run = data.draw(st.sampled_from([r for r in self.running_runs()]))
        execution = run.running
        assert execution is not None
        self.note(f"retry {run.id}")
        run.retries += 1
        self.store.release(execution.slots, run.id, execution.token, execution.ticket)
        run.running = None
        if execution.ticket:
            run.finished_tickets.add(execution.ticket)
        self.broker.append(Msg(run.id))

    @precondition(lambda self: [r for r in self.running_runs() if r.running and r.running.slots])
    @rule(data=st.data())
    def lose_process(self, data: st.DataObject) -> None:
        """SIGKILL, OOM, hard time limit: the main process frees by token prefix; the broker
        redelivers the copy that was running (acks late)."""
        run = data.draw(st.sampled_from([r for r in self.running_runs() if r.running and r.running.slots]))
        execution = run.running
        assert execution is not None
        self.note(f"lose process {run.id}")
        self.store.release_lost(execution.slots, run.id, token_prefix(run.id, execution.host, 1))
        run.running = None
        run.faults += 1
        self.broker.append(Msg(run.id, execution.ticket, born=execution.born))

    @precondition(lambda self: [r for r in self.running_runs()
                                if r.running and r.running.slots and r.parent is None])
    @rule(data=st.data())
    def lose_process_before_the_result(self, data: st.DataObject) -> None:
        """The body ended and the gate released (a ticketed copy leaves its memo), then the
        process died before Celery stored the result; with task_reject_on_worker_lost the
        main process forgets the memo and Celery puts the message back: it must run again."""
        run = data.draw(st.sampled_from([r for r in self.running_runs()
                                         if r.running and r.running.slots and r.parent is None]))
        execution = run.running
        assert execution is not None
        self.note(f"lose process before the result {run.id} ticket={execution.ticket}")
        self.store.release(execution.slots, run.id, execution.token, execution.ticket)
        if execution.ticket:
            self.store.forget_memo(execution.slots, run.id, execution.ticket)
        self.store.release_lost(execution.slots, run.id, token_prefix(run.id, execution.host, 1))
        run.running = None  # not done: no result was stored
        run.faults += 1
        self.broker.append(Msg(run.id, execution.ticket, born=execution.born))

    @precondition(lambda self: [r for r in self.runs.values() if r.waiting is not None])
    @rule(data=st.data())
    def lose_a_waiting_process(self, data: st.DataObject) -> None:
        """The process of a run blocked in wait_for dies: its waits go (token prefix) and the
        broker redelivers it; it starts again from the top. Its child runs on."""
        run = data.draw(st.sampled_from([r for r in self.runs.values() if r.waiting is not None]))
        waiting = run.waiting
        assert waiting is not None
        self.note(f"lose waiting process {run.id}")
        self.store.release_lost(self.plan(run).slots, run.id,
                                token_prefix(run.id, waiting.host, 1))
        child = self.runs[run.child or ""]
        child.parent = None
        run.waiting, run.child, run.wait_token = None, None, ""
        run.faults += 1
        self.broker.append(Msg(run.id, waiting.ticket))

    @precondition(lambda self: [r for r in self.running_runs() if r.running and not r.running.stale])
    @rule(data=st.data())
    def lose_lease(self, data: st.DataObject) -> None:
        """The run stalls past its lease: its units run out; it may still renew or finish."""
        run = data.draw(st.sampled_from([r for r in self.running_runs()
                                         if r.running and not r.running.stale]))
        execution = run.running
        assert execution is not None
        client = self.store.client
        for slot in execution.slots:
            units = Names.redis_key(slot.tag, UNITS)
            if client.type(units) in (b"string", "string"):
                if client.get(units) in (execution.token, execution.token.encode()):
                    client.delete(units)
            else:
                client.zadd(units, {run.id: 1}, xx=True)
        execution.stale = True
        run.faults += 1
        self.note(f"lose lease {run.id}")

    @precondition(lambda self: self.running_runs())
    @rule(data=st.data())
    def renew(self, data: st.DataObject) -> None:
        run = data.draw(st.sampled_from(self.running_runs()))
        execution = run.running
        assert execution is not None
        (count,) = self.store.renew_many([(execution.slots, run.id, execution.token, "hold")])
        if execution.stale:
            assert count < len(execution.slots) or not execution.slots, "a lost lease came back"
        else:
            assert count == len(execution.slots), "a live run could not renew"

    @precondition(lambda self: self.broker)
    @rule(data=st.data())
    def redeliver(self, data: st.DataObject) -> None:
        """The broker delivers a copy twice (visibility timeout, a lost ack)."""
        msg = self.broker[data.draw(st.integers(0, len(self.broker) - 1))]
        self.broker.append(Msg(msg.run, msg.ticket, msg.home, msg.first_ms, msg.born))
        # a fault: a copy without a ticket that comes after its run finished runs again
        # (at-least-once); the protocol only promises it never runs at the same time
        self.runs[msg.run].faults += 1
        self.note(f"redeliver {msg}")

    @precondition(lambda self: self.broker)
    @rule(data=st.data())
    def revoke(self, data: st.DataObject) -> None:
        """revoke(task_id) or an ``expires`` that passes: every copy is discarded from now."""
        msg = self.broker[data.draw(st.integers(0, len(self.broker) - 1))]
        run = self.runs[msg.run]
        if run.parent is None and run.child is None:
            run.revoked = True
            self.note(f"revoke {run.id}")

    @precondition(lambda self: [r for r in self.running_runs()
                                if r.running and not r.running.stale and r.running.slots
                                and r.parent is None and r.child is None])
    @rule(data=st.data(), kind=st.sampled_from(KINDS), key=st.sampled_from(KEYS))
    def wait_for(self, data: st.DataObject, kind: str, key: str) -> None:
        run = data.draw(st.sampled_from([r for r in self.running_runs()
                                         if r.running and not r.running.stale and r.running.slots
                                         and r.parent is None and r.child is None]))
        execution = run.running
        assert execution is not None
        run.wait_token = json.dumps([run.id, execution.host, 1, uuid.uuid4().hex[:8],
                                     execution.ticket], separators=(",", ":"))
        self.store.step_out(execution.slots, run.id, execution.token, run.wait_token)
        self.note(f"{run.id} waits for r{len(self.runs)} ({kind} {key})")
        run.waiting, run.running = execution, None
        child = Run(id=f"r{len(self.runs)}", kind=kind, key=key, parent=run.id)
        self.runs[child.id] = child
        run.child = child.id
        self.broker.append(Msg(child.id))

    def resumable(self) -> list[Run]:
        # a child that skip or keep_latest revoked is final too (REVOKED: wait_for returns)
        return [r for r in self.runs.values() if r.waiting is not None and r.child is not None
                and (self.runs[r.child].done or self.runs[r.child].revoked)]

    @precondition(lambda self: self.resumable())
    @rule(data=st.data())
    def resume(self, data: st.DataObject) -> None:
        run = data.draw(st.sampled_from(self.resumable()))
        self.try_resume(run)

    def try_resume(self, run: Run) -> bool:
        waiting = run.waiting
        assert waiting is not None
        token = self.token(run, waiting.host, waiting.ticket)
        result = self.store.acquire(self.plan(run).slots, run.id, token, mode="resume",
                                    ticket=run.wait_token)
        self.note(f"resume {run.id}: {result.status}")
        if result.status != "admitted":
            return False
        run.waiting, run.child = None, None
        run.running = Execution(result.taken, token, waiting.ticket, waiting.host)
        return True

    @rule(limit=st.sampled_from([None, 1, 2, 3]))
    def change_limit(self, limit: Optional[int]) -> None:
        """celery ckeys limits set q N / --clear, while runs hold, wait and park."""
        self.store.set_queue_limit("q", limit)
        self.limits_seen.add(limit)
        self.note(f"limit q = {limit}")

    @rule(key=st.sampled_from(KEYS), limit=st.sampled_from([None, 1, 3]))
    def change_key_limit(self, key: str, limit: Optional[int]) -> None:
        """celery ckeys limits set q N --key K / --clear: that partition's own limit."""
        self.store.set_key_limit("q", key, limit)
        self.limits_seen.add(limit)
        self.note(f"limit q[{key}] = {limit}")

    @rule(rate=st.sampled_from([None, RATE]))
    def change_rate(self, rate: Optional[str]) -> None:
        """celery ckeys limits set q --rate 2/30s / --clear-rate (issue 13)."""
        self.store.set_rate("q", rate)
        self.note(f"rate q = {rate}")

    @invariant()
    def no_rate_window_holds_more_starts_than_its_rate(self) -> None:
        if not hasattr(self, "runs"):
            return
        n, window = (int(x) for x in RATE.split("/"))
        now = self.store.now_ms()
        for raw in self.store.client.scan_iter(match=f"ckeys:{{{self.names.ns}|*}}:s", count=1000):
            starts = [sc for _, sc in self.store.client.zrange(raw, 0, -1, withscores=True)]
            recent = [t for t in starts if t > now - window]
            assert len(recent) <= n, f"{raw!r}: {len(recent)} starts within one window"

    @rule(what=st.sampled_from(["q", *KEYS]), paused=st.booleans())
    def pause_or_resume(self, what: str, paused: bool) -> None:
        """celery ckeys pause q [--key K] / resume: limit 0 meanwhile (issue 13)."""
        value = 1 if paused else None
        if what == "q":
            self.store.set_queue_limit("q", value, field="paused")
        else:
            self.store.set_key_limit("q", what, value, what="paused")
        self.note(f"{'pause' if paused else 'resume'} q{'' if what == 'q' else f'[{what}]'}")

    @rule(total=st.sampled_from([None, 1, 2]))
    def change_total(self, total: Optional[int]) -> None:
        """celery ckeys limits set q --total N / --clear-total: every run of q together."""
        self.store.set_queue_limit("q", total, field="total")
        self.totals_seen.add(total)
        self.note(f"total q = {total}")

    @rule()
    def claim_windows_pass(self) -> None:
        """Time passes: every woken run's claim window is over (the sweeper wakes it again)."""
        client = self.store.client
        for tag in self.slot_tags():
            state = self.store.read_slot(tag)
            for who, _ in state.units:
                if state.info.get(who, "").startswith("@w"):
                    client.zadd(Names.redis_key(tag, UNITS), {who: 1}, xx=True)

    @rule()
    def sweep(self) -> None:
        """What every worker's main process does each second, here for every indexed slot
        whether due or not (time is the model's to move)."""
        raw = self.store.client.zrange(self.names.index_key(), 0, -1, withscores=True)
        for tag, seen in raw:
            slot = slot_for_tag(self.config, self.names, tag.decode() if isinstance(tag, bytes) else tag)
            assert slot is not None
            self.store.sweep(slot, float(seen))

    def indexed(self) -> list[str]:
        raw = self.store.client.zrange(self.names.index_key(), 0, -1)
        return [x.decode() if isinstance(x, bytes) else x for x in raw]

    @rule()
    def a_copy_life_passes(self) -> None:
        """ckeys_handoff_copy_ttl passes: memos of finished stays expire, woken copies older
        than that expire in the broker, claim windows are long over."""
        self.hour += 1
        client = self.store.client
        for tag in self.slot_tags():
            for raw in client.scan_iter(match=Names.redis_key(tag, "x:*")):
                client.delete(raw)
        self.claim_windows_pass()
        self.note("a copy life passes")

    @precondition(lambda self: [r for r in self.runs.values()
                                if (r.running and not r.running.stale) or r.waiting])
    @rule(data=st.data())
    def a_whole_host_dies(self, data: st.DataObject) -> None:
        """The machine of a running or waiting run dies: no main process frees anything; its
        leases run out, and the broker redelivers its message."""
        run = data.draw(st.sampled_from([r for r in self.runs.values()
                                         if (r.running and not r.running.stale) or r.waiting]))
        client = self.store.client
        execution = run.running or run.waiting
        assert execution is not None
        for slot in self.plan(run).slots:
            units = Names.redis_key(slot.tag, UNITS)
            if client.type(units) in (b"string", "string"):
                if client.get(units) in (execution.token, execution.token.encode()):
                    client.delete(units)
            elif client.zscore(units, run.id) is not None:
                client.zadd(units, {run.id: 1}, xx=True)
            client.zadd(Names.redis_key(slot.tag, "w"), {run.id: 1}, xx=True)
        if run.waiting is not None:
            child = self.runs[run.child or ""]
            child.parent = None
            run.waiting, run.child, run.wait_token = None, None, ""
        run.running = None
        run.faults += 1
        self.broker.append(Msg(run.id, execution.ticket, born=execution.born))
        self.note(f"host of {run.id} dies")

    @rule(ms=st.sampled_from([20_000, 35_000]))
    def time_passes(self, ms: int) -> None:
        """Heartbeats renew every live hold and wait, then ``ms`` pass without a script call:
        every key's TTL and every expiry score (units, waits, the sweep index) moves closer,
        and whatever was not renewed (a stale hold, a woken run's claim window, a dead host's
        wait) runs out for real, as Redis would let it."""
        for run in self.runs.values():
            held = run.running
            if held is not None and not held.stale and held.slots:
                (count,) = self.store.renew_many([(held.slots, run.id, held.token, "hold")])
                assert count == len(held.slots), f"live run {run.id} could not renew"
            if run.waiting is not None and run.wait_token:
                self.store.renew_many([(run.waiting.slots, run.id, run.wait_token, "wait")])
        client = self.store.client
        for raw in list(client.scan_iter(match=f"ckeys:{{{self.names.ns}|*", count=1000)):
            name = raw.decode() if isinstance(raw, bytes) else raw
            role = name.rsplit("}:", 1)[1]
            if client.type(name) in (b"zset", "zset") and (
                    role in ("h", "w", "s") or (role == "i" and "|lines}" in name)):
                scores = client.zrange(name, 0, -1, withscores=True)
                moved = {m: max(1.0, sc - ms) for m, sc in scores if sc > 0}
                if moved:
                    client.zadd(name, moved, xx=True)
            ttl = client.pttl(name)
            if ttl > 0:
                if ttl <= ms:
                    client.delete(name)
                else:
                    client.pexpire(name, ttl - ms)
        self.note(f"{ms} ms pass")

    @rule()
    def redis_forgets_its_scripts(self) -> None:
        """A Redis restart (AOF keeps the data): every script must be loaded again."""
        self.store.client.script_flush()

    # -- safety, after every step ------------------------------------------------------
    @invariant()
    def a_slot_with_people_waiting_is_never_idle(self) -> None:
        """I1: a line, a resume order or a waiting run keeps the slot's units key, so the fast
        path (SET NX) can never pass them."""
        if not hasattr(self, "runs"):
            return
        client = self.store.client
        for tag in self.slot_tags():
            waiting = [role for role in ("p", "r", "w") if client.exists(Names.redis_key(tag, role))]
            if waiting:
                assert client.exists(Names.redis_key(tag, UNITS)), \
                    f"{tag} has {waiting} but no units key\n" + "\n".join(self.ops)

    @invariant()
    def never_over_a_limit_and_one_copy_at_a_time(self) -> None:
        if not hasattr(self, "runs"):
            return
        held: dict[str, list[str]] = {}
        for run in self.runs.values():
            if run.running is not None and not run.running.stale:
                for slot in run.running.slots:
                    held.setdefault(slot.tag, []).append(run.id)
        env = self.config.environment_limit
        top = max((min(lim, env) if env and lim else lim or env or 1) for lim in self.limits_seen)
        for tag, holders in held.items():
            assert len(holders) == len(set(holders)), f"a run holds {tag} twice: {holders}"
            parsed = self.names.parse(Names.redis_key(tag, UNITS))
            assert parsed is not None
            if parsed[0].kind == "key":
                assert len(holders) <= 1, f"two runs hold key {parsed[0].key}: {holders}"
            elif parsed[0].kind == "total":
                if None not in self.totals_seen:
                    top_total = max(t for t in self.totals_seen if t is not None)
                    assert len(holders) <= top_total, f"{tag} is over its total: {holders}"
            elif parsed[0].kind == "env" or parsed[0].queue == "t":
                # the environment, and the task's implicit queue (capped by the environment)
                assert len(holders) <= 2, f"{tag} is over its limit: {holders}"
            else:
                assert len(holders) <= top, f"{tag} is over every limit it ever had: {holders}"

    # -- liveness and bounds, once the events stop ---------------------------------------
    def teardown(self) -> None:
        if not hasattr(self, "runs"):
            return
        try:
            self.checked_drain()
        finally:
            self.store.close()

    def checked_drain(self) -> None:
        try:
            for what in ("q", *KEYS):  # resumed: a paused queue drains once it is resumed
                self.pause_or_resume(what, False)
            self.change_rate(None)  # and a rate of 2 per 30 s would outlast the drain
            self.drain()
            for run in self.runs.values():
                if run.revoked:
                    continue
                assert run.done, f"{run.id} never finished: {run}"
                assert run.uncoordinated or run.executions <= 1 + run.faults + run.retries, \
                    f"{run.id} ran twice without a fault: {run}"
            self.nothing_left()
        except AssertionError as exc:
            if "--- what happened" in str(exc):
                raise
            raise AssertionError(f"{exc}\n--- what happened:\n" + "\n".join(self.ops)) from None

    def drain(self) -> None:
        for _ in range(60):
            progressed = False
            for run in list(self.running_runs()):
                self.end(run)
                progressed = True
            for run in self.resumable():
                progressed = self.try_resume(run) or progressed
            batch, self.broker = self.broker, []
            for msg in batch:
                self.admit(msg, handoff=True)
                progressed = True
            if not progressed:
                if all(r.done or r.revoked for r in self.runs.values()) and not self.indexed():
                    return
                self.claim_windows_pass()
                self.sweep()
        states = "\n".join(str(self.store.read_slot(tag)) for tag in self.slot_tags())
        raise AssertionError(f"the system did not drain: {self.runs} {self.broker}\n{states}")

    def nothing_left(self) -> None:
        """B1: once idle, no line, message, resume order or live unit is left; what is left
        expires within its bound (memos, deferral records, wake lists, a rate's log of starts,
        and the lapsed units of a host that died, which nobody touched again)."""
        client = self.store.client
        left = []
        bounds = {"f": self.config.deferral_memory_ms, "q": 60_000,
                  "h": self.config.lock_ttl_ms, "i": self.config.lock_ttl_ms,
                  "w": self.config.lock_ttl_ms, "v": self.config.lock_ttl_ms,
                  # a rate's log: a window past its last pending entry, the longest (an
                  # hour) when that entry went after the rate was cleared
                  "s": 3_600_000}
        for tag, roles in self.store.scan_tags().items():
            for role in roles:
                key = Names.redis_key(tag, role)
                if role == "c":
                    continue  # a recorded limit is configuration, kept on purpose
                if role == "h" and self.live_units(tag):
                    left.append(f"{key} (live units)")
                    continue
                bound = self.config.copy_ttl_ms if role.startswith("x:") else bounds.get(role)
                if bound is None:
                    left.append(key)
                    continue
                ttl = client.pttl(key)
                assert 0 < ttl <= bound, f"{key} lives without a bound ({ttl})"
        assert not left, f"state left behind once idle: {left}"


@pytest.fixture(scope="module")
def single() -> Iterator[str]:
    server = RedisServer().start()
    yield f"{server.url}/0"
    server.stop()


@pytest.fixture(scope="module")
def cluster() -> Iterator[str]:
    c = Cluster().start()
    yield c.url
    c.stop()


SETTINGS = settings(max_examples=EXAMPLES, stateful_step_count=40, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
                    # CKT_MODEL_NOSHRINK=1 reports the first failure as found (faster to debug)
                    phases=[p for p in Phase if p != Phase.shrink or not os.environ.get(
                        "CKT_MODEL_NOSHRINK")])


def test_protocol_on_one_redis(single: str) -> None:
    machine = type("OnOneRedis", (Protocol,), {"url": single, "cluster": False})
    run_state_machine_as_test(machine, settings=SETTINGS)


def test_protocol_on_a_cluster(cluster: str) -> None:
    machine = type("OnACluster", (Protocol,), {"url": cluster, "cluster": True})
    run_state_machine_as_test(machine, settings=SETTINGS)
