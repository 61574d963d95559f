"""The scoring part of ``bench kv``: multiple-choice log-likelihood scoring after one shared few-shot context.

Each question's choices are one right-padded batch. Three variants run alternately per batch, the first round
a warm-up: the uncached forward ``model(ids, attention_mask=mask).logits``; :func:`score_forward` with reuse
(from an empty store each round, so the first question computes the context); and the bound, the same
forwards with the context's blocks already stored and served into the cache before the clock starts.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any

import torch

from lightning_tiercache.bench.common import median, timed
from lightning_tiercache.bench.kv_workload import Batch, bench_store, scoring_batches, seed_prefix, timing_row
from lightning_tiercache.kv.cache import KVConfig, TieredKVCache, cache_kwarg
from lightning_tiercache.kv.prefix import mask_positions
from lightning_tiercache.kv.scoring import score_forward

__all__ = ["scoring"]

UNCACHED, REUSE, BOUND = "uncached forward", "score_forward (reuse)", "bound (context precomputed)"


@dataclasses.dataclass
class _Scorer:
    """``prepare`` (untimed) makes the state ``run`` (timed) scores a batch with; ``begin`` starts a round."""

    prepare: Callable[[Batch], Any]
    run: Callable[[Any, Batch], tuple[torch.Tensor, int]]
    begin: Callable[[], Any] = lambda: None


def scoring(args: Any, model: Any, clock: Callable[[], float]) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Rows for the three variants and the extra figures (uncached tokens/s, the context's share, ceiling)."""
    device = next(model.parameters()).device
    context, batches = scoring_batches(args.score_questions, args.shots, args.shot_tokens, args.choices, device)
    config = KVConfig(block_tokens=args.block)
    reuse_store, bound_store = bench_store(device, "8GiB"), bench_store(device, "8GiB")
    seed = seed_prefix(model, bound_store, config, context)
    answer = context.numel() + 24  # every question has >= 24 tokens: the choices' logits come after this

    def uncached(_: Any, batch: Batch) -> tuple[torch.Tensor, int]:
        return model(batch[0], attention_mask=batch[1]).logits, 0

    def reuse(cache: TieredKVCache, batch: Batch) -> tuple[torch.Tensor, int]:
        scored = score_forward(model, *batch, cache=cache, logits_from=answer)
        return scored.logits, scored.start

    def bound_cache(batch: Batch) -> TieredKVCache:
        cache = TieredKVCache(bound_store, config, model=model)
        cache.load_prefix(*batch, max_columns=answer)
        return cache

    def bound(cache: TieredKVCache, batch: Batch) -> tuple[torch.Tensor, int]:
        n = cache.get_seq_length()
        logits = model(
            batch[0][:, n:], attention_mask=batch[1], position_ids=mask_positions(batch[1])[:, n:],
            use_cache=True, **{cache_kwarg(model): cache},
        ).logits  # fmt: skip
        return logits, n

    seeds: list[float] = []
    scorers = {
        UNCACHED: _Scorer(lambda _: None, uncached),
        REUSE: _Scorer(lambda _: TieredKVCache(reuse_store, config, model=model), reuse, reuse_store.clear_cache),
        BOUND: _Scorer(bound_cache, bound, lambda: seeds.append(timed(seed, clock))),
    }
    times: dict[str, list[float]] = {k: [] for k in scorers}
    results: dict[str, list[tuple[torch.Tensor, int]]] = {}
    counts: dict[str, list[int]] = {}
    with torch.no_grad():
        for r in range(args.repeats + 1):  # round 0 warms up
            spent = dict.fromkeys(scorers, 0.0)
            results = {k: [] for k in scorers}
            counts = {k: [0, 0] for k in scorers}
            for s in scorers.values():
                s.begin()
            for batch in batches:
                for name, s in scorers.items():
                    state = s.prepare(batch)
                    holder: list[tuple[torch.Tensor, int]] = []
                    spent[name] += timed(functools.partial(_call_into, holder, s.run, state, batch), clock)
                    results[name].append(holder[0])
                    if isinstance(state, TieredKVCache):
                        st = state.stats()
                        counts[name][0] += st["hits"]
                        counts[name][1] += st["hits"] + st["misses"]
                        state.close()
            if r:
                for name in scorers:
                    times[name].append(spent[name])
    reuse_store.close()
    bound_store.close()
    base, best = median(times[UNCACHED]), median(times[BOUND])
    rows = []
    for name in scorers:
        diff = 0.0
        for (logits, start), (full, _), (_, mask) in zip(results[name], results[UNCACHED], batches, strict=True):
            real = mask[:, start:].bool()
            diff = max(diff, (logits.float() - full[:, start:].float()).abs()[real].max().item())
        hits, total = counts[name]
        workload = f"score ({args.choices} choices, {args.shots}-shot)"
        rows.append({**timing_row(workload, name, times, UNCACHED, BOUND, hits, total), "max |dlogit|": diff})
    once = median(seeds[1:])
    extra = {
        "scoring_uncached_tokens_per_s": sum(b[0].numel() for b in batches) / base,
        "scoring_context_share_of_uncached": 1 - best / base,
        "scoring_context_prefill_once_s": once,
        "scoring_reuse_ceiling_of_bound": best / (best + once),
    }
    return rows, extra


def _call_into(out: list[Any], fn: Callable[[Any, Batch], Any], state: Any, batch: Batch) -> None:
    out.append(fn(state, batch))
