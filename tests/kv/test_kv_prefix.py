"""Prefix reuse: stable chained keys, exact hit blocks, stale namespaces, eviction order, persistence."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from transformers import DynamicCache

from lightning_tiercache import EntryEvictedError, Tier
from lightning_tiercache.kv.cache import KVConfig, TieredKVCache, cache_kwarg
from lightning_tiercache.kv.prefix import block_keys
from tests.kv_models import tiny_model

BLK = 8
PREFIX = 32  # four blocks
ROOT = Path(__file__).resolve().parents[2]


def _prompts(n: int = 2, q: int = 9, seed: int = 1) -> tuple[torch.Tensor, list[torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    prefix = torch.randint(3, 128, (1, PREFIX), generator=g)
    return prefix, [torch.cat([prefix.expand(n, -1), torch.randint(3, 128, (n, q), generator=g)], 1) for _ in range(3)]


def _gen(model, ids, cache=None, new=6):
    extra = {cache_kwarg(model): cache} if cache is not None else {}
    with torch.no_grad():
        return model.generate(
            ids, attention_mask=torch.ones_like(ids), max_new_tokens=new, do_sample=False, output_logits=True,
            return_dict_in_generate=True, **extra,
        )  # fmt: skip


def _fresh_prefill(model, ids):
    cache = DynamicCache()
    with torch.no_grad():
        model(ids, **{cache_kwarg(model): cache}, use_cache=True)
    return cache


def _run(model, store, ids, config=None, **kw):
    cache = TieredKVCache(store, config or KVConfig(block_tokens=BLK), model=model, **kw)
    served = cache.load_prefix(ids)
    return cache, served, _gen(model, ids, cache)


def test_block_keys_are_chained_and_stable_across_processes():
    ids = torch.arange(24).reshape(1, 24)
    keys = block_keys(ids, None, BLK, "ns")[0]
    assert len(keys) == 3 and len(set(keys)) == 3
    changed = ids.clone()
    changed[0, 0] = 99
    other = block_keys(changed, None, BLK, "ns")[0]
    assert all(a != b for a, b in zip(keys, other, strict=True))  # block 0 changes every later key
    assert block_keys(ids, None, BLK, "ns2")[0] != keys
    mask = torch.ones_like(ids)
    mask[0, 20] = 0
    assert block_keys(ids, mask, BLK, "ns")[0][:2] == keys[:2]
    assert len(block_keys(ids, mask, BLK, "ns")[0]) == 2  # a hole in the mask ends the row's blocks
    code = "import torch; from lightning_tiercache.kv.prefix import block_keys; "
    code += f"print(block_keys(torch.arange(24).reshape(1, 24), None, {BLK}, 'ns')[0][-1])"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    assert out.stdout.strip() == keys[-1]


def test_hit_blocks_are_bitwise_a_fresh_prefill_and_tokens_match(make_store):
    model = tiny_model("llama")
    store = make_store(device_bytes="64MiB", host_bytes="64MiB", disk_bytes=0)
    prefix, prompts = _prompts()
    _, served, _ = _run(model, store, prompts[0][:1])  # one row: a normal prefill stores the blocks
    assert served == 0
    cache = TieredKVCache(store, KVConfig(block_tokens=BLK), model=model)
    assert cache.load_prefix(prompts[1]) == PREFIX
    fresh = _fresh_prefill(model, prefix.expand(2, -1))
    for i, layer in enumerate(cache.layers):
        assert torch.equal(layer.keys, fresh.layers[i].keys)
        assert torch.equal(layer.values, fresh.layers[i].values)
    out, ref = _gen(model, prompts[1], cache), _gen(model, prompts[1])
    assert torch.equal(out.sequences, ref.sequences)
    worst = max((a - b).abs().max().item() for a, b in zip(out.logits, ref.logits, strict=True))
    assert worst <= 1e-4  # the suffix-only prefill changes matmul shapes; measured 0 on this model
    assert cache.stats()["hit_tokens"] == 2 * PREFIX


@pytest.mark.parametrize("offload", [False, True])
def test_reuse_with_offload_and_spills_keeps_tokens(make_store, offload):
    model = tiny_model("gpt2")
    store = make_store(device_bytes="8KiB", host_bytes="32KiB", disk_bytes="64MiB")
    _, prompts = _prompts()
    config = KVConfig(block_tokens=BLK, offload=offload)
    for ids in prompts:
        _, served, out = _run(model, store, ids, config)
        assert torch.equal(out.sequences, _gen(model, ids).sequences)
    assert served == PREFIX


def test_stale_namespace_never_serves_old_blocks(make_store):
    model = tiny_model("qwen2")
    store = make_store(device_bytes="64MiB", host_bytes="64MiB", disk_bytes=0)
    _, prompts = _prompts()
    first, _, _ = _run(model, store, prompts[0], model_version=0)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.01)
    first.set_model_version(1)  # the old version's blocks this cache stored are freed
    cache, served, out = _run(model, store, prompts[1], model_version=1)
    assert cache.stats()["shared_prefill_blocks"] == 4  # every prefix block recomputed under the new weights
    assert torch.equal(out.sequences, _gen(model, prompts[1]).sequences)
    _, served, _ = _run(model, store, prompts[2], model_version=1)
    assert served == PREFIX
    assert TieredKVCache.version_from_weights(model) != TieredKVCache.version_from_weights(tiny_model("qwen2"))


def test_prefix_tail_is_evicted_before_its_head(make_store):
    # Note: [prefix tail first]. No tier below the device: evicted cache blocks are dropped.
    model = tiny_model("llama")
    store = make_store(device_bytes="1MiB", host_bytes=0, disk_bytes=0)
    _, prompts = _prompts(n=1)
    _run(model, store, prompts[0])
    block_bytes = 2 * 2 * BLK * 16 * 4
    store.resize(Tier.DEVICE, 2 * len(model.model.layers) * block_bytes)  # room for two blocks of each layer
    cache = TieredKVCache(store, KVConfig(block_tokens=BLK), model=model)
    assert cache.load_prefix(prompts[1]) == 2 * BLK


def test_block_evicted_between_lookup_and_get_is_recomputed(make_store, monkeypatch):
    # Note: [evicted between lookup and get]
    model = tiny_model("llama")
    store = make_store(device_bytes="64MiB", host_bytes="64MiB", disk_bytes=0)
    _, prompts = _prompts()
    _run(model, store, prompts[0])
    victim = store.lookup(f"kv/{block_keys(prompts[1], None, BLK, _ns(model, store))[0][2]}/1")
    real_get = store.get

    def get(h):
        if h == victim:
            raise EntryEvictedError("dropped")
        return real_get(h)

    monkeypatch.setattr(store, "get", get)
    cache, served, out = _run(model, store, prompts[1])
    assert served == 2 * BLK
    assert cache.stats()["evicted_hits"] >= 1
    assert torch.equal(out.sequences, _gen(model, prompts[1]).sequences)


def _ns(model, store):
    return TieredKVCache(store, KVConfig(block_tokens=BLK), model=model).namespace


def test_prefetch_for_brings_spilled_hit_blocks_up(make_store):
    model = tiny_model("llama")
    store = make_store(device_bytes="4KiB", host_bytes="4KiB", disk_bytes="64MiB")
    _, prompts = _prompts()
    _run(model, store, prompts[0])
    store.settle()
    store.resize(Tier.DEVICE, "1MiB")  # room above: a prefetch never pushes a tier over its budget
    cache = TieredKVCache(store, KVConfig(block_tokens=BLK), model=model)
    before = store.stats()["prefetches"]
    assert cache.prefetch_for(prompts[1]) == 2 * 4 * 2  # rows x blocks x layers
    assert store.stats()["prefetches"] > before
    assert cache.load_prefix(prompts[1]) == PREFIX


@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_lossy_codec_serves_close_but_not_exact_blocks(make_store, mode):
    model = tiny_model("llama")
    store = make_store(device_bytes="64MiB", host_bytes="64MiB", disk_bytes=0)
    prefix, prompts = _prompts()
    config = KVConfig(block_tokens=BLK, quant=mode, quant_group=16)
    _run(model, store, prompts[0], config)
    cache = TieredKVCache(store, config, model=model)
    assert cache.load_prefix(prompts[1]) == PREFIX
    fresh = _fresh_prefill(model, prefix.expand(2, -1)).layers[0].keys
    err = ((cache.layers[0].keys - fresh).abs().max() / fresh.abs().max()).item()
    assert 0 < err < (0.01 if mode == "int8" else 0.2)


_PERSIST = textwrap.dedent(
    """
    import json, sys, warnings, torch
    from lightning_tiercache import TierConfig, TierStore
    from lightning_tiercache.kv.cache import KVConfig, TieredKVCache, cache_kwarg
    from tests.kv_models import tiny_model
    from tests.kv.test_kv_prefix import _prompts, BLK
    model = tiny_model("llama")
    prompts = _prompts()[1]
    ids = prompts[int(sys.argv[2])]
    with TierStore(TierConfig(device="cpu", device_bytes="64MiB", host_bytes="64MiB", disk_bytes=0)) as store:
        cache = TieredKVCache(store, KVConfig(block_tokens=BLK, persist_dir=sys.argv[1]), model=model)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            served = cache.load_prefix(ids)
        with torch.no_grad():
            out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=4, do_sample=False,
                                 **{cache_kwarg(model): cache})
            ref = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=4, do_sample=False)
        cache.close()
        stats = cache.stats()
        warned = any("corrupt" in str(w.message) for w in caught)
        print(json.dumps({"served": served, "same": bool(torch.equal(out, ref)), "corrupt": stats["persist_corrupt"],
                          "writes": stats["persist_writes"], "warned": warned,
                          "shared": stats["shared_prefill_blocks"]}))
    """
)


def test_persisted_blocks_survive_a_restart_and_corrupt_ones_are_ignored(tmp_path):
    import json

    def run(prompt: int) -> dict:
        args = [sys.executable, "-c", _PERSIST, str(tmp_path / "kv"), str(prompt)]
        out = subprocess.run(args, capture_output=True, text=True, cwd=ROOT, timeout=120)
        assert out.returncode == 0, out.stderr[-2000:]
        return json.loads(out.stdout.strip().splitlines()[-1])

    first = run(0)
    # The two rows share 4 blocks, prefilled once (Note: [shared prefill]); (4 shared + 2 own) blocks x 2 layers.
    assert first["served"] == PREFIX and first["shared"] == 4 and first["writes"] == 2 * 6 and first["same"]
    (folder,) = [p for p in (tmp_path / "kv").iterdir() if p.is_dir()]
    records = sorted(folder.glob("*.ltc"))
    assert len(records) == 12
    # Corrupt block 2 of layer 0 of the shared prefix: blocks 0 and 1 are still served, 2 and 3 recomputed.
    target = _block_file(folder, 2)
    data = bytearray(target.read_bytes())
    data[-5] ^= 0xFF
    target.write_bytes(bytes(data))
    second = run(1)
    assert second["served"] == PREFIX and second["shared"] == 2
    assert second["corrupt"] == 1 and second["warned"] and second["same"]


def _block_file(folder: Path, block: int) -> Path:
    from lightning_tiercache.kv.prefix import namespace

    fields = __import__("json").loads((folder / "namespace.json").read_text())
    assert namespace(fields) == folder.name
    key = block_keys(_prompts()[1][1][:1], None, BLK, folder.name)[0][block]
    return folder / f"{key}-0.ltc"


# ---------------------------------------------------------------------- intra-batch shared prefill


def _stored(store, model, ids, layers):
    """The stored blocks of row 0 of ``ids``: ``{(block, layer): tensor}``."""
    keys = block_keys(ids[:1], None, BLK, _ns(model, store))[0]
    found = {(j, i): store.lookup(f"kv/{k}/{i}") for j, k in enumerate(keys) for i in range(layers)}
    return {where: store.get(h) for where, h in found.items() if h is not None}


@pytest.mark.parametrize(("family", "offload"), [("llama", False), ("gpt2", True)])
def test_shared_prefix_of_a_missing_batch_is_prefilled_once_and_bitwise_exact(make_store, family, offload):
    # Note: [shared prefill]
    model = tiny_model(family)
    store = make_store(device_bytes="64MiB", host_bytes="64MiB", disk_bytes=0)
    prefix, prompts = _prompts(n=3)
    config = KVConfig(block_tokens=BLK, offload=offload)
    cache = TieredKVCache(store, config, model=model)
    assert cache.load_prefix(prompts[0]) == PREFIX  # the first batch already hits: its prefix was computed once
    s = cache.stats()
    assert (s["shared_prefill_blocks"], s["shared_prefill_tokens"]) == (4, PREFIX)
    assert (s["hits"], s["misses"]) == (3 * 4, 3 * 1)
    fresh = _fresh_prefill(model, prefix)  # batch 1
    for i, layer in enumerate(cache.layers):
        layer._materialize()
        assert torch.equal(layer.keys, fresh.layers[i].keys.expand(3, -1, -1, -1))
        assert torch.equal(layer.values, fresh.layers[i].values.expand(3, -1, -1, -1))
    out, ref = _gen(model, prompts[0], cache), _gen(model, prompts[0])
    assert torch.equal(out.sequences, ref.sequences)
    assert max((a - b).abs().max().item() for a, b in zip(out.logits, ref.logits, strict=True)) <= 1e-4
    # Same keys, namespace and layout as a normal (one row, nothing shared) prefill stores.
    normal = make_store(device_bytes="64MiB", host_bytes="64MiB", disk_bytes=0)
    _run(model, normal, prompts[0][:1], config)
    layers = len(cache.layers)
    mine, theirs = _stored(store, model, prompts[0], layers), _stored(normal, model, prompts[0], layers)
    assert len(theirs) == 5 * layers and set(mine) == set(theirs)  # 4 shared blocks and row 0's own block
    assert all(torch.equal(mine[w], theirs[w]) for w in theirs)
    second = TieredKVCache(store, config, model=model)
    assert second.load_prefix(prompts[1]) == PREFIX and second.stats()["shared_prefill_blocks"] == 0


def test_shared_prefill_serves_stored_head_and_computes_only_the_rest(make_store):
    model = tiny_model("llama")
    store = make_store(device_bytes="64MiB", host_bytes="64MiB", disk_bytes=0)
    prefix, prompts = _prompts(n=2)
    _run(model, store, prefix[:, : 2 * BLK + 1])  # stores blocks 0 and 1 of the prefix
    cache = TieredKVCache(store, KVConfig(block_tokens=BLK), model=model)
    assert cache.load_prefix(prompts[0]) == PREFIX
    assert cache.stats()["shared_prefill_blocks"] == 2
    out, ref = _gen(model, prompts[0], cache), _gen(model, prompts[0])
    assert torch.equal(out.sequences, ref.sequences)


def test_no_shared_prefill_for_distinct_rows_one_row_no_model_or_no_reuse(make_store):
    model = tiny_model("llama")
    store = make_store(device_bytes="64MiB", host_bytes="64MiB", disk_bytes=0)
    _, prompts = _prompts(n=2)
    distinct = torch.randint(3, 128, (2, 41), generator=torch.Generator().manual_seed(5))
    cases = [
        (KVConfig(block_tokens=BLK), model, distinct),
        (KVConfig(block_tokens=BLK), model, prompts[0][:1]),
        (KVConfig(block_tokens=BLK), model.config, prompts[0]),
        (KVConfig(block_tokens=BLK, reuse=False), model, prompts[0]),
    ]
    for config, owner, ids in cases:
        store.clear_cache()
        cache = TieredKVCache(store, config, model=owner)
        assert cache.load_prefix(ids) == 0
        assert cache.stats()["shared_prefill_blocks"] == 0 and cache.stats()["stored_blocks"] == 0


def test_shared_blocks_follow_real_tokens_not_padding(make_store):
    model = tiny_model("llama")
    store = make_store(device_bytes="64MiB", host_bytes="64MiB", disk_bytes=0)
    _, prompts = _prompts(n=2)
    ids = prompts[0]
    mask = torch.ones_like(ids)
    mask[:, 20] = 0  # the same hole in both rows: a row's blocks end at its first hole
    cache = TieredKVCache(store, KVConfig(block_tokens=BLK), model=model)
    assert cache.load_prefix(ids, mask) == 2 * BLK
    assert cache.stats()["shared_prefill_blocks"] == 2
    store.clear_cache()
    left = torch.ones_like(ids)
    left[:, :3] = 0  # left padding: blocks start at the first real token; rows share 29 real tokens
    cache = TieredKVCache(store, KVConfig(block_tokens=BLK), model=model)
    assert cache.load_prefix(ids, left) == 3 + 3 * BLK and cache.stats()["shared_prefill_blocks"] == 3


def test_generate_hook_shares_greedy_batches_and_skips_beam_search(make_store):
    from lightning_tiercache.kv.generate import tier_generate

    model = tiny_model("qwen2")
    _, prompts = _prompts(n=2)
    store = make_store(device_bytes="64MiB", host_bytes="64MiB", disk_bytes=0)
    hook = tier_generate(model, store, KVConfig(block_tokens=BLK))
    try:
        beams = _gen_kw(model, prompts[0], num_beams=2)
        assert hook.stats()["shared_prefill_blocks"] == 0 and hook.stats()["hits"] == 0
        greedy = _gen_kw(model, prompts[1])
        assert hook.stats()["shared_prefill_blocks"] == 4 and hook.stats()["hits"] == 2 * 4
    finally:
        hook.remove()
    assert torch.equal(beams, _gen_kw(model, prompts[0], num_beams=2))
    assert torch.equal(greedy, _gen_kw(model, prompts[1]))


def _gen_kw(model, ids, **kw):
    with torch.no_grad():
        return model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=4, do_sample=False, **kw)
