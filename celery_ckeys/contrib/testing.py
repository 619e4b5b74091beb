"""What the ``ckeys`` pytest plugin is built on; usable without pytest.

* ``SessionRedis``: a private redis-server on a free loopback port (or the server named
  by ``CKEYS_TEST_REDIS_URL``, used in a namespace of its own and never flushed), and the
  Celery settings that coordinate there (``SessionRedis.settings``).
* The recorder: every keyed run, in this process and in workers started by
  ``CeleryWorkers``, appends its start, end and deferrals to one list in that Redis, in
  the order they happened; ``Recorder`` reads it back (``peak``, ``runs``,
  ``deferrals``).
* ``CeleryWorkers``: real ``celery worker`` subprocesses, started through
  ``python -m celery_ckeys.contrib.launch``, which applies the settings and installs the
  recorder before handing over to Celery's own command line.
* ``wait_until``: poll a condition with a deadline instead of sleeping.

A coordinated run (a ``celery_ckeys.KeyedTask`` run that went through the gate) is
recorded from the moment it took its slots to the moment before it gives them back, so two
recorded windows of one key overlap only when coordination failed. Any other run that
carries a key or a queue (a task without ``base=KeyedTask``, an eager run) is recorded from
Celery's ``task_prerun`` to ``task_postrun``: that is where missing coordination shows.
"""

from __future__ import annotations

import gc
import json
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Optional, Sequence, TypeVar

import redis

from ..embedded import RedisServer
from ..naming import Names
from ..store import abandon_inherited

__all__ = [
    "ENV_REDIS_URL",
    "CeleryWorkers",
    "Deferral",
    "ProcessLocalRedis",
    "RecordedRun",
    "Recorder",
    "SessionRedis",
    "install_recorder",
    "open_session_redis",
    "uninstall_recorder",
    "wait_until",
]

#: Set it to ``redis://host:port/N`` to use that server instead of a private one.
ENV_REDIS_URL = "CKEYS_TEST_REDIS_URL"
#: How ``CeleryWorkers`` passes the settings and the recorder to the launcher.
ENV_SETTINGS = "CKEYS_TEST_SETTINGS"
ENV_RECORDER = "CKEYS_TEST_RECORDER"

T = TypeVar("T")


def wait_until(predicate: Callable[[], T], timeout: float = 30.0, interval: float = 0.05,
               message: str = "condition") -> T:
    """Poll ``predicate`` until it returns something truthy, and return that; raise
    ``AssertionError`` after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {message}")
        time.sleep(interval)


# -- the session's Redis -----------------------------------------------------------------

@dataclass
class SessionRedis:
    """The Redis a test session coordinates in, and the namespace it owns there."""

    url: str
    namespace: str
    #: the private redis-server, or ``None`` when ``CKEYS_TEST_REDIS_URL`` named the server
    server: Optional[RedisServer] = None
    retry_countdown: float = 0.25

    @property
    def prefix(self) -> str:
        """Prefix of every key the session creates besides celery_ckeys's own: broker,
        results and the recorder."""
        return f"{self.namespace}:"

    @property
    def recorder_key(self) -> str:
        return f"{self.prefix}ckeys-recorder"

    def settings(self) -> dict[str, Any]:
        """Celery settings that coordinate in this Redis (and use it as broker and result
        backend, under ``prefix``)."""
        keyprefix = {"global_keyprefix": self.prefix}
        return {
            "broker_url": self.url,
            "result_backend": self.url,
            "broker_transport_options": dict(keyprefix),
            "result_backend_transport_options": dict(keyprefix),
            "broker_connection_retry_on_startup": True,
            "ckeys_redis_url": self.url,
            "ckeys_namespace": self.namespace,
            "ckeys_retry_countdown": self.retry_countdown,
        }

    def client(self) -> redis.Redis:
        return redis.Redis.from_url(self.url)

    def keys(self) -> list[str]:
        """Every key of this session's namespace (celery_ckeys's, broker, results, recorder)."""
        client = self.client()
        try:
            found: list[str] = []
            for pattern in (Names(self.namespace).scan_pattern(), f"{self.prefix}*"):
                found.extend(k.decode() for k in client.scan_iter(match=pattern, count=1000))
            return found
        finally:
            client.close()

    def cleanup(self) -> int:
        """Delete this session's keys, and no other; returns how many went."""
        keys = self.keys()
        if not keys:
            return 0
        client = self.client()
        try:
            return sum(int(client.unlink(*keys[i:i + 500])) for i in range(0, len(keys), 500))
        finally:
            client.close()

    def close(self) -> None:
        # results still referenced by finished tests unsubscribe when they are collected:
        # let them do so while Redis is still there
        gc.collect()
        if self.server is not None:
            self.server.stop()
            self.server = None
        else:
            self.cleanup()


