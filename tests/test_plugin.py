"""The ``ckeys`` pytest plugin, tested the way a user runs it: a user's suite in ``pytester``.

Each session runs in a subprocess with the plugin and pytest-celery loaded from their entry
points, as after ``pip install "celery-ckeys[pytest]"``. The sessions write what the outer
test checks afterwards (server and worker pids, the namespace) to ``facts.json``.
"""

from __future__ import annotations

import json
import os
import textwrap
from pathlib import Path
from typing import Any

import pytest
import redis

from celery_ckeys.contrib.testing import SessionRedis
from celery_ckeys.embedded import RedisServer

pytest_plugins = ["pytester"]

pytestmark = pytest.mark.timeout(240)

# -- the README's example, word for word ------------------------------------------------
README_CONFTEST = '''
import pytest


@pytest.fixture(scope="session")
def celery_config(ckeys_config):
    return {**ckeys_config}          # your own settings go here too


@pytest.fixture(scope="session")
def celery_worker_pool():
    return "threads"


@pytest.fixture(scope="session")
def celery_worker_parameters():
    return {"concurrency": 4}
'''

README_TASKS = '''
import time

from celery import shared_task

from celery_ckeys import KeyedTask


@shared_task(base=KeyedTask, concurrency_key="contact:{contact_id}")
def enrich(contact_id):
    time.sleep(0.2)
    return contact_id
'''

README_TEST = '''
from tasks import enrich


def test_one_enrichment_per_contact_at_a_time(celery_session_worker, ckeys_recorder):
    results = [enrich.delay("c1") for _ in range(3)] + [enrich.delay("c2")]
    assert [r.get(timeout=30) for r in results] == ["c1", "c1", "c1", "c2"]
    assert ckeys_recorder.peak(key="contact:c1") == 1      # never two at once
    assert len(ckeys_recorder.runs(key="contact:c1")) == 3
'''

# -- more of a user's suite ---------------------------------------------------------------
FACTS = '''
import json
import os

import pytest


@pytest.fixture(scope="session", autouse=True)
def _facts(ckeys_redis):
    yield
    facts = {"namespace": ckeys_redis.namespace, "url": ckeys_redis.url, "pid": os.getpid(),
             "server_pid": ckeys_redis.server.process.pid if ckeys_redis.server else None}
    with open("facts.json", "w") as f:
        json.dump(facts, f)
'''

MORE_TASKS = '''
import time

from celery import shared_task

from celery_ckeys import KeyedTask


@shared_task(bind=True, base=KeyedTask)
def work(self, seconds=0.3):
    time.sleep(seconds)
    return self.request.id


@shared_task
def unkeyed(seconds=0.5):
    """No base=KeyedTask: a concurrency_key on its runs is not honoured."""
    time.sleep(seconds)
    return "done"


@shared_task
def child(x):
    return x * 2


@shared_task(bind=True, base=KeyedTask, concurrency_key="doc:{doc_id}")
def parent(self, doc_id):
    return self.wait_for(child.s(doc_id), timeout=30)
'''

THREADS_TEST = '''
from tasks import parent, work


def test_a_limited_queue_partitioned_per_user(celery_session_worker, ckeys_recorder):
    paid = {"name": "paid", "limit": 2}
    results = [work.apply_async((0.5,), concurrency_queue=paid, concurrency_key=user)
               for user in ("alice", "alice", "alice", "bob")]
    for r in results:
        r.get(timeout=30)
    assert ckeys_recorder.peak(queue="paid", key="alice") == 2
    assert ckeys_recorder.peak(queue="paid", key="bob") == 1
    assert len(ckeys_recorder.runs(queue="paid")) == 4
    assert ckeys_recorder.deferrals(queue="paid", key="alice")
    assert ckeys_recorder.deferrals(queue="paid", key="bob") == []


def test_wait_for_gives_the_key_back_while_the_child_runs(celery_session_worker, ckeys_recorder):
    assert parent.delay(21).get(timeout=30) == 42
    runs = ckeys_recorder.runs(key="doc:21")
    assert len(runs) == 1 and runs[0].ended is not None and runs[0].coordinated


def test_first_of_two(celery_session_worker, ckeys_recorder):
    assert ckeys_recorder.runs() == []
    work.apply_async((0.0,), concurrency_key="iso").get(timeout=30)
    assert [r.key for r in ckeys_recorder.runs()] == ["iso"]


def test_second_of_two_sees_nothing_of_the_first(ckeys_recorder):
    assert ckeys_recorder.runs() == [] and ckeys_recorder.peak() == 0
    assert ckeys_recorder.deferrals() == []
'''

