"""SPEC 4.9 and §3: bad keys, limits and settings get precise errors before anything is published."""

from __future__ import annotations

import subprocess
import sys

import pytest
from celery import Celery, group
from conftest import TESTS, Env, wait_until

from celery_ckeys import (
    CkeysError,
    ConcurrencyQueue,
    ConfigurationError,
    InvalidConcurrencyKey,
    KeyedTask,
    MalformedHeader,
)
from celery_ckeys.config import from_conf
from celery_ckeys.validation import check_key

BAD_KEYS = [1.5, 123, b"bytes", "", "x" * 257, ["list"]]


@pytest.mark.parametrize("bad", BAD_KEYS)
def test_check_key_rejects(bad: object) -> None:
    with pytest.raises(InvalidConcurrencyKey) as info:
        check_key(bad)
    assert isinstance(info.value, ValueError) and isinstance(info.value, CkeysError)


def test_check_key_accepts_the_boundaries() -> None:
    assert check_key("k") == "k"
    assert check_key("x" * 256) == "x" * 256
    assert check_key("ключ {tag} : spaces") == "ключ {tag} : spaces"


@pytest.mark.parametrize("bad", BAD_KEYS)
def test_invalid_keys_raise_before_anything_is_published(env: Env, bad: object) -> None:
    app = env.app()
    work = app.tasks["ckt.work"]
    attempts = [
        lambda: work.apply_async((["v"],), concurrency_key=bad),
        lambda: work.s(["v"]).set(concurrency_key=bad).apply_async(),
        lambda: group(work.s(["v"]), work.s(["w"])).apply_async(concurrency_key=bad),
        lambda: app.send_task("ckt.work", (["v"],), concurrency_key=bad),
        lambda: app.send_task("ckt.work", (["v"],), headers={"concurrency_key": bad}),
    ]
    for attempt in attempts:
        with pytest.raises(InvalidConcurrencyKey):
            attempt()
    assert env.broker_length() == 0


def test_a_template_naming_a_missing_argument_is_a_clear_error(env: Env) -> None:
    app = Celery("v", set_as_current=False)

    @app.task(base=KeyedTask, concurrency_key="user:{user}", shared=False)
    def t(contact_id: str) -> None: ...

    with pytest.raises(InvalidConcurrencyKey, match="names 'user'"):
        t.apply_async(("c",))


def test_a_producer_only_app_can_install_the_checks(env: Env) -> None:
    from celery_ckeys import install

    app = Celery("producer", broker=env.broker, set_as_current=False)
    install(app)
    with pytest.raises(InvalidConcurrencyKey):
        app.send_task("ckt.work", (["v"],), concurrency_key="")
    assert env.broker_length() == 0
    app.close()


def test_a_malformed_header_from_another_producer_fails_the_run_and_never_runs_the_body(env: Env) -> None:
    env.workers(count=1, concurrency=1)
    # a producer that knows nothing of celery_ckeys: no install(), raw headers
    outsider = Celery("outsider", broker=env.broker, backend=env.broker, set_as_current=False)
    result = outsider.send_task("ckt.work", (["malformed"],), headers={"concurrency_key": ""})
    with pytest.raises(MalformedHeader, match="invalid 'concurrency_key' header"):
        result.get(timeout=30)
    result2 = outsider.send_task("ckt.work", (["malformed"],),
                                 headers={"concurrency_queue": {"name": "q", "limit": 0}})
    with pytest.raises(MalformedHeader, match="concurrency_queue"):
        result2.get(timeout=30)
    assert env.max("malformed") == 0
    outsider.close()


def test_a_send_task_option_from_an_app_without_install_still_travels_as_a_header(env: Env) -> None:
    """The before_task_publish backstop moves the option from properties to headers."""
    env.workers(count=1, concurrency=1)
    outsider = Celery("outsider", broker=env.broker, backend=env.broker, set_as_current=False)
    out = outsider.send_task("ckt.work", (["moved"],), concurrency_key="moved").get(timeout=30)
    assert out["slots"] == ["key moved"]
    outsider.close()


@pytest.mark.parametrize(("setting", "value", "message"), [
    ("ckeys_retry_countdown", -1, "ckeys_retry_countdown must be greater than 0"),
    ("ckeys_retry_countdown", "10", "ckeys_retry_countdown must be a number"),
    ("ckeys_lock_ttl", 0, "ckeys_lock_ttl must be at least 1"),
    ("ckeys_environment_limit", 0, "ckeys_environment_limit must be a positive integer"),
    ("ckeys_environment_limit", 2.5, "ckeys_environment_limit must be a positive integer"),
    ("ckeys_burst_factor", 0.5, "ckeys_burst_factor must be at least 1"),
    ("ckeys_deferral", "later", "ckeys_deferral must be one of"),
    ("ckeys_redis_cluster", "yes", "ckeys_redis_cluster must be True or False"),
    ("ckeys_namespace", "", "ckeys_namespace must be a non-empty str"),
    ("ckeys_redis_url", "http://x", "ckeys_redis_url must be a URL"),
    ("ckeys_redis_transport_options", [1], "ckeys_redis_transport_options must be a dict"),
    ("ckeys_retry_jitter", 2, "ckeys_retry_jitter must be at most 1"),
])
def test_bad_settings_name_the_setting(setting: str, value: object, message: str) -> None:
    conf = {"broker_url": "redis://localhost", setting: value}
    with pytest.raises(ConfigurationError, match=message) as info:
        from_conf(conf, default_namespace="app")
    assert info.value.setting == setting


