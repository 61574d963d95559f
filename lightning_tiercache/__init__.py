"""lightning_tiercache: fine-tune and evaluate models that do not fit in accelerator memory.

A tiered tensor store (device -> host -> disk) under activation offload, a tiered KV cache and OOM recovery,
wired into Lightning by :class:`TierCacheCallback`.
"""

from __future__ import annotations

from lightning_tiercache.config import TierConfig, parse_bytes
from lightning_tiercache.errors import (
    BatchSplitError,
    EntryEvictedError,
    EntryNotFoundError,
    OOMRecoveryError,
    PinnedMemoryError,
    SpillCorruptError,
    SpillError,
    SpillMissingError,
    StoreClosedError,
    TierCacheError,
)
from lightning_tiercache.store.placement import Handle, Kind, Tier, TierStore
from lightning_tiercache.store.policy import EvictionPolicy, register_policy

__all__ = [
    "BatchSplitError",
    "EntryEvictedError",
    "EntryNotFoundError",
    "EvictionPolicy",
    "Handle",
    "Kind",
    "OOMRecoveryError",
    "PinnedMemoryError",
    "SpillCorruptError",
    "SpillError",
    "SpillMissingError",
    "StoreClosedError",
    "Tier",
    "TierCacheError",
    "TierConfig",
    "TierStore",
    "parse_bytes",
    "register_policy",
]

__version__ = "0.1.0"

# Parts that import optional or heavy packages load on first use.
_LAZY = {
    "ActivationOffloader": "lightning_tiercache.activations.offloader",
    "OffloadConfig": "lightning_tiercache.activations.offloader",
    "offload_activations": "lightning_tiercache.activations.offloader",
    "no_offload": "lightning_tiercache.activations.offloader",
    "TieredKVCache": "lightning_tiercache.kv.cache",
    "KVConfig": "lightning_tiercache.kv.layers",
    "tier_generate": "lightning_tiercache.kv.generate",
    "TierCacheCallback": "lightning_tiercache.lightning.callback",
    "OOMConfig": "lightning_tiercache.oom.recovery",
    "OOMInjector": "lightning_tiercache.lightning.testing",
    "micro_batches": "lightning_tiercache.oom.microbatch",
}


def __getattr__(name: str) -> object:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'lightning_tiercache' has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(module), name)