def new_namespace() -> str:
    return f"ckeys-test-{uuid.uuid4().hex[:12]}"


def open_session_redis(server_args: Sequence[str] = (), *, url: Optional[str] = None,
                       directory: Optional[str] = None) -> SessionRedis:
    """The server named by ``url`` or ``$CKEYS_TEST_REDIS_URL``, else a private redis-server
    (Debian's when on PATH, else the embedded one) started with ``server_args``."""
    url = url or os.environ.get(ENV_REDIS_URL) or None
    if url:
        return SessionRedis(url, new_namespace())
    server = RedisServer(directory=directory, extra=list(server_args)).start()
    return SessionRedis(f"{server.url}/0", new_namespace(), server)


# -- the recorder: writing --------------------------------------------------------------

class ProcessLocalRedis:
    """A Redis client of this process, made again in a forked child.

    A client inherited through ``fork()`` must not be used, nor closed: if another thread of
    the parent held its connection pool's lock at that instant (a worker's main process
    records a lost run from a background thread while it forks a new pool process),
    redis-py's fork check in the child waits for that lock (see ``store.abandon_inherited``).
    """

    def __init__(self, url: str) -> None:
        self.url = url
        self._pid = 0
        self._client: Optional[redis.Redis] = None

    @property
    def client(self) -> redis.Redis:
        if self._client is None or self._pid != os.getpid():
            abandon_inherited(self._client)
            self._client = redis.Redis.from_url(self.url)
            self._pid = os.getpid()
        return self._client

    def close(self) -> None:
        if self._client is not None and self._pid == os.getpid():
            self._client.close()
        self._client = None


class _Sink:
    """Appends this process's events to the session's list, one RPUSH each (Redis orders
    them: an end recorded before a release precedes the start of the next holder)."""

    def __init__(self, url: str, key: str) -> None:
        self.url = url
        self.key = key
        self.redis = ProcessLocalRedis(url)
        self._plain: dict[tuple[str, int], str] = {}
        self._lock = threading.Lock()

    def emit(self, event: dict[str, Any]) -> None:
        event.setdefault("t", time.time())
        event.setdefault("pid", os.getpid())
        self.redis.client.rpush(self.key, json.dumps(event, separators=(",", ":"), default=str))

    def start(self, task: Any, token: str, coordinated: bool) -> None:
        key, queue = _identity(task)
        request = task.request
        self.emit({"ev": "start", "tok": token, "id": request.id, "task": task.name,
                   "key": key, "queue": queue, "host": request.hostname or "",
                   "coordinated": coordinated})

    # gate observer: windows in which a coordinated run holds its slots
    def on_hold(self, event: str, task: Any, token: str) -> None:
        if event == "hold":
            self.start(task, token, True)
        elif event == "lost":  # in the worker's main process: token is a token prefix
            self.emit({"ev": "lost", "prefix": token})
        else:
            self.emit({"ev": event, "tok": token, "id": task.request.id})

    # Celery's task signals: runs that do not go through the gate
    def on_prerun(self, sender: Any = None, task_id: Optional[str] = None, **_: Any) -> None:
        task = sender
        if task is None or task_id is None or _coordinated(task):
            return
        key, queue = _identity(task)
        if key is None and queue is None:
            return
        token = f"plain/{task_id}/{os.getpid()}/{uuid.uuid4().hex[:8]}"
        with self._lock:
            self._plain[(task_id, threading.get_ident())] = token
        self.start(task, token, False)

    def on_postrun(self, sender: Any = None, task_id: Optional[str] = None, **_: Any) -> None:
        if task_id is None:
            return
        with self._lock:
            token = self._plain.pop((task_id, threading.get_ident()), None)
        if token is not None:
            self.emit({"ev": "end", "tok": token, "id": task_id})

    def on_deferred(self, sender: Any = None, task_id: Optional[str] = None,
                    blocked_by: str = "", countdown: Optional[float] = None,
                    reason: str = "", **_: Any) -> None:
        key, queue = _identity(sender) if sender is not None else (None, None)
        self.emit({"ev": "defer", "id": task_id, "task": getattr(sender, "name", None),
                   "key": key, "queue": queue, "blocked_by": blocked_by,
                   "countdown": countdown, "reason": reason})


def _coordinated(task: Any) -> bool:
    """Does this run go through the gate (whose observer records it)?"""
    return bool(getattr(task, "_ckeys_keyed", False)) and not task.request.is_eager


