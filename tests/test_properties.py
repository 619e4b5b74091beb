"""Property-based tests: validation, key naming, and the slot store against a model."""

from __future__ import annotations

import fnmatch
import itertools
import os
from typing import Any

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

from celery_ckeys import ConcurrencyQueue, InvalidConcurrencyKey, InvalidTags
from celery_ckeys.admission import RunSpec, plan_for
from celery_ckeys.config import from_conf
from celery_ckeys.embedded import RedisServer
from celery_ckeys.naming import Names, parse_tag
from celery_ckeys.queues import coerce_queue
from celery_ckeys.store import HOLDERS, Store
from celery_ckeys.validation import check_key, check_limit, check_tags

anything = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=True), st.binary(),
                     st.lists(st.text(max_size=3), max_size=3), st.dictionaries(st.text(max_size=3),
                                                                                st.integers(), max_size=2))


@given(st.text(max_size=300))
def test_a_key_is_valid_exactly_when_it_is_1_to_256_characters(text: str) -> None:
    if 1 <= len(text) <= 256:
        assert check_key(text) == text
    else:
        with pytest.raises(InvalidConcurrencyKey):
            check_key(text)


@given(anything)
def test_anything_but_a_str_is_not_a_key(value: Any) -> None:
    with pytest.raises(InvalidConcurrencyKey):
        check_key(value)


@given(st.one_of(st.integers(), st.booleans(), st.floats(), st.text(max_size=3)))
def test_a_limit_is_valid_exactly_when_it_is_a_positive_int(value: Any) -> None:
    ok = isinstance(value, int) and not isinstance(value, bool) and value >= 1
    if ok:
        assert check_limit(value) == value
    else:
        with pytest.raises(ValueError):
            check_limit(value)


@given(st.one_of(st.text(max_size=300), st.fixed_dictionaries(
    {"name": st.text(max_size=300)}, optional={"limit": st.one_of(st.integers(), st.none())})))
def test_queue_specs_are_accepted_exactly_when_name_and_limit_are_valid(spec: Any) -> None:
    name = spec if isinstance(spec, str) else spec["name"]
    limit = None if isinstance(spec, str) else spec.get("limit")
    ok = 1 <= len(name) <= 256 and (limit is None or limit >= 1)
    if ok:
        assert coerce_queue(spec) == ConcurrencyQueue(name, limit)
    else:
        with pytest.raises(ValueError):
            coerce_queue(spec)


@given(st.lists(st.text(max_size=140), max_size=12))
def test_tags_are_valid_exactly_when_few_and_short(tags: list[str]) -> None:
    ok = len(tags) <= 10 and all(1 <= len(t) <= 128 for t in tags)
    if ok:
        assert check_tags(tags) == tags
    else:
        with pytest.raises(InvalidTags):
            check_tags(tags)


names_text = st.text(min_size=1, max_size=40)


@given(names_text, names_text, names_text, names_text)
def test_no_two_namespaces_or_keys_share_a_redis_key(ns1: str, k1: str, ns2: str, k2: str) -> None:
    assume((ns1, k1) != (ns2, k2))
    a, b = Names(ns1), Names(ns2)
    assert Names.redis_key(a.key(k1), "h") != Names.redis_key(b.key(k2), "h")
    assert Names.redis_key(a.queue(k1), "h") != Names.redis_key(b.key(k2), "h")
    assert Names.redis_key(a.partition(k1, k2), "h") != Names.redis_key(b.partition(k2, k1), "h") \
        or (ns1 == ns2 and k1 == k2)


@given(names_text, names_text, names_text)
def test_encoding_cannot_reach_another_namespaces_state(ns1: str, ns2: str, key: str) -> None:
    assume(ns1 != ns2)
    a, b = Names(ns1), Names(ns2)
    mine = [Names.redis_key(t, "h") for t in (a.key(key), a.queue(key), a.partition(key, key), a.env())]
    for redis_key in mine:
        # one hash tag per key: the first {...} is exactly the tag
        inner = redis_key[redis_key.index("{") + 1:redis_key.index("}")]
        assert "{" not in inner and "}" not in inner
        # another namespace's SCAN never matches it, and parsing keeps it in its namespace
        assert not fnmatch.fnmatchcase(redis_key, b.scan_pattern())
        assert b.parse(redis_key) is None
        parsed = a.parse(redis_key)
        assert parsed is not None and parsed[0].namespace == ns1
    tag = parse_tag(a.partition(key, "k:{x}"))
    assert tag is not None and (tag.queue, tag.key) == (key, "k:{x}")


