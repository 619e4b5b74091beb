"""``celery -A proj ckeys``: operate celery_ckeys from the command line.

    celery -A proj ckeys status [--tag TAG] [--all] [--json | --watch SECONDS]
    celery -A proj ckeys exporter [--port 9808] [--address 127.0.0.1]
    celery -A proj ckeys dashboard [--port 5566] [--address 127.0.0.1] [--basic-auth U:P]
                                   [--allow-actions]
    celery -A proj ckeys explain TASK_ID [--json]
    celery -A proj ckeys release KEY [--yes]
    celery -A proj ckeys release --queue QUEUE [--key KEY] [--yes]
    celery -A proj ckeys limits get [QUEUE ...] [--json]
    celery -A proj ckeys limits set QUEUE LIMIT
    celery -A proj ckeys limits set QUEUE --clear
    celery -A proj ckeys limits set QUEUE --key KEY --weight N
    celery -A proj ckeys pause QUEUE [--key KEY]
    celery -A proj ckeys resume QUEUE [--key KEY]

Tables for people by default, ``--json`` for scripts. Registered through the
``celery.commands`` entry point, so ``celery`` finds it once the package is installed.
"""

from __future__ import annotations

import json
import time
from typing import Any, Optional

import click
from celery.bin.base import CeleryCommand, handle_preload_options

from . import introspect
from . import limits as limits_api
from . import release as release_api
from .config import get_config
from .errors import CkeysError
from .introspect import SlotStatus, age_text, declared_queues
from .naming import parse_tag
from .redaction import redact
from .store import Store


def _app(ctx: click.Context) -> Any:
    return ctx.obj.app


def _store(ctx: click.Context) -> Store:
    from .gate import store_of

    return store_of(_app(ctx))


