"""``python -m lightning_tiercache.bench kv``: few-shot generation and scoring, DynamicCache vs TieredKVCache.

Generation: ``--prompts`` prompts sharing a ``--prefix``-token prefix, each with its own question of
``--question // 2`` to ``--question`` tokens (``--pad left``, the default: batched with left padding, as HF
batched ``generate`` needs; ``--pad none``: every question ``--question`` tokens), ``--new`` greedy tokens
each, in batches of ``--batch``; a small Llama-style model from a config (random weights). Variants run
alternately per batch after a warm-up: ``DynamicCache``; ``DynamicCache(offloading=True)`` (CUDA only);
``TieredKVCache`` without reuse; with offload (tiering, device KV bounded); with reuse; and the **bound**:
the same batches with the shared prefix already computed and served into the cache outside the timed region
(the time reuse would take if the prefix cost nothing). Every timed run of the reuse variant starts from an
empty store, so its first batch computes the prefix (once, at batch 1: the shared prefill).

Scoring: ``--score-questions`` multiple-choice questions after one shared ``--shots``-shot context (shots of
``--shot-tokens`` tokens), each question's ``--choices`` continuations one batch, right-padded; the
log-likelihood forward ``model(ids, attention_mask=mask).logits`` against ``score_forward`` with reuse (from
an empty store) and its bound (the context precomputed and served outside timing).

Reported: tokens/s relative to the baseline, fraction of the bound (bound time / variant time), hit rate,
peak device KV bytes (CUDA: allocator peak above the weights; CPU: resident K/V plus the store's device-tier
peak), whether greedy tokens equal DynamicCache's and the largest logit difference (scoring: on real tokens,
against the uncached forward). The lossy codecs (``int8``/``int4`` prefix blocks) are measured by token
agreement with the exact run and by perplexity of the question tokens given the served prefix.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import Any

import torch

from lightning_tiercache.bench.common import base_parser, emit, median, timed
from lightning_tiercache.config import TierConfig
from lightning_tiercache.kv.cache import KVConfig, TieredKVCache, cache_kwarg
from lightning_tiercache.kv.scoring import score_forward
from lightning_tiercache.store.placement import TierStore

__all__ = ["main"]

Batch = tuple[torch.Tensor, torch.Tensor]  # input ids, attention mask


def _model(full: bool, device: torch.device, layers: int | None = None) -> Any:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    width = 1024 if full else 256
    cfg = LlamaConfig(
        vocab_size=4096, hidden_size=width, intermediate_size=2 * width, num_hidden_layers=layers or (8 if full else 4),
        num_attention_heads=8, num_key_value_heads=8, max_position_embeddings=8192,
    )  # fmt: skip
    model: Any = LlamaForCausalLM(cfg)
    model = model.to(device).eval()
    model.generation_config.pad_token_id = 0
    model.generation_config.eos_token_id = None
    return model


def _pad(rows: list[torch.Tensor], side: str, device: torch.device) -> Batch:
    width = max(r.numel() for r in rows)
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, r in enumerate(rows):
        cols = slice(width - r.numel(), width) if side == "left" else slice(0, r.numel())
        ids[i, cols], mask[i, cols] = r, 1
    return ids.to(device), mask.to(device)


def _workload(args: Any, device: torch.device) -> tuple[torch.Tensor, list[Batch]]:
    g = torch.Generator().manual_seed(1)
    prefix = torch.randint(3, 4096, (args.prefix,), generator=g)
    if args.pad == "left":
        lengths = torch.randint(max(1, args.question // 2), args.question + 1, (args.prompts,), generator=g).tolist()
    else:
        lengths = [args.question] * args.prompts
    rows = [torch.cat([prefix, torch.randint(3, 4096, (n,), generator=g)]) for n in lengths]
    return prefix, [_pad(rows[i : i + args.batch], "left", device) for i in range(0, len(rows), args.batch)]


def _scoring_workload(args: Any, device: torch.device) -> tuple[torch.Tensor, list[Batch]]:
    """One shared few-shot context; per question, its choices as one right-padded batch."""
    g = torch.Generator().manual_seed(2)
    context = torch.randint(3, 4096, (args.shots * args.shot_tokens,), generator=g)
    batches = []
    for _ in range(args.score_questions):
        question = torch.randint(3, 4096, (int(torch.randint(24, 49, (1,), generator=g)),), generator=g)
        choices = [torch.randint(3, 4096, (int(torch.randint(1, 5, (1,), generator=g)),), generator=g)]
        choices += [torch.randint(3, 4096, (int(torch.randint(1, 5, (1,), generator=g)),), generator=g)
                    for _ in range(args.choices - 1)]  # fmt: skip
        batches.append(_pad([torch.cat([context, question, c]) for c in choices], "right", device))
    return context, batches


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

    ``prepare`` runs outside the timed region (the bound serves its precomputed prefix there); ``run_batch``
    is what is timed.
    """

    new = 32

    def __init__(
        self,
        model: Any,
        make: Callable[[], Any],
        store: TierStore | None = None,
        seed: Callable[[], None] | None = None,
    ) -> None:
        self.model, self.make, self.store, self.seed = model, make, store, seed
        self.sequences: list[torch.Tensor] = []
        self.logits: list[torch.Tensor] = []
        self.peak = 0
        self.hits = self.total = 0

    def start(self) -> None:
        """Forget the last run (and empty the store's cache entries: the first batch misses again)."""
        if self.store is not None:
            self.store.clear_cache()
        if self.seed is not None:
            self.seed()
        self.sequences, self.logits, self.peak, self.hits, self.total = [], [], 0, 0, 0

    def run(self, batches: list[Batch]) -> None:
        self.start()
        for batch in batches:
            self.run_batch(self.prepare(batch), batch)

    def prepare(self, batch: Batch) -> Any:
        cache = self.make()
        if self.seed is not None and isinstance(cache, TieredKVCache):
            cache.load_prefix(*batch)  # the bound: the prefix is served before the clock starts
        return cache

    def run_batch(self, cache: Any, batch: Batch) -> None:
        ids, mask = batch
        cuda = ids.is_cuda
        if cuda:
            torch.cuda.synchronize()
            base = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
        if isinstance(cache, TieredKVCache) and self.seed is None:
            cache.load_prefix(ids, mask)
        with torch.no_grad():
            out = self.model.generate(
                ids, attention_mask=mask, max_new_tokens=self.new, do_sample=False, output_logits=True,
                return_dict_in_generate=True, **{cache_kwarg(self.model): cache},
            )  # fmt: skip
        self.sequences.append(out.sequences)
        self.logits.append(torch.stack(out.logits))
        if cuda:
            self.peak = max(self.peak, torch.cuda.max_memory_allocated() - base)
        elif isinstance(cache, TieredKVCache):
            s = cache.stats()
            dev = s["store_device_peak_bytes"]
            live = s["peak_device_resident_bytes"] if cache.config.offload else _buffer_bytes(cache)
            self.peak = max(self.peak, live + dev)
        else:
            self.peak = max(self.peak, _kv_bytes(cache))
        if isinstance(cache, TieredKVCache):
            s = cache.stats()
            self.hits += s["hits"]
            self.total += s["hits"] + s["misses"]
            cache.close()