def _identity(task: Any) -> tuple[Optional[str], Optional[str]]:
    """The key and queue the current run of ``task`` asked for."""
    from ..gate import headers_of, run_spec

    request = task.request
    try:
        spec = run_spec(task, headers_of(request), request.args, request.kwargs)
    except Exception:
        return None, None
    return spec.key, (spec.queue.name if spec.queue is not None else None)


_sink: Optional[_Sink] = None


def install_recorder(url: str, key: str) -> None:
    """Record this process's keyed runs into ``key`` of the Redis at ``url`` (idempotent;
    another key replaces the previous one)."""
    global _sink
    from celery.signals import task_postrun, task_prerun

    from .. import gate, signals

    if _sink is not None and (_sink.url, _sink.key) == (url, key):
        return
    uninstall_recorder()
    sink = _Sink(url, key)
    gate.hold_observers.append(sink.on_hold)
    task_prerun.connect(sink.on_prerun, weak=False, dispatch_uid="celery_ckeys.recorder.prerun")
    task_postrun.connect(sink.on_postrun, weak=False, dispatch_uid="celery_ckeys.recorder.postrun")
    signals.run_deferred.connect(sink.on_deferred, weak=False,
                                 dispatch_uid="celery_ckeys.recorder.deferred")
    _sink = sink


def uninstall_recorder() -> None:
    global _sink
    from celery.signals import task_postrun, task_prerun

    from .. import gate, signals

    sink, _sink = _sink, None
    if sink is None:
        return
    if sink.on_hold in gate.hold_observers:
        gate.hold_observers.remove(sink.on_hold)
    task_prerun.disconnect(dispatch_uid="celery_ckeys.recorder.prerun")
    task_postrun.disconnect(dispatch_uid="celery_ckeys.recorder.postrun")
    signals.run_deferred.disconnect(dispatch_uid="celery_ckeys.recorder.deferred")
    sink.redis.close()


# -- the recorder: reading --------------------------------------------------------------

@dataclass(frozen=True)
class RecordedRun:
    """One run that started executing (a ``wait_for`` in between does not split it)."""

    task_id: str
    task: str
    key: Optional[str]
    queue: Optional[str]
    started: float
    #: when it ended, or ``None`` while it runs; for a run whose pool process died under
    #: it (SIGKILL, OOM, hard time limit), when the worker saw that process gone
    ended: Optional[float]
    pid: int
    hostname: str
    #: ``False`` for a run that did not go through the gate (no ``base=KeyedTask``, eager)
    coordinated: bool


@dataclass(frozen=True)
class Deferral:
    """A run that could not get its slots and was deferred (re-published or parked)."""

    task_id: str
    task: Optional[str]
    key: Optional[str]
    queue: Optional[str]
    blocked_by: str
    #: seconds until it is tried again, ``None`` when it was parked (handoff)
    countdown: Optional[float]
    reason: str
    at: float


@dataclass
class _Run:
    info: dict[str, Any]
    ended: Optional[float] = None
    windows: list[str] = field(default_factory=list)


def _matches(item: Mapping[str, Any], key: Optional[str], queue: Optional[str]) -> bool:
    return (key is None or item.get("key") == key) and (queue is None or item.get("queue") == queue)


