"""The Redis layer: one client per process and config, the Lua scripts, and slot I/O.

Policies (which slots a run needs) live in :mod:`celery_ckeys.admission`; this module
only knows how to take, renew and give back a list of slots, atomically.
"""

from __future__ import annotations

import json
import logging
import os
import threading
from dataclasses import dataclass
from functools import partial
from importlib import resources
from typing import Any, Callable, Optional, Sequence
from urllib.parse import urlparse

import redis

from .config import CkeysConfig
from .errors import CoordinationUnavailable, describe
from .naming import (
    CONF,
    DEFERRED,
    HOLDERS,
    MESSAGES,
    META,
    PARKED,
    RESUMING,
    WAITING,
    WAKE,
    WOKEN,
    Names,
)

logger = logging.getLogger("celery_ckeys.store")

# What a failed call to Redis looks like, whatever the deployment.
REDIS_ERRORS: tuple[type[BaseException], ...] = (redis.RedisError, OSError)

_SCRIPT_NAMES = ("acquire", "release", "renew", "wait", "park", "wake", "sweep")


def _load_script(name: str) -> str:
    return (resources.files("celery_ckeys") / "lua" / f"{name}.lua").read_text(encoding="utf-8")


_SOURCES: dict[str, str] = {}


def script_source(name: str) -> str:
    if name not in _SOURCES:
        _SOURCES[name] = _load_script(name)
    return _SOURCES[name]


@dataclass(frozen=True)
class Slot:
    """One thing a run must hold: the environment, a key, a queue or a partition.

    ``spec`` is the Lua limit spec (see ``acquire.lua``) with ``conf`` standing for the
    queue's conf hash; ``label`` is what people read in logs and ``status``.
    """

    tag: str
    kind: str
    label: str
    spec: tuple[tuple[str, Any], ...]
    conf_tag: Optional[str] = None

    def key(self, role: str) -> str:
        return Names.redis_key(self.tag, role)


@dataclass(frozen=True)
class AcquireResult:
    ok: bool
    fence: int = 0
    taken: tuple[Slot, ...] = ()
    blocked: Optional[Slot] = None
    holder: str = ""
    limit: int = 0
    #: the run now waits in ``blocked``'s line (handoff)
    parked: bool = False
    #: ... and it is the first in that line (so the line must be listed for the sweeper)
    new_line: bool = False
    #: a woken run that is no longer listed as woken: another copy already claimed it
    duplicate: bool = False


def _client_options(config: CkeysConfig) -> dict[str, Any]:
    options: dict[str, Any] = {
        "socket_timeout": config.socket_timeout,
        "socket_connect_timeout": min(config.socket_timeout, 2.0),
        "health_check_interval": 30,
    }
    for name in ("socket_timeout", "socket_connect_timeout", "password", "username",
                 "ssl_cert_reqs", "ssl_ca_certs", "ssl_certfile", "ssl_keyfile",
                 "health_check_interval"):
        if name in config.redis_transport_options:
            options[name] = config.redis_transport_options[name]
    return options


def make_client(config: CkeysConfig) -> Any:
    """A redis-py client for ``ckeys_redis_url``: plain, TLS, unix, Sentinel or Cluster."""
    url = config.redis_url
    options = _client_options(config)
    if url.startswith(("sentinel://", "sentinels://")):
        return _sentinel_client(config, options)
    if config.redis_cluster:
        from redis.cluster import RedisCluster

        options.pop("health_check_interval", None)
        return RedisCluster.from_url(url, **options)
    return redis.Redis.from_url(url, **options)