def _ppl(model: Any, ids: torch.Tensor, cache: Any, served: int, start: int) -> float:
    """Perplexity of ``ids[:, start + 1:]`` given a cache already holding ``served`` tokens."""
    kw = {cache_kwarg(model): cache}
    with torch.no_grad():
        logits = model(ids[:, served:], use_cache=True, **kw).logits.float()[:, start - served : -1]
    tgt = ids[:, start + 1 :]
    loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), tgt.reshape(-1))
    return math.exp(loss.item())


def _store(device: torch.device, device_bytes: int | str) -> TierStore:
    return TierStore(TierConfig(device=str(device), device_bytes=device_bytes, host_bytes="8GiB", disk_bytes="8GiB"))


def _seed_prefix(model: Any, store: TierStore, config: KVConfig, prefix: torch.Tensor) -> Callable[[], None]:
    """A function that stores exactly the prefix's blocks (a batch-1 prefill) in an emptied ``store``."""

    def seed() -> None:
        store.clear_cache()
        cache = TieredKVCache(store, config, model=model)
        ids = prefix[None].to(next(model.parameters()).device)
        cache.load_prefix(ids)
        with torch.no_grad():
            model(ids, **{cache_kwarg(model): cache}, use_cache=True)
        cache.close()

    return seed


