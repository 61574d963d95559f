"""Prefix reuse of a :class:`~lightning_tiercache.kv.TieredKVCache`: find stored prompt blocks, serve them into
the layers, and store the blocks a forward computes.

A prompt row's blocks start at its first real token (:func:`~lightning_tiercache.kv.prefix.row_blocks`), so a
left- or right-padded row looks up the blocks the same row without padding would. The cache holds K/V in the
batch's padded layout: ``load_prefix`` serves the first ``n`` columns of every row, where ``n`` is the
smallest over rows of (first real column + tokens found). A row's padding columns get zeros, which the
attention mask hides; its real columns get the stored blocks' K/V bit for bit (the last block maybe in part).
The forward computes columns ``n..`` with positions counted from each row's first real token, as
``generate`` does (:func:`~lightning_tiercache.kv.prefix.mask_positions`); blocks it completes are stored.

Note: [prefix tail first]
    The store evicts least recently used entries first. After a hit or a store, a prompt's blocks are
    touched tail-first, so the head of a prefix is the most recent and its tail is evicted before it: a
    half-evicted prefix still serves its head.

Note: [evicted between lookup and get]
    A cache entry can be dropped after ``lookup`` found it and before ``get``. Serving treats that
    (``EntryEvictedError``, or a spill file that fails its checksum) as a miss at that block: the row keeps
    the blocks before it, ``n`` shrinks, and the forward recomputes the rest.

Note: [persist without a sync]
    With ``persist_dir``, each stored block is written by a background thread. The forward's thread only
    queues the block's copy to pinned host memory (CUDA) and an event after it; the writer waits for the
    event. On the host the block itself is written: it is a fresh tensor nothing changes in place, so no
    copy is made.

Note: [positions of stored blocks]
    Stored blocks are only right for a forward whose positions count from each row's first real token.
    Where the model hands its ``position_ids`` to the cache (Llama, Qwen2 and most RoPE models), the first
    layer checks them against the mask; on a mismatch (a plain forward over a left-padded batch without
    ``position_ids``) nothing is stored and ``unstored_position_mismatch`` counts it.
"""

from __future__ import annotations

import collections
import concurrent.futures as cf
import dataclasses
import inspect
import logging
import weakref
from typing import Any

import torch

from lightning_tiercache.errors import EntryNotFoundError, SpillError
from lightning_tiercache.kv.prefix import PersistDir, RowBlocks, mask_positions, row_blocks
from lightning_tiercache.kv.quant import KVQuantizer
from lightning_tiercache.store.placement import Handle, Kind, TierStore
from lightning_tiercache.store.tiers.host import is_pin_oom

__all__ = ["PrefixBlocks", "ServePlan"]

log = logging.getLogger(__name__)


@dataclasses.dataclass
class ServePlan:
    """What one ``load_prefix`` served and what the forward after it must store.

    Attributes:
        rows: each row's blocks.
        hit: per row, blocks already in the store (served in full or in part; never stored again).
        columns: columns of every row served from the store.
        mask: the attention mask of the prompt (``None``: no padding).
        done: layers whose computed blocks were stored.
    """

    rows: list[RowBlocks]
    hit: list[int]
    columns: int
    mask: torch.Tensor | None
    done: set[int] = dataclasses.field(default_factory=set)