def _sentinel_client(config: CkeysConfig, options: dict[str, Any]) -> Any:
    """Sentinel the way Celery's own Redis transport takes it.

    ``sentinel://[:password@]host:port[/db];sentinel://host2:port`` with the master's name
    in ``ckeys_redis_transport_options["master_name"]``; ``sentinel_kwargs`` go to the
    sentinels themselves.
    """
    from redis.sentinel import Sentinel

    transport = dict(config.redis_transport_options)
    master_name = transport.get("master_name")
    if not master_name:
        from .errors import ConfigurationError

        raise ConfigurationError(
            "a sentinel:// ckeys_redis_url needs ckeys_redis_transport_options['master_name']",
            setting="ckeys_redis_transport_options")
    hosts = []
    password = None
    username = None
    db = 0
    for part in config.redis_url.split(";"):
        part = part.strip()
        if not part:
            continue
        parsed = urlparse(part)
        hosts.append((parsed.hostname or "127.0.0.1", parsed.port or 26379))
        password = parsed.password or password
        username = parsed.username or username
        if parsed.path and parsed.path.strip("/"):
            db = int(parsed.path.strip("/"))
    if password and "password" not in options:
        options["password"] = password
    if username and "username" not in options:
        options["username"] = username
    if config.redis_url.startswith("sentinels://"):
        options["ssl"] = True
    sentinel = Sentinel(hosts, sentinel_kwargs=transport.get("sentinel_kwargs") or {},
                        socket_timeout=options.get("socket_timeout"))
    options.pop("health_check_interval", None)
    return sentinel.master_for(master_name, db=db, **options)


