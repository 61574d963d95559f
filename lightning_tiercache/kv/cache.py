"""TieredKVCache: a ``transformers`` ``Cache`` whose K/V live in a :class:`~lightning_tiercache.TierStore`.

Two jobs, both exact by default:

* **Tiering** (``KVConfig(offload=True)``): each layer's K/V is one store entry of its whole blocks, placed in
  the host tier, plus a short device tail (:mod:`lightning_tiercache.kv.layers`); at most ``device_layers``
  layers stay assembled on the device, and a layer is read back with one read-through ``get`` per step.
* **Prefix reuse** (``KVConfig(reuse=True)``, the default): :meth:`TieredKVCache.load_prefix` looks up the
  prompt's chained block keys (:mod:`lightning_tiercache.kv.prefix`, padding ignored) and serves the blocks
  found (:mod:`lightning_tiercache.kv.reuse`), so the forward computes only the rest; the prompt's blocks are
  stored (keyed cache entries that the store may evict) as the forward computes them.
"""

from __future__ import annotations

import collections
import functools
import importlib.metadata
import typing
import weakref
from typing import Any

import torch
from transformers.cache_utils import Cache

from lightning_tiercache.config import TierConfig
from lightning_tiercache.errors import EntryNotFoundError
from lightning_tiercache.kv.layers import KVConfig, LayerShared, TieredLayer, cache_kwarg, kv_geometry, release_blocks
from lightning_tiercache.kv.prefix import PersistDir, RowBlocks, model_identity, namespace, weights_fingerprint
from lightning_tiercache.kv.quant import KVQuantizer
from lightning_tiercache.kv.reuse import PrefixBlocks, ServePlan, prefill_kwargs, shared_blocks
from lightning_tiercache.store.placement import Handle, TierStore

__all__ = ["KVConfig", "TieredKVCache", "cache_kwarg"]

COUNTERS = (
    "hits", "misses", "hit_tokens", "lookups", "stored_blocks", "evicted_hits", "prefetched_blocks",
    "prefetch_waits", "bytes_loaded", "bytes_offloaded", "shared_prefill_blocks", "shared_prefill_tokens",
    "unstored_position_mismatch", "persist_unpinned",
)  # fmt: skip


