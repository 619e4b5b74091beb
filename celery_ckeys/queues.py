"""``ConcurrencyQueue``: a named limit that several tasks may share."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Optional, Union

from .errors import InvalidConcurrencyQueue
from .validation import check_key, check_limit, check_queue_name, check_rate, check_weight

#: A queue's limit: a number, or (per key's partition) a callable of the key.
LimitLike = Union[int, Callable[[str], int], None]


@dataclass(frozen=True)
class ConcurrencyQueue:
    """At most ``limit`` runs of this queue execute at once across all workers.

    ``limit=None`` leaves the limit to what Redis already records for the queue
    (set by an earlier trigger or ``celery ckeys limits set``), else to
    ``ckeys_environment_limit``. With a key, ``limit`` applies to each key's partition, and
    may be a callable of the key (``limit=lambda key: 10 if key.startswith("paid:") else 1``);
    ``total_limit`` caps the whole queue (every key, and runs without one) as well.
    ``weights`` (key -> 1..100): a key of weight w gets w turns a round when keys wait for
    the queue's shared capacity (its total, the environment); 1 when not given.
    ``rate`` ("10/s", "100/m", "5/h"): at most that many runs start in any window of that
    length, per partition (per queue for runs without a key), across all workers.
    """

    name: str
    limit: LimitLike = None
    total_limit: Optional[int] = None
    weights: Optional[Mapping[str, int]] = field(default=None, compare=False)
    #: at most N runs *start* in any window (Celery's syntax: "10/s", "100/m", "5/h"), per
    #: partition when a run has a key, else for the queue; across all workers
    rate: Optional[str] = None
    #: ``weights`` as sorted pairs: what equality and hashing see (a dict is not hashable)
    _weights: tuple[tuple[str, int], ...] = field(default=(), init=False, repr=False)

    def __post_init__(self) -> None:
        check_queue_name(self.name)
        if self.limit is not None and not callable(self.limit):
            check_limit(self.limit, what=f"limit of queue {self.name!r}")
        if self.total_limit is not None:
            check_limit(self.total_limit, what=f"total_limit of queue {self.name!r}")
        if self.rate is not None:
            check_rate(self.rate)
        if self.weights is not None:
            if not isinstance(self.weights, Mapping):
                raise InvalidConcurrencyQueue(
                    f"weights of queue {self.name!r} must map keys to ints, got"
                    f" {type(self.weights).__name__}", queue=self.name)
            pairs = tuple(sorted((check_key(k), check_weight(w, key=k))
                                 for k, w in self.weights.items()))
            object.__setattr__(self, "_weights", pairs)

    @property
    def rate_spec(self) -> Optional[str]:
        """The rate as the scripts read it, ``"n/window_ms"`` (``None``: no rate)."""
        return check_rate(self.rate) if self.rate is not None else None

    @property
    def computed(self) -> bool:
        """Whether the limit is a callable of the key."""
        return callable(self.limit)

    @property
    def fixed_limit(self) -> Optional[int]:
        """The limit when it is a number (``None`` when none, or computed per key)."""
        return None if callable(self.limit) else self.limit

    def limit_for(self, key: str) -> Optional[int]:
        """The limit the callable computes for ``key``'s partition (checked), else ``None``."""
        if not callable(self.limit):
            return None
        try:
            value = self.limit(key)
        except Exception as exc:
            raise InvalidConcurrencyQueue(
                f"the limit callable of queue {self.name!r} raised for key {key!r}: {exc!r}",
                queue=self.name) from exc
        return check_limit(value, what=f"limit of queue {self.name!r} for key {key!r}")

    def weight_of(self, key: Optional[str]) -> Optional[int]:
        """The weight declared for ``key`` (``None``: not declared)."""
        return dict(self._weights).get(key) if key is not None and self._weights else None


QueueLike = Union[ConcurrencyQueue, str, Mapping[str, Any]]
_FIELDS = {"name", "limit", "total_limit", "weights", "rate"}


def coerce_queue(value: Any) -> ConcurrencyQueue:
    """Accept a ``ConcurrencyQueue``, a queue name, or ``{"name": ..., "limit": ...,
    "total_limit": ..., "weights": ...}``."""
    if isinstance(value, ConcurrencyQueue):
        return value
    if isinstance(value, str):
        return ConcurrencyQueue(value)
    if isinstance(value, Mapping):
        unknown = set(value) - _FIELDS
        if unknown:
            raise InvalidConcurrencyQueue(
                f"concurrency_queue accepts the fields {sorted(_FIELDS)}, got"
                f" {sorted(unknown)}", queue=dict(value))
        if "name" not in value:
            raise InvalidConcurrencyQueue("concurrency_queue needs a 'name'", queue=dict(value))
        if callable(value.get("limit")):
            raise InvalidConcurrencyQueue(
                "a trigger-time concurrency_queue cannot compute its limit: declare the"
                " callable on the task's ConcurrencyQueue", queue=value["name"])
        return ConcurrencyQueue(value["name"], value.get("limit"), value.get("total_limit"),
                                value.get("weights"), value.get("rate"))
    raise InvalidConcurrencyQueue(
        "concurrency_queue must be a ConcurrencyQueue, a queue name or"
        f" {{'name': ..., 'limit': ...}}, got {type(value).__name__}: {value!r}", queue=value)
