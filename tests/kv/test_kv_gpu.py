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


def test_persisted_blocks_fall_back_to_a_pageable_copy_when_nothing_can_be_pinned(make_store, tmp_path, monkeypatch):
    """Note: [pinned memory is not a device OOM] -- a failed pin while persisting must not reach the eval step."""
    model = tiny_model("llama", layers=2).cuda()
    ids = torch.randint(3, 128, (1, 21), device="cuda", generator=torch.Generator("cuda").manual_seed(0))
    to = torch.Tensor.to

    def no_locked_memory(self, *args, **kwargs):
        if self.is_cuda and kwargs.get("non_blocking") and args and str(args[0]) == "cpu":
            err = torch.AcceleratorError("CUDA error: out of memory\n(no page-locked host memory left)")
            err.error_code = 2  # what c10's check of cudaHostAlloc raises
            raise err
        return to(self, *args, **kwargs)

    monkeypatch.setattr(torch.Tensor, "to", no_locked_memory)
    store = make_store(device="cuda", device_bytes="64MiB", host_bytes="64MiB", disk_bytes=0)
    cache = TieredKVCache(store, KVConfig(block_tokens=4, persist_dir=tmp_path / "kv"), model=model)
    cache.load_prefix(ids)
    with torch.no_grad():
        model(ids, **{cache_kwarg(model): cache}, use_cache=True)
    cache.flush()
    st = cache.stats()
    assert st["persist_writes"] == 5 * 2 and st["persist_unpinned"] == 5 * 2
    name, block = next(iter(cache.prefix.registered.items()))  # "kv/<key>/<layer>"
    _, key, layer = name.rsplit("/", 2)
    prefix = cache.prefix
    saved = prefix.persist.load(key, int(layer), prefix.block_shape, prefix.block_dtype)
    assert saved is not None and torch.equal(saved.cuda(), store.get(block))


def test_weights_fingerprint_of_a_cuda_model_moves_digests_not_weights_to_the_host():
    """Defect: the fingerprint copied the whole model to host memory on every rank."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from lightning_tiercache.kv.prefix import weights_fingerprint

    class HostBytes(TorchDispatchMode):
        def __init__(self) -> None:
            super().__init__()
            self.nbytes = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            from_cuda = any(isinstance(a, torch.Tensor) and a.is_cuda for a in args)
            if isinstance(out, torch.Tensor) and out.device.type == "cpu" and from_cuda:
                self.nbytes += out.numel() * out.element_size()
            return out

    model = torch.nn.Sequential(torch.nn.Linear(1024, 1024), torch.nn.Linear(1024, 8)).cuda()  # 4 MiB and more
    with HostBytes() as seen:
        weights_fingerprint(model)
    assert 0 < seen.nbytes <= 64 * 4  # 16 bytes per tensor (4 of them), against 4 MiB of weights