class Store:
    """Owns the Redis client of one config in one process, and every script call.

    The client is created lazily and again after ``fork()``, so a prefork pool never
    shares a connection with its parent.
    """

    def __init__(self, config: CkeysConfig) -> None:
        self.config = config
        self.names = Names(config.namespace)
        self._client: Any = None
        self._pid = 0
        self._scripts: dict[str, Any] = {}
        self._lock = threading.Lock()
        #: one script call per hash tag (Redis Cluster); tests force it on a single Redis
        self.stepwise = config.redis_cluster
        #: publishes woken parked runs' messages (set by the Celery glue, which has the app)
        self.on_wakes: Optional[Callable[[list[str]], None]] = None

    # -- connection -----------------------------------------------------------
    @property
    def client(self) -> Any:
        if self._client is None or self._pid != os.getpid():
            with self._lock:
                if self._client is None or self._pid != os.getpid():
                    self._client = make_client(self.config)
                    self._scripts = {}
                    self._pid = os.getpid()
        return self._client

    def script(self, name: str) -> Any:
        client = self.client
        found = self._scripts.get(name)
        if found is None:
            found = self._scripts[name] = client.register_script(script_source(name))
        return found

    def call(self, name: str, keys: Sequence[str], args: Sequence[Any]) -> Any:
        """Run one script; any Redis failure becomes :class:`CoordinationUnavailable`."""
        try:
            return self.script(name)(keys=list(keys), args=list(args))
        except REDIS_ERRORS as exc:
            raise CoordinationUnavailable(
                f"coordination Redis at {self.config.safe_url()} is unavailable: {describe(exc)}",
                url=self.config.safe_url()) from None

    def guarded(self, fn: Callable[[Any], Any]) -> Any:
        """Run ``fn(client)``; a Redis failure becomes :class:`CoordinationUnavailable`."""
        try:
            return fn(self.client)
        except REDIS_ERRORS as exc:
            raise CoordinationUnavailable(
                f"coordination Redis at {self.config.safe_url()} is unavailable: {describe(exc)}",
                url=self.config.safe_url()) from None

    def pipeline(self, calls: Sequence[tuple[str, Sequence[str], Sequence[Any]]]) -> list[Any]:
        """Run several scripts in one round trip; returns their replies in order.

        redis-py's pipeline would first ask ``SCRIPT EXISTS`` for registered scripts (a
        second round trip every time), so this sends bare EVALSHAs and falls back to a
        full EVAL only for a call that meets ``NOSCRIPT`` (after a Redis restart).
        """
        from redis.exceptions import NoScriptError

        if self.stepwise:
            # redis-py's cluster pipeline refuses scripts; each call is one round trip here
            return [self.call(name, keys, args) for name, keys, args in calls]

        def _do(client: Any) -> list[Any]:
            pipe = client.pipeline(transaction=False)
            for name, keys, args in calls:
                pipe.evalsha(self.script(name).sha, len(keys), *keys, *args)
            replies = list(pipe.execute(raise_on_error=False))
            for i, reply in enumerate(replies):
                if isinstance(reply, NoScriptError):
                    name, keys, args = calls[i]
                    replies[i] = self.script(name)(keys=list(keys), args=list(args))
                elif isinstance(reply, Exception):
                    raise reply
            return replies

        return list(self.guarded(_do))

    def close(self) -> None:
        if self._client is not None and self._pid == os.getpid():
            try:
                self._client.close()
            except REDIS_ERRORS:
                pass
        self._client = None

    # -- slots ----------------------------------------------------------------
    def publish_wakes(self, wakes: Sequence[str]) -> None:
        """Hand the messages of woken parked runs to whoever publishes them.

        Nothing is lost if that fails or nobody is set: a woken run that does not arrive
        is published again by the sweeper (``sweep.lua``).
        """
        if not wakes:
            return
        if self.on_wakes is None:
            logger.warning("%d woken run(s) left to the sweeper: no publisher is set", len(wakes))
            return
        try:
            self.on_wakes(list(wakes))
        except Exception as exc:
            logger.error("could not publish %d woken run(s) (%s); the sweeper will",
                         len(wakes), describe(exc))

    def acquire(self, slots: Sequence[Slot], owner: str, holder: dict[str, Any], *,
                primary: int, mode: str = "fresh", message: str = "",
                first_deferred_ms: int = 0) -> AcquireResult:
        """Take every slot or none. ``primary`` is the 1-based slot that records deferrals.

        ``mode`` is ``"fresh"``, ``"resume"`` (back from wait_for) or ``"woken"`` (a parked
        run the handoff woke). With a ``message``, a blocked run is parked in the full
        slot's line in the same atomic step (no wake-up can be lost in between).

        On one Redis this is one script call. Under Redis Cluster (``stepwise``) a script
        may only touch keys of one hash tag, and a run's slots (a partition, its queue's
        limit, the namespace-wide environment) have different tags; see
        :meth:`_acquire_stepwise`.
        """
        if self.stepwise:
            return self._acquire_stepwise(slots, owner, holder, primary=primary, mode=mode,
                                          message=message, first_deferred_ms=first_deferred_ms)
        keys: list[str] = []
        for slot in slots:
            keys += _acquire_keys(slot)
        conf_index: dict[str, int] = {}
        specs: list[dict[str, Any]] = []
        for slot in slots:
            spec = dict(slot.spec)
            if "c" in spec:
                assert slot.conf_tag is not None
                if slot.conf_tag not in conf_index:
                    keys.append(Names.redis_key(slot.conf_tag, CONF))
                    conf_index[slot.conf_tag] = len(keys)
                spec["c"] = conf_index[slot.conf_tag]
            specs.append(spec)
        reply = self.call("acquire", keys, self._acquire_args(
            owner, holder, json.dumps(specs, separators=(",", ":")), primary, mode, message,
            first_deferred_ms))
        return self._acquire_result(reply, slots)

    def _acquire_args(self, owner: str, holder: dict[str, Any], specs: str, primary: int, mode: str,
                      message: str, first_deferred_ms: int) -> list[Any]:
        return [owner, self.config.lock_ttl_ms, json.dumps(holder, separators=(",", ":")), specs,
                primary, self.config.deferral_memory_ms, mode, message, first_deferred_ms]

    def _acquire_result(self, reply: Any, slots: Sequence[Slot]) -> AcquireResult:
        status = int(reply[0])
        if status == 1:
            taken_idx = [int(i) for i in _text(reply[2]).split(",") if i]
            return AcquireResult(True, fence=int(reply[1]),
                                 taken=tuple(slots[i - 1] for i in taken_idx))
        if status == 2:
            return AcquireResult(False, duplicate=True)
        wakes = tuple(_text(w) for w in reply[5:])
        self.publish_wakes(wakes)
        return AcquireResult(False, blocked=slots[int(reply[1]) - 1], holder=_text(reply[2]),
                             limit=int(reply[3]), parked=int(reply[4]) > 0,
                             new_line=int(reply[4]) == 2)

    def _resolve_limits(self, slots: Sequence[Slot]) -> list[tuple[int, int]]:
        """``(slot index, limit)`` of the slots to take, as ``acquire.lua`` decides them."""
        used: list[tuple[int, int]] = []
        for j, slot in enumerate(slots, 1):
            spec = dict(slot.spec)
            if spec.get("alt"):
                continue
            if "l" in spec:
                used.append((j, int(spec["l"])))
                continue
            assert slot.conf_tag is not None
            conf = Names.redis_key(slot.conf_tag, CONF)
            limit: Optional[int]
            if "s" in spec:
                self.set_conf_limit(conf, int(spec["s"]))
                limit = int(spec["s"])
            else:
                stored = self.guarded(partial(_hget, key=conf, field="limit"))
                limit = int(stored) if stored is not None else spec.get("d")
            cap = spec.get("x")
            if limit is None or (cap is not None and cap < limit):
                limit = cap
            if limit is not None:
                used.append((j, limit))
            elif "a" in spec:
                used.append((int(spec["a"]), 1))
        return used

    def _acquire_stepwise(self, slots: Sequence[Slot], owner: str, holder: dict[str, Any], *,
                          primary: int, mode: str, message: str,
                          first_deferred_ms: int) -> AcquireResult:
        """Admission in steps, for Redis Cluster: one script call per slot, with compensation.

        Limits are resolved first (reading, or for a trigger-time limit writing, each queue's
        conf). Then each slot is taken by its own call, most specific first and the
        environment last; when one is full, the slots taken so far are released before
        returning, so no partial hold survives the attempt. Between the steps another run
        may briefly see a slot taken that this run gives back: it is deferred once more,
        never admitted past a limit. A crash between the steps leaves slots that the
        worker's main process (pool process died) or the lease frees.
        """
        used = self._resolve_limits(slots)
        if primary and primary not in {j for j, _ in used}:
            alt = dict(slots[primary - 1].spec).get("a")
            primary = int(alt) if alt and alt in {j for j, _ in used} else primary
        taken: list[Slot] = []
        fence = 0
        for j, limit in used:
            slot = slots[j - 1]
            one = Slot(tag=slot.tag, kind=slot.kind, label=slot.label, spec=(("l", limit),))
            result = self._acquire_one(one, owner, holder, record=(j == primary), mode=mode,
                                       message=message, first_deferred_ms=first_deferred_ms)
            if result.duplicate and not taken:
                return result
            if not result.ok:
                if taken:
                    self.release(taken, owner)
                if j != primary and primary and not result.duplicate:
                    # note the deferral where status looks for it (a limit of 0 never admits)
                    p = slots[primary - 1]
                    self._acquire_one(Slot(tag=p.tag, kind=p.kind, label=p.label, spec=(("l", 0),)),
                                      owner, holder, record=True, mode="fresh", message="",
                                      first_deferred_ms=0)
                return AcquireResult(False, blocked=slot, holder=result.holder, limit=limit,
                                     parked=result.parked, new_line=result.new_line)
            taken.append(slot)
            if j == primary or not fence:
                fence = result.fence
        return AcquireResult(True, fence=fence, taken=tuple(taken))

    def _acquire_one(self, slot: Slot, owner: str, holder: dict[str, Any], *, record: bool,
                     mode: str, message: str, first_deferred_ms: int) -> AcquireResult:
        reply = self.call("acquire", _acquire_keys(slot), self._acquire_args(
            owner, holder, json.dumps([dict(slot.spec)], separators=(",", ":")), 1 if record else 0,
            mode, message, first_deferred_ms))
        return self._acquire_result(reply, [slot])

    def release(self, slots: Sequence[Slot], owner: str, *, only: str = "") -> int:
        """Give back ``owner``'s slots; returns how many it held. Wakes parked runs."""
        if not slots:
            return 0
        if self.stepwise and len(slots) > 1:
            replies = self.pipeline([("release", _release_keys([slot]), (owner, only))
                                     for slot in slots])
        else:
            replies = [self.call("release", _release_keys(slots), [owner, only])]
        self.publish_wakes([_text(w) for reply in replies for w in reply[1:]])
        return sum(int(reply[0]) for reply in replies)

    def release_many(self, runs: Sequence[tuple[Sequence[Slot], str]]) -> None:
        """Release several runs in one round trip."""
        if len(runs) == 1:
            self.release(runs[0][0], runs[0][1])
            return
        groups = [[slot] for slots, _ in runs for slot in slots] if self.stepwise else None
        owners = [owner for slots, owner in runs for _ in slots] if self.stepwise else None
        if groups is not None and owners is not None:
            calls = [("release", _release_keys(g), (o, "")) for g, o in zip(groups, owners)]
        else:
            calls = [("release", _release_keys(slots), (owner, "")) for slots, owner in runs]
        replies = self.pipeline(calls)
        self.publish_wakes([_text(w) for reply in replies for w in reply[1:]])

    def renew(self, slots: Sequence[Slot], owner: str) -> int:
        return self.renew_many([(slots, owner, HOLDERS)])[0]

    def renew_many(self, runs: Sequence[tuple[Sequence[Slot], str, str]]) -> list[int]:
        """Renew several runs in one round trip; each item is ``(slots, owner, role)``.

        ``role`` is ``HOLDERS`` for running runs and ``WAITING`` for runs blocked in
        ``wait_for`` (whose place in the wait chain must not expire).
        """
        calls: list[tuple[str, Sequence[str], Sequence[Any]]] = []
        sizes: list[int] = []
        for slots, owner, role in runs:
            groups = [[slot] for slot in slots] if self.stepwise else [list(slots)]
            sizes.append(len(groups))
            for group in groups:
                keys: list[str] = []
                for slot in group:
                    keys += [slot.key(role), slot.key(META)]
                calls.append(("renew", keys, (owner, self.config.lock_ttl_ms)))
        replies = [int(x) for x in self.pipeline(calls)]
        counts: list[int] = []
        for size in sizes:
            counts.append(sum(replies[:size]))
            replies = replies[size:]
        return counts

    def wait_op(self, op: str, tags: Sequence[str], owner: str) -> int:
        """``wait.lua``: ``enter``, ``ready`` or ``leave`` for the slots named by ``tags``."""
        calls = self._wait_calls(op, tags, owner)
        if not calls:
            return 0
        replies = [self.call(*calls[0])] if len(calls) == 1 else self.pipeline(calls)
        return sum(int(reply[0]) for reply in replies)

    def _wait_calls(self, op: str, tags: Sequence[str],
                    owner: str) -> list[tuple[str, Sequence[str], Sequence[Any]]]:
        groups = [[tag] for tag in tags] if self.stepwise else [list(tags)]
        return [("wait", [Names.redis_key(tag, role) for tag in group
                          for role in (HOLDERS, WAITING, RESUMING, META)],
                 (op, owner, self.config.lock_ttl_ms)) for group in groups if group]

    def step_out(self, slots: Sequence[Slot], owner: str) -> None:
        """Give the slots back to wait, staying listed as waiting on them (one round trip)."""
        tags = [slot.tag for slot in slots]
        calls = self._wait_calls("enter", tags, owner)
        groups = [[slot] for slot in slots] if self.stepwise else [list(slots)]
        calls += [("release", _release_keys(group), (owner, "")) for group in groups]
        replies = self.pipeline(calls)
        self.publish_wakes([_text(w) for reply in replies[len(calls) - len(groups):]
                            for w in reply[1:]])

    # -- the handoff's sweep index: slots with a line, by when they next need a sweep ----
    @property
    def _lines_key(self) -> str:
        return Names.redis_key(self.names.lines(), "i")

    def note_line(self, tag: str) -> None:
        """Remember that ``tag`` has a line, due for a sweep after one countdown."""
        due_in = int(self.config.retry_countdown * 1000)
        key = self._lines_key
        self.guarded(lambda c: c.eval(
            "local t = redis.call('TIME'); local now = t[1] * 1000 + math.floor(t[2] / 1000);"
            " local due = now + tonumber(ARGV[2]); local old = redis.call('ZSCORE', KEYS[1], ARGV[1]);"
            " if not old or tonumber(old) > due then redis.call('ZADD', KEYS[1], due, ARGV[1]) end;"
            " redis.call('PEXPIRE', KEYS[1], ARGV[3])",
            1, key, tag, due_in, self._lines_ttl_ms))

    @property
    def _lines_ttl_ms(self) -> int:
        # refreshed by every park and sweep; outlives the longest gap between two sweeps of
        # a live line, so only an index nobody uses any more expires
        return int(2 * self.config.retry_countdown * 1000) + 900_000

    def due_lines(self, most: int = 100) -> list[tuple[str, float]]:
        """Slots whose line is due for a sweep now, with the due time the index holds."""
        key = self._lines_key

        def _do(client: Any) -> list[tuple[str, float]]:
            sec, usec = client.time()
            now = int(sec) * 1000 + int(usec) // 1000
            return [(_text(t), float(score)) for t, score in
                    client.zrangebyscore(key, "-inf", now, start=0, num=most, withscores=True)]

        result: list[tuple[str, float]] = self.guarded(_do)
        return result

    def sweep_line(self, tag: str, seen_due: float) -> None:
        """Sweep one slot, then keep its index entry up to date (or drop it when empty)."""
        due = self.sweep(tag)
        key = self._lines_key
        # compare-and-set: a park that happened meanwhile set a new due time; keep it
        self.guarded(lambda c: c.eval(
            "local old = redis.call('ZSCORE', KEYS[1], ARGV[1]);"
            " if old and tonumber(old) == tonumber(ARGV[2]) then"
            "   if tonumber(ARGV[3]) < 0 then redis.call('ZREM', KEYS[1], ARGV[1])"
            "   else redis.call('ZADD', KEYS[1], ARGV[3], ARGV[1]) end end;"
            " if redis.call('EXISTS', KEYS[1]) == 1 then redis.call('PEXPIRE', KEYS[1], ARGV[4]) end",
            1, key, tag, repr(seen_due), due, self._lines_ttl_ms))

    def sweep(self, tag: str, *, most: int = 100) -> int:
        """``sweep.lua`` on one slot; publishes what it wakes; returns the next due time (ms)."""
        keys = [Names.redis_key(tag, role) for role in (PARKED, WOKEN, MESSAGES, HOLDERS)]
        reply = self.call("sweep", keys, [self.config.claim_window_ms,
                                          int(self.config.retry_countdown * 1000), most])
        self.publish_wakes([_text(w) for w in reply[1:]])
        return int(reply[0])

    def queue_limit(self, queue: str) -> Optional[int]:
        key = Names.redis_key(self.names.queue(queue), CONF)
        value = self.guarded(partial(_hget, key=key, field="limit"))
        return int(value) if value is not None else None

    def set_conf_limit(self, conf_key: str, limit: Optional[int]) -> None:
        if limit is None:
            self.guarded(lambda c: c.hdel(conf_key, "limit"))
        else:
            self.guarded(lambda c: c.hset(conf_key, "limit", limit))

    def set_queue_limit(self, queue: str, limit: Optional[int]) -> None:
        self.set_conf_limit(Names.redis_key(self.names.queue(queue), CONF), limit)


