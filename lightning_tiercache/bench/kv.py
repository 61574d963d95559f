"""``python -m lightning_tiercache.bench kv``: few-shot generation and scoring, DynamicCache vs TieredKVCache.

A small Llama-style model from a config (random weights). Modes (:data:`MODES`): the default is short, the
few-shot shape of an eval (a 200-token shared prefix, 12-24-token questions, a 5-shot 4-choice scoring set);
``--full`` is the long run (a 1024-token prefix, 32-64-token questions, every variant; on CUDA also a wider,
deeper model and more prompts). An option given overrides its mode's value. On a shared machine,
``--threads 1 --clock cpu`` times CPU seconds of one thread, which other processes' load disturbs least.

Generation: ``--prompts`` prompts sharing a ``--prefix``-token prefix, each with its own question of
``--question // 2`` to ``--question`` tokens (``--pad left``, the default: batched with left padding, as HF
batched ``generate`` needs; ``--pad none``: every question ``--question`` tokens), ``--new`` greedy tokens
each, in batches of ``--batch``. Variants run alternately per batch after a warm-up: ``DynamicCache``; with
``--tiering 1`` (the ``--full`` default) ``DynamicCache(offloading=True)`` (CUDA only), ``TieredKVCache``
without reuse and with offload (tiering, device KV bounded); ``TieredKVCache`` with reuse; and the
**bound**: the same batches and decode steps with the prefix's whole blocks already computed and served into
the cache outside the timed region (the time reuse would take if the prefix cost nothing). Every timed round
of the reuse variant starts from an empty store, so its first batch computes the prefix once (Note: [shared
prefill]) and every batch is served it inside the timed region.

Scoring (:mod:`lightning_tiercache.bench.kv_scoring`): ``--score-questions`` multiple-choice questions after
one shared ``--shots``-shot context (shots of ``--shot-tokens`` tokens), each question's ``--choices``
continuations one right-padded batch; the uncached forward against ``score_forward`` and its bound.

Reported per variant: median seconds over ``--repeats`` rounds, tokens/s relative to the baseline, fraction
of the bound (bound time / variant time), hit rate, peak device KV bytes (CUDA: allocator peak above the
weights; CPU: resident K/V plus the store's device-tier peak), whether greedy tokens equal DynamicCache's and
the largest logit difference (scoring: on real tokens, against the uncached forward). Besides: the prefix's
share of the baseline's time (1 - bound / baseline: the most reuse can save), the time of one batch-1
prefill of the prefix's whole blocks, and the ceiling of "of bound" for reuse that must compute the prefix
once (bound / (bound + that prefill)). The lossy codecs (``int8``/``int4`` prefix blocks) are measured by
token agreement with the exact run and by perplexity of the question tokens given the served prefix.
"""

from __future__ import annotations

import argparse
import functools
import math
import time
from collections.abc import Callable
from typing import Any

import torch

from lightning_tiercache.bench.common import base_parser, emit, median, timed
from lightning_tiercache.bench.kv_scoring import scoring
from lightning_tiercache.bench.kv_workload import (
    Batch,
    bench_model,
    bench_store,
    generation_batches,
    seed_prefix,
    timing_row,
)  # fmt: skip
from lightning_tiercache.kv.cache import KVConfig, TieredKVCache, cache_kwarg
from lightning_tiercache.store.placement import TierStore

__all__ = ["MODES", "main", "parse"]

#: The workload of each mode. Default: few-shot prompts sharing a 200-token prefix with 12-24-token questions
#: and a 5-shot, 4-choice scoring set, generation variants DynamicCache, reuse and the bound only (``tiering``
#: 0). ``full``: the long run, with every variant. ``full-cuda``: ``--full`` on a CUDA device.
MODES: dict[str, dict[str, int]] = {
    "default": {
        "prompts": 32, "batch": 8, "prefix": 200, "question": 24, "new": 32, "width": 256, "layers": 4,
        "shots": 5, "shot_tokens": 120, "score_questions": 8, "repeats": 5, "tiering": 0,
    },
    "full": {
        "prompts": 32, "batch": 8, "prefix": 1024, "question": 64, "new": 32, "width": 256, "layers": 4,
        "shots": 5, "shot_tokens": 120, "score_questions": 24, "repeats": 3, "tiering": 1,
    },
    "full-cuda": {
        "prompts": 64, "batch": 16, "prefix": 1024, "question": 64, "new": 32, "width": 1024, "layers": 8,
        "shots": 5, "shot_tokens": 120, "score_questions": 12, "repeats": 3, "tiering": 1,
    },
}  # fmt: skip
BOUND = "bound (prefix precomputed)"


