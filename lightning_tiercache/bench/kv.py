"""``python -m lightning_tiercache.bench kv``: few-shot generation with DynamicCache vs TieredKVCache.

Workload: ``--prompts`` prompts sharing a ``--prefix``-token prefix, each with its own ``--question``-token
question, ``--new`` greedy tokens each, in batches of ``--batch``; a small Llama-style model from a config
(random weights). Variants run alternately after a warm-up: ``DynamicCache``; ``DynamicCache(offloading=True)``
(CUDA only); ``TieredKVCache`` without reuse; with offload (tiering, device KV bounded); with reuse. Every
timed run of a reuse variant starts from an empty store, so its first batch misses.

Reported: generated tokens/s relative to DynamicCache, hit rate, peak device KV bytes (CUDA: allocator peak
above the weights; CPU: resident K/V plus the store's device-tier peak), whether greedy tokens equal
DynamicCache's and the largest logit difference. The lossy codecs (``int8``/``int4`` prefix blocks) are
measured by token agreement with the exact run and by perplexity of the question tokens given the served
prefix.
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
from lightning_tiercache.store.placement import TierStore

__all__ = ["main"]


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


def _workload(args: Any, device: torch.device) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    prefix = torch.randint(3, 4096, (1, args.prefix), generator=g)
    qs = torch.randint(3, 4096, (args.prompts, args.question), generator=g)
    ids = torch.cat([prefix.expand(args.prompts, -1), qs], 1).to(device)
    return list(ids.split(args.batch))


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
    """One way to run the workload; remembers tokens, logits and memory of its last run."""

    def __init__(self, model: Any, make: Callable[[], Any], store: TierStore | None = None) -> None:
        self.model, self.make, self.store = model, make, store
        self.sequences: list[torch.Tensor] = []
        self.logits: list[torch.Tensor] = []
        self.peak = 0
        self.hits = self.total = 0

    def start(self) -> None:
        """Forget the last run (and empty the store's cache entries: the first batch misses again)."""
        if self.store is not None:
            self.store.clear_cache()
        self.sequences, self.logits, self.peak, self.hits, self.total = [], [], 0, 0, 0

    def run(self, batches: list[torch.Tensor]) -> None:
        self.start()
        for ids in batches:
            self.batch(ids)

    def batch(self, ids: torch.Tensor) -> None:
        cuda = ids.is_cuda
        if cuda:
            torch.cuda.synchronize()
            base = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
        cache = self.make()
        if isinstance(cache, TieredKVCache):
            cache.load_prefix(ids)
        with torch.no_grad():
            out = self.model.generate(
                ids, attention_mask=torch.ones_like(ids), max_new_tokens=self.new, do_sample=False,
                output_logits=True, return_dict_in_generate=True, **{cache_kwarg(self.model): cache},
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

    new = 32


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


def main(argv: list[str]) -> int:
    p = base_parser("kv", __doc__.splitlines()[0] if __doc__ else "kv")
    p.add_argument("--prompts", type=int, default=32)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--prefix", type=int, default=1024)
    p.add_argument("--question", type=int, default=64)
    p.add_argument("--new", type=int, default=32)
    p.add_argument("--block", type=int, default=64)
    p.add_argument("--layers", type=int, default=None, help="decoder layers (default 4, 8 with --full)")
    args = p.parse_args(argv)
    torch.set_grad_enabled(False)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if args.full:
        args.prompts, args.prefix, args.batch = 64, 1024, 16
    repeats = args.repeats or 3
    _Variant.new = args.new
    model = _model(args.full, device, args.layers)
    batches = _workload(args, device)
    layers = model.config.num_hidden_layers
    dyn_bytes = args.batch * layers * 2 * model.config.hidden_size * (args.prefix + args.question + args.new) * 4
    plain_store = _store(device, "8GiB")
    reuse_store = _store(device, "8GiB")
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
    for v in variants.values():  # warm-up
        v.run(batches[:2])
    # Alternate per batch (A B C D, A B C D, ...) so that load from other processes hits every variant alike.
    times: dict[str, list[float]] = {k: [] for k in variants}
    for _ in range(repeats):
        spent = dict.fromkeys(variants, 0.0)
        for v in variants.values():
            v.start()
        for ids in batches:
            for name, v in variants.items():
                spent[name] += timed(functools.partial(v.batch, ids))
        for name in variants:
            times[name].append(spent[name])
    base = variants["DynamicCache"]
    tokens = args.prompts * args.new
    rows = []
    for name, v in variants.items():
        same = all(torch.equal(a, b) for a, b in zip(v.sequences, base.sequences, strict=True))
        diff = max((a - b).abs().max().item() for a, b in zip(v.logits, base.logits, strict=True))
        rows.append({
            "variant": name,
            "tokens/s vs Dynamic": median(times["DynamicCache"]) / median(times[name]),
            "time vs Dynamic": median(times[name]) / median(times["DynamicCache"]),
            "hit rate": v.hits / v.total if v.total else 0.0,
            "peak device KV MiB": v.peak / 2**20,
            "KV vs Dynamic": v.peak / base.peak if base.peak else float("nan"),
            "tokens equal": same,
            "max |dlogit|": diff,
        })  # fmt: skip
    extra = {"workload": vars(args), "dynamic_tokens_per_s": tokens / median(times["DynamicCache"])}
    extra["lossy"] = _lossy(model, batches, reuse_store, base, blk)
    emit("kv: DynamicCache vs TieredKVCache", rows, args.json, extra)
    for store in (plain_store, reuse_store, off_store):
        store.close()
    return 0


def _lossy(model: Any, batches: list[torch.Tensor], store: TierStore, base: _Variant, blk: int) -> dict:
    """Token agreement and question perplexity of int8/int4 prefix blocks against the exact run."""
    out: dict[str, Any] = {}
    ids = batches[1] if len(batches) > 1 else batches[0]
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
