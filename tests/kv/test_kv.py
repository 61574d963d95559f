"""TieredKVCache without prefix reuse is DynamicCache, bit for bit, with and without tiering and disk spills."""

from __future__ import annotations

import gc

import pytest
import torch
import transformers
from packaging.version import Version
from transformers import DynamicCache

from lightning_tiercache import Tier
from lightning_tiercache.kv.cache import KVConfig, TieredKVCache, cache_kwarg
from lightning_tiercache.kv.generate import find_hf_models, tier_generate
from lightning_tiercache.kv.quant import KVQuantizer
from tests.kv_models import FAMILIES, tiny_model

NEW = 6


def _gen(model, ids, cache=None, **kw):
    extra = {cache_kwarg(model): cache} if cache is not None else {}
    with torch.no_grad():
        return model.generate(
            ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW, do_sample=False, output_logits=True,
            return_dict_in_generate=True, **extra, **kw,
        )  # fmt: skip


def _store(make_store, spill: bool):
    # A 4 KiB device tier and a 16 KiB host tier force blocks down to disk after a few tokens.
    if spill:
        return make_store(device_bytes="4KiB", host_bytes="16KiB", disk_bytes="64MiB")
    return make_store(device_bytes="64MiB", host_bytes="64MiB", disk_bytes=0)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize(("offload", "spill"), [(False, False), (True, False), (True, True)])
def test_prefill_and_decode_logits_bitwise_equal_dynamic_cache(make_store, family, offload, spill):
    model = tiny_model(family)
    ids = torch.randint(3, 128, (2, 37))
    ref = _gen(model, ids)
    store = _store(make_store, spill)
    cache = TieredKVCache(store, KVConfig(block_tokens=8, reuse=False, offload=offload), model=model)
    out = _gen(model, ids, cache)
    assert torch.equal(out.sequences, ref.sequences)
    assert len(out.logits) == len(ref.logits)
    for a, b in zip(out.logits, ref.logits, strict=True):
        assert torch.equal(a, b)
    if spill:
        store.settle()
        assert store.stats()["spills"] > 0
        assert store.stats()["reads"] > 0
    if offload:
        assert cache.stats()["peak_device_resident_bytes"] < sum(x.numel() * 4 for x in _layer_kv(cache))


def _layer_kv(cache):
    out = []
    for layer in cache.layers:
        layer._materialize()
        out += [layer.keys, layer.values]
    return out


def test_forward_keys_match_dynamic_cache_layer_by_layer(make_store):
    model = tiny_model("llama", layers=3)
    ids = torch.randint(3, 128, (3, 21))
    kw = cache_kwarg(model)
    ref, tier = (
        DynamicCache(),
        TieredKVCache(_store(make_store, True), KVConfig(block_tokens=4, offload=True), model=model),
    )
    with torch.no_grad():
        for cache in (ref, tier):
            model(ids[:, :13], **{kw: cache}, use_cache=True)
            model(ids[:, 13:], **{kw: cache}, use_cache=True)
    assert tier.get_seq_length() == ref.get_seq_length() == 21
    for i, layer in enumerate(tier.layers):
        layer._materialize()
        assert torch.equal(layer.keys, ref.layers[i].keys)
        assert torch.equal(layer.values, ref.layers[i].values)


def _filled(make_store, offload: bool):
    model = tiny_model("llama")
    ids = torch.randint(3, 128, (2, 19))
    kw = cache_kwarg(model)
    ref = DynamicCache()
    tier = TieredKVCache(_store(make_store, offload), KVConfig(block_tokens=4, offload=offload), model=model)
    with torch.no_grad():
        model(ids, **{kw: ref}, use_cache=True)
        model(ids, **{kw: tier}, use_cache=True)
    return ref, tier


def _assert_same(ref, tier):
    assert tier.get_seq_length() == ref.get_seq_length()
    for i, layer in enumerate(tier.layers):
        layer._materialize()
        assert torch.equal(layer.keys, ref.layers[i].keys)
        assert torch.equal(layer.values, ref.layers[i].values)


@pytest.mark.parametrize("offload", [False, True])
def test_batch_repeat_interleave_and_select_like_dynamic_cache(make_store, offload):
    ref, tier = _filled(make_store, offload)
    for cache in (ref, tier):
        cache.batch_repeat_interleave(3)
    _assert_same(ref, tier)
    idx = torch.tensor([5, 0, 2])
    for cache in (ref, tier):
        cache.batch_select_indices(idx)
    _assert_same(ref, tier)


@pytest.mark.parametrize("offload", [False, True])
def test_reorder_cache_like_dynamic_cache(make_store, offload):
    ref, tier = _filled(make_store, offload)
    beam_idx = torch.tensor([1, 1])
    for cache in (ref, tier):
        cache.reorder_cache(beam_idx)
    _assert_same(ref, tier)


