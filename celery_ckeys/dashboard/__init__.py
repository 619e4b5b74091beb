"""``celery -A proj ckeys dashboard``: a live web page of every queue, partition and key.

``pip install 'celery-ckeys[dashboard]'`` (Starlette, uvicorn, Jinja2). The page reads
Redis only, like ``celery ckeys status``: one snapshot every ``--interval`` seconds, shared
by all browsers. It binds to loopback unless told otherwise, and then only with
``--basic-auth``. Actions (release, pause, resume, set a limit) exist only with
``--allow-actions``; each asks for confirmation in the browser and is logged.

Routes: ``/`` (the page), ``/live`` (the part the page refreshes), ``/api/status``,
``/api/explain?task_id=``, ``POST /api/actions/{release,pause,resume,limit}``.
"""

from __future__ import annotations

import logging
import re
import time
from contextlib import asynccontextmanager
from dataclasses import asdict
from pathlib import Path
from typing import Any, AsyncIterator, Optional

from ..config import get_config
from ..errors import CkeysError, ConfigurationError, describe
from ..redaction import redact
from .guard import (
    LOOPBACK_HOSTS,
    check_address,
    check_basic_auth,
    check_interval,
    same_origin,
    where,
    with_basic_auth,
    with_headers,
)
from .snapshot import HISTORY_SECONDS, Sampler, charts

log = logging.getLogger("celery_ckeys.dashboard")
HERE = Path(__file__).parent
#: a browser sends this header only from a script on the page itself, never from a form on
#: another site, so an action cannot be triggered across sites (no CSRF token needed)
ACTION_HEADER = "x-ckeys-action"
ACTIONS = ("release", "pause", "resume", "limit")