class PrefixBlocks:
    """The stored-block side of prefix reuse for one cache: lookups, serving, storing and persistence.

    Args:
        store: the store holding blocks (shared by caches of one user).
        block_tokens: tokens per block.
        counts: counters to add to (see :meth:`TieredKVCache.stats`).
    """

    def __init__(self, store: TierStore, block_tokens: int, counts: collections.Counter[str]) -> None:
        self.store = store
        self.block_tokens = block_tokens
        self.counts = counts
        self.namespace = ""
        self.quant: KVQuantizer | None = None
        self.persist: PersistDir | None = None
        self.registered: dict[str, Handle] = {}
        self.device: torch.device | None = None
        self.block_shape: tuple[int, ...] | None = None  # of a stored block (encoded when quantized)
        self.block_dtype: torch.dtype | None = None
        self._memo: tuple[torch.Tensor, torch.Tensor | None, list[RowBlocks]] | None = None
        self._writer: cf.ThreadPoolExecutor | None = None

    # ------------------------------------------------------------------ keys

    def rows(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> list[RowBlocks]:
        """The blocks of every row (memoized for the last prompt: prefetch and load see the same batch)."""
        ids = input_ids.detach().cpu()
        mask = attention_mask.detach().cpu() if attention_mask is not None else None
        memo = self._memo
        if (
            memo is not None
            and memo[0].shape == ids.shape
            and torch.equal(memo[0], ids)
            and (memo[1] is None) == (mask is None)
            and (memo[1] is None or torch.equal(memo[1], mask))  # type: ignore[arg-type]
        ):
            return memo[2]
        rows = row_blocks(ids, mask, self.block_tokens, self.namespace)
        self._memo = (ids.clone(), mask.clone() if mask is not None else None, rows)
        return rows

    def forget(self) -> None:
        """A new namespace: free the blocks this cache stored and forget the memo."""
        self._memo = None
        for h in self.registered.values():
            self.store.free(h)
        self.registered.clear()

    def find(self, key: str, layer: int, load: bool) -> Handle | None:
        """The store handle of block ``key`` of ``layer``, read from ``persist_dir`` if asked and missing."""
        name = f"kv/{key}/{layer}"
        h = self.store.lookup(name)
        if h is not None or not load or self.persist is None or self.block_shape is None:
            return h
        t = self.persist.load(key, layer, self.block_shape, self.block_dtype or torch.float32)
        if t is None:
            return None
        return self.store.put(t.to(self.device or self.store.device), kind=Kind.CACHE, key=name)

    def hit_run(self, keys: tuple[str, ...], usable: int, layers: int, load: bool) -> list[list[Handle]]:
        """Handles ``[block][layer]`` of the longest run of blocks found for every layer."""
        run: list[list[Handle]] = []
        for j in range(min(usable, len(keys))):
            found: list[Handle] = []
            for layer in range(layers):
                h = self.find(keys[j], layer, load)
                if h is None:
                    return run
                found.append(h)
            run.append(found)
        return run

    # ------------------------------------------------------------------ serving

    def usable(self, row: RowBlocks, limit: int) -> int:
        """Blocks of ``row`` that lie wholly before column ``limit``."""
        return max(0, min(len(row.keys), (limit - row.start) // self.block_tokens)) if limit > row.start else 0

    def columns(self, rows: list[RowBlocks], hit: list[int], limit: int) -> int:
        """Columns every row can be served: the least first-real-column plus found tokens, at most ``limit``."""
        blk = self.block_tokens
        return max(0, min(min(r.start + h * blk, limit) for r, h in zip(rows, hit, strict=True)))

    def fetch(
        self, rows: list[RowBlocks], runs: list[list[list[Handle]]], layers: int, limit: int
    ) -> tuple[int, list[dict[tuple[int, int], torch.Tensor]]]:
        """Read the blocks that serving needs, layer by layer (prefetching the next layer's).

        Returns the columns that can be served and, per layer, ``{(row, block): K/V [2, H, blk, D]}``. A block
        that several rows share (the same entry) is read and decoded once per layer. See Note: [evicted
        between lookup and get].
        """
        blk = self.block_tokens
        hit = [len(run) for run in runs]
        n = self.columns(rows, hit, limit)
        got: list[dict[tuple[int, int], torch.Tensor]] = []
        waits = self.store.stats()["waits"]
        for layer in range(layers):
            if layer + 1 < layers:
                self.store.prefetch(list(dict.fromkeys(blk_h[layer + 1] for run in runs for blk_h in run)))
            parts: dict[tuple[int, int], torch.Tensor] = {}
            read: dict[Handle, torch.Tensor] = {}
            for r, row in enumerate(rows):
                for j in range(_blocks_under(row.start, n, blk)):
                    h = runs[r][j][layer]
                    block = read.get(h)
                    if block is None:
                        try:
                            block = read[h] = self._decode(self.store.get(h))
                        except (EntryNotFoundError, SpillError):
                            self.counts["evicted_hits"] += 1
                            hit[r] = j
                            runs[r] = runs[r][:j]
                            n = self.columns(rows, hit, limit)
                            break
                    parts[(r, j)] = block
            got.append(parts)
        self.counts["prefetch_waits"] += self.store.stats()["waits"] - waits
        return n, got

    def assemble(
        self, rows: list[RowBlocks], parts: dict[tuple[int, int], torch.Tensor], n: int, capacity: int
    ) -> torch.Tensor:
        """One layer's served K/V, ``[2, B, H, capacity, D]`` (columns ``n..`` left empty): zeros in padding
        columns, the stored blocks' K/V in real ones.

        Note: [one copy per row]
            A row's served columns are its blocks in order, so each row gets one copy of a run of blocks
            rather than one copy per block. Rows with the same key at their last served block have the same
            tokens up to it (keys chain), so the run is concatenated once and every such row copies (a slice
            of) it: with a shared few-shot prefix, one ``cat`` and one copy per row per layer.
        """
        blk = self.block_tokens
        sample = next(iter(parts.values()))
        _, heads, _, dim = sample.shape
        out = sample.new_empty((2, len(rows), heads, capacity, dim))
        runs: dict[str, torch.Tensor] = {}  # block key -> a run of blocks through that block, [2, H, >= len, D]
        for r, row in enumerate(rows):
            out[:, r, :, : min(row.start, n)].zero_()  # only padding needs zeros: the run covers the rest
            count = _blocks_under(row.start, n, blk)
            if not count:
                continue
            run = runs.get(row.keys[count - 1])
            if run is None:
                blocks = [parts[(r, j)] for j in range(count)]
                run = blocks[0] if count == 1 else torch.cat(blocks, dim=-2)
                for key in row.keys[:count]:
                    runs.setdefault(key, run)
            out[:, r, :, row.start : n].copy_(run[:, :, : n - row.start])
        return out

    def _decode(self, t: torch.Tensor) -> torch.Tensor:
        return self.quant.decode(t) if self.quant is not None else t

    # ------------------------------------------------------------------ storing

    def check_positions(self, plan: ServePlan, position_ids: Any) -> bool:
        """Whether a forward's ``position_ids`` are the mask's (Note: [positions of stored blocks])."""
        if plan.mask is None or not isinstance(position_ids, torch.Tensor):
            return True
        mask = plan.mask.to(position_ids.device)[:, plan.columns :]
        expected = mask_positions(plan.mask.to(position_ids.device))[:, plan.columns :]
        if position_ids.shape[-1] != expected.shape[-1]:
            return True  # not this prompt's forward
        got = position_ids.expand_as(expected)
        ok = bool(torch.equal(got[mask.ne(0)], expected[mask.ne(0)]))
        if not ok:
            self.counts["unstored_position_mismatch"] += 1
            log.warning(
                "tiercache: a forward over a padded batch did not count positions from each row's first real "
                "token; its KV blocks are not stored (pass position_ids=mask_positions(attention_mask))"
            )
        return ok

    def store_blocks(self, plan: ServePlan, layer: int, layers: int, keys: torch.Tensor, values: torch.Tensor) -> None:
        """Store the blocks of ``layer`` the forward completed (``keys``/``values``: ``[B, H, L, D]``)."""
        blk = self.block_tokens
        if self.block_shape is None:
            self.device = keys.device
            self.block_dtype = torch.uint8 if self.quant is not None else keys.dtype
            shape = (2, keys.shape[1], blk, keys.shape[-1])
            self.block_shape = (self.quant.encoded_nbytes,) if self.quant is not None else shape
        length = keys.shape[-2]
        for r, row in enumerate(plan.rows):
            end = min(row.end, length)
            for j in range(plan.hit[r], len(row.keys)):
                lo = row.start + j * blk
                if lo + blk > end:
                    break
                name = f"kv/{row.keys[j]}/{layer}"
                if self.store.lookup(name) is not None:
                    continue
                block = torch.stack([keys[r, :, lo : lo + blk], values[r, :, lo : lo + blk]])
                data = self.quant.encode(block) if self.quant is not None else block
                self.registered[name] = self.store.put(data, kind=Kind.CACHE, key=name)
                self.counts["stored_blocks"] += 1
                if self.persist is not None:
                    self._write_async(row.keys[j], layer, data)
        if len(plan.done) == layers:
            for row in plan.rows:
                self.touch(row.keys, layers)

    def touch(self, keys: tuple[str, ...], layers: int) -> None:
        """Mark a prompt's stored blocks used, tail first (Note: [prefix tail first])."""
        found = (self.store.lookup(f"kv/{keys[j]}/{i}") for j in reversed(range(len(keys))) for i in range(layers))
        self.store.touch([h for h in found if h is not None])

    def _write_async(self, key: str, layer: int, data: torch.Tensor) -> None:
        """Persist one block on the writer thread (Note: [persist without a sync])."""
        if self._writer is None:
            self._writer = cf.ThreadPoolExecutor(1, thread_name_prefix="tiercache-kv-persist")
            weakref.finalize(self, self._writer.shutdown, wait=True)
        persist = self.persist
        if persist is None:
            return
        ready: Any = None
        if data.is_cuda:
            stream = torch.cuda.current_stream(data.device)
            try:
                data = data.detach().to("cpu", non_blocking=True)  # into pinned memory, queued on this stream
                ready = torch.cuda.Event(blocking=True)
                ready.record(stream)
            except RuntimeError as err:  # Note: [pinned memory is not a device OOM]
                if not is_pin_oom(err):
                    raise
                self.counts["persist_unpinned"] += 1
                data = data.detach().to("cpu")  # no locked memory left: a blocking copy into pageable memory
        elif data.device.type != "cpu":
            data = data.detach().to("cpu")
        self._writer.submit(_save_when_ready, persist, key, layer, data, ready)

    def flush(self) -> None:
        """Wait until persisted blocks are written."""
        if self._writer is not None:
            self._writer.submit(lambda: None).result()

    def close(self) -> None:
        self.flush()
        if self._writer is not None:
            self._writer.shutdown(wait=True)


def _save_when_ready(persist: PersistDir, key: str, layer: int, data: torch.Tensor, ready: Any) -> None:
    if ready is not None:
        ready.synchronize()  # a blocking event: the writer thread sleeps, it does not spin
    persist.save(key, layer, data)


def shared_blocks(rows: list[RowBlocks], usable: list[int]) -> int:
    """How many leading blocks (at most the least ``usable``) every row has with the same key.

    Keys chain the token ids of every earlier block and ignore padding, so equal keys at block ``j`` mean
    equal real-token prefixes up to block ``j``. A single row shares nothing (see Note: [shared prefill]).
    """
    if len(rows) < 2:
        return 0
    cap = min(usable)
    first = rows[0].keys
    m = 0
    while m < cap and all(row.keys[m] == first[m] for row in rows):
        m += 1
    return m


def prefill_kwargs(model: torch.nn.Module) -> dict[str, Any]:
    """Keyword arguments that make a forward compute K/V only (one logit row, when the model allows)."""
    if "logits_to_keep" in inspect.signature(model.forward).parameters:
        return {"logits_to_keep": 1}
    return {}


def _blocks_under(start: int, n: int, blk: int) -> int:
    """Blocks (the last maybe in part) of a row starting at ``start`` that columns ``< n`` touch."""
    return -(-(n - start) // blk) if n > start else 0
