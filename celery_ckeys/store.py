"""The Redis layer: the only code that talks to Redis.

One client per process and config (created again after ``fork()``), the Lua scripts
(``lua/*.lua``, as ``scripts.py`` assembles them), and one method per protocol
step of docs/protocol.md. ``celery_ckeys.cluster.ClusterStore`` runs the same steps
on Redis Cluster, where a script may only touch one hash tag.
"""

from __future__ import annotations

import json
import logging
import os
import threading
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Sequence
from urllib.parse import urlparse

import redis

from .config import CkeysConfig
from .errors import ConfigurationError, CoordinationUnavailable, describe
from .naming import (
    CONF,
    INFO,
    LINE,
    MESSAGES,
    RESUME,
    SLOT_ROLES,
    STARTS,
    UNITS,
    WAITING,
    WAITS,
    WAKE,
    Names,
    memo_role,
)
from .scripts import script_source
from .slots import Place, Slot

logger = logging.getLogger("celery_ckeys.store")

# What a failed call to Redis looks like, whatever the deployment.
REDIS_ERRORS: tuple[type[BaseException], ...] = (redis.RedisError, OSError)

SCRIPTS = ("acquire", "take", "release", "unlock", "give", "wait", "renew", "fence", "sweep",
           "limit", "registry", "index")
#: The hot path's releases: a reply of -1 (not as they expect) sends the release on to
#: release.lua, which they left untouched.
BARE = ("unlock", "give")
#: The keys give.lua takes per slot, of ``Store._keys``' layout.
GIVE_ROLES = tuple(SLOT_ROLES.index(role) for role in (UNITS, INFO, LINE, MESSAGES, RESUME, WAITS))


@dataclass(frozen=True)
class Wake:
    """A parked run given a unit: its message is published again, carrying its ticket."""

    tag: str
    ticket: str
    message: str


@dataclass(frozen=True)
class AcquireResult:
    status: str  # "admitted" | "blocked" | "dropped" | "needs_message" | "reserved"
    taken: tuple[Slot, ...] = ()
    #: it claimed a woken reservation (it was first in a line)
    claimed: bool = False
    blocked: Optional[Slot] = None
    holder: str = ""
    limit: int = 0
    #: the run now waits in ``blocked``'s line (handoff)
    parked: bool = False
    #: why a copy was dropped: "dup" (a copy with its ticket holds, waits or finished) or
    #: "parked" (the run is already in a line)
    why: str = ""
    #: keep_latest: the runs of its task that stopped waiting on its slot for it
    replaced: tuple[str, ...] = ()
    #: blocked by ``blocked``'s rate or throttle: ms until it lets a run start (0: neither)
    rate_wait_ms: int = 0

    @property
    def ok(self) -> bool:
        return self.status == "admitted"


@dataclass
class SlotState:
    """The raw state of one slot, read for introspection."""

    tag: str
    now_ms: int
    simple: Optional[str] = None  # the one hold token of a simple slot
    simple_ttl_ms: int = 0
    units: list[tuple[str, float]] = field(default_factory=list)
    info: dict[str, str] = field(default_factory=dict)
    line: list[tuple[str, float]] = field(default_factory=list)
    #: when the runs counted by the slot's rate started (ms)
    starts: list[float] = field(default_factory=list)
    messages: dict[str, str] = field(default_factory=dict)
    resume: list[tuple[str, float]] = field(default_factory=list)
    waiting: list[tuple[str, float]] = field(default_factory=list)
    waits: dict[str, str] = field(default_factory=dict)
    deferred: dict[str, str] = field(default_factory=dict)


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


def _text(value: Any) -> str:
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)


def token_prefix(task_id: str, host: str, pid: int) -> str:
    """The start of every hold and wait token one pool process makes for one run."""
    return json.dumps([task_id, host, pid], separators=(",", ":"))[:-1] + ","


def owner_prefix(task_id: str) -> str:
    """The start of every hold and wait token of one run, whichever process made it."""
    return json.dumps([task_id])[:-1] + ","


#: Clients a forked child inherited from its parent. They are never used, closed or
#: collected in the child: another thread of the parent may have held their pool's lock at
#: the instant of the fork (the main process sweeps while it forks pool processes), and
#: redis-py's disconnect (run by ``__del__`` when a client is replaced) then waits for that
#: lock, which nobody in the child will ever release.
_inherited: list[Any] = []


def abandon_inherited(client: Any) -> None:
    """Keep ``client``, made by a parent process, out of this process's way for good."""
    if client is not None:
        _inherited.append(client)


class _Unpooled(Exception):
    """The client routes or fails over per command (Cluster, Sentinel): no kept connection."""


