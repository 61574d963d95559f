"""The exceptions lightning_tiercache raises: one small hierarchy rooted at :class:`TierCacheError`."""

from __future__ import annotations

__all__ = [
    "BatchSplitError",
    "EntryEvictedError",
    "EntryNotFoundError",
    "OOMRecoveryError",
    "PinnedMemoryError",
    "SpillCorruptError",
    "SpillError",
    "SpillMissingError",
    "StoreClosedError",
    "TierCacheError",
]


class TierCacheError(Exception):
    """Base class of every error lightning_tiercache raises on its own account."""


class StoreClosedError(TierCacheError):
    """The store was used after ``close()``. Nothing was changed; open a new ``TierStore``."""


class EntryNotFoundError(TierCacheError, KeyError):
    """The handle names no live entry: it was freed, or it belongs to another store."""

    def __str__(self) -> str:  # KeyError quotes its argument; keep the message readable.
        return str(self.args[0]) if self.args else "entry not found"


class EntryEvictedError(EntryNotFoundError):
    """A *cache* entry was dropped under memory pressure. Recompute the value; nothing else was lost."""


class SpillError(TierCacheError):
    """A spill file could not be read back. The entry is removed from the store; no tensor is returned."""


class SpillCorruptError(SpillError):
    """A spill file's header or checksum does not match what was written (corruption or truncation)."""


class SpillMissingError(SpillError):
    """A spill file is gone (deleted by another process or a temp cleaner)."""


class BatchSplitError(TierCacheError, TypeError):
    """A batch could not be split into micro-batches; pass a ``split_fn`` that knows its type."""


class PinnedMemoryError(TierCacheError, RuntimeError):
    """Page-locked (pinned) host memory could not be allocated. Not a device OOM: a smaller batch does not help.

    The store falls back to pageable memory where it pins; where this is raised, raise the locked-memory limit
    (``ulimit -l``) or lower ``host_bytes``.
    """


class OOMRecoveryError(TierCacheError):
    """Out of memory even at micro-batch size 1. The step's partial gradients were zeroed."""
