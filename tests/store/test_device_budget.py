"""The device tier's budget comes from the device allocator when decisions are made, not from a number fixed
at setup (Note: [device budget from the allocator]); on the simulated device, whose allocator the tests drive."""

from __future__ import annotations

import torch

from lightning_tiercache import Tier
from lightning_tiercache.store.device_budget import HEADROOM_SHARE, REFRESH_EVERY_PUTS, derive_device_budget
from lightning_tiercache.store.tiers.device import DeviceMemory

KiB = 1024
TOTAL = 1024 * KiB
HEADROOM = int(TOTAL * HEADROOM_SHARE)


def _device_tensor(store, values: torch.Tensor) -> torch.Tensor:
    """A tensor in the simulated device's memory (counted by its allocator, as a CUDA tensor is)."""
    dev = store.device_ops.alloc(tuple(values.shape), values.dtype)
    dev.copy_(values)
    return dev


def test_derived_budget_is_what_the_tier_holds_plus_what_new_tensors_could_get_less_headroom():
    mem = DeviceMemory(total=100, free=50, cached=10)
    assert derive_device_budget(mem, held=5, cap=None) == 5 + 60 - 20
    assert derive_device_budget(mem, held=5, cap=30) == 30  # a configured device_bytes caps it
    assert derive_device_budget(DeviceMemory(total=100, free=3), held=5, cap=None) == 5  # never below what it holds


def test_a_model_that_grows_after_setup_shrinks_the_device_budget_and_moves_entries_down(sim_store):
    # device_bytes unset: on a CPU device this would be a RAM-sized number fixed when the store opened.
    store = sim_store(0, host_bytes="4MiB", disk_bytes=0, sim={"total_bytes": TOTAL})
    assert store.budgets[Tier.DEVICE] == TOTAL - HEADROOM  # read from the allocator, the device empty
    t = torch.randn(16 * KiB)  # 64 KiB
    h = store.put(_device_tensor(store, t))
    assert store.where(h) is Tier.DEVICE
    store.device_ops.model_bytes = TOTAL - HEADROOM  # the model (and its optimizer state) moved to the device
    assert store.budgets[Tier.DEVICE] == TOTAL - HEADROOM  # not re-read mid-batch, per decision
    store.settle()  # a batch boundary
    assert store.budgets[Tier.DEVICE] == t.nbytes  # only what the tier already holds; nothing more fits
    h2 = store.put(_device_tensor(store, t))
    store.settle()
    tiers = store.stats()["tiers"]  # the device is full: one of the two went below it
    assert (tiers["device"]["bytes"], tiers["host"]["bytes"]) == (t.nbytes, t.nbytes)
    assert torch.equal(store.get(h, place=False), t) and torch.equal(store.get(h2, place=False), t)
    store.device_ops.model_bytes = 0  # the model left again (e.g. eval done, offloaded)
    store.settle()
    assert store.room(Tier.DEVICE) > 512 * KiB


def test_a_configured_device_bytes_caps_the_derived_budget(sim_store):
    store = sim_store(0, device_bytes="128KiB", host_bytes="4MiB", disk_bytes=0, sim={"total_bytes": TOTAL})
    assert store.budgets[Tier.DEVICE] == 128 * KiB  # the device has more room; the cap wins
    store.device_ops.model_bytes = TOTAL - HEADROOM - 32 * KiB
    store.settle()
    assert store.budgets[Tier.DEVICE] == 32 * KiB  # the allocator allows less than the cap
    store.resize(Tier.DEVICE, "16KiB")
    assert store.budgets[Tier.DEVICE] == 16 * KiB


def test_the_allocator_is_asked_at_decision_points_not_per_put(sim_store):
    store = sim_store(0, host_bytes="64MiB", disk_bytes=0, sim={"total_bytes": 64 * TOTAL})
    sim = store.device_ops
    for _ in range(3):
        store.settle()
    assert sim.counts["memory_queries"] == 0  # a store nobody uses makes no driver call
    for _ in range(3 * REFRESH_EVERY_PUTS):
        store.put(torch.randn(16))
    # One snapshot before the first put, then one per REFRESH_EVERY_PUTS puts.
    assert sim.counts["memory_queries"] == 3
    store.settle()
    store.settle()
    assert sim.counts["memory_queries"] == 3  # a boundary only marks the snapshot stale
    store.put(torch.randn(16))
    store.put(torch.randn(16))
    assert sim.counts["memory_queries"] == 4 and store.stats()["device_budget_refreshes"] == 4


def test_kv_blocks_go_below_the_device_tier_when_the_device_is_full(sim_store):
    from lightning_tiercache.kv import KVConfig, TieredKVCache, cache_kwarg
    from tests.kv_models import tiny_model

    model = tiny_model("llama", layers=2)
    ids = torch.randint(3, 128, (2, 24), generator=torch.Generator().manual_seed(0))
    where = {}
    for full in (False, True):
        store = sim_store(0, host_bytes="64MiB", disk_bytes=0, sim={"total_bytes": 64 * TOTAL})
        cache = TieredKVCache(store, KVConfig(block_tokens=8, offload=True), model=model)
        if full:  # the model's weights and the eval's working memory took the device after the store opened
            store.device_ops.model_bytes = 64 * TOTAL - int(64 * TOTAL * HEADROOM_SHARE)
        cache.load_prefix(ids)
        with torch.no_grad():
            model(ids, **{cache_kwarg(model): cache}, use_cache=True)
        store.settle()
        where[full] = cache.stats()["blocks_per_tier"]
    assert where[False].get(Tier.DEVICE.label, 0) > 0  # prefix blocks stay on a device with room
    assert where[True].get(Tier.DEVICE.label, 0) == 0 and where[True][Tier.HOST.label] > 0
