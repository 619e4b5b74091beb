"""Waiting on a child without holding slots (SPEC 4.8)."""

from __future__ import annotations

from typing import Any, Optional

from .errors import WaitError


def wait_for(target: Any, timeout: Optional[float] = None, *, task: Any = None) -> Any:
    raise WaitError("wait_for is not implemented yet")