def _table(rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _fail(exc: BaseException) -> None:
    raise click.ClickException(redact(str(exc)))


@click.group(name="ckeys")
@click.pass_context
@handle_preload_options
def ckeys(ctx: click.Context, **_: Any) -> None:
    """Inspect and operate concurrency keys, queues and limits."""


@ckeys.command(cls=CeleryCommand)
@click.option("--tag", help="only slots where a run carries this tag")
@click.option("--all", "show_all", is_flag=True, help="also list idle queues with a recorded limit")
@click.option("--json", "as_json", is_flag=True, help="machine-readable output")
@click.option("--watch", type=float, default=None, metavar="SECONDS",
              help="redraw the table in place every SECONDS until interrupted")
@click.pass_context
def status(ctx: click.Context, tag: Optional[str], show_all: bool, as_json: bool,
           watch: Optional[float]) -> None:
    """Each queue, partition and key in use: limit, holders, waiting and deferred runs."""
    if watch is not None:
        if watch <= 0 or as_json:
            raise click.UsageError("--watch takes a positive number of seconds, and no --json")
        try:
            while True:
                click.clear()
                _print_status(ctx, tag, show_all)
                click.echo(f"\n(every {watch:g} s; Ctrl-C to stop)")
                time.sleep(watch)
        except KeyboardInterrupt:
            return
    _print_status(ctx, tag, show_all, as_json=as_json)


def _print_status(ctx: click.Context, tag: Optional[str], show_all: bool,
                  as_json: bool = False) -> None:
    try:
        slots = _status(ctx, tag, show_all)
    except CkeysError as exc:
        _fail(exc)
        return
    if as_json:
        click.echo(json.dumps([s.as_dict() for s in slots], indent=2))
        return
    config = get_config(_app(ctx))
    click.echo(f"namespace {config.namespace} on {config.safe_url()}")
    if not slots:
        click.echo("nothing holds, waits or is deferred")
        return
    rows = [["SLOT", "LIMIT", "RUNNING", "WAITING", "DEFERRED", "PARKED", "OLDEST WAIT"]]
    for s in slots:
        limit = "paused" if s.paused else "-" if s.limit is None else str(s.limit)
        rows.append([s.label, limit, str(len(s.holders)),
                     str(len(s.waiting)), str(len(s.deferred)), str(len(s.parked)),
                     age_text(s.oldest_wait_seconds)])
    click.echo(_table(rows))
    for s in slots:
        if s.error:
            click.echo(f"{s.label}: {s.error}")
    holders = [(s, h) for s in slots for h in s.holders]
    if holders:
        click.echo("")
        rows = [["SLOT", "TASK ID", "TASK", "AGE", "WORKER", "TAGS"]]
        for s, h in holders:
            rows.append([s.label, h.task_id, h.task_name, age_text(h.held_seconds),
                         f"{h.worker} (pid {h.pid})" if h.pid else h.worker, ",".join(h.tags)])
        click.echo(_table(rows))
    line = [(s, p) for s in slots for p in s.parked]
    if line:
        click.echo("")
        rows = [["LINE OF", "#", "TASK ID", "TASK", "KEY", "PRIORITY", "WAITING"]]
        for s, p in line:
            rows.append([s.label, "woken" if p.woken else str(p.position), p.task_id, p.task_name,
                         p.key or "-", str(p.priority), age_text(p.parked_seconds)])
        click.echo(_table(rows))


@ckeys.command(cls=CeleryCommand)
@click.option("--port", type=int, default=9808, show_default=True)
@click.option("--address", default="127.0.0.1", show_default=True,
              help="the address to bind (loopback unless you say otherwise)")
@click.pass_context
def exporter(ctx: click.Context, port: int, address: str) -> None:
    """Serve per-queue and per-partition gauges for Prometheus at /metrics (reads Redis)."""
    from .exporter import serve_forever

    app = _app(ctx)
    click.echo(f"serving ckeys_slot_* gauges of namespace {get_config(app).namespace} on"
               f" http://{address}:{port}/metrics")
    try:
        serve_forever(app, port, address)
    except CkeysError as exc:
        _fail(exc)


@ckeys.command(cls=CeleryCommand)
@click.option("--port", type=int, default=5566, show_default=True)
@click.option("--address", default="127.0.0.1", show_default=True,
              help="the address to bind; anything but loopback needs --basic-auth")
@click.option("--basic-auth", envvar="CKEYS_DASHBOARD_AUTH", metavar="USER:PASSWORD",
              help="ask every request for these credentials (or set CKEYS_DASHBOARD_AUTH)")
@click.option("--allow-actions", is_flag=True,
              help="offer release, pause, resume and set limit (each confirmed and logged)")
@click.option("--interval", type=float, default=2.0, show_default=True,
              help="seconds between two reads of Redis")
@click.option("--allowed-host", "allowed_hosts", multiple=True, metavar="NAME",
              help="without --basic-auth, a host name besides loopback the page may be"
                   " called by (repeatable)")
@click.pass_context
def dashboard(ctx: click.Context, port: int, address: str, basic_auth: Optional[str],
              allow_actions: bool, interval: float, allowed_hosts: tuple[str, ...]) -> None:
    """Serve a live web page of every queue, partition and key (reads Redis)."""
    from .dashboard import serve

    app = _app(ctx)
    click.echo(f"serving the dashboard of namespace {get_config(app).namespace} on"
               f" http://{address}:{port}/" + (" (actions allowed)" if allow_actions else ""))
    try:
        serve(app, port=port, address=address, allow_actions=allow_actions,
              basic_auth=basic_auth, interval=interval, allowed_hosts=allowed_hosts)
    except CkeysError as exc:
        _fail(exc)


def _status(ctx: click.Context, tag: Optional[str], show_all: bool) -> list[SlotStatus]:
    return introspect.status(_app(ctx), tag=tag, include_idle=show_all)


@ckeys.command(name="explain", cls=CeleryCommand)
@click.argument("task_id")
@click.option("--json", "as_json", is_flag=True, help="machine-readable output")
@click.pass_context
def explain_cmd(ctx: click.Context, task_id: str, as_json: bool) -> None:
    """Why a run is not running: which slot blocks it and who holds that slot."""
    try:
        why = introspect.explain(_app(ctx), task_id)
    except CkeysError as exc:
        _fail(exc)
        return
    if as_json:
        click.echo(json.dumps(why.as_dict(), indent=2))
        return
    click.echo(f"{task_id}: {why.state}")
    click.echo(f"  {why.detail}")
    for h in why.holders:
        click.echo(f"  holder {h.task_id} {h.task_name} for {age_text(h.held_seconds)} on {h.worker}")


@ckeys.command(cls=CeleryCommand)
@click.argument("key", required=False)
@click.option("--queue", help="release the holders of this queue (and of all its partitions)")
@click.option("--key", "partition_key", help="with --queue: only this key's partition")
@click.option("--yes", "-y", is_flag=True, help="do not ask for confirmation")
@click.option("--json", "as_json", is_flag=True, help="machine-readable output")
@click.pass_context
def release(ctx: click.Context, key: Optional[str], queue: Optional[str],
            partition_key: Optional[str], yes: bool, as_json: bool) -> None:
    """Force-release a key, a queue or a partition (for administrators).

    The runs holding them keep executing; they are told their lease is lost when they
    next renew it. Use this to unstick slots whose holder you know is gone.
    """
    app = _app(ctx)
    if (key is None) == (queue is None):
        raise click.UsageError("give either KEY or --queue QUEUE")
    try:
        owners = release_api.held(app, key, queue=queue, partition_key=partition_key)
    except CkeysError as exc:
        _fail(exc)
        return
    if not owners:
        if as_json:
            click.echo(json.dumps({"released": []}))
        else:
            click.echo("nothing to release: no run holds it")
        return
    if not yes:
        listing = "\n".join(f"  {_label(t)}: {o}" for t, o in owners)
        click.confirm(f"Force-release {len(owners)} slot(s)?\n{listing}\n", abort=True)
    released = release_api.force_release(app, owners)
    if as_json:
        click.echo(json.dumps({"released": released}))
    else:
        for item in released:
            click.echo(f"released {item['slot']} held by {item['task_id']}")


def _label(tag: str) -> str:
    parsed = parse_tag(tag)
    return parsed.label if parsed else tag


def _pause_or_resume(ctx: click.Context, queue: str, key: Optional[str], pausing: bool) -> None:
    app = _app(ctx)
    try:
        if pausing:
            limits_api.pause(app, queue, key=key)
        else:
            limits_api.resume(app, queue, key=key)
    except CkeysError as exc:
        _fail(exc)
        return
    what = f"queue {queue}" + (f" [{key}]" if key is not None else "")
    click.echo(f"{what}: {'paused' if pausing else 'resumed'}")


@ckeys.command(cls=CeleryCommand)
@click.argument("queue")
@click.option("--key", help="pause only this key's partition")
@click.pass_context
def pause(ctx: click.Context, queue: str, key: Optional[str]) -> None:
    """Start nothing new of QUEUE (or of KEY's partition) until resumed; running runs finish,
    waiting runs keep their places. Kept in Redis: it outlives worker restarts."""
    _pause_or_resume(ctx, queue, key, True)


@ckeys.command(cls=CeleryCommand)
@click.argument("queue")
@click.option("--key", help="resume only this key's partition")
@click.pass_context
def resume(ctx: click.Context, queue: str, key: Optional[str]) -> None:
    """Undo pause; the runs waiting in QUEUE's lines are woken now."""
    _pause_or_resume(ctx, queue, key, False)


@ckeys.group()
def limits() -> None:
    """Read or set queue limits (kept centrally in Redis)."""


@limits.command(name="get", cls=CeleryCommand)
@click.argument("queues", nargs=-1)
@click.option("--json", "as_json", is_flag=True, help="machine-readable output")
@click.pass_context
def limits_get(ctx: click.Context, queues: tuple[str, ...], as_json: bool) -> None:
    """The limit of each queue: recorded, declared in code, and the one that applies; and
    each key with a limit of its own."""
    app = _app(ctx)
    store = _store(ctx)
    config = store.config
    try:
        names = list(queues) or sorted(set(declared_queues(app)) | set(store.recorded_limits())
                                       | set(store.queues_with_key_limits()))
        rows_data = [limits_api.get_limits(app, name) for name in names]
    except CkeysError as exc:
        _fail(exc)
        return
    if as_json:
        click.echo(json.dumps({"environment_limit": config.environment_limit,
                               "burst_limit": config.environment_burst_limit, "queues": rows_data},
                              indent=2))
        return
    click.echo(f"environment limit: {config.environment_limit or 'none'}"
               f" (burst to {config.environment_burst_limit or 'unbounded'})")
    if not rows_data:
        click.echo("no queue has a limit")
        return
    rows = [["QUEUE", "RECORDED", "DECLARED", "APPLIES"]]
    for r in rows_data:
        rows.append([r["queue"], _opt(r["recorded"]), _opt(r["declared"]), _opt(r["effective"])])
        total = r["total"]
        if total["effective"] is not None:
            rows.append(["  (total)", _opt(total["recorded"]), _opt(total["declared"]),
                         _opt(total["effective"])])
        for key, own in r["keys"].items():
            rows.append([f"  [{key}]", str(own["recorded"]), "-", _opt(own["effective"])])
        for key, weight in r["weights"].items():
            rows.append([f"  [{key}] weight", _opt(weight["recorded"]), _opt(weight["declared"]),
                         str(weight["effective"])])
    click.echo(_table(rows))


def _opt(value: Optional[int]) -> str:
    return "-" if value is None else str(value)


@limits.command(name="set", cls=CeleryCommand)
@click.argument("queue")
@click.argument("limit", type=int, required=False)
@click.option("--key", help="the limit (or weight) of this key alone (before the queue's)")
@click.option("--clear", is_flag=True, help="forget the recorded limit (the next rule applies)")
@click.option("--total", type=int, help="the queue's total_limit: all its keys together")
@click.option("--clear-total", is_flag=True, help="forget the recorded total_limit")
@click.option("--weight", type=int, help="with --key: its turns a round in the fair lines")
@click.option("--clear-weight", is_flag=True, help="with --key: forget its recorded weight")
@click.option("--rate", help="at most N starts per window, per partition: 10/s, 100/m, 5/h")
@click.option("--clear-rate", is_flag=True, help="forget the recorded rate")
@click.pass_context
def limits_set(ctx: click.Context, queue: str, limit: Optional[int], key: Optional[str],
               clear: bool, total: Optional[int], clear_total: bool, weight: Optional[int],
               clear_weight: bool, rate: Optional[str], clear_rate: bool) -> None:
    """Record QUEUE's limit (or KEY's), its total, or KEY's weight; it applies to runs that
    start (or wait) from now on."""
    app = _app(ctx)
    actions = [limit is not None, clear, total is not None, clear_total, weight is not None,
               clear_weight, rate is not None, clear_rate]
    if sum(actions) != 1:
        raise click.UsageError("give one of LIMIT, --clear, --total N, --clear-total,"
                               " --weight N, --clear-weight, --rate R, --clear-rate")
    weights = weight is not None or clear_weight
    totals = total is not None or clear_total
    rates = rate is not None or clear_rate
    if (totals or rates) and key is not None:
        raise click.UsageError("--total, --rate and their --clear-* take no --key")
    if weights and key is None:
        raise click.UsageError("--weight and --clear-weight need --key")
    what = f"queue {queue}" + (f" [{key}]" if key is not None else "")
    try:
        if rate is not None:
            limits_api.set_rate(app, queue, rate)
        elif clear_rate:
            limits_api.clear_rate(app, queue)
        elif total is not None:
            limits_api.set_total(app, queue, total)
        elif clear_total:
            limits_api.clear_total(app, queue)
        elif weight is not None and key is not None:
            limits_api.set_weight(app, queue, key, weight)
        elif clear_weight and key is not None:
            limits_api.clear_weight(app, queue, key)
        elif limit is not None:
            limits_api.set_limit(app, queue, limit, key=key)
        else:
            limits_api.clear_limit(app, queue, key=key)
        said = (f"rate {rate if rate is not None else 'cleared'}" if rates else
                f"total limit {total if total is not None else 'cleared'}" if totals else
                f"weight {weight if weight is not None else 'cleared'}" if weights else
                f"limit {limit if limit is not None else 'cleared'}")
    except CkeysError as exc:
        _fail(exc)
        return
    click.echo(f"{what}: {said}")