def main(argv: list[str]) -> int:
    p = base_parser("kv", __doc__.splitlines()[0] if __doc__ else "kv")
    p.add_argument("--prompts", type=int, default=32)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--prefix", type=int, default=1024)
    p.add_argument("--question", type=int, default=64, help="longest question (left padding: half to all of it)")
    p.add_argument("--pad", choices=("left", "none"), default="left")
    p.add_argument("--new", type=int, default=32)
    p.add_argument("--block", type=int, default=64)
    p.add_argument("--layers", type=int, default=None, help="decoder layers (default 4, 8 with --full)")
    p.add_argument("--shots", type=int, default=5)
    p.add_argument("--shot-tokens", type=int, default=120)
    p.add_argument("--choices", type=int, default=4)
    p.add_argument("--score-questions", type=int, default=12)
    p.add_argument("--skip", choices=("none", "generation", "scoring"), default="none")
    args = p.parse_args(argv)
    torch.set_grad_enabled(False)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if args.full:
        args.prompts, args.prefix, args.batch = 64, 1024, 16
    repeats = args.repeats or 3
    _Variant.new = args.new
    model = _model(args.full, device, args.layers)
    out: dict[str, Any] = {"workload": vars(args)}
    rows: list[dict[str, Any]] = []
    if args.skip != "generation":
        gen_rows, extra = _generation(args, model, device, repeats)
        rows += gen_rows
        out.update(extra)
    if args.skip != "scoring":
        score_rows, extra = _scoring(args, model, repeats)
        rows += score_rows
        out.update(extra)
    emit("kv: DynamicCache vs TieredKVCache", rows, args.json, out)
    return 0


