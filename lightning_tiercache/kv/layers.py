"""The pieces of :class:`~lightning_tiercache.kv.cache.TieredKVCache` below the cache: its config and its layers.

A :class:`TieredLayer` is a ``transformers`` ``DynamicLayer`` that, with ``KVConfig(offload=True)``, keeps its
K/V in the store as one assembled entry of its first whole blocks plus a short device tail, and holds the
assembled K/V on the device only while it is among the ``device_layers`` most recently used layers.

Note: [assembled layer]
    A layer that is not resident is read back with one ``get`` of its stored entry (then one ``cat`` with
    the tail and the new tokens), not one ``get`` per block per token. The read does not place the entry
    back in the device tier (``get(place=False)``), so offloaded K/V stays off the device whatever the
    store's device budget. When new tokens complete a block, the
    layer's whole blocks so far are handed to the store as a new entry (a clone, so no view keeps the
    assembled tensor alive) placed in the host tier (``tier=HOST``: on CUDA the store copies it to the pinned
    host pool on a side stream and frees the device copy once the copy is done), and the old entry is freed.
    That moves the layer down once per ``block_tokens`` tokens, against reading it up once per token.
"""

from __future__ import annotations

import collections
import dataclasses
import inspect
import logging
import os
from typing import Any

import torch
from transformers.cache_utils import DynamicLayer

from lightning_tiercache.kv.quant import QUANT_MODES
from lightning_tiercache.store.placement import Handle, Kind, Tier, TierStore

# transformers 4.5x: lazy_initialization(key_states); 5.x: lazy_initialization(key_states, value_states).
_LAZY_INIT_TAKES_VALUES = len(inspect.signature(DynamicLayer.lazy_initialization).parameters) >= 3

__all__ = ["KVConfig", "LayerShared", "TieredLayer", "cache_kwarg", "kv_geometry", "release_blocks"]

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class KVConfig:
    """Choices of a :class:`TieredKVCache`.

    Args:
        block_tokens: tokens per prefix block (the reuse granularity and the offload block size).
        reuse: look up and store prompt blocks for reuse across requests.
        offload: keep layers' K/V in the store with at most ``device_layers`` layers assembled on the device.
        device_layers: layers kept assembled on the device when ``offload`` is on.
        persist_dir: folder where prefix blocks persist across processes (``None``: no persistence).
        quant: codec of the stored prefix blocks, one of :data:`~lightning_tiercache.kv.quant.QUANT_MODES`;
            ``"none"`` (exact) by default, ``"int8"``/``"int4"`` are lossy.
        quant_group: values per quantization scale.
    """

    block_tokens: int = 64
    reuse: bool = True
    offload: bool = False
    device_layers: int = 1
    persist_dir: str | os.PathLike[str] | None = None
    quant: str = "none"
    quant_group: int = 64

    def __post_init__(self) -> None:
        for field in ("block_tokens", "device_layers", "quant_group"):
            value = getattr(self, field)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{field}={value!r} must be an int >= 1")
        if self.quant not in QUANT_MODES:
            raise ValueError(f"quant={self.quant!r} is not one of {', '.join(QUANT_MODES)}")
        if self.persist_dir is not None:
            object.__setattr__(self, "persist_dir", os.fspath(self.persist_dir))


def cache_kwarg(model: Any) -> str:
    """The keyword ``model.forward``/``generate`` take the cache under: ``cache`` (transformers >= 5.2x) or
    ``past_key_values`` (older)."""
    import inspect

    forward = getattr(model, "forward", None)
    params = inspect.signature(forward).parameters if callable(forward) else {}
    return "cache" if "cache" in params else "past_key_values"


class LayerShared:
    """What the cache and its layers share. Layers point here, not at the cache, so no cycle keeps the cache
    (and its store entries) alive after the last user reference goes."""

    def __init__(self, store: TierStore, config: KVConfig, counts: collections.Counter[str]) -> None:
        self.store = store
        self.config = config
        self.counts = counts
        self.working: set[Handle] = set()
        self.resident: collections.OrderedDict[int, None] = collections.OrderedDict()
        self.peak_resident_bytes = 0
        self.resident_bytes = 0


