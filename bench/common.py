"""Shared helpers for the benchmarks: a private redis-server and real worker subprocesses."""

from __future__ import annotations

import os
import platform
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any, Optional

BENCH = Path(__file__).parent


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return (f"{os.cpu_count()} cores ({cpu}), Python {platform.python_version()},"
            f" {platform.system()} {platform.release()}")


class Worker:
    def __init__(self, app_module: str, environ: dict[str, str], *, concurrency: int = 2,
                 pool: str = "prefork", queues: Optional[str] = None, log: Optional[Path] = None) -> None:
        self.name = f"bench-{uuid.uuid4().hex[:6]}@bench"
        cmd = [sys.executable, "-m", "celery", "-A", app_module, "worker", "-P", pool,
               "-c", str(concurrency), "-n", self.name, "--without-mingle", "--without-gossip",
               "--without-heartbeat", "-l", "WARNING"]
        if queues:
            cmd += ["-Q", queues]
        out = log.open("wb") if log else subprocess.DEVNULL
        self.proc = subprocess.Popen(cmd, cwd=str(BENCH), env={**os.environ, **environ,
                                     "PYTHONPATH": str(BENCH)}, stdout=out,
                                     stderr=subprocess.STDOUT, start_new_session=True)

    def wait_ready(self, app: Any, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if app.control.ping(destination=[self.name], timeout=0.5):
                return
        raise TimeoutError(f"worker {self.name} did not start")

    def stop(self) -> None:
        try:
            os.killpg(self.proc.pid, signal.SIGTERM)
            self.proc.wait(30)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            pass
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
