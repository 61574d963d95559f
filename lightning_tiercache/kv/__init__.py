"""The KV layer: a ``transformers`` ``Cache`` whose K/V live in the store, with prompt-prefix reuse.

``cache`` holds :class:`TieredKVCache`; ``layers`` its per-layer pieces and :class:`KVConfig`; ``prefix`` the
chained block keys, the model namespace and on-disk persistence; ``quant`` the optional lossy int8/int4 codec
for stored blocks; ``reuse`` serving and storing prefix blocks (padding-aware); ``scoring`` a forward that reuses
them for log-likelihood evals; ``generate`` the hook that gives HF models a tiered cache by default. Needs
``transformers``; plain PyTorch otherwise.
"""

from __future__ import annotations

from lightning_tiercache.kv.cache import KVConfig, TieredKVCache, cache_kwarg
from lightning_tiercache.kv.generate import tier_generate
from lightning_tiercache.kv.prefix import mask_positions
from lightning_tiercache.kv.scoring import Scored, score_forward

__all__ = ["KVConfig", "Scored", "TieredKVCache", "cache_kwarg", "mask_positions", "score_forward", "tier_generate"]
