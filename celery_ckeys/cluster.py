"""Redis Cluster: the protocol of docs/protocol.md, one hash tag per script call.

A run's slots (its partition, its queue's conf, the environment) live on different hash
tags, and a Lua script may only touch keys of one. ``ClusterStore`` keeps every
per-slot rule of ``celery_ckeys.store.Store`` and changes only the steps
(protocol.md section 9):

* queue limits are read (and trigger-time limits recorded) on each queue's conf tag first,
  then every step gets the limit as a fixed value;
* admission takes the slots one call each, most specific first; when one blocks, the run
  parks there or records its deferral, and the units taken so far are released;
* a resuming run first makes sure a unit of every slot is reserved for it ("reserve"), and
  only then claims them, so a slot that is not ready never costs it a place it had;
* the sweep index lives on its own tag: a slot is noted in it before a run may park
  there, and the sweeper removes an entry only if it still has the score it read.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any, Optional, Sequence

from .naming import CONF, INFO, Names
from .slots import LimitSpec, Place, Slot
from .store import AcquireResult, Store, _text


class ClusterStore(Store):
    inline_index = False

    # -- limits, resolved on each queue's own tag --------------------------------------
    def _recorded(self, slot: Slot, *, record: bool,
                  seen: Optional[dict[str, dict[str, Any]]] = None
                  ) -> tuple[Optional[int], Optional[int], bool, Optional[str]]:
        """The queue's limit (recorded, or the trigger-time one, recorded now when ``record``),
        the one recorded for the partition's key alone, whether the slot is paused (or
        throttled), and the rate that applies (``"n/window_ms"``). ``seen`` keeps the conf
        reads of one admission: its partition and total slots share one read of the conf."""
        spec = slot.limit
        if spec.queue is None or slot.conf_tag is None:
            return None, None, False, spec.rate_trigger or spec.rate
        conf = Names.redis_key(slot.conf_tag, CONF)
        seen = {} if seen is None else seen
        extra = ([f"key:{spec.key}", f"paused:{spec.key}", f"throttle:{spec.key}"]
                 if spec.key is not None else [])
        if conf not in seen or any(f not in seen[conf] for f in extra):
            fields = ["limit", "total", "paused", "throttle", "rate", *extra]
            seen[conf] = dict(zip(fields, self.guarded(lambda c: c.hmget(conf, *fields))))
        got = seen[conf]
        own = int(got[extra[0]]) if extra and got[extra[0]] is not None else None
        until = got[extra[2]] if extra else got["throttle"]
        throttled = until is not None and int(until) > self.now_ms()
        if until is not None and not throttled and record:  # it has passed: forget it
            self.guarded(lambda c: c.hdel(conf, extra[2] if extra else "throttle"))
        paused = not spec.total and (
            got["paused"] is not None or bool(extra and got[extra[1]] is not None) or throttled)
        rate = spec.rate_trigger
        if rate is not None and record:
            self.guarded(lambda c: c.hset(conf, "rate", rate))
        if rate is None:
            rate = _text(got["rate"]) if got["rate"] is not None else spec.rate
        if spec.trigger is not None:
            if record:
                self.guarded(lambda c: c.hset(conf, spec.conf_field, spec.trigger))
            return spec.trigger, own, paused, rate
        value = got[spec.conf_field]
        return (int(value) if value is not None else None), own, paused, rate

    def _remembered(self, slot: Slot) -> tuple[Optional[int], Optional[int]]:
        """The declared (``#d``, else ``#l``) and computed (``#o``) limits the slot remembers,
        for a spec that stands in for code not at hand (the sweeper, status), as core.lua
        reads them."""
        if not slot.limit.remembered:
            return None, None
        info = Names.redis_key(slot.tag, INFO)
        got = self.guarded(lambda c: c.hmget(info, "#d", "#l", "#o"))
        value = got[0] if got[0] is not None else got[1]

        def number(raw: Any) -> Optional[int]:
            return int(raw) if raw not in (None, b"", "") else None
        return number(value), number(got[2])

    def _localized(self, slot: Slot, *, record: bool) -> Slot:
        """The slot with its queue's recorded limits folded in, so it needs no conf key (a
        key's own limit goes before the queue's, as a trigger-time limit does)."""
        spec = slot.limit
        if spec.fixed is not None:
            return slot
        recorded, own, paused, rate = self._recorded(slot, record=record)
        if paused:
            return replace(slot, limit=LimitSpec(fixed=0), conf_tag=None)
        # a key's own limit goes before a computed one (noted, not used, then), which goes
        # before a recorded one
        local = LimitSpec(trigger=own if own is not None else recorded, declared=spec.declared,
                          cap=spec.cap, unlimited_as=spec.unlimited_as, remembered=spec.remembered,
                          total=spec.total, computed=spec.computed, computed_noted=own is not None,
                          rate=rate)
        return replace(slot, limit=local, conf_tag=None)

    def _steps(self, slots: Sequence[Slot], *, record: bool) -> list[tuple[Slot, Slot]]:
        """``(fixed-limit slot, the plan's slot)`` for every slot the run needs, in order."""
        resolved: list[tuple[Optional[int], bool]] = []
        rates: list[Optional[str]] = []
        seen: dict[str, dict[str, Any]] = {}
        for slot in slots:
            rates.append(None)
            if slot.home_only:
                resolved.append((None, False))
            elif slot.when_unlimited is not None:
                resolved.append((1, False))
            else:
                recorded, own, paused, rates[-1] = self._recorded(slot, record=record, seen=seen)
                declared, computed = self._remembered(slot)
                resolved.append(slot.limit.resolve(recorded, declared, override=own,
                                                   remembered_computed=computed, paused=paused))
        steps = []
        for slot, (limit, _), rate in zip(slots, resolved, rates):
            needed = limit is not None
            if slot.when_unlimited is not None:
                needed = resolved[slot.when_unlimited - 1][1]
            if needed:
                assert limit is not None
                spec = LimitSpec(fixed=limit)
                if slot.limit.fixed is None and not slot.limit.remembered:
                    # a queue's limit, already resolved; the declared part goes along so that
                    # the slot remembers it ("#d") for the sweeper
                    spec = LimitSpec(trigger=limit, declared=slot.limit.declared, cap=slot.limit.cap,
                                     total=slot.limit.total, computed=slot.limit.computed,
                                     computed_noted=True, rate=rate)
                fixed = replace(slot, limit=spec, conf_tag=None, when_unlimited=None)
                steps.append((fixed, slot))
        return steps

    def resolve_limits(self, slots: Sequence[Slot], *, record: bool = False) -> list[Optional[int]]:
        needed = {original.tag: step.limit.fixed if step.limit.fixed is not None else step.limit.trigger
                  for step, original in self._steps(slots, record=record)}
        return [needed.get(slot.tag) for slot in slots]

    # -- admission, one slot per call ----------------------------------------------------
    def acquire(self, slots: Sequence[Slot], who: str, token: str, *, mode: str = "run",
                ticket: str = "", new_ticket: str = "", message: str = "",
                place: Optional[Place] = None, primary: int = 1,
                home: Optional[str] = None, deferred: bool = False) -> AcquireResult:
        result = self._admit(slots, who, token, mode=mode, ticket=ticket, new_ticket=new_ticket,
                             message=message, place=self._weighed(place or Place(), message),
                             home=home, primary=primary, deferred=deferred)
        # the unit woken for this copy on a line its plan does not need (any more) goes back,
        # as in acquire.lua (unless the copy stood aside: the run is in line elsewhere)
        if home and ticket and result.status != "needs_message" and result.why != "parked":
            needed = {original.tag for _, original in self._steps(slots, record=False)}
            outside = [s for s in slots if s.tag == home and s.tag not in needed]
            if outside:
                Store._release(self, "unclaim", [replace(outside[0], home_only=True)], who, "",
                               ticket)
        return result

    def _weighed(self, place: Place, message: str) -> Place:
        """The place with the weight recorded for its key folded in (the conf is on a tag of
        its own), read only when the run may park."""
        if place.weight_conf is None:
            return place
        weight = None
        if message not in ("", "?"):
            conf = Names.redis_key(place.weight_conf, CONF)
            got = self.guarded(lambda c: c.hget(conf, f"weight:{place.key}"))
            weight = int(got) if got is not None else None
        return replace(place, weight=weight if weight is not None else place.weight,
                       weight_conf=None)

    def _admit(self, slots: Sequence[Slot], who: str, token: str, *, mode: str, ticket: str,
               new_ticket: str, message: str, place: Place, home: Optional[str],
               primary: int = 1, deferred: bool = False) -> AcquireResult:
        steps = self._steps(slots, record=mode == "run")
        if mode != "resume":
            return self._steps_in_order(steps, who, token, mode=mode, ticket=ticket,
                                        new_ticket=new_ticket, message=message,
                                        place=place, home=home, primary=primary,
                                        first_slot=slots[0] if slots else None,
                                        deferred=deferred)
        # first make sure every slot has a unit reserved for the run; claim only then
        for i, (fixed, original) in enumerate(steps):
            self.note_line(original.tag)  # the sweeper drops its place if the waiter dies
            reserved = Store.acquire(self, [fixed], who, token, mode="reserve", ticket=ticket)
            if reserved.status != "reserved":
                # the ordering rule: no place, and nothing reserved, after the slot it waits on
                for later, _ in steps[i + 1:]:
                    Store._release(self, "unreserve", [later], who, ticket, "")
                return replace(reserved, blocked=original)
        result = self._steps_in_order(steps, who, token, mode=mode, ticket=ticket,
                                      new_ticket="", message="", place=Place(), home=None)
        if result.ok:
            # a slot it waited on that it no longer needs (a limit came meanwhile): its wait
            # there ends, as in acquire.lua (its wait token is the prefix of what to free)
            needed = {original.tag for _, original in steps}
            for slot in slots:
                if slot.tag not in needed:
                    Store._release(self, "lost", [replace(slot, home_only=True)], who, ticket, "")
        return result

    def _steps_in_order(self, steps: list[tuple[Slot, Slot]], who: str, token: str, *, mode: str,
                        ticket: str, new_ticket: str, message: str, place: Place,
                        home: Optional[str], primary: int = 1,
                        first_slot: Optional[Slot] = None,
                        deferred: bool = False) -> AcquireResult:
        # A woken copy visits its home line first (where its reservation is), then the rest in
        # plan order; blocked later in the plan it keeps its home unit and waits with priority,
        # blocked earlier it gives it back: the ordering rule of acquire.lua, step by step.
        order = list(range(len(steps)))
        at_home = next((i for i, (_, s) in enumerate(steps) if s.tag == home), None)
        if at_home is not None:
            order.remove(at_home)
            order.insert(0, at_home)
        taken: list[tuple[int, Slot]] = []
        claimed_home = False
        # keep_latest replaces only on the plan's own first slot (acquire.lua's slot 1); each
        # step's slot is its own primary, and a look records nothing (negative, as the plan's)
        own = first_slot
        sign = -1 if primary < 0 else (1 if primary > 0 else 0)
        for i in order:
            fixed, original = steps[i]
            if message not in ("", "?"):
                self.note_line(original.tag)
            keeps_home = claimed_home and at_home is not None and i > at_home
            step_mode = "claimed" if mode == "run" and claimed_home else mode
            result = Store.acquire(self, [fixed], who, token, mode=step_mode, ticket=ticket,
                                   new_ticket=new_ticket, message=message,
                                   place=replace(place, kept=keeps_home,
                                                 replace=place.replace and original is own),
                                   primary=sign, deferred=deferred)
            if result.parked and result.rate_wait_ms:
                # its line is swept when the rate or the throttle lets it go (the scripts
                # cannot reach the index on its own tag)
                self.call("index", [self.names.index_key()],
                          ["soon", original.tag, result.rate_wait_ms])
            if not result.ok:
                # a home unit claimed before a later full slot stays kept, whether the run
                # parks now or is asked for its message first (it claims "@h" then)
                keep = keeps_home and (result.parked or result.status == "needs_message")
                for j, slot in taken:
                    if keep and j == at_home:
                        Store._release(self, "keep", [self._localized(slot, record=False)], who,
                                       token, ticket)
                    else:
                        self.release([slot], who, token)
                if ticket:
                    # a unit kept or woken for this stay on a slot not visited yet (later in
                    # the plan than the one that blocks) goes back too: keeping it while
                    # waiting on an earlier slot is the cycle the ordering rule forbids
                    for j in order[order.index(i) + 1:]:
                        Store._release(self, "unclaim", [self._localized(steps[j][1], record=False)],
                                       who, "", ticket)
                return replace(result, blocked=original if result.blocked else None)
            claimed_home = claimed_home or (i == at_home and result.claimed)
            taken.append((i, original))
        return AcquireResult("admitted", taken=tuple(s for _, s in sorted(taken)),
                             claimed=claimed_home)

    def _acquired(self, reply: Any, slots: Sequence[Slot]) -> AcquireResult:
        if int(reply[0]) == 4:
            self._wakes(reply[-1], slots)
            return AcquireResult("reserved")
        return super()._acquired(reply, slots)

    # -- everything else: one call per slot ------------------------------------------------
    def _release(self, mode: str, slots: Sequence[Slot], who: str, token: str, ticket: str) -> int:
        return sum(Store._release(self, mode, [self._localized(slot, record=False)], who, token,
                                  ticket) for slot in slots)

    def release_many(self, runs: Sequence[tuple[Sequence[Slot], str, str, str]]) -> None:
        for slots, who, token, ticket in runs:
            self.release(slots, who, token, ticket)

    def _wait(self, op: str, slots: Sequence[Slot], who: str, token: str, wait_token: str) -> int:
        changed = 0
        for slot in slots:
            if op == "ready":
                self.note_line(slot.tag)  # the sweeper drops its place there if it dies
            changed += Store._wait(self, op, [self._localized(slot, record=False)], who, token,
                                   wait_token)
        return changed

    def renew_many(self, runs: Sequence[tuple[Sequence[Slot], str, str, str]]) -> list[int]:
        counts = []
        for slots, who, token, role in runs:
            calls = [self._renew_call([slot], who, token, role) for slot in slots]
            counts.append(sum(int(self.call(*call)) for call in calls))
        return counts

    # -- the sweep index, on its own tag ------------------------------------------------------
    def note_line(self, tag: str) -> None:
        self.call("index", [self.names.index_key()],
                  ["note", tag, int(self.config.retry_countdown * 1000)])

    def sweep(self, slot: Slot, seen_due: float = 0.0) -> int:
        due = super().sweep(self._localized(slot, record=False), seen_due)
        self.call("index", [self.names.index_key()], ["settle", slot.tag, due, repr(seen_due)])
        return due