OVERLAP_TEST = '''
from tasks import unkeyed


def test_the_recorder_sees_runs_that_are_not_coordinated(celery_session_worker, ckeys_recorder):
    results = [unkeyed.apply_async((0.5,), concurrency_key="same") for _ in range(2)]
    assert [r.get(timeout=30) for r in results] == ["done", "done"]
    assert not any(r.coordinated for r in ckeys_recorder.runs(key="same"))
    assert ckeys_recorder.peak(key="same") == 1
'''


def write_suite(pytester: pytest.Pytester, **tests: str) -> None:
    pytester.makeconftest(README_CONFTEST + FACTS)
    pytester.makepyfile(tasks=README_TASKS + MORE_TASKS, **tests)


def facts(pytester: pytest.Pytester) -> dict[str, Any]:
    data: dict[str, Any] = json.loads((pytester.path / "facts.json").read_text())
    return data


def gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    stat = Path(f"/proc/{pid}/stat")
    return stat.exists() and stat.read_text().rsplit(")", 1)[1].split()[0] in ("Z", "X")


def test_the_readme_example_and_the_threads_pool(pytester: pytest.Pytester) -> None:
    write_suite(pytester, test_enrich=README_TEST, test_threads=THREADS_TEST,
                test_overlap=OVERLAP_TEST)
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", timeout=200)
    # the recorder catches two runs of one key at once when nothing coordinates them
    result.assert_outcomes(passed=5, failed=1)
    result.stdout.fnmatch_lines(["*test_overlap.py*", "*assert 2 == 1*"])
    output = result.stdout.str() + result.stderr.str()
    assert "Traceback" not in output.split("= FAILURES =")[0]
    assert "ConnectionError" not in output and "Error while" not in output
    # the private redis-server is gone with the session
    assert gone(facts(pytester)["server_pid"])


SOLO_CONFTEST = '''
import pytest


@pytest.fixture(scope="session")
def celery_config(ckeys_config):
    return {**ckeys_config, "ckeys_deferral": "handoff", "ckeys_starvation_grace": 0.5}
'''

SOLO_APP = '''
from celery import Celery

app = Celery("proj")
app.conf.imports = ["tasks"]
'''

SOLO_TASKS = '''
import time

import redis
from celery import current_app, shared_task

from celery_ckeys import KeyedTask


@shared_task(bind=True, base=KeyedTask)
def hold(self, flag):
    """Holds its key until the test sets ``flag`` in Redis (or 30 s pass)."""
    client = redis.Redis.from_url(current_app.conf.ckeys_redis_url)
    deadline = time.monotonic() + 30
    while not client.exists(flag) and time.monotonic() < deadline:
        time.sleep(0.02)
    return "held"


@shared_task(base=KeyedTask)
def nap(seconds):
    time.sleep(seconds)
    return "slept"


@shared_task(base=KeyedTask)
def quick():
    return "ok"


@shared_task
def child(x):
    return x * 2


@shared_task(bind=True, base=KeyedTask)
def parent(self, x):
    return self.wait_for(child.s(x), timeout=30)


@shared_task(base=KeyedTask)
def dies():
    """Its pool process is SIGKILLed under it (OOM, a crash): nothing of the gate runs."""
    import os
    import signal

    os.kill(os.getpid(), signal.SIGKILL)
'''