def _generation(args: Any, model: Any, device: torch.device, repeats: int) -> tuple[list[dict[str, Any]], dict]:
    prefix, batches = _workload(args, device)
    layers = model.config.num_hidden_layers
    longest = args.prefix + args.question + args.new
    dyn_bytes = args.batch * layers * 2 * model.config.hidden_size * longest * 4
    plain_store, reuse_store, bound_store = _store(device, "8GiB"), _store(device, "8GiB"), _store(device, "8GiB")
    off_store = _store(device, dyn_bytes // (8 * layers))
    blk = args.block

    def tiered(store: TierStore, **kw: Any) -> Callable[[], TieredKVCache]:
        return lambda: TieredKVCache(store, KVConfig(block_tokens=blk, **kw), model=model)

    from transformers import DynamicCache

    variants: dict[str, _Variant] = {"DynamicCache": _Variant(model, DynamicCache)}
    if device.type == "cuda":
        variants["DynamicCache(offloading)"] = _Variant(model, lambda: DynamicCache(offloading=True))
    variants["Tiered (no reuse)"] = _Variant(model, tiered(plain_store, reuse=False), plain_store)
    variants["Tiered offload"] = _Variant(model, tiered(off_store, reuse=False, offload=True), off_store)
    variants["Tiered reuse"] = _Variant(model, tiered(reuse_store), reuse_store)
    seed = _seed_prefix(model, bound_store, KVConfig(block_tokens=blk), prefix)
    variants["bound (prefix precomputed)"] = _Variant(model, tiered(bound_store), None, seed)
    for v in variants.values():  # warm-up
        v.run(batches[:2])
    # Alternate per batch (A B C D, A B C D, ...) so that load from other processes hits every variant alike.
    times: dict[str, list[float]] = {k: [] for k in variants}
    for _ in range(repeats):
        spent = dict.fromkeys(variants, 0.0)
        for v in variants.values():
            v.start()
        for batch in batches:
            for name, v in variants.items():
                state = v.prepare(batch)
                spent[name] += timed(functools.partial(v.run_batch, state, batch))
        for name in variants:
            times[name].append(spent[name])
    base = variants["DynamicCache"]
    bound = median(times["bound (prefix precomputed)"])
    rows = []
    for name, v in variants.items():
        same = all(torch.equal(a, b) for a, b in zip(v.sequences, base.sequences, strict=True))
        diff = max((a - b).abs().max().item() for a, b in zip(v.logits, base.logits, strict=True))
        rows.append({
            "workload": f"generate ({args.pad} pad)",
            "variant": name,
            "tokens/s vs baseline": median(times["DynamicCache"]) / median(times[name]),
            "of bound": bound / median(times[name]),
            "hit rate": v.hits / v.total if v.total else None,
            "peak device KV MiB": v.peak / 2**20,
            "KV vs Dynamic": v.peak / base.peak if base.peak else float("nan"),
            "tokens equal": same,
            "max |dlogit|": diff,
        })  # fmt: skip
    tokens = args.prompts * args.new
    extra = {"dynamic_tokens_per_s": tokens / median(times["DynamicCache"])}
    extra["lossy"] = _lossy(model, batches, reuse_store, base, blk)
    for store in (plain_store, reuse_store, off_store, bound_store):
        store.close()
    return rows, extra


def _scoring(args: Any, model: Any, repeats: int) -> tuple[list[dict[str, Any]], dict]:
    """Log-likelihood scoring: the uncached forward against ``score_forward`` with reuse and its bound."""
    device = next(model.parameters()).device
    context, batches = _scoring_workload(args, device)
    blk = args.block
    config = KVConfig(block_tokens=blk)
    reuse_store, bound_store = _store(device, "8GiB"), _store(device, "8GiB")
    seed = _seed_prefix(model, bound_store, config, context)
    answer = context.numel() + 24  # every question has >= 24 tokens: the choices' logits come after this

    def uncached(batch: Batch) -> tuple[torch.Tensor, int, int, int]:
        with torch.no_grad():
            return model(batch[0], attention_mask=batch[1]).logits, 0, 0, 0

    def reuse(cache: TieredKVCache, batch: Batch) -> tuple[torch.Tensor, int, int, int]:
        scored = score_forward(model, *batch, cache=cache, logits_from=answer)
        s = cache.stats()
        cache.close()
        return scored.logits, scored.start, s["hits"], s["hits"] + s["misses"]

    def bound_cache(batch: Batch) -> TieredKVCache:
        cache = TieredKVCache(bound_store, config, model=model)
        cache.load_prefix(*batch, max_columns=answer)
        return cache

    def bound(cache: TieredKVCache, batch: Batch) -> tuple[torch.Tensor, int, int, int]:
        n = cache.get_seq_length()
        from lightning_tiercache.kv.prefix import mask_positions

        with torch.no_grad():
            logits = model(
                batch[0][:, n:], attention_mask=batch[1], position_ids=mask_positions(batch[1])[:, n:],
                use_cache=True, **{cache_kwarg(model): cache},
            ).logits  # fmt: skip
        cache.close()
        return logits, n, 0, 0

    prepare: dict[str, Callable[[Batch], Any]] = {
        "uncached forward": lambda _: None,
        "score_forward (reuse)": lambda b: TieredKVCache(reuse_store, config, model=model),
        "bound (context precomputed)": bound_cache,
    }
    run: dict[str, Callable[[Any, Batch], tuple[torch.Tensor, int, int, int]]] = {
        "uncached forward": lambda _, b: uncached(b),
        "score_forward (reuse)": reuse,
        "bound (context precomputed)": bound,
    }
    starts = {
        "uncached forward": lambda: None,
        "score_forward (reuse)": reuse_store.clear_cache,
        "bound (context precomputed)": seed,
    }
    times: dict[str, list[float]] = {k: [] for k in run}
    results: dict[str, list[tuple[torch.Tensor, int, int, int]]] = {k: [] for k in run}
    for r in range(repeats + 1):  # round 0 warms up
        spent = dict.fromkeys(run, 0.0)
        results = {k: [] for k in run}
        for begin in starts.values():
            begin()
        for batch in batches:
            for name in run:
                state = prepare[name](batch)
                holder: list[tuple[torch.Tensor, int, int, int]] = []
                spent[name] += timed(functools.partial(_call_into, holder, run[name], state, batch))
                results[name].append(holder[0])
        if r:
            for name in run:
                times[name].append(spent[name])
    rows = []
    ref = results["uncached forward"]
    for name in run:
        diff = 0.0
        for (logits, start, _, _), (full, _, _, _), (_, mask) in zip(results[name], ref, batches, strict=True):
            real = mask[:, start:].bool()
            diff = max(diff, (logits.float() - full[:, start:].float()).abs()[real].max().item())
        hits = sum(x[2] for x in results[name])
        total = sum(x[3] for x in results[name])
        rows.append({
            "workload": f"score ({args.choices} choices, {args.shots}-shot)",
            "variant": name,
            "tokens/s vs baseline": median(times["uncached forward"]) / median(times[name]),
            "of bound": median(times["bound (context precomputed)"]) / median(times[name]),
            "hit rate": hits / total if total else None,
            "max |dlogit|": diff,
        })  # fmt: skip
    scored = sum(b[0].numel() for b in batches)
    extra = {"scoring_uncached_tokens_per_s": scored / median(times["uncached forward"])}
    reuse_store.close()
    bound_store.close()
    return rows, extra


def _call_into(out: list[Any], fn: Callable[[Any, Batch], Any], state: Any, batch: Batch) -> None:
    out.append(fn(state, batch))


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
