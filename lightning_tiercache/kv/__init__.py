"""The KV layer: a ``transformers`` ``Cache`` whose K/V live in the store, with prompt-prefix reuse.

``cache`` holds :class:`TieredKVCache`; ``layers`` its per-layer pieces and :class:`KVConfig`; ``prefix`` the
chained block keys, the model namespace and on-disk persistence; ``quant`` the optional lossy int8/int4 codec
for stored blocks; ``generate`` the hook that gives HF models a tiered cache by default. Needs
``transformers``; plain PyTorch otherwise.
"""

from __future__ import annotations

from lightning_tiercache.kv.cache import KVConfig, TieredKVCache, cache_kwarg
from lightning_tiercache.kv.generate import tier_generate

__all__ = ["KVConfig", "TieredKVCache", "cache_kwarg", "tier_generate"]
