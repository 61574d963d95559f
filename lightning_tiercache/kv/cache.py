"""TieredKVCache: a ``transformers`` ``Cache`` whose K/V live in a :class:`~lightning_tiercache.TierStore`.

Two jobs, both exact by default:

* **Tiering** (``KVConfig(offload=True)``): layers' K/V are full blocks in the store plus a short device tail
  (:mod:`lightning_tiercache.kv.layers`); at most ``device_layers`` layers stay assembled on the device, and
  while layer ``i`` computes the store is already bringing up layer ``i + 1``'s blocks.
* **Prefix reuse** (``KVConfig(reuse=True)``, the default): :meth:`TieredKVCache.load_prefix` looks up the
  prompt's chained block keys (:mod:`lightning_tiercache.kv.prefix`) and loads the longest run of blocks every
  row hits, so the forward computes only the suffix; the prompt's blocks are stored (keyed cache entries
  that the store may evict) as the forward computes them.

Note: [prefix tail first]
    The store evicts least recently used entries first. After a hit or a store, a prompt's blocks are
    touched tail-first, so the head of a prefix is the most recent and its tail is evicted before it: a
    half-evicted prefix still serves its head.

Note: [evicted between lookup and get]
    A cache entry can be dropped after ``lookup`` found it and before ``get``. ``load_prefix`` treats that
    (``EntryEvictedError``, or a spill file that fails its checksum) as a miss at that block: it serves the
    blocks before it and the forward recomputes the rest.
"""

from __future__ import annotations

import collections
import concurrent.futures as cf
import importlib.metadata
import inspect
import typing
import weakref
from typing import Any

import torch
from transformers.cache_utils import Cache

from lightning_tiercache.config import TierConfig
from lightning_tiercache.errors import EntryNotFoundError, SpillError
from lightning_tiercache.kv.layers import KVConfig, LayerShared, TieredLayer, cache_kwarg, kv_geometry, release_blocks
from lightning_tiercache.kv.prefix import PersistDir, block_keys, model_identity, namespace, weights_fingerprint
from lightning_tiercache.kv.quant import KVQuantizer
from lightning_tiercache.store.placement import Handle, Kind, TierStore

__all__ = ["KVConfig", "TieredKVCache", "cache_kwarg"]

COUNTERS = (
    "hits", "misses", "hit_tokens", "lookups", "stored_blocks", "evicted_hits", "prefetched_blocks",
    "prefetch_waits", "bytes_loaded", "bytes_offloaded", "shared_prefill_blocks", "shared_prefill_tokens",
)  # fmt: skip


