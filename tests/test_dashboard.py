"""Issue 14: the live dashboard (`celery ckeys dashboard`), served by a real subprocess over
real workers and Redis; the page itself is driven in headless Chromium when one is installed
(Debian's `chromium` and `chromium-driver`; nothing downloads a browser)."""

from __future__ import annotations

import base64
import json
import os
import shutil
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Optional

import pytest
from conftest import TESTS, Env, wait_until
from test_exporter import free_port

pytest.importorskip("starlette")
pytest.importorskip("uvicorn")

from celery_ckeys import limits
from celery_ckeys.dashboard.guard import check_address, check_basic_auth, check_interval, where
from celery_ckeys.errors import ConfigurationError
from celery_ckeys.introspect import explain
from celery_ckeys.naming import Names

USER, PASSWORD = "admin", "dash-Pa55word"
REDIS_PASSWORD = "redis-S3cret"
AUTH = "Basic " + base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")
SCREENSHOT = TESTS.parent / "docs" / "img" / "dashboard.png"


@contextmanager
def dashboard(env: Env, *args: str, redis_url: Optional[str] = None) -> Iterator[str]:
    """A `celery ckeys dashboard` subprocess; yields its base URL once it answers."""
    port = free_port()
    environ = {**os.environ, **env.worker_environ({})}
    if redis_url is not None:
        environ["CKT_REDIS"] = redis_url
    proc = subprocess.Popen([sys.executable, "-m", "celery", "-A", "workerapp", "ckeys",
                             "dashboard", "--port", str(port), "--interval", "0.5", *args],
                            cwd=TESTS, env=environ, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}/"

    def answers() -> bool:
        assert proc.poll() is None, proc.stdout.read() if proc.stdout else "exited"
        try:
            get(url + "api/status", auth=AUTH)
        except urllib.error.HTTPError:
            return True  # it answers, if only to refuse
        except OSError:
            return False
        return True
    try:
        wait_until(answers, timeout=60, message="the dashboard answers")
        yield url
    finally:
        proc.terminate()
        out, _ = proc.communicate(timeout=30)
        if out.strip():
            print(out)


def get(url: str, *, auth: Optional[str] = None, data: Optional[Any] = None,
        headers: Optional[dict[str, str]] = None) -> Any:
    request = urllib.request.Request(url, headers={**({"Authorization": auth} if auth else {}),
                                                   **(headers or {})})
    if data is not None:
        request.data = (data if isinstance(data, str) else json.dumps(data)).encode()
        request.add_header("Content-Type", "application/json")
    with urllib.request.urlopen(request, timeout=10) as response:
        body = response.read().decode()
    return json.loads(body) if body.startswith(("{", "[")) else body


def status_code(url: str, **kwargs: Any) -> int:
    try:
        get(url, **kwargs)
    except urllib.error.HTTPError as exc:
        return exc.code
    return 200


def test_bad_options_are_refused_before_anything_is_served() -> None:
    assert check_basic_auth("u:p") == ("u", "p")
    assert check_basic_auth("u:p:q") == ("u", "p:q")
    for bad in ("nocolon", ":p", "u:"):
        with pytest.raises(ConfigurationError, match="user:password"):
            check_basic_auth(bad)
    check_address("127.0.0.1", None)
    check_address("::1", None)
    check_address("localhost", None)
    with pytest.raises(ConfigurationError, match="not loopback: give --basic-auth"):
        check_address("0.0.0.0", None)
    check_address("0.0.0.0", ("u", "p"))
    for bad in (float("nan"), float("inf"), 0.0, -1.0, 1e9):
        with pytest.raises(ConfigurationError, match="--interval"):
            check_interval(bad)
    assert check_interval(0.5) == 0.5


@pytest.mark.parametrize(("url", "shown"), [
    ("redis://u:pw@h:1/0", "redis://h:1/0"),
    ("redis://u2:x@Leak3d@h:1/0", "redis://h:1/0"),
    ("redis://h:1/0?password=S3cret", "redis://h:1/0"),
    ("rediss://:pw@h/2", "rediss://h/2"),
    ("sentinel://:a@h:1;sentinel://:b@h:2/0?password=c", "sentinel://:***@h:1;sentinel://:***@h:2/0"),
])
def test_the_page_names_where_redis_is_and_nothing_else(url: str, shown: str) -> None:
    assert where(url) == shown


