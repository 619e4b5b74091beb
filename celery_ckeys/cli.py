"""``celery -A proj ckeys``: operate celery_ckeys from the command line."""

from __future__ import annotations

from typing import Any

import click
from celery.bin.base import handle_preload_options


@click.group(name="ckeys", cls=click.Group)
@click.pass_context
@handle_preload_options
def ckeys(ctx: Any) -> None:
    """Inspect and operate concurrency keys, queues and limits."""
