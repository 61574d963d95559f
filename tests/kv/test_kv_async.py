"""TieredKVCache over a store on the simulated asynchronous device: logits equal DynamicCache's, bit for bit.

Blocks tiered down to host and disk come back through copies that land late (random delays, poison in fresh
memory), so a block read before its copy landed changes a logit.
"""

from __future__ import annotations

import pytest
import torch

from lightning_tiercache.kv import KVConfig, TieredKVCache, cache_kwarg
from tests.kv_models import tiny_model

NEW = 5


def _gen(model, ids, cache=None):
    extra = {cache_kwarg(model): cache} if cache is not None else {}
    with torch.no_grad():
        return model.generate(
            ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW, do_sample=False, output_logits=True,
            return_dict_in_generate=True, **extra,
        )  # fmt: skip


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("spill", [False, True], ids=["host", "disk"])
def test_logits_bitwise_equal_dynamic_cache_with_delayed_copies(sim_store, seed, spill):
    model = tiny_model("llama")
    ids = torch.randint(3, 128, (2, 29), generator=torch.Generator().manual_seed(seed))
    ref = _gen(model, ids)
    budgets = {"host_bytes": "16KiB", "disk_bytes": "64MiB"} if spill else {"host_bytes": "64MiB", "disk_bytes": 0}
    store = sim_store(seed, max_delay_s=1e-3, device_bytes="4KiB", codec="none", **budgets)
    cache = TieredKVCache(store, KVConfig(block_tokens=8, reuse=False, offload=True), model=model)
    out = _gen(model, ids, cache)
    assert torch.equal(out.sequences, ref.sequences)
    for a, b in zip(out.logits, ref.logits, strict=True):
        assert torch.equal(a, b)
    store.settle()
    counts = store.device_ops.counts
    assert counts["downloads"] > 0 and counts["uploads"] > 0