class Recorder:
    """Keyed runs recorded since it was made (or last ``clear``-ed)."""

    def __init__(self, url: str, key: str) -> None:
        self.client = redis.Redis.from_url(url)
        self.key = key
        self.offset = int(self.client.llen(key))

    def clear(self) -> None:
        """Forget everything recorded so far."""
        self.offset = int(self.client.llen(self.key))

    def close(self) -> None:
        self.client.close()

    def events(self) -> list[dict[str, Any]]:
        """The raw events, in the order they happened."""
        return [json.loads(raw) for raw in self.client.lrange(self.key, self.offset, -1)]

    def _replay(self, key: Optional[str], queue: Optional[str]) -> tuple[list[_Run], int]:
        runs: list[_Run] = []
        open_windows: dict[str, _Run] = {}
        paused: dict[tuple[str, int], _Run] = {}
        current = peak = 0
        for event in self.events():
            kind, token = event.get("ev"), event.get("tok")
            if kind == "start" and isinstance(token, str):
                ident = (event.get("id"), event.get("pid"))
                run = paused.pop(ident, None)  # type: ignore[arg-type]
                if run is None:
                    run = _Run(event)
                    runs.append(run)
                run.windows.append(token)
                open_windows[token] = run
                if _matches(run.info, key, queue):
                    current += 1
                    peak = max(peak, current)
            elif kind == "lost" and isinstance(event.get("prefix"), str):
                # the process died under these windows; it is gone now, so they are over
                prefix = event["prefix"]
                for lost in [t for t in open_windows if t.startswith(prefix)]:
                    run = open_windows.pop(lost)
                    if _matches(run.info, key, queue):
                        current -= 1
                    run.ended = float(event.get("t", 0.0))
                for ident, run in list(paused.items()):
                    if any(t.startswith(prefix) for t in run.windows):
                        run.ended = float(event.get("t", 0.0))
                        del paused[ident]
            elif kind in ("end", "pause") and isinstance(token, str):
                run = open_windows.pop(token, None)
                if run is None:
                    continue  # a run that started before this recorder did
                if _matches(run.info, key, queue):
                    current -= 1
                if kind == "end":
                    run.ended = float(event.get("t", 0.0))
                else:
                    paused[(event.get("id"), event.get("pid"))] = run  # type: ignore[index]
        return runs, peak

    def peak(self, key: Optional[str] = None, queue: Optional[str] = None) -> int:
        """The highest number of runs of ``key`` (of ``queue``; of that partition when both are
        given; of all keyed runs when neither is) seen executing at once."""
        return self._replay(key, queue)[1]

    def runs(self, key: Optional[str] = None, queue: Optional[str] = None) -> list[RecordedRun]:
        """One entry per run that started, in start order."""
        found = []
        for run in self._replay(None, None)[0]:
            info = run.info
            if not _matches(info, key, queue):
                continue
            found.append(RecordedRun(
                task_id=str(info.get("id")), task=str(info.get("task")), key=info.get("key"),
                queue=info.get("queue"), started=float(info.get("t", 0.0)), ended=run.ended,
                pid=int(info.get("pid", 0)), hostname=str(info.get("host", "")),
                coordinated=bool(info.get("coordinated"))))
        return found

    def deferrals(self, key: Optional[str] = None, queue: Optional[str] = None) -> list[Deferral]:
        """One entry per deferral, in order."""
        return [
            Deferral(task_id=str(e.get("id")), task=e.get("task"), key=e.get("key"),
                     queue=e.get("queue"), blocked_by=str(e.get("blocked_by", "")),
                     countdown=e.get("countdown"), reason=str(e.get("reason", "")),
                     at=float(e.get("t", 0.0)))
            for e in self.events() if e.get("ev") == "defer" and _matches(e, key, queue)
        ]


# -- real worker subprocesses -----------------------------------------------------------

def _project_path() -> list[str]:
    """The import path entries of this process outside the interpreter's own directories:
    the workers import the modules the tests import."""
    system = {os.path.realpath(p) for p in {sys.prefix, sys.base_prefix, sys.exec_prefix}}
    entries = []
    for entry in sys.path:
        path = os.path.realpath(entry or os.getcwd())
        if not any(path == s or path.startswith(s + os.sep) for s in system) and os.path.isdir(path):
            entries.append(path)
    return list(dict.fromkeys(entries))