class _PromptBlocks:
    """The prompt whose blocks the next forward computes: keys per row, first block to store, layers done."""

    def __init__(self, keys: list[list[str]], first: int) -> None:
        self.keys = keys
        self.first = first
        self.done: set[int] = set()


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
        self._pending: _PromptBlocks | None = None
        self._memo: tuple[torch.Tensor, torch.Tensor | None, list[list[str]]] | None = None
        self._registered: dict[str, Handle] = {}
        self._writer: cf.ThreadPoolExecutor | None = None
        self._persist: PersistDir | None = None
        self._quant: KVQuantizer | None = None
        if self.config.quant != "none" and geometry is not None and self._dtype is not None:
            shape = (2, geometry[1], self.config.block_tokens, geometry[2])
            self._quant = KVQuantizer(self.config.quant, shape, self._dtype, self.config.quant_group)
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
            "transformers": importlib.metadata.version("transformers"),
        }
        self.model_version = str(version)
        self.namespace = namespace(self._fields)
        self._pending = None
        self._memo = None
        for h in self._registered.values():
            self.store.free(h)
        self._registered.clear()
        if self.config.persist_dir is not None and self.config.reuse:
            self._persist = PersistDir(self.config.persist_dir, self._fields)

    # ------------------------------------------------------------------ the Cache interface

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args: Any, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Append new K/V of ``layer_idx`` and return the layer's whole K/V (as ``DynamicCache`` does)."""
        while len(self.layers) <= layer_idx:
            self.layers.append(TieredLayer(self._shared))
        if self.config.offload:
            nxt = self.layers[(layer_idx + 1) % len(self.layers)]
            if isinstance(nxt, TieredLayer) and nxt._full is None:
                self.store.prefetch(nxt._blocks)
        layer: Any = self.layers[layer_idx]
        keys, values = layer.update(key_states, value_states, *args, **kwargs)
        if self._pending is not None and layer_idx not in self._pending.done:
            self._pending.done.add(layer_idx)
            self._store_blocks(layer_idx, keys, values)
        if self.config.offload:
            self._keep_window(layer_idx)
        return keys, values

    def reset(self) -> None:
        """Empty every layer (freeing its store blocks); stored prefix blocks stay for reuse."""
        super().reset()
        self._pending = None

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

    def _keys_for(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> list[list[str]]:
        memo = self._memo
        if (
            memo is not None
            and memo[0].shape == input_ids.shape
            and torch.equal(memo[0], input_ids.detach().cpu())
            and (memo[1] is None) == (attention_mask is None)
            and (memo[1] is None or torch.equal(memo[1], attention_mask.detach().cpu()))  # type: ignore[union-attr]
        ):
            return memo[2]
        keys = block_keys(input_ids, attention_mask, self.config.block_tokens, self.namespace)
        mask = attention_mask.detach().cpu().clone() if attention_mask is not None else None
        self._memo = (input_ids.detach().cpu().clone(), mask, keys)
        return keys

    def _block_shape(self) -> tuple[int, ...] | None:
        if self._geometry is None:
            return None
        if self._quant is not None:
            return (self._quant.encoded_nbytes,)
        return (2, self._geometry[1], self.config.block_tokens, self._geometry[2])

    def _find(self, key: str, layer: int, load: bool) -> Handle | None:
        """The store handle of block ``key`` of ``layer``, loading it from ``persist_dir`` if asked."""
        name = f"kv/{key}/{layer}"
        h = self.store.lookup(name)
        if h is not None or not load or self._persist is None:
            return h
        shape = self._block_shape()
        if shape is None:
            return None
        dtype = torch.uint8 if self._quant is not None else (self._dtype or torch.float32)
        t = self._persist.load(key, layer, shape, dtype)
        if t is None:
            return None
        device = _model_device(self._model) or self.store.device  # a config alone names no device
        t = t.to(device)
        return self.store.put(t, kind=Kind.CACHE, key=name)

    def _hit_run(self, keys: list[str], usable: int, layers: int, load: bool) -> list[list[Handle]]:
        """Handles ``[block][layer]`` of the longest run of blocks found for every layer."""
        run: list[list[Handle]] = []
        for j in range(usable):
            row: list[Handle] = []
            for layer in range(layers):
                h = self._find(keys[j], layer, load)
                if h is None:
                    return run
                row.append(h)
            run.append(row)
        return run

    def prefetch_for(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> int:
        """Start bringing the hit blocks of a coming batch up the tiers (layer 0 first). Returns the blocks
        asked for. Blocks only on disk in ``persist_dir`` are not read here (``load_prefix`` reads them)."""
        if not self.config.reuse or not self.layers or input_ids.shape[1] <= self.config.block_tokens:
            return 0
        keys = self._keys_for(input_ids, attention_mask)
        usable = (input_ids.shape[1] - 1) // self.config.block_tokens
        runs = [self._hit_run(row, usable, len(self.layers), load=False) for row in keys]
        order = [blk[layer] for layer in range(len(self.layers)) for run in runs for blk in run]
        self.store.prefetch(order)
        self.counts["prefetched_blocks"] += len(order)
        return len(order)

    def load_prefix(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> int:
        """Serve the longest run of stored prompt blocks shared by all rows; returns the tokens served.

        Call it on an empty cache before the forward (``generate`` then computes only the rest; for a plain
        forward pass ``input_ids[:, n:]``). The prompt's remaining full blocks are stored as the forward
        computes them. At least one token is always left to compute.
        """
        if not self.config.reuse or input_ids.dim() != 2:
            return 0
        if self.get_seq_length() > 0:
            self._pending = None
            return 0
        blk = self.config.block_tokens
        keys = self._keys_for(input_ids, attention_mask)
        usable = (input_ids.shape[1] - 1) // blk
        n = 0
        runs: list[list[list[Handle]]] = []
        if self.layers and usable:
            runs = [self._hit_run(row, usable, len(self.layers), load=True) for row in keys]
            n = min(len(r) for r in runs)
            shared = _shared_blocks(keys, attention_mask, blk, usable)
            if shared > n and self._prefill_shared(input_ids[:1, : shared * blk], keys[0][:shared], runs[0][:n]):
                runs = [self._hit_run(row, usable, len(self.layers), load=True) for row in keys]
                n = min(len(r) for r in runs)
        self.counts["lookups"] += len(keys) * len(keys[0]) if keys else 0
        if n:
            n = self._serve([r[:n] for r in runs], n)
        for run in runs:
            self.store.touch([h for blk_h in reversed(run[:n]) for h in blk_h])  # Note: [prefix tail first]
        self.counts["hits"] += n * len(keys)
        self.counts["hit_tokens"] += n * blk * len(keys)
        self.counts["misses"] += sum(len(row) - n for row in keys)
        self._pending = _PromptBlocks(keys, n)
        return n * blk

    def _prefill_shared(self, ids: torch.Tensor, keys: list[str], hit: list[list[Handle]]) -> bool:
        """Compute and store the blocks of a prefix that every row of a batch shares, once, at batch 1.

        Note: [shared prefill]
            Rows of a batch that miss on the same leading blocks (same token ids, mask bits all 1) would each
            prefill them. Instead, ``ids`` (``[1, blocks * block_tokens]``, the shared prefix of row 0) runs
            through the model in this empty cache: its stored hit blocks ``hit`` are served first, exactly as
            for any prompt, and the forward computes and stores the rest under the keys a normal prefill
            uses. The cache is then reset, and every row is served the blocks as hits. Skipped for one row
            (the normal prefill stores the same blocks at the same cost) and when the cache has no model.

        Returns:
            Whether a forward ran (the caller looks the blocks up again).
        """
        model = self._model
        if ids.shape[0] != 1 or not isinstance(model, torch.nn.Module) or not keys:
            return False
        blk = self.config.block_tokens
        served = self._serve([hit], len(hit)) if hit else 0
        self._pending = _PromptBlocks([keys], served)
        kwargs: dict[str, Any] = {cache_kwarg(model): self, "use_cache": True}
        if "logits_to_keep" in inspect.signature(model.forward).parameters:
            kwargs["logits_to_keep"] = 1  # only the K/V are wanted
        try:
            with torch.no_grad():
                model(ids[:, served * blk :], **kwargs)
        finally:
            self.reset()  # frees the working blocks; the stored prefix blocks stay
        self.counts["shared_prefill_blocks"] += len(keys) - served
        self.counts["shared_prefill_tokens"] += (len(keys) - served) * blk
        return True

    def _serve(self, runs: list[list[list[Handle]]], n: int) -> int:
        """Load ``n`` blocks of every row into the layers; returns how many could be served (see Note:
        [evicted between lookup and get])."""
        waits = self.store.stats()["waits"]
        got: list[list[list[torch.Tensor]]] = []  # [layer][row][block]
        for layer in range(len(self.layers)):
            if layer + 1 < len(self.layers):
                self.store.prefetch([blk[layer + 1] for run in runs for blk in run[:n]])
            rows: list[list[torch.Tensor]] = []
            for run in runs:
                parts: list[torch.Tensor] = []
                for j, blk in enumerate(run[:n]):
                    try:
                        parts.append(self._decode(self.store.get(blk[layer])))
                    except (EntryNotFoundError, SpillError):
                        self.counts["evicted_hits"] += 1
                        n = j
                        break
                rows.append(parts)
            got.append(rows)
            got = [[parts[:n] for parts in rows] for rows in got]
            if n == 0:
                return 0
        self.counts["prefetch_waits"] += self.store.stats()["waits"] - waits
        for layer, rows in enumerate(got):
            full = torch.stack([torch.cat(parts, dim=-2) for parts in rows], dim=1)
            target = self.layers[layer]
            if isinstance(target, TieredLayer):
                target.lazy_initialization(full[0], full[1])
                target._set_full(full)
                if self.config.offload:
                    self._keep_window(layer)
        return n

    def _decode(self, t: torch.Tensor) -> torch.Tensor:
        return self._quant.decode(t) if self._quant is not None else t

    def _store_blocks(self, layer: int, keys: torch.Tensor, values: torch.Tensor) -> None:
        """Store the pending prompt's computed full blocks of ``layer`` (``keys``: ``[B, H, L, D]``)."""
        pending = self._pending
        if pending is None:
            return
        blk = self.config.block_tokens
        if self._geometry is None:
            self._geometry = (len(self.layers), keys.shape[1], keys.shape[-1])
            self._dtype = self._dtype if self._dtype is not None else keys.dtype
        if self.config.quant != "none" and self._quant is None:
            shape = (2, keys.shape[1], blk, keys.shape[-1])
            self._quant = KVQuantizer(self.config.quant, shape, keys.dtype, self.config.quant_group)
        for r, row in enumerate(pending.keys):
            for j in range(pending.first, min(len(row), keys.shape[-2] // blk)):
                name = f"kv/{row[j]}/{layer}"
                if self.store.lookup(name) is not None:
                    continue
                block = torch.stack([keys[r, :, j * blk : (j + 1) * blk], values[r, :, j * blk : (j + 1) * blk]])
                data = self._quant.encode(block) if self._quant is not None else block
                self._registered[name] = self.store.put(data, kind=Kind.CACHE, key=name)
                self.counts["stored_blocks"] += 1
                if self._persist is not None:
                    self._write_async(row[j], layer, data)
        if len(pending.done) == len(self.layers):
            for row in pending.keys:  # Note: [prefix tail first]
                found = (
                    self.store.lookup(f"kv/{row[j]}/{i}")
                    for j in reversed(range(len(row)))
                    for i in range(len(self.layers))
                )
                self.store.touch([h for h in found if h is not None])

    def _write_async(self, key: str, layer: int, data: torch.Tensor) -> None:
        if self._writer is None:
            self._writer = cf.ThreadPoolExecutor(1, thread_name_prefix="tiercache-kv-persist")
            weakref.finalize(self, self._writer.shutdown, wait=True)
        persist = self._persist
        if persist is not None:
            self._writer.submit(persist.save, key, layer, data.detach().to("cpu", copy=True))

    # ------------------------------------------------------------------ housekeeping

    def flush(self) -> None:
        """Wait until persisted blocks are written."""
        if self._writer is not None:
            self._writer.submit(lambda: None).result()

    def close(self) -> None:
        """Flush persistence, free this cache's working blocks (and its private store). Idempotent."""
        self.flush()
        if self._writer is not None:
            self._writer.shutdown(wait=True)
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
        for h in [*self._shared.working, *self._registered.values()]:
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
        if self._persist is not None:
            out.update(self._persist.counts)
        return out


def _shared_blocks(keys: list[list[str]], attention_mask: torch.Tensor | None, blk: int, usable: int) -> int:
    """How many leading blocks (at most ``usable``) are the same in every row, with mask bits all 1.

    Keys chain the token ids and mask bits of every earlier block, so equal keys at block ``j`` mean equal
    prefixes up to block ``j``. A single row shares nothing (see Note: [shared prefill]).
    """
    if len(keys) < 2:
        return 0
    m = 0
    while m < usable and m < len(keys[0]) and all(len(row) > m and row[m] == keys[0][m] for row in keys):
        m += 1
    if m and attention_mask is not None:
        zeros = attention_mask[:, : m * blk].eq(0).any(dim=0).nonzero()
        if zeros.numel():
            m = min(m, int(zeros[0, 0]) // blk)
    return m


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