def test_the_coordination_url_defaults_to_a_redis_broker_and_is_required_otherwise() -> None:
    assert from_conf({"broker_url": "redis://h:1/2"}, default_namespace="a").redis_url == "redis://h:1/2"
    with pytest.raises(ConfigurationError, match="ckeys_redis_url is required"):
        from_conf({"broker_url": "amqp://guest@localhost//"}, default_namespace="a")
    conf = from_conf({"broker_url": "amqp://x", "ckeys_redis_url": "redis://h"}, default_namespace="a")
    assert conf.namespace == "a" and conf.retry_countdown == 10 and conf.lock_ttl == 300


def test_passwords_never_appear_in_configuration_errors() -> None:
    with pytest.raises(ConfigurationError) as info:
        from_conf({"ckeys_redis_url": "http://user:s3cret@host"}, default_namespace="a")
    assert "s3cret" not in str(info.value)


def test_a_worker_with_a_bad_setting_refuses_to_start(env: Env) -> None:
    environ = env.worker_environ({"ckeys_retry_countdown": -5})
    import os
    proc = subprocess.run(
        [sys.executable, "-m", "celery", "-A", "workerapp", "worker", "-P", "solo",
         "--without-mingle", "--without-gossip"],
        cwd=str(TESTS), env={**os.environ, **environ}, capture_output=True, text=True, timeout=60)
    assert proc.returncode != 0
    assert "ckeys_retry_countdown must be greater than 0" in proc.stdout + proc.stderr


@pytest.mark.parametrize("bad", [0, -1, 1.5, True, "3"])
def test_bad_limits_raise_value_error(bad: object) -> None:
    with pytest.raises(ValueError, match="positive integer"):
        ConcurrencyQueue("q", limit=bad)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="total_limit of queue 'q' must be a positive integer"):
        ConcurrencyQueue("q", limit=2, total_limit=bad)  # type: ignore[arg-type]
    app = Celery("v", set_as_current=False)
    with pytest.raises(ValueError, match="positive integer"):
        @app.task(base=KeyedTask, concurrency_limit=bad, shared=False)
        def t() -> None: ...
        t.name  # noqa: B018 - tasks are created lazily


def test_wait_until_helper_fails_loudly() -> None:
    with pytest.raises(AssertionError, match="timed out"):
        wait_until(lambda: False, 0.1, message="nothing")


@pytest.mark.parametrize("bad", [["t"] * 11, ["x" * 129], [""], "not-a-list", [1], ("ok", None)])
def test_bad_tags_raise_before_anything_is_published(env: Env, bad: object) -> None:
    from celery_ckeys import InvalidTags

    work = env.app().tasks["ckt.work"]
    with pytest.raises(InvalidTags):
        work.apply_async((["v"],), tags=bad)
    assert env.broker_length() == 0


def test_ten_tags_of_128_characters_are_fine(env: Env) -> None:
    work = env.app().tasks["ckt.work"]
    work.apply_async((["v"],), tags=[f"{i}" * 128 for i in range(10)])
    assert env.broker_length() == 1


@pytest.mark.parametrize("option, bad, error", [
    ("concurrency_priority", 1001, "InvalidConcurrencyPriority"),
    ("concurrency_priority", "high", "InvalidConcurrencyPriority"),
    ("concurrency_priority", True, "InvalidConcurrencyPriority"),
    ("concurrency_policy", "newest", "InvalidConcurrencyPolicy"),
    ("concurrency_policy", 1, "InvalidConcurrencyPolicy"),
    ("concurrency_queue", {"name": "q", "weights": {"gold": 0}}, "InvalidConcurrencyLimit"),
    ("concurrency_queue", {"name": "q", "weights": {"gold": 101}}, "InvalidConcurrencyLimit"),
    ("concurrency_queue", {"name": "q", "limit": lambda key: 1}, "InvalidConcurrencyQueue"),
])
def test_bad_priorities_policies_and_weights_raise_before_anything_is_published(
        env: Env, option: str, bad: object, error: str) -> None:
    import celery_ckeys

    app = env.app()
    work = app.tasks["ckt.work"]
    attempts = [lambda: work.apply_async((["v"],), concurrency_key="k", **{option: bad}),
                lambda: work.s(["v"]).set(concurrency_key="k", **{option: bad}).apply_async(),
                lambda: app.send_task("ckt.work", (["v"],), concurrency_key="k", **{option: bad})]
    for attempt in attempts:
        with pytest.raises(getattr(celery_ckeys, error)) as info:
            attempt()
        assert isinstance(info.value, ValueError)
    assert env.broker_length() == 0


def test_a_limit_callable_that_fails_for_a_key_fails_the_publish(env: Env) -> None:
    from celery_ckeys import InvalidConcurrencyLimit, InvalidConcurrencyQueue

    tiered = env.app().tasks["ckt.tiered"]
    queue = type(tiered)._ckeys_queue
    assert queue.limit_for("paid:x") == 2 and queue.limit_for("free:x") == 1
    app = env.app()

    @app.task(base=KeyedTask, name="ckt.broken_limit", shared=False,
              concurrency_queue=ConcurrencyQueue("broken", limit=lambda key: {"a": 0}[key]))
    def broken_limit() -> None: ...

    with pytest.raises(InvalidConcurrencyLimit, match="for key 'a'"):
        broken_limit.apply_async(concurrency_key="a")
    with pytest.raises(InvalidConcurrencyQueue, match="raised for key 'b'"):
        broken_limit.apply_async(concurrency_key="b")
    assert env.broker_length() == 0