class CeleryWorkers:
    """A group of ``celery -A APP worker`` subprocesses.

    ``settings`` (JSON-able) are applied to the app before the worker starts; ``recorder``
    (``(url, key)``) makes the workers record their keyed runs. Call ``start``; it
    returns once every worker answered a ping. ``stop`` sends SIGTERM (a warm shutdown:
    running tasks finish) and SIGKILLs what is left after ``timeout``.
    """

    def __init__(self, app: str, *, count: int = 1, pool: str = "prefork", concurrency: int = 2,
                 queues: Sequence[str] = (), settings: Optional[Mapping[str, Any]] = None,
                 env: Optional[Mapping[str, str]] = None, cwd: Optional[os.PathLike[str] | str] = None,
                 log_dir: Optional[os.PathLike[str] | str] = None, extra_args: Sequence[str] = (),
                 ping_app: Any = None, recorder: Optional[tuple[str, str]] = None,
                 name: str = "w", host: str = "ckeys", loglevel: str = "INFO") -> None:
        self.app = app
        self.count = count
        self.pool = pool
        self.concurrency = concurrency
        self.queues = list(queues)
        self.settings = dict(settings or {})
        self.extra_env = dict(env or {})
        self.cwd = str(cwd) if cwd is not None else None
        self.log_dir = Path(log_dir) if log_dir is not None else Path.cwd()
        self.extra_args = list(extra_args)
        self.recorder = recorder
        self.loglevel = loglevel
        self.names = [f"{name}{i}-{uuid.uuid4().hex[:6]}@{host}" for i in range(count)]
        self.procs: list[subprocess.Popen[bytes]] = []
        self.logs: list[Path] = []
        self._handles: list[Any] = []
        self._ping_app = ping_app
        self._own_ping_app = False

    def command(self, name: str) -> list[str]:
        cmd = [sys.executable, "-m", "celery_ckeys.contrib.launch", "-A", self.app, "worker",
               "-P", self.pool, "-c", str(self.concurrency), "-n", name, "--without-mingle",
               "--without-gossip", "--without-heartbeat", "-l", self.loglevel]
        if self.queues:
            cmd += ["-Q", ",".join(self.queues)]
        return cmd + self.extra_args

    def environ(self) -> dict[str, str]:
        environ = dict(os.environ)
        environ.pop(ENV_SETTINGS, None)
        environ.pop(ENV_RECORDER, None)
        path = [p for p in [self.cwd, *_project_path(), environ.get("PYTHONPATH")] if p]
        environ["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(path))
        if self.settings:
            environ[ENV_SETTINGS] = json.dumps(self.settings)
        if self.recorder is not None:
            environ[ENV_RECORDER] = json.dumps(list(self.recorder))
        environ.update(self.extra_env)
        return environ

    def start(self, timeout: float = 60.0) -> CeleryWorkers:
        self.log_dir.mkdir(parents=True, exist_ok=True)
        environ = self.environ()
        for name in self.names:
            log = self.log_dir / f"{name.split('@')[0]}.log"
            handle = log.open("wb")
            self._handles.append(handle)
            proc = subprocess.Popen(self.command(name), cwd=self.cwd, env=environ, stdout=handle,
                                    stderr=subprocess.STDOUT, start_new_session=True)
            self.procs.append(proc)
            self.logs.append(log)
        self.wait_ready(timeout)
        return self

    def ping_app(self) -> Any:
        if self._ping_app is None:
            from celery import Celery

            broker = self.settings.get("broker_url")
            if not broker:
                raise ValueError("CeleryWorkers needs settings with a broker_url, or a ping_app")
            app = Celery("ckeys-ping", broker=broker, set_as_current=False)
            app.conf.broker_transport_options = self.settings.get("broker_transport_options", {})
            app.conf.broker_connection_retry_on_startup = True
            self._ping_app, self._own_ping_app = app, True
        return self._ping_app

    def wait_ready(self, timeout: float = 60.0) -> None:
        """Return once every worker answered a ping; fail (with its log) if one exited."""
        app = self.ping_app()
        pending = set(self.names)

        def answered() -> bool:
            for proc, log in zip(self.procs, self.logs):
                if proc.poll() is not None:
                    raise AssertionError(f"worker exited early with {proc.returncode}:\n"
                                         f"{log.read_text(errors='replace')[-3000:]}")
            replies = app.control.ping(destination=sorted(pending), timeout=0.5) or []
            for reply in replies:
                pending.difference_update(reply)
            return not pending

        try:
            wait_until(answered, timeout, message=f"workers {sorted(pending)} to answer ping")
        except AssertionError as exc:
            if "timed out" in str(exc):
                raise AssertionError(f"{exc}\n{self.log_text(3000)}") from None
            raise

    def log_text(self, tail: Optional[int] = None) -> str:
        """The workers' logs (the last ``tail`` characters of each)."""
        parts = []
        for name, log in zip(self.names, self.logs):
            text = log.read_text(errors="replace") if log.exists() else ""
            parts.append(f"--- {name} ---\n{text[-tail:] if tail else text}")
        return "\n".join(parts)

    def pool_pids(self, index: int = 0) -> list[int]:
        """Pids of worker ``index``'s pool processes."""
        out = subprocess.run(["ps", "-o", "pid=", "--ppid", str(self.procs[index].pid)],
                             capture_output=True, text=True, check=False).stdout
        return [int(x) for x in out.split()]

    def stop(self, *, kill: bool = False, timeout: float = 30.0) -> None:
        """SIGTERM every worker (warm shutdown), SIGKILL it after ``timeout``; ``kill=True``
        SIGKILLs at once. Pool processes left behind are killed too."""
        for proc in self.procs:
            if proc.poll() is None:
                try:
                    if kill:
                        os.killpg(proc.pid, signal.SIGKILL)
                    else:
                        proc.send_signal(signal.SIGTERM)
                except ProcessLookupError:
                    pass
        for proc in self.procs:
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                try:
                    os.killpg(proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                proc.wait(10)
            try:  # pool children left behind by a killed parent
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        for handle in self._handles:
            handle.close()
        self._handles.clear()
        if self._own_ping_app and self._ping_app is not None:
            self._ping_app.close()
            self._ping_app, self._own_ping_app = None, False