def parse(argv: list[str], cuda: bool = False) -> argparse.Namespace:
    """The options, each left out one filled from its mode (:data:`MODES`)."""
    p = base_parser("kv", __doc__.splitlines()[0] if __doc__ else "kv")
    p.add_argument("--prompts", type=int)
    p.add_argument("--batch", type=int)
    p.add_argument("--prefix", type=int, help="shared prefix tokens (default 200, --full 1024)")
    p.add_argument("--question", type=int, help="longest question (left padding: half to all of it)")
    p.add_argument("--pad", choices=("left", "none"), default="left")
    p.add_argument("--new", type=int, help="greedy tokens generated per prompt")
    p.add_argument("--block", type=int, default=64)
    p.add_argument("--width", type=int, help="hidden size (default 256; --full on CUDA 1024)")
    p.add_argument("--layers", type=int, help="decoder layers (default 4; --full on CUDA 8)")
    p.add_argument("--shots", type=int)
    p.add_argument("--shot-tokens", type=int)
    p.add_argument("--choices", type=int, default=4)
    p.add_argument("--score-questions", type=int)
    p.add_argument("--skip", choices=("none", "generation", "scoring"), default="none")
    p.add_argument(
        "--tiering", type=int, choices=(0, 1), help="1: also DynamicCache(offloading) on CUDA, no reuse, offload"
    )
    p.add_argument("--threads", type=int, help="torch threads (default: torch's)")
    p.add_argument(
        "--clock", choices=("wall", "cpu"), default="wall",
        help="wall time, or CPU time of the process (steadier on a shared machine with --threads 1)",
    )  # fmt: skip
    args = p.parse_args(argv)
    mode = "default" if not args.full else "full-cuda" if cuda else "full"
    for name, value in MODES[mode].items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    args.mode = mode
    return args


def main(argv: list[str]) -> int:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    args = parse(argv, cuda=device.type == "cuda")
    torch.set_grad_enabled(False)
    if args.threads:
        torch.set_num_threads(args.threads)
    clock = time.perf_counter if args.clock == "wall" else time.process_time
    _Variant.new = args.new
    model = bench_model(args.width, args.layers, device)
    out: dict[str, Any] = {"workload": vars(args)}
    rows: list[dict[str, Any]] = []
    if args.skip != "generation":
        gen_rows, extra = _generation(args, model, device, clock)
        rows += gen_rows
        out.update(extra)
    if args.skip != "scoring":
        score_rows, extra = scoring(args, model, clock)
        rows += score_rows
        out.update(extra)
    emit("kv: DynamicCache vs TieredKVCache", rows, args.json, out)
    return 0


def _kv_bytes(cache: Any) -> int:
    return sum(
        t.numel() * t.element_size() for layer in cache.layers for t in (layer.keys, layer.values) if t is not None
    )


def _buffer_bytes(cache: TieredKVCache) -> int:
    """Bytes of the layers' K/V buffers, spare capacity included."""
    return sum(
        b.numel() * b.element_size() for layer in cache.layers if (b := getattr(layer, "_full", None)) is not None
    )