def _hget(client: Any, *, key: str, field: str) -> Any:
    return client.hget(key, field)


def _acquire_keys(slot: Slot) -> list[str]:
    return [slot.key(role) for role in (HOLDERS, META, DEFERRED, RESUMING, PARKED, WOKEN, MESSAGES)]


def _release_keys(slots: Sequence[Slot]) -> list[str]:
    keys: list[str] = []
    for slot in slots:
        keys += [slot.key(role) for role in (HOLDERS, META, RESUMING, WAKE, PARKED, WOKEN, MESSAGES)]
    return keys


def _text(value: Any) -> str:
    if isinstance(value, bytes):
        return value.decode("utf-8")
    return str(value)


_stores: dict[CkeysConfig, Store] = {}
_stores_lock = threading.Lock()


def store_for(config: CkeysConfig) -> Store:
    """The process-wide :class:`Store` of ``config``: equal configs share one client."""
    found = _stores.get(config)
    if found is None:
        with _stores_lock:
            found = _stores.get(config)
            if found is None:
                found = _stores[config] = Store(config)
    return found


__all__ = [
    "CONF", "DEFERRED", "HOLDERS", "MESSAGES", "META", "PARKED", "REDIS_ERRORS", "RESUMING",
    "WAITING", "WAKE", "WOKEN", "AcquireResult", "Slot", "Store", "make_client", "store_for",
]
