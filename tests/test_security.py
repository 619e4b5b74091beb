"""TLS (rediss://), Redis ACL users, and passwords kept out of logs, CLI output and errors."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Iterator

import pytest
import redis
from conftest import TESTS, Env, wait_until
from servers import TLSProxy

from celery_ckeys import CoordinationUnavailable
from celery_ckeys.config import from_conf
from celery_ckeys.embedded import RedisServer
from celery_ckeys.redaction import redact
from celery_ckeys.store import Store

PASSWORD = "s3cr3t-Pa55"


@pytest.fixture
def tls_env(redis_server: RedisServer, tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Env]:
    coordination = RedisServer().start()
    proxy = TLSProxy(coordination.port).start()
    world = Env(redis_server, tmp_path, request.node.name, coordination=coordination,
                redis_url=proxy.url)
    world.configure(ckeys_redis_transport_options={"ssl_ca_certs": str(proxy.ca_file)})
    world.proxy = proxy  # type: ignore[attr-defined]
    yield world
    world.close()
    proxy.stop()
    coordination.stop()


def test_keys_work_over_tls(tls_env: Env) -> None:
    env = tls_env
    env.workers(count=1, concurrency=3)
    work = env.app().tasks["ckt.work"]
    outs = [r.get(timeout=60) for r in [work.apply_async((["tls"], 0.1), concurrency_key="tls")
                                        for _ in range(4)]]
    assert all(o["slots"] == ["key tls"] for o in outs)
    assert env.max("tls") == 1
    assert env.proxy.handshakes >= 2  # type: ignore[attr-defined]  # the test's and the worker's


@pytest.fixture
def acl_server() -> Iterator[RedisServer]:
    server = RedisServer().start()
    admin = redis.Redis(port=server.port)
    admin.execute_command("ACL", "SETUSER", "ckeys", "on", f">{PASSWORD}", "~*", "&*", "+@all")
    admin.execute_command("ACL", "SETUSER", "default", "off")
    yield server
    server.stop()


def acl_url(server: RedisServer, password: str = PASSWORD) -> str:
    return f"redis://ckeys:{password}@127.0.0.1:{server.port}/0"


def test_an_acl_user_with_a_password_works_and_never_shows(redis_server: RedisServer,
                                                          acl_server: RedisServer, tmp_path: Path,
                                                          request: pytest.FixtureRequest) -> None:
    env = Env(redis_server, tmp_path, request.node.name, coordination=acl_server,
              redis_url=acl_url(acl_server))
    try:
        workers = env.workers(count=1, concurrency=2)
        work = env.app().tasks["ckt.work"]
        assert work.apply_async((["acl"], 0.0), concurrency_key="acl").get(timeout=60)["slots"] == ["key acl"]
        status = subprocess.run([sys.executable, "-m", "celery", "-A", "workerapp", "ckeys", "status"],
                                cwd=str(TESTS), env={**os.environ, **env.worker_environ({})},
                                capture_output=True, text=True, timeout=60)
        assert status.returncode == 0, status.stderr
        assert "ckeys:***@127.0.0.1" in status.stdout
        assert PASSWORD not in status.stdout + status.stderr
        assert PASSWORD not in workers.log_text()
    finally:
        env.close()


def test_a_wrong_password_is_logged_without_the_password(redis_server: RedisServer,
                                                         acl_server: RedisServer, tmp_path: Path,
                                                         request: pytest.FixtureRequest) -> None:
    wrong = "WrongPa55word"
    env = Env(redis_server, tmp_path, request.node.name, coordination=acl_server,
              redis_url=acl_url(acl_server, wrong))
    try:
        workers = env.workers(count=1, concurrency=1)
        env.app().tasks["ckt.work"].apply_async((["x"], 0.0), concurrency_key="x")
        wait_until(lambda: "is unavailable" in workers.log_text(), 30, message="the error in the log")
        log = workers.log_text()
        assert wrong not in log and "ckeys:***@" in log
        cli = subprocess.run([sys.executable, "-m", "celery", "-A", "workerapp", "ckeys", "status"],
                             cwd=str(TESTS), env={**os.environ, **env.worker_environ({})},
                             capture_output=True, text=True, timeout=60)
        assert cli.returncode != 0
        assert wrong not in cli.stdout + cli.stderr and "unavailable" in cli.stderr
    finally:
        env.close()


def test_exception_messages_never_carry_the_password(acl_server: RedisServer) -> None:
    config = from_conf({"ckeys_redis_url": acl_url(acl_server, "nope-nope")}, default_namespace="x")
    store = Store(config)
    with pytest.raises(CoordinationUnavailable) as info:
        store.queue_limit("q")
    assert "nope-nope" not in str(info.value) and "nope-nope" not in repr(info.value.context)


@pytest.mark.parametrize(("text", "expected"), [
    ("redis://user:pw@host:1/0", "redis://user:***@host:1/0"),
    ("rediss://:pw@host", "rediss://:***@host"),
    ("sentinel://:a@h:1;sentinel://:b@h:2", "sentinel://:***@h:1;sentinel://:***@h:2"),
    ("redis://host:1/0", "redis://host:1/0"),
    # the password runs to the authority's last "@", as urllib and redis-py read it
    ("redis://u2:x@Leak3d@h:1/0", "redis://u2:***@h:1/0"),
    ("redis://h:1/0?password=S3cret&db=2", "redis://h:1/0?password=***&db=2"),
    ("rediss://h/0?ssl_cert_reqs=none&Password=S3cret", "rediss://h/0?ssl_cert_reqs=none&Password=***"),
])
def test_redaction(text: str, expected: str) -> None:
    assert redact(text) == expected