SOLO_TEST = '''
import json
import os

import pytest
import redis

from celery_ckeys import WaitStarvation
from celery_ckeys.contrib.pytest import wait_until
from tasks import dies, hold, nap, parent, quick


def test_real_workers_with_the_prefork_pool(celery_session_app, ckeys_workers, ckeys_recorder):
    workers = ckeys_workers("app", pool="prefork", concurrency=2, queues=["real"])
    results = [nap.apply_async((0.3,), concurrency_key="k", queue="real") for _ in range(3)]
    assert [r.get(timeout=60) for r in results] == ["slept"] * 3
    runs = ckeys_recorder.runs(key="k")
    assert len(runs) == 3 and ckeys_recorder.peak(key="k") == 1
    assert {r.hostname for r in runs} == set(workers.names)
    assert os.getpid() not in {r.pid for r in runs}
    with open("worker_pids.json", "w") as f:
        json.dump([p.pid for p in workers.procs], f)


def test_a_run_whose_process_dies_ends_when_the_worker_sees_it_gone(celery_session_app,
                                                                  ckeys_workers, ckeys_recorder):
    ckeys_workers("app", pool="prefork", concurrency=1, queues=["dying"])
    result = dies.apply_async(concurrency_key="dies", queue="dying")
    with pytest.raises(Exception, match="SIGKILL|WorkerLost|exited"):
        result.get(timeout=60)
    ended = wait_until(lambda: [r for r in ckeys_recorder.runs(key="dies") if r.ended], 30,
                       message="the run's window to close")
    assert ended[0].task_id == result.id and ended[0].ended >= ended[0].started
    assert ckeys_recorder.peak(key="dies") == 1
    after = nap.apply_async((0.0,), concurrency_key="dies", queue="dying")
    assert after.get(timeout=60) == "slept"
    assert [r.ended is not None for r in ckeys_recorder.runs(key="dies")] == [True, True]


def test_solo_a_blocked_run_is_parked_and_comes_back(celery_session_worker, ckeys_workers,
                                                     ckeys_recorder, ckeys_redis_url):
    ckeys_workers("app", pool="solo", concurrency=1, queues=["elsewhere"])
    holder = hold.apply_async(("ckeys-flag-release",), concurrency_key="solo",
                              queue="elsewhere")
    wait_until(lambda: ckeys_recorder.runs(key="solo"), 30, message="the holder to start")
    blocked = quick.apply_async(concurrency_key="solo")
    wait_until(lambda: ckeys_recorder.deferrals(key="solo"), 30, message="a deferral")
    assert ckeys_recorder.deferrals(key="solo")[0].countdown is None   # parked (handoff)
    redis.Redis.from_url(ckeys_redis_url).set("ckeys-flag-release", 1)
    assert blocked.get(timeout=30) == "ok" and holder.get(timeout=30) == "held"
    assert [r.task_id for r in ckeys_recorder.runs(key="solo")] == [holder.id, blocked.id]
    assert ckeys_recorder.peak(key="solo") == 1


def test_solo_a_wait_that_can_never_end_fails_instead_of_hanging(celery_session_worker):
    with pytest.raises(WaitStarvation):
        parent.apply_async((1,), concurrency_key="w").get(timeout=60)
'''


def test_solo_in_thread_worker_handoff_and_prefork_workers(pytester: pytest.Pytester) -> None:
    pytester.makeconftest(SOLO_CONFTEST + FACTS)
    pytester.makepyfile(app=SOLO_APP, tasks=SOLO_TASKS, test_solo=SOLO_TEST)
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", timeout=200)
    result.assert_outcomes(passed=4)
    assert gone(facts(pytester)["server_pid"])
    worker_pids = json.loads((pytester.path / "worker_pids.json").read_text())
    assert worker_pids and all(gone(pid) for pid in worker_pids)


def test_an_external_redis_is_never_flushed(pytester: pytest.Pytester, redis_server: RedisServer,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    url = f"{redis_server.url}/4095"  # the last database: no other test of the suite uses it
    client = redis.Redis.from_url(url)
    client.set("someone-elses-key", "stays")
    before = set(client.keys("*"))
    monkeypatch.setenv("CKEYS_TEST_REDIS_URL", url)
    write_suite(pytester, test_enrich=README_TEST)
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", timeout=200)
    result.assert_outcomes(passed=1)
    found = facts(pytester)
    assert found["server_pid"] is None and found["url"] == url
    assert client.get("someone-elses-key") == b"stays"
    assert SessionRedis(url, found["namespace"]).keys() == []
    assert set(client.keys("*")) == before


def test_a_suite_that_asks_for_no_fixture_sees_no_change(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(test_plain=textwrap.dedent('''
        import subprocess

        def test_nothing_started():
            out = subprocess.run(["ps", "-o", "args=", "--ppid", str(__import__("os").getpid())],
                                 capture_output=True, text=True).stdout
            assert "redis-server" not in out
        '''))
    pytester.runpytest_subprocess("-p", "no:cacheprovider").assert_outcomes(passed=1)
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", "-p", "no:ckeys", "--fixtures")
    assert "ckeys_recorder" not in result.stdout.str()


def test_the_readme_shows_the_example_these_tests_run() -> None:
    readme = (Path(__file__).parent.parent / "README.md").read_text()
    docs = (Path(__file__).parent.parent / "docs" / "testing.md").read_text()
    for text in (readme, docs):
        assert README_CONFTEST.strip() in text
        assert README_TEST.strip() in text
        assert '@shared_task(base=KeyedTask, concurrency_key="contact:{contact_id}")' in README_TASKS


def test_the_plugin_is_registered_as_ckeys_with_its_extra() -> None:
    from importlib import metadata

    eps = metadata.entry_points()
    group = eps.select(group="pytest11") if hasattr(eps, "select") else eps["pytest11"]
    assert any(ep.name == "ckeys" and ep.value == "celery_ckeys.contrib.pytest" for ep in group)
    requires = metadata.requires("celery-ckeys") or []
    assert any(r.startswith("pytest-celery") and 'extra == "pytest"' in r for r in requires)

