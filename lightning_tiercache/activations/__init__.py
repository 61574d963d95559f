"""The activation layer: tensors autograd saves in forward go to the store and come back in backward.

``offloader`` holds :class:`ActivationOffloader` (the ``saved_tensors_hooks``), :func:`offload_activations`
and :func:`no_offload`; ``policy`` its :class:`OffloadConfig` and which saved tensors stay put;
``saved_tensors`` the records ``pack`` returns and the storage spans it stores; ``prefetch_plan`` the
backward-order prefetch planned from a measured step; ``budget`` what the device budget lets stay resident;
``idle`` the gate that skips the hooks when a forward has nothing to offload. Plain PyTorch over
:mod:`lightning_tiercache.store`.
"""

from __future__ import annotations

from lightning_tiercache.activations.offloader import (
    OFFLOAD_TIERS,
    ActivationOffloader,
    OffloadConfig,
    no_offload,
    offload_activations,
)

__all__ = ["OFFLOAD_TIERS", "ActivationOffloader", "OffloadConfig", "no_offload", "offload_activations"]