class _Variant:
    """One way to run the generation workload; remembers tokens, logits and memory of its last run.

    ``prepare`` (untimed) makes the cache, and for the bound serves its precomputed prefix; ``run_batch`` is
    what is timed (reuse: serving the prefix and ``generate``); ``finish`` (untimed) records and closes.
    """

    new = 32

    def __init__(
        self,
        model: Any,
        make: Callable[[], Any],
        store: TierStore | None = None,
        seed: Callable[[], None] | None = None,
        clock: Callable[[], float] = time.perf_counter,
    ) -> None:
        self.model, self.make, self.store, self.seed, self.clock = model, make, store, seed, clock
        self.sequences: list[torch.Tensor] = []
        self.logits: list[torch.Tensor] = []
        self.seed_seconds: list[float] = []
        self.peak = 0
        self.hits = self.total = 0
        self._base = 0
        self._out: Any = None

    def start(self) -> None:
        """Forget the last run (and empty the store's cache entries: the first batch misses again)."""
        if self.store is not None:
            self.store.clear_cache()
        if self.seed is not None:
            self.seed_seconds.append(timed(self.seed, self.clock))
        self.sequences, self.logits, self.peak, self.hits, self.total = [], [], 0, 0, 0

    def run(self, batches: list[Batch]) -> None:
        self.start()
        for batch in batches:
            cache = self.prepare(batch)
            self.run_batch(cache, batch)
            self.finish(cache)

    def prepare(self, batch: Batch) -> Any:
        if batch[0].is_cuda:
            torch.cuda.synchronize()
            self._base = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
        cache = self.make()
        if self.seed is not None and isinstance(cache, TieredKVCache):
            cache.load_prefix(*batch)  # the bound: the prefix is served before the clock starts
        return cache

    def run_batch(self, cache: Any, batch: Batch) -> None:
        ids, mask = batch
        if isinstance(cache, TieredKVCache) and self.seed is None:
            cache.load_prefix(ids, mask)
        with torch.no_grad():
            self._out = self.model.generate(
                ids, attention_mask=mask, max_new_tokens=self.new, do_sample=False, output_logits=True,
                return_dict_in_generate=True, **{cache_kwarg(self.model): cache},
            )  # fmt: skip

    def finish(self, cache: Any) -> None:
        out, self._out = self._out, None
        self.sequences.append(out.sequences)
        self.logits.append(torch.stack(out.logits))
        if out.sequences.is_cuda:
            self.peak = max(self.peak, torch.cuda.max_memory_allocated() - self._base)
        elif isinstance(cache, TieredKVCache):
            s = cache.stats()
            live = s["peak_device_resident_bytes"] if cache.config.offload else _buffer_bytes(cache)
            self.peak = max(self.peak, live + s["store_device_peak_bytes"])
        else:
            self.peak = max(self.peak, _kv_bytes(cache))
        if isinstance(cache, TieredKVCache):
            s = cache.stats()
            self.hits += s["hits"]
            self.total += s["hits"] + s["misses"]
            cache.close()


