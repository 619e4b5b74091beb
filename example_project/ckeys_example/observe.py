"""Measures what the demo reports: how many runs of each key or queue execute at once.

Each run counts itself in and out of Redis atomically (a tiny Lua script), so the
highest concurrency is exact across processes and machines, without trusting clocks.
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from typing import Any, Iterator

import redis

from celery_ckeys.signals import run_deferred

_ENTER = """
for _, label in ipairs(KEYS) do
  local c = redis.call('HINCRBY', ARGV[1] .. ':cur', label, 1)
  if c > tonumber(redis.call('HGET', ARGV[1] .. ':max', label) or '0') then
    redis.call('HSET', ARGV[1] .. ':max', label, c)
  end
end
redis.call('HINCRBY', ARGV[1] .. ':runs', ARGV[2], 1)
return 1
"""
_EXIT = """
for _, label in ipairs(KEYS) do redis.call('HINCRBY', ARGV[1] .. ':cur', label, -1) end
return 1
"""


class Observer:
    def __init__(self, url: str, namespace: str) -> None:
        self.client = redis.Redis.from_url(url, decode_responses=True)
        self.prefix = f"demo-observe:{namespace}"
        self._enter = self.client.register_script(_ENTER)
        self._exit = self.client.register_script(_EXIT)

    @contextmanager
    def running(self, scenario: str, *labels: str) -> Iterator[None]:
        self._enter(keys=list(labels), args=[self.prefix, scenario])
        try:
            yield
        finally:
            self._exit(keys=list(labels), args=[self.prefix])

    def deferred(self, scenario: str) -> None:
        self.client.hincrby(f"{self.prefix}:deferred", scenario, 1)

    def report(self) -> dict[str, dict[str, int]]:
        return {name: {k: int(v) for k, v in self.client.hgetall(f"{self.prefix}:{name}").items()}
                for name in ("max", "runs", "deferred")}

    def clear(self) -> None:
        for name in ("cur", "max", "runs", "deferred"):
            self.client.delete(f"{self.prefix}:{name}")


_observer: Observer | None = None


def observer() -> Observer:
    global _observer
    if _observer is None:
        _observer = Observer(os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0"),
                             os.environ.get("CKEYS_NAMESPACE", "ckeys-example"))
    return _observer


@run_deferred.connect(weak=False)
def _count_deferral(sender: Any = None, **_: Any) -> None:
    scenario = getattr(sender, "scenario", None)
    if scenario:
        observer().deferred(scenario)
