"""The workloads of ``bench kv``: a small Llama-style model, padded few-shot batches, stores and the bound's seed.

:func:`pad_rows` batches token rows with left or right padding (the layout HF batched ``generate`` and
log-likelihood scorers use); the KV tests build their padded batches with it too.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from lightning_tiercache.bench.common import median
from lightning_tiercache.config import TierConfig
from lightning_tiercache.kv.cache import KVConfig, TieredKVCache, cache_kwarg
from lightning_tiercache.store.placement import TierStore

__all__ = [
    "Batch", "bench_model", "bench_store", "generation_batches", "pad_rows", "scoring_batches", "seed_prefix",
    "timing_row",
]  # fmt: skip

Batch = tuple[torch.Tensor, torch.Tensor]  # input ids, attention mask
VOCAB = 4096


def bench_model(width: int, layers: int, device: torch.device) -> Any:
    """A Llama-style causal LM from a config (random weights, seed 0) that never stops at an EOS."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=VOCAB, hidden_size=width, intermediate_size=2 * width, num_hidden_layers=layers,
        num_attention_heads=8, num_key_value_heads=8, max_position_embeddings=8192,
    )  # fmt: skip
    model: Any = LlamaForCausalLM(cfg)
    model = model.to(device).eval()
    model.generation_config.pad_token_id = 0
    model.generation_config.eos_token_id = None
    return model


def pad_rows(rows: list[torch.Tensor], side: str, device: torch.device | str | None = None) -> Batch:
    """Batch 1-D token rows of different lengths: ``(ids, mask)``, pad id 0 and mask 0 on ``side`` ("left"
    or "right") of each shorter row."""
    if side not in ("left", "right"):
        raise ValueError(f"side must be 'left' or 'right', got {side!r}")
    width = max(r.numel() for r in rows)
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, r in enumerate(rows):
        cols = slice(width - r.numel(), width) if side == "left" else slice(0, r.numel())
        ids[i, cols], mask[i, cols] = r, 1
    return ids.to(device), mask.to(device)


def generation_batches(
    prompts: int, prefix: int, question: int, batch: int, pad: str, device: torch.device
) -> tuple[torch.Tensor, list[Batch]]:
    """A shared ``prefix``-token prefix, then per prompt a question of ``question // 2`` to ``question``
    tokens (``pad="left"``) or of exactly ``question`` tokens (``pad="none"``); left-padded batches."""
    g = torch.Generator().manual_seed(1)
    shared = torch.randint(3, VOCAB, (prefix,), generator=g)
    if pad == "left":
        lengths = torch.randint(max(1, question // 2), question + 1, (prompts,), generator=g).tolist()
    else:
        lengths = [question] * prompts
    rows = [torch.cat([shared, torch.randint(3, VOCAB, (n,), generator=g)]) for n in lengths]
    return shared, [pad_rows(rows[i : i + batch], "left", device) for i in range(0, len(rows), batch)]


def scoring_batches(
    questions: int, shots: int, shot_tokens: int, choices: int, device: torch.device
) -> tuple[torch.Tensor, list[Batch]]:
    """One shared few-shot context of ``shots * shot_tokens`` tokens; per question (24-48 tokens) its
    ``choices`` continuations (1-4 tokens each) as one right-padded batch."""
    g = torch.Generator().manual_seed(2)
    context = torch.randint(3, VOCAB, (shots * shot_tokens,), generator=g)

    def tokens(lo: int, hi: int) -> torch.Tensor:
        return torch.randint(3, VOCAB, (int(torch.randint(lo, hi + 1, (1,), generator=g)),), generator=g)

    batches = []
    for _ in range(questions):
        question = tokens(24, 48)
        batches.append(
            pad_rows([torch.cat([context, question, tokens(1, 4)]) for _ in range(choices)], "right", device)
        )
    return context, batches


def bench_store(device: torch.device, device_bytes: int | str) -> TierStore:
    return TierStore(TierConfig(device=str(device), device_bytes=device_bytes, host_bytes="8GiB", disk_bytes="8GiB"))


def seed_prefix(model: Any, store: TierStore, config: KVConfig, prefix: torch.Tensor) -> Callable[[], None]:
    """A function that empties ``store`` and stores exactly the whole blocks of ``prefix`` (a batch-1 prefill
    of them: the work reuse does once, at the first batch; Note: [shared prefill])."""
    whole = prefix[: prefix.numel() // config.block_tokens * config.block_tokens]

    def seed() -> None:
        store.clear_cache()
        if not whole.numel():
            return
        cache = TieredKVCache(store, config, model=model)
        ids = whole[None].to(next(model.parameters()).device)
        cache.load_prefix(ids)
        with torch.no_grad():
            model(ids, **{cache_kwarg(model): cache}, use_cache=True)
        cache.close()

    return seed


def timing_row(
    workload: str, variant: str, times: dict[str, list[float]], baseline: str, bound: str, hits: int, total: int
) -> dict[str, Any]:
    """The timing columns of one variant's row: median seconds, speed against the baseline and the bound."""
    mine = median(times[variant])
    return {
        "workload": workload,
        "variant": variant,
        "median s": mine,
        "tokens/s vs baseline": median(times[baseline]) / mine,
        "of bound": median(times[bound]) / mine,
        "hit rate": hits / total if total else None,
    }