class _Direct:
    """Connections of their own for the hot path, made like a plain client's pool makes them.

    redis-py's client spends more time around a command than a round trip to a local Redis
    takes (pool checkout and return, retry wrapper, observability hooks: ~100 us a call on
    the benchmark machine, twice a run). The hot path's commands go straight to a
    connection kept for good instead: one per process in a prefork pool, up to ``KEEP``
    when threads send commands at once (thread or greenlet pools, the heartbeat).

    No lock, and none of the pool's: a connection is taken out of a list and put back after
    its reply, so an exception raised by a signal at any instant (Celery's soft time limit)
    can at worst lose that connection object, which the garbage collector closes; the next
    command makes another. (Lost from redis-py's pool instead, it would count against the
    pool's ``max_connections`` for good.) Anything but an error reply disconnects the
    connection first: the exception may have come between a command and its reply, and the
    next command would read that reply as its own.
    """

    KEEP = 4

    def __init__(self, client: Any) -> None:
        pool = getattr(client, "connection_pool", None)
        self._pool: Any = pool if type(pool) is redis.ConnectionPool else None
        self._kept: list[Any] = []

    def send(self, args: Sequence[Any]) -> Any:
        return self.send_later(args)()

    def send_later(self, args: Sequence[Any]) -> Callable[[], Any]:
        """Send the command now; the function returned reads its reply. The connection is
        out of the list until then, so nothing else reads that reply as its own."""
        if self._pool is None:
            raise _Unpooled
        conn = self._take()
        try:
            conn.send_command(*args)
        except BaseException:
            conn.disconnect()  # connects again on its next command
            self._give(conn)
            raise

        def reply() -> Any:
            try:
                return conn.read_response()
            except redis.ResponseError:
                raise  # an error reply, read whole: the connection is in step
            except BaseException:
                conn.disconnect()
                raise
            finally:
                self._give(conn)
        return reply

    def _take(self) -> Any:
        try:
            return self._kept.pop()
        except IndexError:
            return self._pool.connection_class(**self._pool.connection_kwargs)

    def _give(self, conn: Any) -> None:
        if len(self._kept) < self.KEEP:
            self._kept.append(conn)
        else:
            conn.disconnect()

    def close(self) -> None:
        while self._kept:
            self._kept.pop().disconnect()