def test_the_cli_refuses_a_public_address_without_credentials(env: Env) -> None:
    done = subprocess.run([sys.executable, "-m", "celery", "-A", "workerapp", "ckeys",
                           "dashboard", "--address", "0.0.0.0", "--port", str(free_port())],
                          cwd=TESTS, env={**os.environ, **env.worker_environ({})},
                          capture_output=True, text=True, timeout=60)
    assert done.returncode != 0
    assert "not loopback: give --basic-auth" in done.stderr


def start_holder_and_waiter(env: Env) -> tuple[Any, Any, Any]:
    """acme's partition of queue dq (limit 1) held, one run parked behind it; bob's held."""
    env.configure(ckeys_deferral="handoff")
    env.workers(count=1, concurrency=3)  # two holders, and a process to park the waiter
    app = env.app()
    hold = app.tasks["ckt.hold_until"]
    holder = hold.apply_async((["dash:holder"], "dash"), concurrency_queue={"name": "dq",
                              "limit": 1}, concurrency_key="acme", tags=["team-a"])
    other = hold.apply_async((["dash:other"], "dash"), concurrency_queue={"name": "dq",
                             "limit": 1}, concurrency_key="bob", tags=["team-b"])
    wait_until(lambda: len(env.events("start")) == 2, timeout=60, message="both holders start")
    waiter = app.tasks["ckt.work"].apply_async((["dash:waiter"],), concurrency_queue="dq",
                                               concurrency_key="acme", tags=["team-a"])
    wait_until(lambda: explain(app, waiter.id).state == "parked", timeout=60,
               message="the waiter is parked in acme's line")
    return app, (holder, other), waiter


def finish(env: Env, app: Any, holders: Any, waiter: Any) -> None:
    limits.resume(app, "dq")
    env.open_gate("dash")
    for run in (*holders, waiter):
        run.get(timeout=60)


def test_the_api_needs_credentials_and_actions_need_the_flag(env: Env) -> None:
    app, holders, waiter = start_holder_and_waiter(env)
    try:
        with dashboard(env, "--basic-auth", f"{USER}:{PASSWORD}") as url:
            assert status_code(url) == 401
            assert status_code(url, auth="Basic \xc3\xa9") == 401  # not base64: refused
            with urllib.request.urlopen(urllib.request.Request(
                    url, headers={"Authorization": AUTH}), timeout=10) as response:
                headers = response.headers
            assert headers["X-Frame-Options"] == "DENY"
            assert "frame-ancestors 'none'" in headers["Content-Security-Policy"]
            assert status_code(url, auth="Basic " + base64.b64encode(b"admin:wrong").decode()) \
                == 401
            got = wait_until(lambda: (s := get(url + "api/status", auth=AUTH))["queues"] and s,
                             timeout=30, message="the snapshot lists queue dq")
            queue = next(q for q in got["queues"] if q["name"] == "dq")
            assert queue["running"] == 2 and queue["waiting"] == 1 and queue["limit"] == 1
            narrowed = get(url + "api/status?tag=team-b", auth=AUTH)
            assert [s["label"] for s in narrowed["slots"]] == ["queue dq [bob]"]
            # a record no celery_ckeys wrote spoils its own slot, not the page
            env.redis.hset(Names.redis_key(env.names.queue("badq"), "f"), "x",
                           '{"at": "not-a-number"}')
            spoiled = wait_until(lambda: next((s for s in get(url + "api/status", auth=AUTH)[
                "slots"] if s["label"] == "queue badq"), None), timeout=30,
                message="the spoiled slot is listed")
            assert spoiled["error"].startswith("unreadable: ValueError")
            assert any(q["name"] == "dq" for q in get(url + "api/status", auth=AUTH)["queues"])
            why = get(url + f"api/explain?task_id={waiter.id}", auth=AUTH)
            assert why["state"] == "parked" and "position 1" in why["detail"]
            assert status_code(url + "api/actions/pause", auth=AUTH, data={"queue": "dq"},
                               headers={"X-Ckeys-Action": "1"}) == 403
            assert not limits.paused(app, "dq")["queue"]
        recorded = limits.get_limits(app, "dq")["recorded"]  # the trigger-time limit, 1
        with dashboard(env, "--allow-actions") as url:
            # without the header a browser adds only from the page's own script: refused
            assert status_code(url + "api/actions/pause", data={"queue": "dq"}) == 400
            for bad in ({}, {"queue": ""}, {"queue": 7}, {"queue": "dq", "key": ""}):
                assert status_code(url + "api/actions/pause", data=bad,
                                   headers={"X-Ckeys-Action": "1"}) == 400, bad
            assert status_code(url + "api/actions/limit", data={"queue": "dq", "limit": "x"},
                               headers={"X-Ckeys-Action": "1"}) == 400
            assert status_code(url + "api/actions/drop", data={"queue": "dq"},
                               headers={"X-Ckeys-Action": "1"}) == 404
            for bad_limit in ("\u0663", "1_0", " ", "1e3", 1.5, True, [1]):
                assert status_code(url + "api/actions/limit", data={"queue": "dq",
                                   "limit": bad_limit}, headers={"X-Ckeys-Action": "1"}) == 400
            assert limits.get_limits(app, "dq")["recorded"] == recorded == 1
            assert limits.paused(app, "dq") == {"queue": False, "keys": []}
            # an action from another site's page: refused however it is sent
            for foreign in ({"Origin": "http://evil.example"}, {"Sec-Fetch-Site": "cross-site"}):
                assert status_code(url + "api/actions/pause", data={"queue": "dq"},
                                   headers={"X-Ckeys-Action": "1", **foreign}) == 403
            # a name rebound to 127.0.0.1 by another site gets nothing
            assert status_code(url + "api/status", headers={"Host": "rebind.evil.example"}) \
                == 400
            # releasing a run that holds nothing there says so, and changes nothing
            assert status_code(url + "api/actions/release", data={"queue": "dq",
                               "kind": "partition", "task_id": waiter.id},
                               headers={"X-Ckeys-Action": "1"}) == 409
            assert status_code(url + "api/actions/pause", data=_deep(5000),
                               headers={"X-Ckeys-Action": "1"}) == 400
            assert limits.paused(app, "dq") == {"queue": False, "keys": []}
            done = get(url + "api/actions/pause", data={"queue": "dq"},
                       headers={"X-Ckeys-Action": "1"})
            assert done == {"paused": "dq", "key": None} and limits.paused(app, "dq")["queue"]
            get(url + "api/actions/resume", data={"queue": "dq"}, headers={"X-Ckeys-Action": "1"})
            assert not limits.paused(app, "dq")["queue"]
            get(url + "api/actions/limit", data={"queue": "dq", "limit": "2"},
                headers={"X-Ckeys-Action": "1"})
            assert limits.get_limits(app, "dq")["recorded"] == 2
            get(url + "api/actions/limit", data={"queue": "dq", "limit": ""},
                headers={"X-Ckeys-Action": "1"})
            assert limits.get_limits(app, "dq")["recorded"] is None
    finally:
        finish(env, app, holders, waiter)


