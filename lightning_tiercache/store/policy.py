"""Eviction policies: which entry of a tier to move down first. Pluggable through a registry.

A policy tracks entry ids of one tier. The store tells it about inserts, accesses and removals and asks it
for a victim among the entries that may move now (``eligible``). Policies are not thread-safe on their
own: the store calls them under its lock.
"""

from __future__ import annotations

import abc
import collections
import itertools
from collections.abc import Callable

__all__ = [
    "EvictionPolicy",
    "LFUPolicy",
    "LRUPolicy",
    "S3FIFOPolicy",
    "make_policy",
    "register_policy",
    "registered_policies",
]


class EvictionPolicy(abc.ABC):
    """What a tier's eviction policy answers. ``victim`` must not return an id it was not told about."""

    @abc.abstractmethod
    def insert(self, entry_id: int) -> None:
        """An entry arrived in the tier."""

    @abc.abstractmethod
    def access(self, entry_id: int) -> None:
        """An entry in the tier was read or touched."""

    @abc.abstractmethod
    def remove(self, entry_id: int) -> None:
        """An entry left the tier (moved, freed or dropped). Unknown ids are ignored."""

    @abc.abstractmethod
    def victim(self, eligible: Callable[[int], bool]) -> int | None:
        """The entry to move down next among those for which ``eligible`` is true, or ``None``."""

    @abc.abstractmethod
    def __len__(self) -> int: ...


class LRUPolicy(EvictionPolicy):
    """Least recently used first."""

    def __init__(self) -> None:
        self._order: collections.OrderedDict[int, None] = collections.OrderedDict()

    def insert(self, entry_id: int) -> None:
        self._order[entry_id] = None
        self._order.move_to_end(entry_id)

    def access(self, entry_id: int) -> None:
        if entry_id in self._order:
            self._order.move_to_end(entry_id)

    def remove(self, entry_id: int) -> None:
        self._order.pop(entry_id, None)

    def victim(self, eligible: Callable[[int], bool]) -> int | None:
        return next((i for i in self._order if eligible(i)), None)

    def __len__(self) -> int:
        return len(self._order)


class LFUPolicy(EvictionPolicy):
    """Least frequently used first; ties go to the least recently used."""

    def __init__(self) -> None:
        self._count: dict[int, int] = {}
        self._stamp: dict[int, int] = {}
        self._clock = itertools.count()

    def insert(self, entry_id: int) -> None:
        self._count[entry_id] = self._count.get(entry_id, 0) + 1
        self._stamp[entry_id] = next(self._clock)

    def access(self, entry_id: int) -> None:
        if entry_id in self._count:
            self._count[entry_id] += 1
            self._stamp[entry_id] = next(self._clock)

    def remove(self, entry_id: int) -> None:
        self._count.pop(entry_id, None)
        self._stamp.pop(entry_id, None)

    def victim(self, eligible: Callable[[int], bool]) -> int | None:
        best: tuple[int, int] | None = None
        chosen = None
        for entry_id, count in self._count.items():
            key = (count, self._stamp[entry_id])
            if (best is None or key < best) and eligible(entry_id):
                best, chosen = key, entry_id
        return chosen

    def __len__(self) -> int:
        return len(self._count)


class S3FIFOPolicy(EvictionPolicy):
    """S3-FIFO (Yang et al., SOSP'23): a small probationary FIFO, a main FIFO and a ghost list.

    New entries enter the small queue; one that is accessed again before it reaches the head is promoted to
    the main queue, others are evicted early. Entries seen recently (in the ghost list) go straight to main.
    This adapts to scans (one-shot activations) and to reuse (prefix KV blocks) without tuning.
    """

    def __init__(self, small_fraction: float = 0.1, ghost_size: int = 4096) -> None:
        self._small: collections.OrderedDict[int, None] = collections.OrderedDict()
        self._main: collections.OrderedDict[int, None] = collections.OrderedDict()
        self._ghost: collections.OrderedDict[int, None] = collections.OrderedDict()
        self._freq: dict[int, int] = {}
        self._small_fraction = small_fraction
        self._ghost_size = ghost_size

    def insert(self, entry_id: int) -> None:
        if entry_id in self._freq:
            self.access(entry_id)
            return
        self._freq[entry_id] = 0
        if self._ghost.pop(entry_id, 0) is None:
            self._main[entry_id] = None
        else:
            self._small[entry_id] = None

    def access(self, entry_id: int) -> None:
        if entry_id in self._freq:
            self._freq[entry_id] = min(self._freq[entry_id] + 1, 3)

    def remove(self, entry_id: int) -> None:
        if self._freq.pop(entry_id, None) is None:
            return
        if self._small.pop(entry_id, 0) is None:
            self._ghost[entry_id] = None
            if len(self._ghost) > self._ghost_size:
                self._ghost.popitem(last=False)
        self._main.pop(entry_id, None)

    def victim(self, eligible: Callable[[int], bool]) -> int | None:
        small_first = len(self._small) >= self._small_fraction * max(1, len(self._freq))
        queues = (self._small, self._main) if small_first else (self._main, self._small)
        for queue in queues:
            found = self._scan(queue, eligible)
            if found is not None:
                return found
        return None

    def _scan(self, queue: collections.OrderedDict[int, None], eligible: Callable[[int], bool]) -> int | None:
        # Each entry is looked at a bounded number of times: freq only goes down while scanning.
        for _ in range(4 * len(queue) + 1):
            if not queue:
                return None
            entry_id = next(iter(queue))
            if not eligible(entry_id):
                queue.move_to_end(entry_id)
                continue
            if self._freq[entry_id] > 0:
                queue.pop(entry_id)
                self._freq[entry_id] -= 1 if queue is self._main else self._freq[entry_id]
                self._main[entry_id] = None
                continue
            return entry_id
        return None

    def __len__(self) -> int:
        return len(self._freq)


_REGISTRY: dict[str, Callable[[], EvictionPolicy]] = {
    "lru": LRUPolicy,
    "lfu": LFUPolicy,
    "s3fifo": S3FIFOPolicy,
}


def register_policy(name: str, factory: Callable[[], EvictionPolicy]) -> None:
    """Make ``TierConfig(policy=name)`` build policies with ``factory()``."""
    if not name or not isinstance(name, str):
        raise ValueError(f"policy name must be a non-empty string, got {name!r}")
    _REGISTRY[name] = factory


def registered_policies() -> tuple[str, ...]:
    """Names accepted by ``TierConfig(policy=...)``."""
    return tuple(_REGISTRY)


def make_policy(name: str) -> EvictionPolicy:
    """A new policy instance for one tier."""
    try:
        factory = _REGISTRY[name]
    except KeyError:
        raise ValueError(f"policy={name!r} is not one of {', '.join(_REGISTRY)}") from None
    return factory()