class Store:
    """Owns the Redis client of one config in one process, and every script call."""

    #: the sweep index is kept inside the scripts (one Redis); ClusterStore keeps it itself
    inline_index = True

    def __init__(self, config: CkeysConfig) -> None:
        self.config = config
        self.names = Names(config.namespace)
        self._client: Any = None
        self._pid = 0
        self._scripts: dict[str, Any] = {}
        #: the scripts this process has had a reply of: Redis has them (until it restarts)
        self._answered: set[str] = set()
        self._lock = threading.Lock()
        self._direct = _Direct(None)
        #: publishes woken runs (set by the Celery glue, which has the app)
        self.on_wakes: Optional[Callable[[list[Wake]], None]] = None

    # -- connection ------------------------------------------------------------
    @property
    def client(self) -> Any:
        if self._client is None or self._pid != os.getpid():
            with self._lock:
                if self._client is None or self._pid != os.getpid():
                    abandon_inherited(self._client)
                    abandon_inherited(self._direct)  # its connection is the parent's too
                    self._client = make_client(self.config)
                    self._scripts = {}
                    self._direct = _Direct(self._client)
                    self._pid = os.getpid()
        return self._client

    def _script(self, name: str) -> Any:
        client = self.client
        found = self._scripts.get(name)
        if found is None:
            found = self._scripts[name] = client.register_script(script_source(name))
        return found

    def guarded(self, fn: Callable[[Any], Any]) -> Any:
        """Run ``fn(client)``; a Redis failure becomes ``CoordinationUnavailable``."""
        try:
            return fn(self.client)
        except REDIS_ERRORS as exc:
            raise self._unavailable(exc) from None

    def _unavailable(self, exc: BaseException) -> CoordinationUnavailable:
        return CoordinationUnavailable(
            f"coordination Redis at {self.config.safe_url()} is unavailable: {describe(exc)}",
            url=self.config.safe_url())

    def call(self, name: str, keys: Sequence[str], args: Sequence[Any]) -> Any:
        """Run one script: EVALSHA, and after a Redis restart (NOSCRIPT) through redis-py's
        ``Script``, which loads it again."""
        script = self._script(name)
        try:
            return self.command("EVALSHA", script.sha, len(keys), *keys, *args)
        except redis.exceptions.NoScriptError:
            return self.guarded(lambda _: script(keys=list(keys), args=list(args)))

    def command(self, *args: Any) -> Any:
        """One command, its reply raw (no response callback), on the Store's kept connection
        (``_Direct``); through the client on Cluster and Sentinel, and once more after a
        broken connection."""
        client = self.client  # made again after a fork, and its _Direct with it
        try:
            try:
                return self._direct.send(args)
            except (_Unpooled, redis.ConnectionError, redis.TimeoutError):
                # Cluster or Sentinel, or a broken connection: the client, with redis-py's
                # own retry
                return client.execute_command(*args)
        except redis.exceptions.NoScriptError:
            raise
        except REDIS_ERRORS as exc:
            raise self._unavailable(exc) from None

    def pipeline(self, calls: Sequence[tuple[str, Sequence[str], Sequence[Any]]]) -> list[Any]:
        """Run several **independent** script calls in one round trip.

        Only calls whose order does not matter go through here (renewals of different runs,
        releases of different runs). After a Redis restart the scripts are gone: every
        script is loaded again and the calls that met ``NOSCRIPT`` are run again.
        """
        from redis.exceptions import NoScriptError

        def _do(client: Any) -> list[Any]:
            pipe = client.pipeline(transaction=False)
            for name, keys, args in calls:
                pipe.evalsha(self._script(name).sha, len(keys), *keys, *args)
            replies = list(pipe.execute(raise_on_error=False))
            failed = [i for i, reply in enumerate(replies) if isinstance(reply, NoScriptError)]
            if failed:
                for name in {calls[i][0] for i in failed}:
                    client.script_load(script_source(name))
                for i in failed:
                    name, keys, args = calls[i]
                    replies[i] = self._script(name)(keys=list(keys), args=list(args))
            for reply in replies:
                if isinstance(reply, Exception):
                    raise reply
            return replies

        return list(self.guarded(_do))

    def close(self) -> None:
        if self._client is not None and self._pid == os.getpid():
            try:
                self._direct.close()
                self._client.close()
            except REDIS_ERRORS:
                pass
        self._client = None

    def now_ms(self) -> int:
        sec, usec = self.guarded(lambda c: c.time())
        return int(sec) * 1000 + int(usec) // 1000

    # -- script arguments -------------------------------------------------------
    @staticmethod
    def _conf_position(keys: Sequence[str], conf_tag: Optional[str]) -> int:
        """Where a queue's conf is in ``keys`` (1-based; 0: not there)."""
        if conf_tag is None:
            return 0
        conf = Names.redis_key(conf_tag, CONF)
        return keys.index(conf) + 1 if conf in keys else 0

    def _keys(self, slots: Sequence[Slot], who: str, extra_conf: Optional[str] = None
              ) -> tuple[list[str], list[str], int]:
        """KEYS of a slot script (core.lua's layout), the limit specs, the index position.
        ``extra_conf``: a queue conf the script reads besides those the specs name."""
        keys = [Names.redis_key(slot.tag, role) for slot in slots for role in SLOT_ROLES]
        memo = memo_role(who)
        keys += [Names.redis_key(slot.tag, memo) for slot in slots]
        specs: list[str] = []
        conf_at: dict[str, int] = {}
        for slot in slots:
            position = 0
            if slot.conf_tag is not None and not slot.home_only:  # "~" reads no conf
                if slot.conf_tag not in conf_at:
                    keys.append(Names.redis_key(slot.conf_tag, CONF))
                    conf_at[slot.conf_tag] = len(keys)
                position = conf_at[slot.conf_tag]
            specs.append(slot.lua_spec(position))
        if extra_conf is not None and extra_conf not in conf_at:
            keys.append(Names.redis_key(extra_conf, CONF))
        index_at = 0
        if self.inline_index:
            keys.append(self.names.index_key())
            index_at = len(keys)
        return keys, specs, index_at

    @property
    def _lease(self) -> int:
        return self.config.lock_ttl_ms

    @property
    def _window(self) -> int:
        return min(self.config.claim_window_ms, self.config.lock_ttl_ms)

    @property
    def _countdown(self) -> int:
        return int(self.config.retry_countdown * 1000)

    # -- woken runs ---------------------------------------------------------------
    def _wakes(self, raw: Any, slots: Sequence[Slot]) -> None:
        items = list(raw or [])
        wakes = []
        for j, stored in zip(items[::2], items[1::2]):
            ticket, _, message = _text(stored).partition("\n")
            wakes.append(Wake(slots[int(j) - 1].tag, ticket, message))
        self.publish_wakes(wakes)

    def publish_wakes(self, wakes: Sequence[Wake]) -> None:
        """Hand woken runs to whoever publishes them.

        Nothing is lost if that fails or nobody is set: a woken run that does not arrive
        within the claim window is woken again by the next script on its slot or the sweeper.
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

    # -- admission ------------------------------------------------------------------
    def acquire(self, slots: Sequence[Slot], who: str, token: str, *, mode: str = "run",
                ticket: str = "", new_ticket: str = "", message: str = "",
                place: Optional[Place] = None, primary: int = 1,
                home: Optional[str] = None, deferred: bool = False) -> AcquireResult:
        """Admit the run (every slot or none) or not: ``acquire.lua``, one call.

        ``mode`` "run" (a delivery; ``ticket`` is the one its copy carries) or "resume" (back
        from wait_for; ``ticket`` is then its wait token). ``message``: "" never parks
        (countdown), "?" asks for the message when the run would park, else the message to
        park (handoff), under ``ticket`` or ``new_ticket``, at ``place``. ``home``: the tag of the line a
        woken copy comes from (one call sees every slot; ClusterStore needs it). ``deferred``:
        the run was deferred before, so it has a deferral record for the script to clear.
        """
        place = place or Place()
        fresh = mode == "run" and not ticket
        # The uncontended cases first (protocol.md section 6.1). An idle simple slot is taken
        # with a bare SET NX PX (one command, no script; no other key named): an existing
        # units key of either type means "go the long way" (section 3, invariant I1).
        # A run deferred before has a deferral record, which the bare SET would leave behind
        # (status would list a run that ran as deferred): a script admits it.
        simple = self._simple(slots)
        if fresh and simple and not deferred and self.command(
                "SET", Names.redis_key(slots[0].tag, UNITS), token, "NX", "PX", self._lease):
            return AcquireResult("admitted", taken=(slots[0],))
        keys, specs, index_at = self._keys(slots, who, place.weight_conf)
        if fresh and not simple:
            # Full slots with room and nobody waiting are taken by take.lua. Only a run
            # deferred before has a deferral record for it to delete (primary 0: none).
            taken = _text(self.call("take", keys, [who, token, self._lease,
                                                   primary if deferred else 0,
                                                   len(slots), *specs]))
            if taken != "0":
                return AcquireResult("admitted",
                                     taken=tuple(slots[int(j) - 1] for j in taken.split(",")))
        reply = self.call("acquire", keys, [
            who, token, self._lease, mode, ticket, new_ticket, message,
            place.lua(".".join(str(j) for j, s in enumerate(slots, 1) if s.fair),
                      self._conf_position(keys, place.weight_conf)),
            f"{self._window},{self._countdown},{self.config.deferral_memory_ms},"
            f"{primary},{index_at}", len(slots), *specs])
        return self._acquired(reply, slots)

    @staticmethod
    def _simple(slots: Sequence[Slot]) -> bool:
        """One slot of a fixed limit: idle, it is taken as a plain key (a STRING units key)."""
        return len(slots) == 1 and slots[0].lua_spec(0)[0] == "="

    def _acquired(self, reply: Any, slots: Sequence[Slot]) -> AcquireResult:
        status = int(reply[0])
        self._wakes(reply[-1], slots)
        if status == 1:
            taken = tuple(slots[int(i) - 1] for i in _text(reply[1]).split(",") if i)
            return AcquireResult("admitted", taken=taken, claimed=int(reply[2]) == 1)
        if status == 2:
            return AcquireResult("dropped", why=_text(reply[1]))
        if status == 3:
            return AcquireResult("needs_message")
        return AcquireResult("blocked", blocked=slots[int(reply[1]) - 1], holder=_text(reply[2]),
                             limit=int(reply[3]), parked=int(reply[4]) == 1,
                             replaced=tuple(_text(x) for x in reply[5] or ()),
                             rate_wait_ms=max(0, int(reply[6])))

    # -- release, in its three modes ---------------------------------------------------
    def _release(self, mode: str, slots: Sequence[Slot], who: str, token: str, ticket: str) -> int:
        if not slots:
            return 0
        call = self._release_call(mode, slots, who, token, ticket)
        return self._released(call, self.call(*call), mode, slots, who, token, ticket)

    def _release_call(self, mode: str, slots: Sequence[Slot], who: str, token: str, ticket: str,
                      *, lite: bool = True) -> tuple[str, list[str], list[Any]]:
        """The script call that releases. A run's own end tries a bare script first:
        ``unlock.lua`` on a simple slot, ``give.lua`` on full slots when it carries no
        ticket (both six keys a slot of ``_keys``' layout, unlock.lua the memo key too);
        else ``release.lua``."""
        if lite and mode == "normal" and self._simple(slots):
            tag = slots[0].tag
            return ("unlock", [*(Names.redis_key(tag, SLOT_ROLES[role]) for role in GIVE_ROLES),
                               Names.redis_key(tag, memo_role(who))],
                    [token, ticket, self.config.copy_ttl_ms, who])
        keys, specs, index_at = self._keys(slots, who)
        if lite and mode == "normal" and not ticket:
            return ("give", [keys[j * len(SLOT_ROLES) + role] for j in range(len(slots))
                             for role in GIVE_ROLES], [who, token])
        return ("release", keys, [mode, who, token, ticket, self._release_numbers(index_at),
                                  len(slots), *specs])

    def _released(self, call: tuple[str, list[str], list[Any]], reply: Any, mode: str,
                  slots: Sequence[Slot], who: str, token: str, ticket: str) -> int:
        """Units freed, from a release's reply; a bare script's -1 (somebody waits, or the
        slot is not as it expects) sends the release on to ``release.lua``, which it left
        untouched."""
        if call[0] in BARE:
            if int(reply) >= 0:
                return int(reply)
            reply = self.call(*self._release_call(mode, slots, who, token, ticket, lite=False))
        self._wakes(reply[1], slots)
        return int(reply[0])

    def _release_numbers(self, index_at: int) -> str:
        return f"{self._lease},{self._window},{self.config.copy_ttl_ms},{index_at}"

    def release(self, slots: Sequence[Slot], who: str, token: str, ticket: str = "") -> int:
        """The run's own end: free its units (token ``token``); a ticketed run leaves a memo."""
        return self._release("normal", slots, who, token, ticket)

    def release_later(self, slots: Sequence[Slot], who: str, token: str,
                      ticket: str = "") -> Callable[[], int]:
        """``release``, its reply read when the function returned is called (it returns
        what ``release`` would). The hot path's ``unlock.lua`` is sent now, so that the
        caller's own round trip (Celery storing the result) overlaps Redis's answer;
        Redis runs it before any command sent after it on the same server (protocol.md
        section 6.2). Any other release (several slots, Cluster, no kept connection) is
        done before this returns."""
        def now() -> Callable[[], int]:
            freed = self.release(slots, who, token, ticket)
            return lambda: freed
        if not self._simple(slots):
            return now()
        name, keys, args = self._release_call("normal", slots, who, token, ticket)
        if name not in self._answered:
            # this process's first: Redis may not have the script yet, and its NOSCRIPT would
            # be seen only when the reply is read, after the result store; the synchronous
            # way loads it
            done = now()
            self._answered.add(name)
            return done
        sha = self._script(name).sha  # after a fork, the client and its connections anew
        try:
            reply = self._direct.send_later(("EVALSHA", sha, len(keys), *keys, *args))
        except (_Unpooled, redis.ConnectionError, redis.TimeoutError):
            return now()  # Cluster, Sentinel or a broken connection: the client's way
        except REDIS_ERRORS as exc:
            raise self._unavailable(exc) from None

        def finish() -> int:
            try:
                raw = reply()
            except (redis.exceptions.NoScriptError, redis.ConnectionError, redis.TimeoutError):
                # Redis restarted, or the reply was lost: once more, the synchronous way
                # (unlock.lua run twice frees once: the second finds the token gone)
                return self.release(slots, who, token, ticket)
            except REDIS_ERRORS as exc:
                raise self._unavailable(exc) from None
            return self._released((name, keys, args), raw, "normal", slots, who, token, ticket)
        return finish

    def release_lost(self, slots: Sequence[Slot], who: str, prefix: str) -> int:
        """Free what a pool process that is gone held or waited on (tokens starting ``prefix``)."""
        return self._release("lost", slots, who, prefix, "")

    def forfeit(self, slots: Sequence[Slot], who: str, ticket: str) -> int:
        """Celery discarded this copy: its woken reservation and parked entry go."""
        return self._release("forfeit", slots, who, "", ticket)

    def forget_memo(self, slots: Sequence[Slot], who: str, ticket: str) -> None:
        """The pool process of ``who``'s copy with ``ticket`` died and Celery puts its message
        back: a memo it left (its body ended, its result was not stored) must not drop it."""
        self._release("unmemo", slots, who, "", ticket)

    def unclaim(self, slots: Sequence[Slot], who: str, ticket: str) -> int:
        """A copy gives back the unit woken (or kept) for its ticket on slots its plan does
        not need: mark them ``home_only``."""
        return self._release("unclaim", slots, who, "", ticket)

    def release_many(self, runs: Sequence[tuple[Sequence[Slot], str, str, str]]) -> None:
        """Normal releases of several runs ``(slots, who, token, ticket)`` in one round trip."""
        if len(runs) == 1:
            self.release(*runs[0])
            return
        calls = [self._release_call("normal", *run) for run in runs]
        for run, call, reply in zip(runs, calls, self.pipeline(calls)):
            self._released(call, reply, "normal", *run)

    # -- waits ----------------------------------------------------------------------------
    def _wait(self, op: str, slots: Sequence[Slot], who: str, token: str, wait_token: str) -> int:
        if not slots:
            return 0
        keys, specs, index_at = self._keys(slots, who)
        reply = self.call("wait", keys, [op, who, token, wait_token, self._lease, self._window,
                                         self._countdown, 0, index_at, len(slots), *specs])
        self._wakes(reply[1], slots)
        return int(reply[0])

    def step_out(self, slots: Sequence[Slot], who: str, token: str, wait_token: str) -> int:
        """Give back every unit held with ``token`` and wait with ``wait_token``: one call."""
        return self._wait("enter", slots, who, token, wait_token)

    def ready(self, slots: Sequence[Slot], who: str, wait_token: str) -> int:
        """The child of ``who`` reached a final state: ``who`` may resume, ahead of new runs."""
        return self._wait("ready", slots, who, "", wait_token)

    def wait_wake(self, slot: Slot, timeout: float) -> None:
        """Block until a unit is reserved for a resuming run on ``slot`` (or ``timeout``)."""
        wake = Names.redis_key(slot.tag, WAKE)
        self.guarded(lambda c: c.blpop([wake], timeout=timeout))

    # -- leases -----------------------------------------------------------------------------
    def _renew_call(self, slots: Sequence[Slot], who: str, token: str,
                    role: str) -> tuple[str, list[str], list[Any]]:
        keys = [Names.redis_key(slot.tag, r) for slot in slots for r in SLOT_ROLES]
        return ("renew", keys, [role, who, token, self._lease, len(slots)])

    def renew_many(self, runs: Sequence[tuple[Sequence[Slot], str, str, str]]) -> list[int]:
        """Renew several runs ``(slots, who, token, role)`` in one round trip; ``role`` is
        "hold" (running) or "wait" (blocked in wait_for). Returns slots renewed per run."""
        calls = [self._renew_call(slots, who, token, role) for slots, who, token, role in runs]
        return [int(x) for x in self.pipeline(calls)]

    def fence(self, slot: Slot, who: str, token: str) -> int:
        """The fencing token of a run holding ``slot`` with ``token``; -1 once it lost it."""
        keys = [Names.redis_key(slot.tag, role) for role in SLOT_ROLES]
        return int(self.call("fence", keys, [who, token]))

    def stay_known(self, slots: Sequence[Slot], who: str, ticket: str) -> bool:
        """Does Redis still know run ``who``'s stay ``ticket``: a unit held, woken, kept or
        reserved for it, a place in a line, a wait, or the memo that it finished?

        Each slot is read in one MULTI (its keys share a hash tag), so a run that moves from
        one structure to another inside a script (line to woken, wait to resuming) is seen
        in one of them, never in neither. A move between slots keeps the run visible on one
        of them at every instant (a run parks before it gives back what it took)."""
        mine = owner_prefix(who)

        def _do(client: Any) -> bool:
            for slot in slots:
                pipe = client.pipeline(transaction=True)
                pipe.type(Names.redis_key(slot.tag, UNITS))
                pipe.get(Names.redis_key(slot.tag, UNITS))  # WRONGTYPE on a full slot: ignored
                pipe.hexists(Names.redis_key(slot.tag, INFO), who)
                pipe.zscore(Names.redis_key(slot.tag, LINE), who)
                pipe.hexists(Names.redis_key(slot.tag, WAITS), who)
                pipe.get(Names.redis_key(slot.tag, memo_role(who)))
                kind, simple, info, line, wait, memo = pipe.execute(raise_on_error=False)
                if _text(kind) == "string" and not isinstance(simple, Exception) \
                        and _text(simple or b"").startswith(mine):
                    return True  # a simple slot: its one hold
                if info or line is not None or wait:
                    return True
                if ticket and not isinstance(memo, Exception) and _text(memo or b"") == f"done:{ticket}":
                    return True
            return False
        return bool(self.guarded(_do))

    # -- the handoff's sweep ---------------------------------------------------------------
    def due_lines(self, most: int = 100) -> list[tuple[str, float]]:
        """Slots due for a sweep now, with the due time the index holds."""
        key = self.names.index_key()

        def _do(client: Any) -> list[tuple[str, float]]:
            sec, usec = client.time()
            now = int(sec) * 1000 + int(usec) // 1000
            return [(_text(t), float(score)) for t, score in
                    client.zrangebyscore(key, "-inf", now, start=0, num=most, withscores=True)]

        found: list[tuple[str, float]] = self.guarded(_do)
        return found

    def sweep(self, slot: Slot, seen_due: float = 0.0) -> int:
        """``sweep.lua`` on one slot; publishes what it wakes; returns when it is next due."""
        keys, specs, index_at = self._keys([slot], "")
        reply = self.call("sweep", keys, [self._window, self._countdown, self._lease, 0,
                                          index_at, 1, specs[0]])
        self._wakes(reply[1], [slot])
        return int(reply[0])

    # -- limits -------------------------------------------------------------------------------
    def resolve_limits(self, slots: Sequence[Slot], *, record: bool = False) -> list[Optional[int]]:
        """The limit each slot has now (``None``: not needed), by ``limit.lua``."""
        keys, specs, _ = self._keys(slots, "")
        reply = self.call("limit", keys, ["1" if record else "0", len(slots), *specs])
        return [None if int(x) < 0 else int(x) for x in reply]

    def queue_limit(self, queue: str, *, field: str = "limit") -> Optional[int]:
        """The limit recorded for ``queue`` (``field="total"``: its total_limit)."""
        key = Names.redis_key(self.names.queue(queue), CONF)
        value = self.guarded(lambda c: c.hget(key, field))
        return int(value) if value is not None else None

    def set_queue_limit(self, queue: str, limit: Optional[int], *, field: str = "limit") -> None:
        """Record (``None``: forget) ``queue``'s limit (``field="total"``: its total_limit)."""
        key = Names.redis_key(self.names.queue(queue), CONF)
        if limit is None:
            self.guarded(lambda c: c.hdel(key, field))
        else:
            self.guarded(lambda c: c.hset(key, field, limit))

    def recorded_rate(self, queue: str) -> Optional[str]:
        """The rate recorded for ``queue`` (``"n/window_ms"``), if any."""
        conf = Names.redis_key(self.names.queue(queue), CONF)
        value = self.guarded(lambda c: c.hget(conf, "rate"))
        return _text(value) if value is not None else None

    def set_rate(self, queue: str, rate: Optional[str]) -> None:
        """Record (``None``: forget) ``queue``'s rate, ``"n/window_ms"``."""
        conf = Names.redis_key(self.names.queue(queue), CONF)
        if rate is None:
            self.guarded(lambda c: c.hdel(conf, "rate"))
        else:
            self.guarded(lambda c: c.hset(conf, "rate", rate))

    def throttle(self, queue: str, key: Optional[str], seconds: float) -> int:
        """Start nothing new of ``queue``'s partition for ``key`` (or of the queue's own slot,
        with no key) for ``seconds`` from now (server time); returns until when (ms). Its
        line is swept then, so the runs waiting go as soon as it ends."""
        conf = Names.redis_key(self.names.queue(queue), CONF)
        field_name = "throttle" if key is None else f"throttle:{key}"
        tag = self.names.queue(queue) if key is None else self.names.partition(queue, key)
        until = self.now_ms() + int(seconds * 1000)

        def _do(client: Any) -> None:
            client.hset(conf, field_name, until)
            client.zadd(self.names.index_key(), {tag: until}, lt=True)
        self.guarded(_do)
        return until

    def key_limits(self, queue: str, *, what: str = "key") -> dict[str, int]:
        """The limits recorded for single keys of ``queue`` (``key:<key>`` in its conf;
        ``what="weight"``: their weights, ``weight:<key>``)."""
        conf = Names.redis_key(self.names.queue(queue), CONF)
        fields = self.guarded(lambda c: c.hgetall(conf))
        prefix = f"{what}:"
        return {_text(f)[len(prefix):]: int(v) for f, v in fields.items()
                if _text(f).startswith(prefix)}

    def set_key_limit(self, queue: str, key: str, limit: Optional[int], *,
                      what: str = "key") -> None:
        """Record (``None``: forget) the limit of ``queue``'s partition for ``key`` alone
        (``what="weight"``: the key's weight in the queue's fair lines)."""
        conf = Names.redis_key(self.names.queue(queue), CONF)
        if limit is None:
            self.guarded(lambda c: c.hdel(conf, f"{what}:{key}"))
        else:
            self.guarded(lambda c: c.hset(conf, f"{what}:{key}", limit))

    def _conf_queues(self) -> list[str]:
        """Every queue of the namespace with a conf HASH (some limit recorded)."""
        found = []
        for tag, roles in self.scan_tags().items():
            parsed = self.names.parse(Names.redis_key(tag, CONF))
            if CONF in roles and parsed is not None and parsed[0].queue is not None:
                found.append(parsed[0].queue)
        return found

    def queues_with_key_limits(self) -> list[str]:
        """Every queue of the namespace where some key has a limit or a weight of its own."""
        return [queue for queue in self._conf_queues()
                if self.key_limits(queue) or self.key_limits(queue, what="weight")]

    def recorded_limits(self) -> dict[str, int]:
        """Every queue of the namespace with a recorded limit."""
        found: dict[str, int] = {}
        for queue in self._conf_queues():
            limit = self.queue_limit(queue)
            if limit is not None:
                found[queue] = limit
        return found

    # -- the worker registry (WaitStarvation) ------------------------------------------------
    def _registry_keys(self) -> list[str]:
        tag = self.names.workers()
        return [Names.redis_key(tag, "reg"), Names.redis_key(tag, "b"), Names.redis_key(tag, "bw")]

    def register_worker(self, hostname: str, info: dict[str, Any], lifetime_ms: int) -> None:
        self.call("registry", self._registry_keys(),
                  ["register", hostname, json.dumps(info), lifetime_ms])

    def blocked(self, task_id: str, hostname: str, lease_ms: int) -> None:
        """List (or renew) a run as blocked in wait_for on ``hostname``."""
        self.call("registry", self._registry_keys(), ["block", task_id, hostname, lease_ms])

    def unblocked(self, task_id: str) -> None:
        self.call("registry", self._registry_keys(), ["unblock", task_id])

    def registry(self) -> tuple[int, dict[str, dict[str, Any]], list[tuple[str, float]], dict[str, str]]:
        """``(now ms, workers, blocked runs with lease expiry, run -> host)``."""
        now, workers, blocked, where = self.call("registry", self._registry_keys(), ["read"])
        pairs = list(workers)
        info = {_text(h): json.loads(_text(v)) for h, v in zip(pairs[::2], pairs[1::2])}
        flat = list(blocked)
        runs = [(_text(t), float(s)) for t, s in zip(flat[::2], flat[1::2])]
        hosts = list(where)
        return int(now), info, runs, {_text(t): _text(h) for t, h in zip(hosts[::2], hosts[1::2])}

    # -- introspection and the CLI ------------------------------------------------------------
    def scan_tags(self, match_tag: str = "*") -> dict[str, set[str]]:
        """Tags of this namespace with the roles (key suffixes) that exist for each."""
        names = self.names
        pattern = f"ckeys:{{{names.ns}|{match_tag}}}:*"
        found: dict[str, set[str]] = {}

        def _do(client: Any) -> None:
            for raw in client.scan_iter(match=pattern, count=1000):
                key = _text(raw)
                tag, sep, role = key[len("ckeys:{"):].partition("}:")
                if sep and names.parse(key) is not None:
                    found.setdefault(tag, set()).add(role)

        self.guarded(_do)
        return found

    def read_slot(self, tag: str) -> SlotState:
        """Everything one slot holds, in one round trip (all its keys share its tag)."""
        def key(role: str) -> str:
            return Names.redis_key(tag, role)

        def _read(client: Any) -> list[Any]:
            pipe = client.pipeline(transaction=False)
            # the units are a STRING (simple) or a ZSET (full): one of these two fails
            pipe.get(key(UNITS))
            pipe.zrange(key(UNITS), 0, -1, withscores=True)
            pipe.pttl(key(UNITS))
            for role in SLOT_ROLES[1:]:
                if role == WAKE:
                    continue  # a wake list is for the waiter alone
                if role in (LINE, RESUME, WAITING, STARTS):
                    pipe.zrange(key(role), 0, -1, withscores=True)
                else:
                    pipe.hgetall(key(role))
            return list(pipe.execute(raise_on_error=False))

        now = self.now_ms()  # TIME may not go in a Redis Cluster pipeline
        simple, units, ttl, info, line, messages, resume, waiting, waits, deferred, starts \
            = self.guarded(_read)
        state = SlotState(tag=tag, now_ms=now)
        if isinstance(simple, (bytes, str)):
            state.simple, state.simple_ttl_ms = _text(simple), int(ttl)
        if isinstance(units, list):
            state.units = [(_text(t), float(s)) for t, s in units]
        state.info = {_text(k): _text(v) for k, v in info.items()}
        state.line = [(_text(t), float(s)) for t, s in line]
        state.messages = {_text(k): _text(v) for k, v in messages.items()}
        state.resume = [(_text(t), float(s)) for t, s in resume]
        state.waiting = [(_text(t), float(s)) for t, s in waiting]
        state.waits = {_text(k): _text(v) for k, v in waits.items()}
        state.starts = [float(s) for _, s in starts] if isinstance(starts, list) else []
        state.deferred = {_text(k): _text(v) for k, v in deferred.items()}
        return state

    def holders_of(self, tag: str) -> list[str]:
        """Task ids holding (not reserving) a unit of the slot ``tag``."""
        state = self.read_slot(tag)
        if state.simple is not None:
            return [json.loads(state.simple)[0]]
        return [t for t, expiry in state.units
                if expiry > state.now_ms and not state.info.get(t, "@").startswith("@")]


_stores: dict[CkeysConfig, Store] = {}
_stores_lock = threading.Lock()


def store_for(config: CkeysConfig) -> Store:
    """The process-wide store of ``config``: equal configs share one client."""
    found = _stores.get(config)
    if found is None:
        with _stores_lock:
            found = _stores.get(config)
            if found is None:
                if config.redis_cluster:
                    from .cluster import ClusterStore

                    found = ClusterStore(config)
                else:
                    found = Store(config)
                _stores[config] = found
    return found