@pytest.mark.parametrize("offload", [False, True])
def test_crop_like_dynamic_cache(make_store, offload):
    ref, tier = _filled(make_store, offload)
    for cache in (ref, tier):
        cache.crop(-6)
    _assert_same(ref, tier)
    assert tier.get_seq_length() == 13


@pytest.mark.parametrize("offload", [False, True])
def test_reset_empties_and_frees_working_blocks(make_store, offload):
    ref, tier = _filled(make_store, offload)
    before = len(tier.store)
    for cache in (ref, tier):
        cache.reset()
    assert tier.get_seq_length() == 0
    # DynamicCache's reset empties it on current transformers (5.24 here); older ones (5.0, 4.57) zero in place and keep
    # the length (there ours still empties, which is what reset is for).
    if Version(transformers.__version__) >= Version("5.20"):
        assert ref.get_seq_length() == 0
    assert not tier._shared.working
    assert len(tier.store) <= before


def test_beam_search_tokens_equal_dynamic_cache(make_store):
    model = tiny_model("qwen2")
    ids = torch.randint(3, 128, (2, 17))
    ref = _gen(model, ids, num_beams=3)
    cache = TieredKVCache(_store(make_store, True), KVConfig(block_tokens=4, offload=True, reuse=False), model=model)
    out = _gen(model, ids, cache, num_beams=3)
    assert torch.equal(out.sequences, ref.sequences)


def test_dropped_cache_frees_its_working_blocks(make_store):
    store = _store(make_store, False)
    ref, tier = None, TieredKVCache(store, KVConfig(block_tokens=4, offload=True), model=tiny_model())
    with torch.no_grad():
        tier.update(torch.randn(1, 2, 9, 16), torch.randn(1, 2, 9, 16), 0)
    assert len(store) == 1  # the layer's two whole blocks, as one entry (Note: [assembled layer])
    del tier, ref
    gc.collect()
    assert len(store) == 0


def test_private_store_is_closed_with_the_cache():
    cache = TieredKVCache(config=KVConfig(block_tokens=4, offload=True), model=tiny_model())
    store = cache.store
    cache.close()
    with pytest.raises(Exception, match="closed"):
        store.put(torch.zeros(1))


@pytest.mark.parametrize(
    ("field", "value", "match"),
    [
        ("block_tokens", 0, "block_tokens=0 must be an int >= 1"),
        ("device_layers", True, "device_layers=True"),
        ("quant", "fp8", "quant='fp8' is not one of none, int8, int4"),
    ],
)
def test_config_errors_name_field_and_choices(field, value, match):
    with pytest.raises(ValueError, match=match):
        KVConfig(**{field: value})


def test_sliding_window_configs_are_refused(make_store):
    model = tiny_model("qwen2")
    model.config.layer_types = ["sliding_attention", "full_attention"]
    with pytest.raises(ValueError, match="full-attention layers only"):
        TieredKVCache(_store(make_store, False), model=model)


@pytest.mark.parametrize(("mode", "tol"), [("int8", 0.01), ("int4", 0.2)])
def test_quantizer_roundtrip_error_is_bounded(mode, tol):
    x = torch.randn(2, 2, 8, 16)
    q = KVQuantizer(mode, tuple(x.shape), torch.float32, group=16)
    enc = q.encode(x)
    assert enc.dtype == torch.uint8 and enc.numel() == q.encoded_nbytes < x.numel() * 4
    err = (q.decode(enc) - x).abs().max() / x.abs().max()
    assert 0 < err < tol


def test_tier_generate_wraps_and_restores(make_store):
    outer = torch.nn.Module()
    outer.lm = tiny_model("llama")
    assert find_hf_models(outer) == [outer.lm]
    ids = torch.randint(3, 128, (1, 40))
    ref = _gen(outer.lm, ids)
    hook = tier_generate(outer, _store(make_store, False), KVConfig(block_tokens=8))
    try:
        first = _gen(outer.lm, ids)
        second = _gen(outer.lm, ids)
        assert torch.equal(first.sequences, ref.sequences)
        assert torch.equal(second.sequences, ref.sequences)
        assert hook.stats()["hits"] == 4
        assert hook.prefetch_for(ids) == 4 * 2
    finally:
        hook.remove()
    assert "generate" not in outer.lm.__dict__


def test_offloaded_layers_spread_over_the_lower_tiers(make_store):
    store = make_store(device_bytes="64MiB", host_bytes="64KiB", disk_bytes="64MiB")  # host: two 25 KiB layers
    cache = TieredKVCache(store, KVConfig(block_tokens=4, offload=True), model=tiny_model(layers=6))
    with torch.no_grad():
        for layer in range(6):
            cache.update(torch.randn(1, 2, 100, 16), torch.randn(1, 2, 100, 16), layer)
    store.settle()
    tiers = cache.stats()["blocks_per_tier"]
    assert sum(tiers.values()) == 6  # one entry per layer, none left in the device tier
    assert tiers.get(Tier.HOST.label, 0) > 0 and tiers.get(Tier.DISK.label, 0) > 0 and Tier.DEVICE.label not in tiers
