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


class World:
    """A broker redis-server, a coordination (and result) redis-server, and workers.

    Two servers, so that INFO commandstats tell broker traffic from coordination traffic.
    """

    def __init__(self, **env: str) -> None:
        self.broker = RedisServer().start()
        self.coord = RedisServer().start()
        self.environ = {"BENCH_BROKER": f"{self.broker.url}/0", "BENCH_REDIS": f"{self.coord.url}/0",
                        "BENCH_NS": f"bench-{uuid.uuid4().hex[:6]}", **env}
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

        for server in (self.broker, self.coord):
            redis.Redis(port=server.port).config_resetstat()

    def close(self) -> None:
        for worker in self.workers:
            worker.stop()
        self.app.close()
        self.broker.stop()
        self.coord.stop()


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
