"""The ``ckeys_*`` settings, read once per app into one validated object.

Every setting is documented in the README's settings table; keep the two in step.
"""

from __future__ import annotations

import math
import weakref
from dataclasses import dataclass, field
from typing import Any, Mapping, Optional

from .errors import ConfigurationError
from .redaction import redact

DEFERRAL_MODES = ("countdown", "handoff")
REDIS_SCHEMES = ("redis://", "rediss://", "unix://", "sentinel://", "sentinels://")
MAX_NAMESPACE_LENGTH = 128

_UNSET = object()


@dataclass(frozen=True)
class CkeysConfig:
    redis_url: str
    namespace: str
    retry_countdown: float = 10.0
    retry_jitter: float = 0.0
    lock_ttl: float = 300.0
    environment_limit: Optional[int] = None
    burst_factor: float = 2.0
    deferral: str = "countdown"
    redis_cluster: bool = False
    redis_transport_options: Mapping[str, Any] = field(default_factory=dict, hash=False)
    tune_worker: bool = True
    eta_task_limit: Optional[int] = 1000
    socket_timeout: float = 5.0
    wait_poll_interval: float = 0.25
    starvation_grace: float = 3.0
    metrics: bool = False
    handoff_claim_timeout: float = 2.0
    handoff_copy_ttl: float = 3600.0

    @property
    def environment_burst_limit(self) -> Optional[int]:
        """``floor(L x B)``: how many keyed runs the namespace may execute at once."""
        if self.environment_limit is None:
            return None
        return max(1, math.floor(self.environment_limit * self.burst_factor))

    @property
    def lock_ttl_ms(self) -> int:
        return int(self.lock_ttl * 1000)

    @property
    def claim_window_ms(self) -> int:
        """How long a woken parked run may take to arrive before it is published again."""
        return int(self.handoff_claim_timeout * 1000)

    @property
    def copy_ttl_ms(self) -> int:
        """How long a copy of a woken run may live: it expires (Celery discards it and the
        run is woken again), and a finished run's copies are recognised for this long."""
        return int(self.handoff_copy_ttl * 1000)

    @property
    def deferral_memory_ms(self) -> int:
        """How long a deferred run stays listed in ``status`` without being seen again."""
        return int((self.retry_countdown * 3 + 60) * 1000)

    def safe_url(self) -> str:
        return redact(self.redis_url)


_cache: weakref.WeakKeyDictionary[Any, CkeysConfig] = weakref.WeakKeyDictionary()


def get_config(app: Any) -> CkeysConfig:
    """The app's config, built and validated on first use and cached per app."""
    try:
        return _cache[app]
    except KeyError:
        pass
    config = from_conf(app.conf, default_namespace=app.main or "celery")
    _cache[app] = config
    return config


def _get(conf: Mapping[str, Any], name: str) -> Any:
    try:
        return conf[name]
    except KeyError:
        return _UNSET


def _number(conf: Mapping[str, Any], name: str, default: float, *, minimum: float,
            strict: bool = False, maximum: Optional[float] = None) -> float:
    value = _get(conf, name)
    if value is _UNSET or value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value):
        raise ConfigurationError(
            f"{name} must be a number, got {value!r}", setting=name, value=value)
    too_small = value <= minimum if strict else value < minimum
    if too_small:
        bound = f"greater than {minimum:g}" if strict else f"at least {minimum:g}"
        raise ConfigurationError(f"{name} must be {bound}, got {value!r}", setting=name, value=value)
    if maximum is not None and value > maximum:
        raise ConfigurationError(
            f"{name} must be at most {maximum:g}, got {value!r}", setting=name, value=value)
    return float(value)


def _optional_positive_int(conf: Mapping[str, Any], name: str, default: Optional[int]) -> Optional[int]:
    value = _get(conf, name)
    if value is _UNSET:
        return default
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigurationError(
            f"{name} must be a positive integer or None, got {value!r}", setting=name, value=value)
    return value