def _deep(depth: int) -> str:
    """A JSON object nested ``depth`` deep (too deep for the server's parser)."""
    return '{"queue": ' * depth + "{}" + "}" * depth


def chromium() -> Any:
    if not (CHROMIUM and CHROMEDRIVER):
        pytest.skip("no Chromium: apt-get install chromium chromium-driver to run the browser"
                    " test of the dashboard")
    webdriver = pytest.importorskip("selenium.webdriver")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--window-size=1400,1000"):
        options.add_argument(arg)
    service = webdriver.ChromeService(executable_path=CHROMEDRIVER)  # no selenium-manager
    return webdriver.Chrome(options=options, service=service)


def test_the_page_in_a_real_browser(env: Env, tmp_path: Path) -> None:
    from selenium.common.exceptions import StaleElementReferenceException
    from selenium.webdriver.common.by import By

    browser = chromium()
    app, holders, waiter = start_holder_and_waiter(env)
    # the dashboard reaches Redis as an ACL user with a password, which the page must hide
    env.redis.execute_command("ACL", "SETUSER", "dash", "on", f">{REDIS_PASSWORD}", "~*", "&*",
                              "+@all")
    coordination = env.redis_url.replace("redis://", f"redis://dash:{REDIS_PASSWORD}@", 1)
    try:
        with dashboard(env, "--basic-auth", f"{USER}:{PASSWORD}", "--allow-actions",
                       redis_url=coordination) as url:
            browser.execute_cdp_cmd("Network.enable", {})
            browser.execute_cdp_cmd("Network.setExtraHTTPHeaders",
                                    {"headers": {"Authorization": AUTH}})
            browser.get(url)

            def rows(css: str) -> list[Any]:
                return browser.find_elements(By.CSS_SELECTOR, css)

            def text_of(css: str) -> str:
                try:
                    return " ".join(e.text for e in rows(css))
                except StaleElementReferenceException:  # the page refreshed under us
                    return ""

            def click(css: str) -> None:  # in one script: no element goes stale meanwhile
                browser.execute_script("document.querySelector(arguments[0]).click()", css)

            # a holder appears with its task name; the waiting run shows its position
            wait_until(lambda: "ckt.hold_until" in text_of("#live tr.holder .task-name"),
                       timeout=30, message="the holder is listed with its task name")
            wait_until(lambda: text_of(f'tr.parked[data-task-id="{waiter.id}"] .position')
                       == "1", timeout=30, message="the parked run is listed at position 1")
            cells = browser.execute_script(
                "return [...document.querySelectorAll(arguments[0])].map(c => c.innerText.trim())",
                'tr.queue[data-queue="dq"] td')
            assert cells[:6] == ["dq", "2", "1 per key", "-", "-", "1"], cells
            wait_until(lambda: rows('svg.chart[data-queue="dq"] polyline.running'), timeout=30,
                       message="the chart of queue dq is drawn")
            # the tag filter narrows the list
            assert rows('section.slot[data-slot="queue dq [bob]"]')
            browser.find_element(By.ID, "tag").send_keys("team-a")
            browser.find_element(By.CSS_SELECTOR, "#tag-form button").click()
            wait_until(lambda: not rows('section.slot[data-slot="queue dq [bob]"]')
                       and rows('section.slot[data-slot="queue dq [acme]"]'), timeout=30,
                       message="the tag filter hides bob's partition")
            # the explain box answers
            browser.find_element(By.ID, "task-id").send_keys(waiter.id)
            browser.find_element(By.CSS_SELECTOR, "#explain-form button").click()
            wait_until(lambda: "parked in the line of queue dq [acme]"
                       in browser.find_element(By.ID, "explain").text, timeout=30,
                       message="explain says where the run waits")
            browser.save_screenshot(str(tmp_path / "dashboard.png"))
            if os.environ.get("CKEYS_UPDATE_SCREENSHOT"):
                SCREENSHOT.parent.mkdir(exist_ok=True)
                browser.save_screenshot(str(SCREENSHOT))
            # no password in the page source: neither the dashboard's nor Redis's
            source = browser.page_source
            assert PASSWORD not in source and REDIS_PASSWORD not in source
            assert f"on {where(coordination)}" in source and "dash:" not in source
            # an action asks first, then acts
            click('tr.queue[data-queue="dq"] button[data-action="pause"]')
            wait_until(lambda: _alert(browser), timeout=10, message="pause asks for confirmation")
            browser.switch_to.alert.dismiss()
            assert not limits.paused(app, "dq")["queue"]
            click('tr.queue[data-queue="dq"] button[data-action="pause"]')
            wait_until(lambda: _alert(browser), timeout=10, message="pause asks again")
            browser.switch_to.alert.accept()
            wait_until(lambda: limits.paused(app, "dq")["queue"], timeout=30,
                       message="the confirmed pause is recorded")
            wait_until(lambda: "paused" in text_of('tr.queue[data-queue="dq"]'), timeout=30,
                       message="the page shows the queue paused")
    finally:
        browser.quit()
        finish(env, app, holders, waiter)


def _alert(browser: Any) -> bool:
    from selenium.common.exceptions import NoAlertPresentException

    try:
        browser.switch_to.alert  # noqa: B018 - raises while there is no dialog
    except NoAlertPresentException:
        return False
    return True


def test_the_charts_stay_in_their_box_and_span_the_history_kept() -> None:
    from celery_ckeys.dashboard.snapshot import HISTORY_SECONDS, Chart, charts

    now = 10_000.0
    history = [(now - 30 + i, {"q": (i % 4, 3 - i % 4)}) for i in range(31)]
    (chart,) = charts(history, now, ["q"])
    points = [tuple(map(float, p.split(","))) for p in chart.running.split()]
    assert len(points) == 31 and chart.peak == 3
    assert points[0][0] == 0.0 and points[-1][0] == Chart.width  # the first sample on the left
    assert all(0 <= x <= Chart.width and 0 <= y <= Chart.height for x, y in points)
    old = [(now - 2 * HISTORY_SECONDS, {"q": (5, 5)}), *history]
    assert charts(old, now, ["q"])[0].peak == 3  # older than the window: not drawn
    (idle,) = charts([], now, ["q"])
    assert idle.running == "" and idle.peak == 1
