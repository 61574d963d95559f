"""What activation offload leaves in place, and where the rest goes: :class:`OffloadConfig` and :class:`SavePolicy`.

Parameters, leaves that need grad and views of either stay put (offloading them frees nothing); tensors under
``min_bytes`` stay put; so do tensor subclasses, non-strided, quantized, nested, conjugate or negative-bit
tensors, tensors on another device than the store's, dtypes the store cannot encode, and anything seen while
``torch.compile`` traces (fake tensors). Tensors sharing a storage are stored once (:meth:`SavePolicy.find_dup`).
"""

from __future__ import annotations

import dataclasses
import warnings

import torch

from lightning_tiercache.activations.prefetch_plan import ForwardPass
from lightning_tiercache.activations.saved_tensors import Slot, extent
from lightning_tiercache.config import parse_bytes
from lightning_tiercache.store.codec import dtype_code
from lightning_tiercache.store.tiers import Tier

__all__ = ["OFFLOAD_TIERS", "OffloadConfig", "SavePolicy", "of_params", "offload_tier_for", "storage_ptrs"]

_DTensor: type[torch.Tensor] | None
try:
    from torch.distributed.tensor import DTensor

    _DTensor = DTensor
except ImportError:  # a torch build without distributed
    _DTensor = None

_PLAIN = (torch.Tensor, torch.nn.Parameter)


#: Tiers an offloaded tensor may be sent to (the highest it may land in; a full tier passes it further down).
#: ``auto``: the host tier when the store's device is an accelerator; disk where the device is the CPU, whose
#: "host tier" is the same RAM (offloading there would free nothing).
OFFLOAD_TIERS = ("auto", "host", "disk")


def offload_tier_for(tier: Tier | str, device: torch.device) -> Tier:
    """The tier a config's ``tier`` sends activations to on a store serving ``device``."""
    if isinstance(tier, Tier):
        return tier
    if tier == "auto":
        return Tier.DISK if device.type == "cpu" else Tier.HOST
    return Tier[tier.upper()]


@dataclasses.dataclass(frozen=True)
class OffloadConfig:
    """Policy of an :class:`ActivationOffloader`. Sizes are int bytes; strings like ``"1MiB"`` are accepted.

    Args:
        min_bytes: saved tensors smaller than this stay where they are.
        keep_tail_bytes: most bytes at the end of the forward kept in the device tier (their backward runs
            first). ``None``: as much as the device tier's room allows (see
            :func:`~lightning_tiercache.activations.budget.resident_tail_bytes`); a number is capped by it too.
        lead_bytes: how far ahead of backward prefetch runs. ``None``: planned from measured bandwidth and
            backward time (one entry on the first step).
        max_lead_bytes: upper bound of a planned lead and tail. ``None``: a fifth of a step's saved bytes.
        prefetch: fetch entries ahead of backward; ``False`` reloads each on demand.
        dedup: store tensors that share a storage once.
        tier: the highest tier offloaded tensors go to, one of :data:`OFFLOAD_TIERS` (or a ``Tier``).
            ``auto``: host with an accelerator, disk on a CPU-only store.
        wait_threshold_s: an ``unpack`` blocked longer than this counts as a wait.
        idle_probe_every: after a forward that stored nothing, forwards entered through ``for_batch`` with
            batches no larger skip the saved-tensor hooks, except one in every ``idle_probe_every``, which checks
            again (see :mod:`lightning_tiercache.activations.idle`). ``0``: hooks on every forward.
    """

    min_bytes: int | str = "64KiB"
    keep_tail_bytes: int | str | None = None
    lead_bytes: int | str | None = None
    max_lead_bytes: int | str | None = None
    prefetch: bool = True
    dedup: bool = True
    tier: Tier | str = "auto"
    wait_threshold_s: float = 1e-4
    idle_probe_every: int = 64

    def __post_init__(self) -> None:
        object.__setattr__(self, "min_bytes", parse_bytes(self.min_bytes, "min_bytes"))
        for field in ("keep_tail_bytes", "lead_bytes", "max_lead_bytes"):
            value = getattr(self, field)
            if value is not None:
                object.__setattr__(self, field, parse_bytes(value, field))
        for field in ("prefetch", "dedup"):
            if not isinstance(getattr(self, field), bool):
                raise ValueError(f"{field}={getattr(self, field)!r} must be True or False")
        tier = self.tier.label if isinstance(self.tier, Tier) else self.tier
        if tier not in OFFLOAD_TIERS:
            raise ValueError(f"tier={self.tier!r} is not one of {', '.join(OFFLOAD_TIERS)}")
        object.__setattr__(self, "tier", {"host": Tier.HOST, "disk": Tier.DISK}.get(tier, "auto"))
        n = self.idle_probe_every
        if isinstance(n, bool) or not isinstance(n, int) or n < 0:
            raise ValueError(f"idle_probe_every={n!r} must be an int >= 0")
        w = self.wait_threshold_s
        if isinstance(w, bool) or not isinstance(w, int | float) or not 0 <= w < 60:
            raise ValueError(f"wait_threshold_s={w!r} must be a number of seconds in [0, 60)")

    def offload_tier(self, device: torch.device) -> Tier:
        """The tier offloaded tensors go to on a store serving ``device`` (``auto`` resolved)."""
        return offload_tier_for(self.tier, device)