def _bool(conf: Mapping[str, Any], name: str, default: bool) -> bool:
    value = _get(conf, name)
    if value is _UNSET or value is None:
        return default
    if not isinstance(value, bool):
        raise ConfigurationError(f"{name} must be True or False, got {value!r}", setting=name, value=value)
    return value


def _redis_url(conf: Mapping[str, Any]) -> str:
    value = _get(conf, "ckeys_redis_url")
    if value is not _UNSET and value is not None:
        if not isinstance(value, str) or not value.startswith(REDIS_SCHEMES):
            shown = redact(value) if isinstance(value, str) else repr(value)
            raise ConfigurationError(
                f"ckeys_redis_url must be a URL starting with one of {', '.join(REDIS_SCHEMES)};"
                f" got {shown}", setting="ckeys_redis_url")
        return value
    broker = _get(conf, "broker_url")
    if isinstance(broker, (list, tuple)):
        broker = broker[0] if broker else None
    if isinstance(broker, str):
        first = broker.split(";")[0].strip()
        if first.startswith(REDIS_SCHEMES):
            return first
    raise ConfigurationError(
        "ckeys_redis_url is required when the broker is not a Redis URL", setting="ckeys_redis_url")


def from_conf(conf: Mapping[str, Any], *, default_namespace: str) -> CkeysConfig:
    """Validate every ``ckeys_*`` setting; raise ``ConfigurationError`` naming the bad one."""
    namespace = _get(conf, "ckeys_namespace")
    if namespace is _UNSET or namespace is None:
        namespace = default_namespace
    if not isinstance(namespace, str) or not namespace or len(namespace) > MAX_NAMESPACE_LENGTH:
        raise ConfigurationError(
            f"ckeys_namespace must be a non-empty str of at most {MAX_NAMESPACE_LENGTH} characters,"
            f" got {namespace!r}", setting="ckeys_namespace", value=namespace)

    deferral = _get(conf, "ckeys_deferral")
    if deferral is _UNSET or deferral is None:
        deferral = "countdown"
    if deferral not in DEFERRAL_MODES:
        raise ConfigurationError(
            f"ckeys_deferral must be one of {DEFERRAL_MODES}, got {deferral!r}",
            setting="ckeys_deferral", value=deferral)

    options = _get(conf, "ckeys_redis_transport_options")
    if options is _UNSET or options is None:
        options = {}
    if not isinstance(options, Mapping):
        raise ConfigurationError(
            f"ckeys_redis_transport_options must be a dict, got {type(options).__name__}",
            setting="ckeys_redis_transport_options")

    return CkeysConfig(
        redis_url=_redis_url(conf),
        namespace=namespace,
        retry_countdown=_number(conf, "ckeys_retry_countdown", 10.0, minimum=0, strict=True),
        retry_jitter=_number(conf, "ckeys_retry_jitter", 0.0, minimum=0, maximum=1),
        lock_ttl=_number(conf, "ckeys_lock_ttl", 300.0, minimum=1),
        environment_limit=_optional_positive_int(conf, "ckeys_environment_limit", None),
        burst_factor=_number(conf, "ckeys_burst_factor", 2.0, minimum=1),
        deferral=deferral,
        redis_cluster=_bool(conf, "ckeys_redis_cluster", False),
        redis_transport_options=dict(options),
        tune_worker=_bool(conf, "ckeys_tune_worker", True),
        eta_task_limit=_optional_positive_int(conf, "ckeys_eta_task_limit", 1000),
        socket_timeout=_number(conf, "ckeys_socket_timeout", 5.0, minimum=0, strict=True),
        wait_poll_interval=_number(conf, "ckeys_wait_poll_interval", 0.25, minimum=0, strict=True),
        starvation_grace=_number(conf, "ckeys_starvation_grace", 3.0, minimum=0),
        metrics=_bool(conf, "ckeys_metrics", False),
        handoff_claim_timeout=_number(conf, "ckeys_handoff_claim_timeout", 2.0, minimum=0.1),
        handoff_copy_ttl=_number(conf, "ckeys_handoff_copy_ttl", 3600.0, minimum=10),
    )