# -- the slot store against a model -------------------------------------------------------

_server: dict[str, RedisServer] = {}
_ns = itertools.count()


def store_url() -> str:
    if "s" not in _server:
        _server["s"] = RedisServer().start()
    return f"{_server['s'].url}/0"


def teardown_module() -> None:
    if "s" in _server:
        _server.pop("s").stop()


OWNERS = [f"o{i}" for i in range(5)]
TARGETS = {"key:a": ("key", 1), "key:b": ("key", 1), "queue:q": ("queue", 2), "part:q[a]": ("part", 2)}


class SlotStore(RuleBasedStateMachine):
    """Any sequence of acquire, renew, release and expire keeps the store equal to a model
    in which a target never has more live holders than its limit and only owners release."""

    @initialize(stepwise=st.booleans())
    def setup(self, stepwise: bool) -> None:
        config = from_conf({"ckeys_redis_url": store_url(), "ckeys_lock_ttl": 120},
                           default_namespace=f"model-{next(_ns)}")
        self.store = Store(config)
        self.store.stepwise = stepwise
        self.model: dict[str, set[str]] = {t: set() for t in TARGETS}
        self.plans = {}
        for target, (kind, limit) in TARGETS.items():
            if kind == "key":
                run = RunSpec("t", key=target)
            elif kind == "queue":
                run = RunSpec("t", queue=ConcurrencyQueue("q", limit))
            else:
                run = RunSpec("t", queue=ConcurrencyQueue("pq", limit), key="a")
            plan = plan_for(config, self.store.names, run)
            assert plan is not None
            self.plans[target] = plan

    def slot(self, target: str) -> Any:
        return self.plans[target].slots[0]

    @rule(owner=st.sampled_from(OWNERS), name=st.sampled_from(sorted(TARGETS)))
    def acquire(self, owner: str, name: str) -> None:
        target = name
        limit = TARGETS[target][1]
        holders = self.model[target]
        expected = owner not in holders and len(holders) < limit
        result = self.store.acquire(self.plans[target].slots, owner, {"t": "t", "w": "w", "p": 1, "s": 0},
                                    primary=1)
        assert result.ok == expected, (owner, target, holders)
        if expected:
            holders.add(owner)

    @rule(owner=st.sampled_from(OWNERS), name=st.sampled_from(sorted(TARGETS)))
    def release(self, owner: str, name: str) -> None:
        target = name
        released = self.store.release([self.slot(target)], owner)
        assert released == (1 if owner in self.model[target] else 0)
        self.model[target].discard(owner)

    @rule(owner=st.sampled_from(OWNERS), name=st.sampled_from(sorted(TARGETS)))
    def renew(self, owner: str, name: str) -> None:
        target = name
        assert self.store.renew([self.slot(target)], owner) == (1 if owner in self.model[target] else 0)

    @rule(owner=st.sampled_from(OWNERS), name=st.sampled_from(sorted(TARGETS)))
    def expire(self, owner: str, name: str) -> None:
        target = name
        """The owner's lease runs out (it stalled): its slot is free, and it cannot renew."""
        if owner in self.model[target]:
            self.store.client.zadd(self.slot(target).key(HOLDERS), {owner: 1})
            self.model[target].discard(owner)

    @invariant()
    def never_over_the_limit_and_equal_to_the_model(self) -> None:
        if not hasattr(self, "store"):
            return
        now = self.store.client.time()
        now_ms = now[0] * 1000 + now[1] // 1000
        for target, (_, limit) in TARGETS.items():
            live = {o.decode() for o in self.store.client.zrangebyscore(
                self.slot(target).key(HOLDERS), f"({now_ms}", "+inf")}
            assert len(live) <= limit
            assert live == self.model[target]


SlotStore.TestCase.settings = settings(max_examples=int(os.environ.get("CKT_MODEL_EXAMPLES", "80")),
                                       stateful_step_count=30, deadline=None,
                                       suppress_health_check=[HealthCheck.too_slow])
TestSlotStore = SlotStore.TestCase
