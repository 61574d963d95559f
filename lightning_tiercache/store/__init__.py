"""The store layer: one tensor store over device memory, host memory and disk.

:class:`TierStore` (``placement``) places each entry in the highest tier with room, moves victims down when a
tier is over budget and brings entries back on ``get``; ``budgets`` sizes the tiers from the machine; the movers
(``moves``) copy between tiers asynchronously. Below it: the tiers (``tiers/``: the device seam with its CUDA
backend and a simulated asynchronous device for CPU tests, host with its pinned pool, disk spill files), the
eviction policies (``policy``), the lossless codecs and the spill record format (``codec``), and cross-rank
event gathering (``events``). Plain PyTorch: nothing here imports Lightning.
"""

from __future__ import annotations

from lightning_tiercache.store.budgets import resolve_budgets
from lightning_tiercache.store.placement import Handle, Kind, Tier, TierStore
from lightning_tiercache.store.policy import EvictionPolicy, register_policy, registered_policies

__all__ = [
    "EvictionPolicy",
    "Handle",
    "Kind",
    "Tier",
    "TierStore",
    "register_policy",
    "registered_policies",
    "resolve_budgets",
]