def create_app(celery_app: Any, *, allow_actions: bool = False,
               basic_auth: Optional[tuple[str, str]] = None, interval: float = 2.0,
               allowed_hosts: tuple[str, ...] = ()) -> Any:
    """The ASGI application (Starlette) serving the dashboard of ``celery_app``.

    Without ``basic_auth`` it answers only requests addressed to a loopback name (or one of
    ``allowed_hosts``), so a page of another site rebound to 127.0.0.1 gets nothing."""
    try:
        from starlette.applications import Starlette
        from starlette.concurrency import run_in_threadpool
        from starlette.middleware import Middleware
        from starlette.middleware.trustedhost import TrustedHostMiddleware
        from starlette.requests import Request
        from starlette.responses import JSONResponse, Response
        from starlette.routing import Mount, Route
        from starlette.staticfiles import StaticFiles
        from starlette.templating import Jinja2Templates
    except ImportError:
        raise ConfigurationError(
            "celery ckeys dashboard needs its extra: pip install 'celery-ckeys[dashboard]'",
            setting="dashboard") from None
    from .. import introspect, limits
    from .. import release as release_api

    sampler = Sampler(celery_app, interval=interval)
    templates = Jinja2Templates(directory=str(HERE / "templates"))
    templates.env.filters["age"] = introspect.age_text
    namespace = get_config(celery_app).namespace
    redis_url = where(get_config(celery_app).redis_url)

    def context(request: Request) -> dict[str, Any]:
        snap = sampler.latest()
        tag = request.query_params.get("tag") or None
        return {"snap": snap, "slots": snap.filtered(tag), "tag": tag or "",
                "charts": charts(sampler.history(), time.time(), [q.name for q in snap.queues]),
                "actions": allow_actions, "namespace": namespace, "redis_url": redis_url,
                "interval": interval,
                "history_minutes": int(HISTORY_SECONDS // 60)}

    async def page(request: Request) -> Response:
        got = await run_in_threadpool(context, request)
        return templates.TemplateResponse(request, "page.html", got)

    async def live(request: Request) -> Response:
        got = await run_in_threadpool(context, request)
        return templates.TemplateResponse(request, "live.html", got)

    async def api_status(request: Request) -> Response:
        snap = await run_in_threadpool(sampler.latest)
        tag = request.query_params.get("tag") or None
        return JSONResponse({"taken": snap.taken, "error": snap.error,
                             "queues": [asdict(q) for q in snap.queues],
                             "slots": [s.as_dict() for s in snap.filtered(tag)]})

    async def api_explain(request: Request) -> Response:
        task_id = request.query_params.get("task_id", "").strip()
        if not task_id:
            return JSONResponse({"error": "give a task id"}, status_code=400)
        try:
            why = await run_in_threadpool(introspect.explain, celery_app, task_id)
        except Exception as exc:  # Redis down: say so on the page
            return JSONResponse({"error": redact(str(exc))}, status_code=503)
        return JSONResponse(why.as_dict())

    def act(name: str, body: dict[str, Any]) -> dict[str, Any]:
        queue: Any = body.get("queue")  # checked by limits/release, as from the CLI
        key: Any = body.get("key")
        if name == "pause":
            limits.pause(celery_app, queue, key=key)
            return {"paused": queue, "key": key}
        if name == "resume":
            limits.resume(celery_app, queue, key=key)
            return {"resumed": queue, "key": key}
        if name == "limit":
            if body.get("limit") in (None, ""):
                limits.clear_limit(celery_app, queue, key=key)
            else:
                limits.set_limit(celery_app, queue, _int(body["limit"]), key=key)
            return {"queue": queue, "key": key, "limit": body.get("limit")}
        # release: the run's holds on this queue (all its slots there) or on this key
        task_id = str(body.get("task_id") or "")
        if body.get("kind") == "key":
            owners = release_api.held(celery_app, key)
        else:
            owners = release_api.held(celery_app, queue=queue)
        mine = [(t, o) for t, o in owners if o == task_id]
        if not mine:
            where_ = f"key {key}" if body.get("kind") == "key" else f"queue {queue}"
            raise LookupError(f"{task_id} holds nothing on {where_} (any more)")
        return {"released": release_api.force_release(celery_app, mine)}

    async def action(request: Request) -> Response:
        name = request.path_params["name"]
        if name not in ACTIONS:
            return JSONResponse({"error": f"no action {name!r}"}, status_code=404)
        if not allow_actions:
            return JSONResponse({"error": "actions are off: start the dashboard with"
                                          " --allow-actions"}, status_code=403)
        if request.headers.get(ACTION_HEADER) != "1":
            return JSONResponse({"error": f"missing the {ACTION_HEADER} header"},
                                status_code=400)
        if request.headers.get("sec-fetch-site", "same-origin") != "same-origin" or \
                not same_origin(request.headers.get("origin"), request.headers.get("host")):
            return JSONResponse({"error": "actions come from the dashboard's own page only"},
                                status_code=403)
        try:
            body = await request.json()
        except (ValueError, RecursionError):
            return JSONResponse({"error": "the body is not JSON"}, status_code=400)
        if not isinstance(body, dict):
            return JSONResponse({"error": "the body is not a JSON object"}, status_code=400)
        who = request.scope.get("ckeys_user") or "-"
        client = request.client.host if request.client else "-"
        try:
            done = await run_in_threadpool(act, name, body)
        except (CkeysError, ValueError, TypeError, LookupError) as exc:
            log.warning("dashboard action %s %s by %s from %s refused: %s",
                        name, body, who, client, exc)
            return JSONResponse({"error": redact(str(exc))},
                                status_code=409 if isinstance(exc, LookupError) else 400)
        except Exception as exc:  # Redis down...: the page says so, the log has it
            log.exception("dashboard action %s %s by %s from %s failed", name, body, who, client)
            return JSONResponse({"error": describe(exc)},
                                status_code=503)
        log.warning("dashboard action %s %s by %s from %s: %s", name, body, who, client, done)
        await run_in_threadpool(sampler.refresh)
        return JSONResponse(done)

    @asynccontextmanager
    async def lifespan(_: Any) -> AsyncIterator[None]:
        sampler.start()
        yield
        sampler.stop()

    web = Starlette(routes=[
        Route("/", page),
        Route("/live", live),
        Route("/api/status", api_status),
        Route("/api/explain", api_explain),
        Route("/api/actions/{name}", action, methods=["POST"]),
        Mount("/static", StaticFiles(directory=str(HERE / "static")), name="static"),
    ], lifespan=lifespan, middleware=[] if basic_auth is not None else [
        Middleware(TrustedHostMiddleware, allowed_hosts=[*LOOPBACK_HOSTS, *allowed_hosts])])
    return with_headers(web if basic_auth is None else with_basic_auth(web, basic_auth))


def _int(value: Any) -> int:
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if isinstance(value, str) and re.fullmatch(r"[0-9]{1,9}", value.strip()):
        return int(value)
    raise ValueError(f"a limit is a whole number written in digits, not {value!r}")


def serve(celery_app: Any, *, port: int = 5566, address: str = "127.0.0.1",
          allow_actions: bool = False, basic_auth: Optional[str] = None,
          interval: float = 2.0, allowed_hosts: tuple[str, ...] = ()) -> None:
    """Serve the dashboard with uvicorn until the process is stopped."""
    auth = check_basic_auth(basic_auth)
    check_address(address, auth)
    web = create_app(celery_app, allow_actions=allow_actions, basic_auth=auth,
                     interval=check_interval(interval),
                     allowed_hosts=(*allowed_hosts, address))
    import uvicorn

    uvicorn.run(web, host=address, port=port, log_level="warning")
