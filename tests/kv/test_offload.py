"""KV offload: layers' K/V go to the host tier and stay there; decode reads one assembled entry per layer."""

from __future__ import annotations

import torch
from transformers import DynamicCache

from lightning_tiercache import Tier
from lightning_tiercache.kv.cache import KVConfig, TieredKVCache, cache_kwarg
from tests.kv_models import tiny_model

LAYERS = 4


def test_offloaded_layers_stay_in_the_host_tier_and_decode_reads_one_entry_per_layer(make_store):
    # Note: [assembled layer]. The device tier could hold every block: nothing may be left there anyway.
    model = tiny_model("llama", layers=LAYERS)
    store = make_store(device_bytes="64MiB", host_bytes="64MiB", disk_bytes=0)
    cache = TieredKVCache(store, KVConfig(block_tokens=4, reuse=False, offload=True, device_layers=1), model=model)
    ref = DynamicCache()
    ids = torch.randint(3, 128, (2, 23), generator=torch.Generator().manual_seed(0))
    kw = cache_kwarg(model)
    with torch.no_grad():
        for c in (cache, ref):
            model(ids, **{kw: c}, use_cache=True)
        gets = []
        for step in range(6):  # crosses a block boundary (23 -> 29 tokens)
            token = torch.full((2, 1), 5 + step)
            before = store.stats()["gets"]
            out = model(token, **{kw: cache}, use_cache=True).logits
            gets.append(store.stats()["gets"] - before)
            assert torch.equal(out, model(token, **{kw: ref}, use_cache=True).logits)
            store.settle()
            assert cache.stats()["blocks_per_tier"] == {Tier.HOST.label: LAYERS}  # one entry per layer
    assert gets == [LAYERS] * 6  # one read per layer (device_layers=1: each is evicted before its next step)
    assert store.stats()["tiers"]["device"]["bytes"] == 0


def test_persisting_blocks_makes_no_copy_on_the_forward_thread(make_store, tmp_path):
    # Note: [persist without a sync]. Each copy here would be a blocking device-to-host copy on CUDA.
    from torch.utils._python_dispatch import TorchDispatchMode

    class Copies(TorchDispatchMode):
        def __init__(self) -> None:
            super().__init__()
            self.count = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func in (torch.ops.aten._to_copy.default, torch.ops.aten.clone.default):
                self.count += 1
            return func(*args, **(kwargs or {}))

    model = tiny_model("llama", layers=2)
    ids = torch.randint(3, 128, (1, 21), generator=torch.Generator().manual_seed(0))
    counted = []
    for persist in (None, tmp_path / "kv"):
        store = make_store(device_bytes="64MiB", host_bytes="64MiB", disk_bytes=0)
        cache = TieredKVCache(store, KVConfig(block_tokens=4, persist_dir=persist), model=model)
        cache.load_prefix(ids)
        with torch.no_grad(), Copies() as copies:
            model(ids, **{cache_kwarg(model): cache}, use_cache=True)
        cache.flush()
        counted.append(copies.count)
    assert cache.stats()["persist_writes"] == 5 * 2  # five blocks of two layers, written in the background
    assert counted[1] == counted[0]  # the model's own casts only; none per persisted block
