"""Prefix reuse on padded batches: blocks start at a row's first real token, for generation and scoring."""

from __future__ import annotations

import pytest
import torch
from transformers import DynamicCache

from lightning_tiercache.bench.kv_workload import pad_rows
from lightning_tiercache.kv.cache import KVConfig, TieredKVCache, cache_kwarg
from lightning_tiercache.kv.prefix import block_keys, mask_positions
from lightning_tiercache.kv.scoring import score_forward
from tests.kv_models import tiny_model

BLK = 8
PREFIX = 32  # four blocks
# The largest |logit| difference between a scoring forward served stored blocks and the uncached forward,
# measured on these fp32 models: 2.4e-7 (the suffix runs with other matmul shapes); bounded here with room.
SCORE_TOL = 1e-5


def _model(family: str = "llama") -> torch.nn.Module:
    model = tiny_model(family)
    model.generation_config.eos_token_id = None  # every row generates all its tokens
    return model


def _rows(lengths: list[int], seed: int = 1) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """A shared prefix and one row per question length (prefix + question)."""
    g = torch.Generator().manual_seed(seed)
    prefix = torch.randint(3, 128, (PREFIX,), generator=g)
    return prefix, [torch.cat([prefix, torch.randint(3, 128, (q,), generator=g)]) for q in lengths]


def _gen(model, ids, mask, cache=None):
    extra = {cache_kwarg(model): cache} if cache is not None else {}
    with torch.no_grad():
        return model.generate(
            ids, attention_mask=mask, max_new_tokens=5, do_sample=False, output_logits=True,
            return_dict_in_generate=True, **extra,
        )  # fmt: skip


def _fresh_prefix_kv(model, prefix: torch.Tensor) -> DynamicCache:
    cache = DynamicCache()
    with torch.no_grad():
        model(prefix[None], **{cache_kwarg(model): cache}, use_cache=True)
    return cache


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_padded_rows_hit_the_blocks_of_unpadded_rows_and_generate_like_dynamic_cache(make_store, family):
    model = _model(family)
    store = make_store(device_bytes="64MiB", host_bytes="64MiB", disk_bytes=0)
    prefix, rows = _rows([5, 9, 3])
    first = TieredKVCache(store, KVConfig(block_tokens=BLK), model=model)
    one = rows[0][None]
    _gen(model, one, torch.ones_like(one), first)  # an unpadded row stores the prefix's four blocks
    fresh = _fresh_prefix_kv(model, prefix)
    for side in ("left", "right"):
        ids, mask = pad_rows(rows, side)
        unpadded = [block_keys(r[None], None, BLK, first.namespace)[0] for r in rows]
        assert block_keys(ids, mask, BLK, first.namespace) == unpadded
        cache = TieredKVCache(store, KVConfig(block_tokens=BLK), model=model)
        gets = store.stats()["gets"]
        served = cache.load_prefix(ids, mask)
        starts = [int(m.nonzero()[0, 0]) for m in mask]
        assert served == min(s + PREFIX for s in starts)
        # The rows share the prefix's four blocks: each is read once per layer, not once per row.
        assert store.stats()["gets"] - gets == PREFIX // BLK * len(cache.layers)
        assert cache.stats()["hits"] == sum(min(PREFIX, served - s) // BLK for s in starts)  # whole blocks served
        for i, layer in enumerate(cache.layers):
            for r, s in enumerate(starts):
                # Padding columns are zeros (masked); real ones are bitwise the unpadded prefill's K/V.
                assert not layer.keys[r, :, :s].any() and not layer.values[r, :, :s].any()
                assert torch.equal(layer.keys[r, :, s:served], fresh.layers[i].keys[0, :, : served - s])
                assert torch.equal(layer.values[r, :, s:served], fresh.layers[i].values[0, :, : served - s])
        out, ref = _gen(model, ids, mask, cache), _gen(model, ids, mask)
        assert torch.equal(out.sequences, ref.sequences)
        assert max((a - b).abs().max().item() for a, b in zip(out.logits, ref.logits, strict=True)) <= SCORE_TOL


def _choices(ctx: torch.Tensor, seed: int) -> list[torch.Tensor]:
    """One question after the shared context, and its four choices of different lengths (one row each)."""
    g = torch.Generator().manual_seed(seed)
    question = torch.randint(3, 128, (6,), generator=g)
    return [torch.cat([ctx, question, torch.randint(3, 128, (k,), generator=g)]) for k in (2, 3, 1, 4)]


@pytest.mark.parametrize("family", ["llama", "qwen2", "gpt2"])
def test_scoring_serves_the_shared_context_and_matches_the_uncached_forward(make_store, family):
    model = _model(family)
    store = make_store(device_bytes="64MiB", host_bytes="64MiB", disk_bytes=0)
    ctx = torch.randint(3, 128, (40,), generator=torch.Generator().manual_seed(2))  # five blocks
    for seed, side in [(3, "right"), (4, "left"), (5, "right")]:
        ids, mask = pad_rows(_choices(ctx, seed), side)
        answer = int(mask.sum(1).min()) - 1 if side == "right" else None  # logits needed from here on
        cache = TieredKVCache(store, KVConfig(block_tokens=BLK), model=model)
        scored = score_forward(model, ids, mask, cache=cache, logits_from=answer)
        s = cache.stats()
        cache.close()
        assert scored.start >= 40 and s["hits"] >= 4 * 4  # (nearly) the whole context was served to every row
        with torch.no_grad():
            ref = model(ids, attention_mask=mask, position_ids=mask_positions(mask)).logits[:, scored.start :]
        real = mask[:, scored.start :].bool()
        assert (scored.logits - ref).abs()[real].max().item() <= SCORE_TOL
        if answer is not None:
            assert torch.equal(scored.columns(answer), scored.logits[:, answer - scored.start :])
    with pytest.raises(ValueError, match="served from stored KV blocks"):
        scored.columns(0)


def test_plain_forward_over_left_padding_without_positions_stores_nothing(make_store):
    # Note: [positions of stored blocks]
    model = _model("llama")
    store = make_store(device_bytes="64MiB", host_bytes="64MiB", disk_bytes=0)
    _, rows = _rows([5, 9, 3])
    ids, mask = pad_rows(rows, "left")
    cache = TieredKVCache(store, KVConfig(block_tokens=BLK), model=model)
    assert cache.load_prefix(ids[:1], mask[:1]) == 0
    with torch.no_grad():
        model(ids[:1], attention_mask=mask[:1], **{cache_kwarg(model): cache}, use_cache=True)
    assert cache.stats()["stored_blocks"] == 0 and cache.stats()["unstored_position_mismatch"] == 1
    cache = TieredKVCache(store, KVConfig(block_tokens=BLK), model=model)
    cache.load_prefix(ids[:1], mask[:1])
    with torch.no_grad():
        model(ids[:1], attention_mask=mask[:1], position_ids=mask_positions(mask[:1]), **{cache_kwarg(model): cache})
    assert cache.stats()["stored_blocks"] == 4 * len(cache.layers)