def _generation(
    args: Any, model: Any, device: torch.device, clock: Callable[[], float]
) -> tuple[list[dict[str, Any]], dict]:
    prefix, batches = generation_batches(args.prompts, args.prefix, args.question, args.batch, args.pad, device)
    layers = model.config.num_hidden_layers
    longest = args.prefix + args.question + args.new
    dyn_bytes = args.batch * layers * 2 * model.config.hidden_size * longest * 4
    plain_store, reuse_store, bound_store = (bench_store(device, "8GiB") for _ in range(3))
    off_store = bench_store(device, dyn_bytes // (8 * layers))
    blk = args.block

    def tiered(store: TierStore, **kw: Any) -> Callable[[], TieredKVCache]:
        return lambda: TieredKVCache(store, KVConfig(block_tokens=blk, **kw), model=model)

    from transformers import DynamicCache

    variants: dict[str, _Variant] = {"DynamicCache": _Variant(model, DynamicCache)}
    if device.type == "cuda" and args.tiering:
        variants["DynamicCache(offloading)"] = _Variant(model, lambda: DynamicCache(offloading=True))
    if args.tiering:
        variants["Tiered (no reuse)"] = _Variant(model, tiered(plain_store, reuse=False), plain_store)
        variants["Tiered offload"] = _Variant(model, tiered(off_store, reuse=False, offload=True), off_store)
    variants["Tiered reuse"] = _Variant(model, tiered(reuse_store), reuse_store)
    seed = seed_prefix(model, bound_store, KVConfig(block_tokens=blk), prefix)
    variants[BOUND] = _Variant(model, tiered(bound_store), None, seed, clock)
    for v in variants.values():  # warm-up
        v.run(batches[:2])
    # Alternate per batch (A B C D, A B C D, ...) so that load from other processes hits every variant alike.
    times: dict[str, list[float]] = {k: [] for k in variants}
    for _ in range(args.repeats):
        spent = dict.fromkeys(variants, 0.0)
        for v in variants.values():
            v.start()
        for batch in batches:
            for name, v in variants.items():
                cache = v.prepare(batch)
                spent[name] += timed(functools.partial(v.run_batch, cache, batch), clock)
                v.finish(cache)
        for name in variants:
            times[name].append(spent[name])
    base = variants["DynamicCache"]
    dyn, bound = median(times["DynamicCache"]), median(times[BOUND])
    rows = []
    for name, v in variants.items():
        same = all(torch.equal(a, b) for a, b in zip(v.sequences, base.sequences, strict=True))
        diff = max((a - b).abs().max().item() for a, b in zip(v.logits, base.logits, strict=True))
        rows.append({
            **timing_row(f"generate ({args.pad} pad)", name, times, "DynamicCache", BOUND, v.hits, v.total),
            "peak device KV MiB": v.peak / 2**20,
            "KV vs Dynamic": v.peak / base.peak if base.peak else float("nan"),
            "tokens equal": same,
            "max |dlogit|": diff,
        })  # fmt: skip
    once = median(variants[BOUND].seed_seconds[1:])  # the warm-up's seed left out
    extra: dict[str, Any] = {
        "dynamic_tokens_per_s": args.prompts * args.new / dyn,
        "prefix_share_of_dynamic": 1 - bound / dyn,
        "prefix_prefill_once_s": once,
        "reuse_ceiling_of_bound": bound / (bound + once),
    }
    extra["lossy"] = _lossy(model, batches, reuse_store, base, blk)
    for store in (plain_store, reuse_store, off_store, bound_store):
        store.close()
    return rows, extra


def _ppl(model: Any, ids: torch.Tensor, cache: Any, served: int, start: int) -> float:
    """Perplexity of ``ids[:, start + 1:]`` given a cache already holding ``served`` tokens."""
    kw = {cache_kwarg(model): cache}
    with torch.no_grad():
        logits = model(ids[:, served:], use_cache=True, **kw).logits.float()[:, start - served : -1]
    tgt = ids[:, start + 1 :]
    loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), tgt.reshape(-1))
    return math.exp(loss.item())


def _lossy(model: Any, batches: list[Batch], store: TierStore, base: _Variant, blk: int) -> dict:
    """Token agreement and question perplexity of int8/int4 prefix blocks against the exact run."""
    out: dict[str, Any] = {}
    ids = batches[1][0] if len(batches) > 1 else batches[0][0]
    ids = ids[ids[:, 0] != 0] if bool((ids[:, 0] != 0).any()) else ids  # unpadded rows: a plain forward
    from transformers import DynamicCache

    for mode in ("int8", "int4"):
        store.clear_cache()
        make = functools.partial(TieredKVCache, store, KVConfig(block_tokens=blk, quant=mode), model=model)
        v = _Variant(model, make, None)
        v.run(batches[:2])
        agree = sum(
            (a[:, -_Variant.new :] == b[:, -_Variant.new :]).float().mean().item()
            for a, b in zip(v.sequences, base.sequences[:2], strict=True)
        )
        cache = TieredKVCache(store, KVConfig(block_tokens=blk, quant=mode), model=model)
        served = cache.load_prefix(ids)
        ppl = _ppl(model, ids, cache, served, served)
        exact = _ppl(model, ids, DynamicCache(), 0, served)
        out[mode] = {
            "served_tokens": served,
            "token_agreement": round(agree / 2, 4),
            "question_ppl": round(ppl, 3),
            "exact_ppl": round(exact, 3),
            "ppl_delta_pct": round(100 * (ppl / exact - 1), 3),
        }
    return out
