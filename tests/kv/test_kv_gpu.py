"""TieredKVCache on CUDA: exact with blocks in the pinned host pool, and a bounded device working set."""

from __future__ import annotations

import pytest
import torch

from lightning_tiercache.kv.cache import KVConfig, TieredKVCache, cache_kwarg
from tests.kv_models import FAMILIES, tiny_model

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
]


def _gen(model, ids, cache=None):
    extra = {cache_kwarg(model): cache} if cache is not None else {}
    with torch.no_grad():
        return model.generate(
            ids, attention_mask=torch.ones_like(ids), max_new_tokens=8, do_sample=False, output_logits=True,
            return_dict_in_generate=True, **extra,
        )  # fmt: skip


@pytest.mark.parametrize("family", FAMILIES)
def test_offloaded_generation_is_bitwise_dynamic_cache_on_cuda(make_store, family):
    model = tiny_model(family).cuda()
    ids = torch.randint(3, 128, (2, 45), device="cuda")
    ref = _gen(model, ids)
    store = make_store(device="cuda", device_bytes="8KiB", host_bytes="64MiB", disk_bytes="64MiB")
    cache = TieredKVCache(store, KVConfig(block_tokens=8, offload=True, reuse=False), model=model)
    out = _gen(model, ids, cache)
    assert torch.equal(out.sequences, ref.sequences)
    for a, b in zip(out.logits, ref.logits, strict=True):
        assert torch.equal(a, b)
    store.settle()
    assert store.stats()["bytes_to_host"] > 0
    assert store.stats()["bytes_to_device"] > 0


def test_reused_prefix_on_cuda_keeps_greedy_tokens(make_store):
    model = tiny_model("llama").cuda()
    prefix = torch.randint(3, 128, (1, 32), device="cuda")
    store = make_store(device="cuda", device_bytes="16KiB", host_bytes="64MiB", disk_bytes=0)
    for seed in range(2):
        q = torch.randint(3, 128, (2, 9), device="cuda", generator=torch.Generator("cuda").manual_seed(seed))
        ids = torch.cat([prefix.expand(2, -1), q], 1)
        cache = TieredKVCache(store, KVConfig(block_tokens=8), model=model)
        served = cache.load_prefix(ids)
        assert torch.equal(_gen(model, ids, cache).sequences, _gen(model, ids).sequences)
    assert served == 32