class TieredKVCache(Cache):
    """A KV cache over a :class:`TierStore`: exact tiering of the working set and prefix reuse.

    Args:
        store: the store holding blocks; shared stores let prefixes be reused across caches. ``None``: a
            private store (closed with the cache) sized from this machine.
        config: block size, reuse, offload, persistence and codec (:class:`KVConfig`).
        model: the ``PreTrainedModel`` (or its config) the cache serves: sets the layer count, KV geometry
            and the namespace of block keys. Needed for prefix reuse before the first forward.
        model_version: part of the namespace; change it (:meth:`set_model_version`) whenever weights change.
        dtype: the KV dtype, when ``model`` is a config (a model's parameter dtype is used otherwise).
        counts: a counter to accumulate :meth:`stats` counters into (shared by caches of one user).

    Raises:
        ValueError: the config has non-full-attention layers (sliding window, linear attention).

    Example::

        store = TierStore(TierConfig(device_bytes="2GiB"))
        cache = TieredKVCache(store, model=model)
        out = model.generate(input_ids, **{cache_kwarg(model): cache}, max_new_tokens=32)
        cache.stats()["hit_tokens"]
    """

    def __init__(
        self,
        store: TierStore | None = None,
        config: KVConfig | None = None,
        model: Any = None,
        *,
        model_version: str | int = 0,
        dtype: torch.dtype | None = None,
        counts: collections.Counter[str] | None = None,
    ) -> None:
        self.config = config or KVConfig()
        self._own_store = store is None
        if store is None:
            device = _model_device(model)
            store = TierStore(TierConfig(device=str(device) if device is not None else None))
        self.store = store
        self.counts = counts if counts is not None else collections.Counter()
        self._shared = LayerShared(store, self.config, self.counts)
        geometry = kv_geometry(getattr(model, "config", model)) if model is not None else None
        self._geometry = geometry
        layers = [TieredLayer(self._shared) for _ in range(geometry[0])] if geometry else []
        super().__init__(layers=typing.cast(Any, layers))
        self._model = model
        self._dtype = dtype or _model_dtype(model)
        self._plan: ServePlan | None = None
        self.prefix = PrefixBlocks(store, self.config.block_tokens, self.counts)
        if geometry is not None and self._dtype is not None:
            shape: tuple[int, ...] = (2, geometry[1], self.config.block_tokens, geometry[2])
            if self.config.quant != "none":
                self.prefix.quant = KVQuantizer(self.config.quant, shape, self._dtype, self.config.quant_group)
                shape = (self.prefix.quant.encoded_nbytes,)
            self.prefix.block_shape = shape
            self.prefix.block_dtype = torch.uint8 if self.prefix.quant is not None else self._dtype
            self.prefix.device = _model_device(model) or store.device
        self.set_model_version(model_version)
        self._finalizer = weakref.finalize(self, release_blocks, store, self._shared.working, self._own_store)

    # ------------------------------------------------------------------ versions and namespaces

    @staticmethod
    def version_from_weights(model: torch.nn.Module) -> str:
        """A model version derived from the weights themselves (reads every parameter once)."""
        return weights_fingerprint(model)

    def set_model_version(self, version: str | int) -> None:
        """Switch to a new model version: blocks stored under other versions are never served again.

        Blocks this cache stored under the old version are freed from the store; persisted ones stay on disk
        in their own namespace folder.
        """
        self._fields = {
            "model": model_identity(self._model) if self._model is not None else "unknown",
            "dtype": str(self._dtype),
            "version": str(version),
            "block_tokens": str(self.config.block_tokens),
            "quant": f"{self.config.quant}/{self.config.quant_group}",
            "torch": torch.__version__,
            "transformers": _transformers_version(),
        }
        self.model_version = str(version)
        self.namespace = namespace(self._fields)
        self._plan = None
        self.prefix.namespace = self.namespace
        self.prefix.forget()
        if self.config.persist_dir is not None and self.config.reuse:
            self.prefix.persist = PersistDir(self.config.persist_dir, self._fields)

    # ------------------------------------------------------------------ the Cache interface

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args: Any, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Append new K/V of ``layer_idx`` and return the layer's whole K/V (as ``DynamicCache`` does)."""
        while len(self.layers) <= layer_idx:
            self.layers.append(TieredLayer(self._shared))
        layer: Any = self.layers[layer_idx]
        keys, values = layer.update(key_states, value_states, *args, **kwargs)
        plan = self._plan
        if plan is not None and layer_idx not in plan.done:
            plan.done.add(layer_idx)
            self._store_blocks(layer_idx, keys, values, _position_ids(args, kwargs))
        if self.config.offload:
            self._keep_window(layer_idx)
        return keys, values

    def reset(self) -> None:
        """Empty every layer (freeing its store blocks); stored prefix blocks stay for reuse."""
        super().reset()
        self._plan = None

    def _keep_window(self, layer_idx: int) -> None:
        shared = self._shared
        shared.resident.pop(layer_idx, None)
        shared.resident[layer_idx] = None
        while len(shared.resident) > self.config.device_layers:
            old, _ = shared.resident.popitem(last=False)
            layer = self.layers[old]
            if isinstance(layer, TieredLayer):
                layer._evict()
        resident = sum(
            (lyr._full.numel() * lyr._full.element_size())
            for lyr in self.layers
            if isinstance(lyr, TieredLayer) and lyr._full is not None
        )
        tails = sum(
            lyr._tail.numel() * lyr._tail.element_size()
            for lyr in self.layers
            if isinstance(lyr, TieredLayer) and lyr._tail is not None and lyr._full is None
        )
        shared.resident_bytes = resident + tails
        shared.peak_resident_bytes = max(shared.peak_resident_bytes, shared.resident_bytes)

    # ------------------------------------------------------------------ prefix reuse

    def prefetch_for(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> int:
        """Start bringing the hit blocks of a coming batch up the tiers (layer 0 first). Returns the blocks
        asked for. Blocks only on disk in ``persist_dir`` are not read here (``load_prefix`` reads them)."""
        if not self.config.reuse or not self.layers or input_ids.dim() != 2:
            return 0
        rows = self.prefix.rows(input_ids, attention_mask)
        limit = input_ids.shape[1] - 1
        layers = len(self.layers)
        runs = [self.prefix.hit_run(r.keys, self.prefix.usable(r, limit), layers, load=False) for r in rows]
        order = [blk[layer] for layer in range(layers) for run in runs for blk in run]
        self.store.prefetch(order)
        self.counts["prefetched_blocks"] += len(order)
        return len(order)

    def load_prefix(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, *, max_columns: int | None = None
    ) -> int:
        """Serve the stored blocks of a prompt into this empty cache; returns the columns served.

        Every row is served the same number ``n`` of leading columns (padding included: a row's blocks start at
        its first real token), so the forward after it takes ``input_ids[:, n:]``; ``generate`` does that
        itself. The prompt's other full blocks are stored as the forward computes them; a forward over a
        padded batch must count positions from each row's first real token, as ``generate`` does (pass
        ``position_ids=mask_positions(attention_mask)[:, n:]`` to a plain forward). At least one column is
        always left to compute.

        Args:
            input_ids: ``[batch, seq]`` token ids.
            attention_mask: ``[batch, seq]``, 0 on padding (left or right); ``None``: no padding.
            max_columns: serve at most this many columns (a scorer that needs the logits of column ``c``
                passes ``c``).
        """
        if not self.config.reuse or input_ids.dim() != 2:
            return 0
        if self.get_seq_length() > 0:
            self._plan = None
            return 0
        prefix = self.prefix
        rows = prefix.rows(input_ids, attention_mask)
        limit = input_ids.shape[1] - 1 if max_columns is None else max(0, min(max_columns, input_ids.shape[1] - 1))
        layers = len(self.layers)
        n = 0
        runs: list[list[list[Handle]]] = [[] for _ in rows]
        if layers and limit:
            usable = [prefix.usable(r, limit) for r in rows]
            runs = [prefix.hit_run(r.keys, u, layers, load=True) for r, u in zip(rows, usable, strict=True)]
            shared = shared_blocks(rows, usable)
            if shared > min(len(r) for r in runs) and self._prefill_shared(input_ids, rows[0], shared, runs[0]):
                runs = [prefix.hit_run(r.keys, u, layers, load=True) for r, u in zip(rows, usable, strict=True)]
            if any(runs):
                n = self._serve(rows, runs, limit, input_ids.shape[1])
        blk = self.config.block_tokens
        hit = [len(run) for run in runs]
        full = [min(h, max(0, (n - r.start) // blk)) for r, h in zip(rows, hit, strict=True)]
        self.counts["lookups"] += sum(len(r.keys) for r in rows)
        self.counts["hits"] += sum(full)
        self.counts["misses"] += sum(len(r.keys) for r in rows) - sum(full)
        self.counts["hit_tokens"] += sum(max(0, n - r.start) for r in rows) if n else 0
        for row, h in zip(rows, hit, strict=True):
            if h:
                prefix.touch(row.keys[:h], layers)  # Note: [prefix tail first]
        mask = attention_mask.detach() if attention_mask is not None and not bool(attention_mask.all()) else None
        self._plan = ServePlan(rows, hit, n, mask)
        return n

    def _prefill_shared(self, ids: torch.Tensor, row: RowBlocks, shared: int, hit: list[list[Handle]]) -> bool:
        """Compute and store the blocks of a prefix that every row of a batch shares, once, at batch 1.

        Note: [shared prefill]
            Rows of a batch that miss on the same leading blocks (same keys: same real tokens, wherever
            their padding) would each prefill them. Instead, the shared real tokens of row 0 run through the
            model in this empty cache at batch 1, unpadded: their stored hit blocks ``hit`` are served first,
            exactly as for any prompt, and the forward computes and stores the rest under the keys a normal
            prefill uses. The cache is then reset, and every row is served the blocks as hits. Skipped for
            one row (the normal prefill stores the same blocks at the same cost) and when the cache has no
            model.

        Returns:
            Whether a forward ran (the caller looks the blocks up again).
        """
        model = self._model
        if not isinstance(model, torch.nn.Module):
            return False
        blk = self.config.block_tokens
        tokens = ids[:1, row.start : row.start + shared * blk]
        keys = row.keys[:shared]
        sub = RowBlocks(0, shared * blk, keys)
        served = self._serve([sub], [hit[:shared]], shared * blk - 1, shared * blk) if hit else 0
        done = served // blk
        self._plan = ServePlan([sub], [done], served, None)
        kwargs: dict[str, Any] = {cache_kwarg(model): self, "use_cache": True, **prefill_kwargs(model)}
        try:
            with torch.no_grad():
                model(tokens[:, served:], **kwargs)
        finally:
            self.reset()  # frees the working blocks; the stored prefix blocks stay
        self.counts["shared_prefill_blocks"] += shared - done
        self.counts["shared_prefill_tokens"] += (shared - done) * blk
        return True

    def _serve(self, rows: list[RowBlocks], runs: list[list[list[Handle]]], limit: int, length: int) -> int:
        """Load the served columns of every row into the layers; returns how many (Note: [evicted between
        lookup and get])."""
        n, got = self.prefix.fetch(rows, runs, len(self.layers), limit)
        if n <= 0 or all(n <= r.start for r in rows):
            return 0
        blk = self.config.block_tokens
        capacity = n if self.config.offload else length + max(2 * blk, length // 8)
        for layer, parts in enumerate(got):
            full = self.prefix.assemble(rows, parts, n, capacity)
            target = self.layers[layer]
            if isinstance(target, TieredLayer):
                target.adopt(full, n)
                if self.config.offload:
                    self._keep_window(layer)
        return n

    def _store_blocks(self, layer: int, keys: torch.Tensor, values: torch.Tensor, positions: Any) -> None:
        plan = self._plan
        if plan is None:
            return
        if self._geometry is None:
            self._geometry = (len(self.layers), keys.shape[1], keys.shape[-1])
            self._dtype = self._dtype if self._dtype is not None else keys.dtype
        if self.config.quant != "none" and self.prefix.quant is None:
            shape = (2, keys.shape[1], self.config.block_tokens, keys.shape[-1])
            self.prefix.quant = KVQuantizer(self.config.quant, shape, keys.dtype, self.config.quant_group)
        if len(plan.done) == 1 and not self.prefix.check_positions(plan, positions):
            self._plan = None
            return
        self.prefix.store_blocks(plan, layer, len(self.layers), keys, values)

    # ------------------------------------------------------------------ housekeeping

    def flush(self) -> None:
        """Wait until persisted blocks are written."""
        self.prefix.flush()

    def close(self) -> None:
        """Flush persistence, free this cache's working blocks (and its private store). Idempotent."""
        self.prefix.close()
        self._finalizer()

    def stats(self) -> dict[str, Any]:
        """Counters: hits, misses, hit_tokens, blocks per tier, bytes moved, prefetch waits, evictions.

        ``hits``/``misses`` count (row, block) pairs of prompts; ``evicted_hits`` counts blocks found by
        lookup but dropped before they could be read. ``store_*`` keys are the (possibly shared) store's.
        """
        out: dict[str, Any] = {name: self.counts[name] for name in COUNTERS}
        total = out["hits"] + out["misses"]
        out["hit_rate"] = out["hits"] / total if total else 0.0
        tiers: collections.Counter[str] = collections.Counter()
        for h in [*self._shared.working, *self.prefix.registered.values()]:
            try:
                tiers[self.store.where(h).label] += 1
            except EntryNotFoundError:
                tiers["evicted"] += 1
        out["blocks_per_tier"] = dict(tiers)
        out["device_resident_bytes"] = self._shared.resident_bytes
        out["peak_device_resident_bytes"] = self._shared.peak_resident_bytes
        s = self.store.stats()
        for name in ("bytes_to_device", "bytes_to_host", "spill_bytes", "read_bytes", "waits", "evictions", "drops"):
            out[f"store_{name}"] = s[name]
        out["store_device_peak_bytes"] = s["tiers"]["device"]["peak_bytes"]
        if self.prefix.persist is not None:
            out.update(self.prefix.persist.counts)
        return out


@functools.cache
def _transformers_version() -> str:
    return importlib.metadata.version("transformers")  # reads package metadata files: once per process


def _position_ids(args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    """The ``position_ids`` a model passed to ``update`` (transformers 5.x: in ``kwargs=``), if any."""
    for extra in (kwargs.get("kwargs"), kwargs.get("cache_kwargs"), *args):
        if isinstance(extra, dict) and "position_ids" in extra:
            return extra["position_ids"]
    return None


def _model_device(model: Any) -> torch.device | None:
    if isinstance(model, torch.nn.Module):
        for p in model.parameters():
            return p.device
    return None


def _model_dtype(model: Any) -> torch.dtype | None:
    if isinstance(model, torch.nn.Module):
        for p in model.parameters():
            return p.dtype
    dtype = getattr(model, "dtype", None) or getattr(model, "torch_dtype", None)
    return dtype if isinstance(dtype, torch.dtype) else None