class SavePolicy:
    """Decides, per saved tensor, whether it may be offloaded (the checks past ``pack``'s fast path).

    Args:
        min_bytes: tensors smaller than this stay put.
        module: the model whose parameter and buffer storages stay put (``None``: parameters are recognized
            by autograd's leaf flags alone).
        device: the store's device; tensors elsewhere stay put.
    """

    def __init__(self, min_bytes: int, module: torch.nn.Module | None, device: torch.device) -> None:
        self.min_bytes = min_bytes
        self.module = module
        self.device = device
        self.param_ptrs: frozenset[int] | None = frozenset()  # None: collect on first need this forward
        self._dtype_ok: dict[torch.dtype, bool] = {}
        self._warned_compile = False

    def new_forward(self) -> None:
        """Parameter storages can move between steps (resharding, ``.to()``): collected again per forward,
        lazily, so a forward that saves only small tensors pays nothing for it."""
        self.param_ptrs = None if self.module is not None else frozenset()

    def skip_reason(self, t: torch.Tensor) -> str | None:
        """Why ``t`` stays put (``params``, ``small``, ``other``), or ``None`` when it may be offloaded."""
        if isinstance(t, torch.nn.Parameter):
            return "params"
        if type(t) not in _PLAIN or t.layout != torch.strided or t.is_quantized or t.is_nested:
            return "other"
        if t.numel() * t.element_size() < self.min_bytes:
            return "small"  # the common case first: nothing below needs checking
        if of_params(t):
            return "params"
        if torch.compiler.is_compiling():
            self._warn_compile()
            return "other"
        if t.is_conj() or t.is_neg() or not self._on_store_device(t.device) or not self._storable(t.dtype):
            return "other"
        if self.param_ptrs is None:
            tensors = [*self.module.parameters(), *self.module.buffers()] if self.module is not None else []
            self.param_ptrs = storage_ptrs(tensors)
        if self.param_ptrs and t.untyped_storage().data_ptr() in self.param_ptrs:
            return "params"
        return None

    def _on_store_device(self, device: torch.device) -> bool:
        own = self.device
        return device.type == own.type and (device.index or 0) == (own.index or 0)

    def _storable(self, dtype: torch.dtype) -> bool:
        ok = self._dtype_ok.get(dtype)
        if ok is None:
            try:
                dtype_code(dtype)
                ok = True
            except TypeError:
                ok = False
            self._dtype_ok[dtype] = ok
        return ok

    def find_dup(self, p: ForwardPass, t: torch.Tensor) -> Slot | None:
        """The slot of ``p`` whose stored span already holds ``t``, if any."""
        found = p.dedup.get(t.untyped_storage().data_ptr())
        if found is None:
            return None
        storage_ref, slot_ref = found
        slot = slot_ref()
        if slot is None or storage_ref.expired() or slot.dtype != t.dtype:
            return None
        lo = t.storage_offset()
        hi = lo + extent(t)
        return slot if slot.start <= lo and hi <= slot.start + slot.length else None

    def _warn_compile(self) -> None:
        if not self._warned_compile:
            self._warned_compile = True
            warnings.warn(
                "tiercache: activation offload is inactive inside code traced by torch.compile (the hooks see "
                "fake tensors there). Enter offload_activations() outside the compiled function: the tensors a "
                "compiled graph saves at run time are then offloaded.",
                RuntimeWarning,
                stacklevel=3,
            )


# ---------------------------------------------------------------------- helpers


def of_params(t: torch.Tensor) -> bool:
    """Whether ``t`` is a leaf that needs grad (a parameter) or a view of one: offloading it frees nothing."""
    if t.requires_grad and t.is_leaf:
        return True
    base = t._base
    return base is not None and (isinstance(base, torch.nn.Parameter) or (base.is_leaf and base.requires_grad))


def storage_ptrs(tensors: list[torch.Tensor]) -> frozenset[int]:
    """Storage addresses of ``tensors``. A DTensor (FSDP2, tensor parallel) stands for its local shard; a tensor
    subclass without a storage of its own contributes nothing (it holds no bytes an activation could share)."""
    out = set()
    for x in tensors:
        local = x.to_local() if _DTensor is not None and isinstance(x, _DTensor) else x  # type: ignore[attr-defined]
        if not local.numel():
            continue
        try:
            out.add(local.untyped_storage().data_ptr())
        except RuntimeError:  # "invalid python storage": a wrapper subclass
            continue
    return frozenset(out)
