"""The example project's demo, as ``make demo`` runs it, and the CLI watching it live."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest
from conftest import TESTS

from celery_ckeys.embedded import RedisServer

pytest.importorskip("ckeys_example")


def test_the_demo_runs_on_an_embedded_redis_and_checks_every_limit() -> None:
    environ = {k: v for k, v in os.environ.items() if k != "REDIS_URL"}
    proc = subprocess.run([sys.executable, "-m", "ckeys_example.demo", "--contacts", "120"],
                          env=environ, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out = proc.stdout
    assert "started an embedded redis-server" in out
    for scenario in ("enrichment", "pull requests", "one at a time", "parent waits on child"):
        assert scenario in out
    assert "PROBLEM" not in out and "wall time" in out


def test_the_cli_shows_holders_and_deferred_runs_while_the_demo_runs(redis_server: RedisServer) -> None:
    url = f"{redis_server.url}/0"
    demo = subprocess.Popen([sys.executable, "-m", "ckeys_example.demo", "--contacts", "60",
                             "--scenarios", "pull requests",
                             # each user's line lasts seconds: several CLI calls see it
                             "--pr-seconds", "1.0"],
                            env={**os.environ, "REDIS_URL": url}, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    try:
        namespace = None
        assert demo.stdout is not None
        for line in demo.stdout:
            if "CKEYS_NAMESPACE=" in line:
                namespace = line.rsplit("CKEYS_NAMESPACE=", 1)[1].strip().rstrip(")")
                break
        assert namespace, "the demo did not say which namespace it uses"
        cli_env = {**os.environ, "REDIS_URL": url, "CKEYS_NAMESPACE": namespace}
        seen_holders = seen_deferred = False
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not (seen_holders and seen_deferred):
            proc = subprocess.run([sys.executable, "-m", "celery", "-A", "ckeys_example.app", "ckeys",
                                   "status", "--json"], env=cli_env, cwd=str(TESTS),
                                  capture_output=True, text=True, timeout=60)
            assert proc.returncode == 0, proc.stderr
            for slot in json.loads(proc.stdout):
                if slot["label"].startswith(("queue free-users [", "queue paid-users [")):
                    assert len(slot["holders"]) <= slot["limit"]
                    seen_holders |= bool(slot["holders"])
                    seen_deferred |= slot["deferred_count"] > 0
        assert seen_holders and seen_deferred
        assert demo.wait(120) == 0
    finally:
        if demo.poll() is None:
            demo.kill()
