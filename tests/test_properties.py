"""Property-based tests: validation, key naming, and the slot store against a model."""

from __future__ import annotations

import fnmatch
import itertools
import os
from typing import Any

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from celery_ckeys import ConcurrencyQueue, InvalidConcurrencyKey, InvalidTags
from celery_ckeys.config import from_conf
from celery_ckeys.embedded import RedisServer
from celery_ckeys.naming import Names, parse_tag
from celery_ckeys.queues import coerce_queue
from celery_ckeys.slots import LimitSpec, Slot
from celery_ckeys.store import Store
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


# -- the queue-limit rule: one in Python, one in Lua, always the same answer ----------------

_server: dict[str, RedisServer] = {}
_ns = itertools.count()


def store_url() -> str:
    if "s" not in _server:
        _server["s"] = RedisServer().start()
    return f"{_server['s'].url}/0"


def teardown_module() -> None:
    if "s" in _server:
        _server.pop("s").stop()


small = st.one_of(st.none(), st.integers(1, 5))


@settings(max_examples=int(os.environ.get("CKT_MODEL_EXAMPLES", "80")), deadline=None,
          suppress_health_check=[HealthCheck.too_slow])
@given(fixed=small, trigger=small, declared=small, cap=small, recorded=small, own=small,
       per_key=st.booleans(), key=st.sampled_from(["k", "a|b", "k:{x}|5|"]),
       total=st.booleans(), computed=small, paused=st.sampled_from(["", "queue", "key"]))
def test_lua_and_python_resolve_a_limit_the_same_way(fixed: Any, trigger: Any, declared: Any,
                                                     cap: Any, recorded: Any, own: Any,
                                                     per_key: bool, key: str, total: bool,
                                                     computed: Any, paused: str) -> None:
    config = from_conf({"ckeys_redis_url": store_url()}, default_namespace=f"lim-{next(_ns)}")
    store = Store(config)
    names = store.names
    spec = LimitSpec(fixed=fixed) if fixed is not None else LimitSpec(
        queue="q", trigger=trigger, declared=declared, cap=cap, total=True) if total else LimitSpec(
        queue="q", trigger=trigger, declared=declared, cap=cap, unlimited_as=1 if per_key else None,
        key=key if per_key else None, computed=computed if per_key else None)
    slot = Slot(tag=names.partition("q", key), kind="partition", label="p", limit=spec,
                conf_tag=None if fixed is not None else names.queue("q"))
    store.set_queue_limit("q", recorded, field="total" if total else "limit")
    store.set_key_limit("q", key, own)  # a key's own limit: read only for a partition
    store.set_queue_limit("q", 1 if paused == "queue" else None, field="paused")
    store.set_key_limit("q", key, 1 if paused == "key" else None, what="paused")
    python, _ = spec.resolve(recorded, override=own,
                             paused=paused == "queue" or (paused == "key" and spec.key is not None))
    assert store.resolve_limits([slot]) == [python]
    store.close()