def release_blocks(store: TierStore, working: set[Handle], own: bool) -> None:
    """Free a cache's working blocks from ``store``, or close the store if the cache made it (``own``)."""
    if own:
        store.close()
        return
    for h in list(working):
        try:
            store.free(h)
        except Exception:  # the store may be closed already; nothing is left to free then
            log.debug("could not free KV block %s", h, exc_info=True)
    working.clear()


class TieredLayer(DynamicLayer):
    """One layer's K/V: a :class:`DynamicLayer` whose blocks may live in the store (``offload``)."""

    def __init__(self, shared: LayerShared) -> None:
        super().__init__()
        self._shared = shared
        self._length = 0
        self._stored: Handle | None = None  # [2, B, H, S, D]: the first S tokens, S a multiple of block_tokens
        self._stored_len = 0
        self._tail: torch.Tensor | None = None  # [2, B, H, t, D], tokens after the stored ones
        self._full: torch.Tensor | None = None  # [2, B, H, L, D] while assembled on the device

    def get_seq_length(self, *args: Any, **kwargs: Any) -> int:
        return self._length

    def get_mask_sizes(self, query: Any, *args: Any) -> tuple[int, int]:
        # 5.x passes the query length, 4.5x the cache_position tensor.
        q = int(query.shape[0]) if isinstance(query, torch.Tensor) else int(query)
        return self._length + q, 0

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        if not self._shared.config.offload:
            return self._append(key_states, value_states)
        new = torch.stack([key_states, value_states])
        if self._full is not None:
            full = torch.cat([self._full, new], dim=-2)
        else:
            full = torch.cat([*self._fetch(), new], dim=-2)
        return self._set_full(full)

    def _append(self, key_states: torch.Tensor, value_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write new K/V into a buffer with headroom and return views of its filled part.

        Note: [growable buffer]
            ``DynamicCache`` copies the whole layer (``torch.cat``) on every decode step. Here new tokens are
            written into spare capacity, so a decode step copies only its own tokens; the layer is copied
            only when the buffer grows (by at least 1/8). The views returned have the same values, shape,
            dtype and innermost strides as ``DynamicCache``'s tensors, and the tests check that logits are
            bitwise equal.
        """
        b, h, n, d = key_states.shape
        length = self._length
        buf = self._full if self._full is not None and self._full.shape[-2] > 0 else None
        if buf is None or buf.shape[1] != b or length + n > buf.shape[-2]:
            need = length + n
            cap = need + max(2 * self._shared.config.block_tokens, need // 8)
            grown = key_states.new_empty((2, b, h, cap, d))
            if buf is not None and length:
                grown[..., :length, :].copy_(buf[..., :length, :])
            buf = grown
        buf[0, :, :, length : length + n].copy_(key_states)
        buf[1, :, :, length : length + n].copy_(value_states)
        self._full = buf
        self._length = length + n
        self.keys, self.values = buf[0, :, :, : self._length], buf[1, :, :, : self._length]
        return self.keys, self.values

    def _fetch(self) -> list[torch.Tensor]:
        """This layer's stored entry and tail, in token order (Note: [assembled layer])."""
        parts = []
        if self._stored is not None:
            parts.append(self._shared.store.get(self._stored, place=False))
            self._shared.counts["bytes_loaded"] += self._stored.nbytes
        if self._tail is not None:
            parts.append(self._tail)
        return parts

    def _set_full(self, full: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Make ``full`` this layer's K/V, handing newly completed blocks to the store (``offload``)."""
        self._length = full.shape[-2]
        self._full = full
        self.keys, self.values = full[0], full[1]
        if not self._shared.config.offload:
            return self.keys, self.values
        blk = self._shared.config.block_tokens
        whole = self._length // blk * blk
        if whole > self._stored_len:  # Note: [assembled layer]
            h = self._shared.store.put(full[..., :whole, :].clone(), kind=Kind.REQUIRED, tier=Tier.HOST)
            self._drop_stored()
            self._stored, self._stored_len = h, whole
            self._shared.working.add(h)
            self._shared.counts["bytes_offloaded"] += h.nbytes
        self._tail = full[..., self._stored_len :, :] if self._stored_len < self._length else None
        return self.keys, self.values

    def adopt(self, full: torch.Tensor, length: int) -> None:
        """Take served K/V: ``full`` is ``[2, B, H, capacity, D]`` with its first ``length`` columns filled.

        Without offload the spare capacity is the growable buffer's headroom (Note: [growable buffer]).
        """
        self.lazy_initialization(full[0, :, :, :length], full[1, :, :, :length])
        if self._shared.config.offload:
            self._set_full(full[..., :length, :])
            return
        self._full = full
        self._length = length
        self.keys, self.values = full[0, :, :, :length], full[1, :, :, :length]

    def _evict(self) -> None:
        """Drop the assembled device copy; the store keeps the whole blocks, a clone keeps the short tail."""
        if self._full is None:
            return
        if self._tail is not None:
            self._tail = self._tail.clone()
        self._full = None
        self.keys = self.values = None

    def stored(self) -> Handle | None:
        """The store entry holding this layer's first whole blocks (offload), if any."""
        return self._stored

    def _drop_stored(self) -> None:
        if self._stored is not None:
            self._shared.working.discard(self._stored)
            self._shared.store.free(self._stored)
        self._stored, self._stored_len = None, 0

    def _drop_blocks(self) -> None:
        self._drop_stored()
        self._tail = None

    def _materialize(self) -> None:
        if self._shared.config.offload and self._full is None and self._length:
            self._full = torch.cat(self._fetch(), dim=-2)
            self.keys, self.values = self._full[0], self._full[1]

    def _rewrite(self, op: Any, *args: Any) -> None:
        """Apply a :class:`DynamicLayer` batch/length operation to the assembled K/V, then re-block it."""
        if not self._shared.config.offload:
            op(self, *args)
            keys, values = self.keys, self.values
            self._full, self._length = None, 0
            if keys is not None and values is not None and keys.numel():
                self._append(keys, values)
            return
        self._materialize()
        op(self, *args)
        if self.keys is None or self.values is None or not self.is_initialized:
            self._length = 0
            self._full = None
            self._drop_blocks()
            return
        full = torch.stack([self.keys, self.values])
        self._drop_blocks()
        self._set_full(full)

    def crop(self, tokens_to_remove: int) -> None:
        self._rewrite(DynamicLayer.crop, tokens_to_remove)

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._rewrite(DynamicLayer.batch_repeat_interleave, repeats)

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._rewrite(DynamicLayer.batch_select_indices, indices)

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self._rewrite(DynamicLayer.reorder_cache, beam_idx)

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor | None = None) -> None:
        """Either transformers signature (4.5x passes the keys only)."""
        if _LAZY_INIT_TAKES_VALUES:
            super().lazy_initialization(key_states, key_states if value_states is None else value_states)
        else:
            super().lazy_initialization(key_states)  # type: ignore[call-arg]

    def reset(self) -> None:
        self._drop_blocks()
        self._full = None
        self._length = 0
        # Emptied, not zeroed (older DynamicLayer.reset zeroes keys in place and keeps their length).
        self.keys = self.values = None
        self.is_initialized = False
        super().reset()

    def offload(self) -> None:  # HF's own offloading hooks: the store does this job
        return None

    def prefetch(self) -> None:
        return None


def kv_geometry(config: Any) -> tuple[int, int, int] | None:
    """(layers, kv heads, head dim) from a transformers config, when it says."""
    try:
        text = config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config
        layers = int(text.num_hidden_layers)
        heads = int(text.num_attention_heads)
        kv_heads = int(getattr(text, "num_key_value_heads", None) or heads)
        head_dim = int(getattr(text, "head_dim", None) or text.hidden_size // heads)
    except (AttributeError, TypeError, ValueError):
        return None
    kinds = set(getattr(text, "layer_types", None) or ["full_attention"])
    if kinds != {"full_attention"}:
        raise ValueError(
            f"TieredKVCache supports full-attention layers only; this config has layer_types {sorted(kinds)}"
        )
    return layers, kv_heads, head_dim
