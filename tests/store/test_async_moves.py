"""The store's asynchronous mover on the simulated device: copies land later, after random delays.

Every test here runs the CUDA state machine (pool buffers, events, fences, hand-over) on CPU; a missing fence
shows up as a wrong value (fresh memory holds poison bytes) or as a recorded violation.
"""

from __future__ import annotations

import random

import pytest
import torch

from lightning_tiercache import Kind, Tier, TierConfig, TierStore
from lightning_tiercache.store.tiers.simulated import POISON, SimulatedDevice

SEEDS = range(12)


def _sim(store: TierStore) -> SimulatedDevice:
    ops = store.device_ops
    assert isinstance(ops, SimulatedDevice)
    return ops


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("tier", [Tier.DEVICE, Tier.HOST, Tier.DISK])
def test_round_trip_through_each_tier_with_delayed_copies(sim_store, seed, tier):
    store = sim_store(seed, device_bytes="1MiB", host_bytes="1MiB", disk_bytes="16MiB")
    t = torch.randn(64, 33)
    h = store.put(t, tier=tier)
    out = store.get(h)  # possibly while the move down is still queued
    assert torch.equal(out, t)
    store.settle()
    # Where `h` ends depends on the race: a get that finds the move down still running hands out the bytes
    # being copied and the entry lands in `tier`; one that comes after brings it back up to the device.
    assert torch.equal(store.get(h), t)
    settled = store.put(t, tier=tier)
    store.settle()
    assert store.where(settled) is tier
    assert torch.equal(store.get(settled), t)


def test_a_download_lands_only_after_its_copy(sim_store):
    store = sim_store(0, max_delay_s=0.05, device_bytes="1MiB", host_bytes="1MiB", disk_bytes=0)
    t = torch.randn(256)
    h = store.put(t, tier=Tier.HOST)
    assert store.stats()["tiers"]["device"]["bytes"] == t.nbytes  # still counted where its bytes are
    store.settle()
    assert store.stats()["tiers"]["host"]["bytes"] == t.nbytes
    assert _sim(store).counts["downloads"] == 1
    assert torch.equal(store.get(h), t)


@pytest.mark.parametrize("seed", range(24))
def test_pool_buffer_is_not_reused_while_an_upload_reads_it(sim_store, seed):
    """Note: [pool reuse] -- a prefetch queues an upload from the entry's pool buffer and lands it at once.

    The next download takes a buffer from the pool; had the prefetched entry's buffer gone back before its
    upload read it, that download would overwrite the bytes the upload is about to copy.
    """
    store = sim_store(seed, max_delay_s=4e-3, device_bytes="64KiB", host_bytes="1MiB", disk_bytes=0)
    a = torch.randn(1024)
    h = store.put(a, tier=Tier.HOST)
    store.settle()
    store.prefetch([h])  # device tier has room: the entry lands there, its upload still queued
    h2 = store.put(torch.full_like(a, 7.0), tier=Tier.HOST)
    assert torch.equal(store.get(h), a)
    assert torch.equal(store.get(h2), torch.full_like(a, 7.0))


@pytest.mark.parametrize("seed", range(8))
def test_random_traffic_returns_exact_values(sim_store, seed):
    rng = random.Random(seed)
    store = sim_store(seed, device_bytes="24KiB", host_bytes="48KiB", disk_bytes="1MiB", codec="none")
    live: dict[int, tuple[object, torch.Tensor]] = {}
    for step in range(120):
        op = rng.random()
        if op < 0.45 or not live:
            t = torch.randn(rng.randint(1, 2048))
            h = store.put(t, kind=Kind.REQUIRED, tier=rng.choice([None, Tier.HOST, Tier.DISK]))
            live[step] = (h, t)
        elif op < 0.75:
            h, t = live[rng.choice(list(live))]
            assert torch.equal(store.get(h), t)  # type: ignore[arg-type]
        elif op < 0.85:
            store.prefetch([h for h, _ in rng.sample(list(live.values()), min(3, len(live)))])  # type: ignore[misc]
        else:
            h, _ = live.pop(rng.choice(list(live)))
            store.free(h)  # type: ignore[arg-type]
    for h, t in live.values():
        assert torch.equal(store.get(h), t)  # type: ignore[arg-type]
    store.settle()
    tiers = store.stats()["tiers"]
    assert tiers["device"]["bytes"] <= 24 * 1024 + 8192 and tiers["host"]["bytes"] <= 48 * 1024 + 8192


def test_fresh_simulated_memory_holds_poison():
    dev = SimulatedDevice()
    try:
        assert int(dev.alloc((8,), torch.uint8)[0]) == POISON
        assert int(dev.host_buffer(8, pin=True)[0]) == POISON
    finally:
        dev.close()


def test_worker_threads_are_pointed_at_the_store_device(sim_store):
    """Note: [worker device] -- a worker that copied without it would make a CUDA context on GPU 0."""
    store = sim_store(device_bytes="1KiB", host_bytes=0, disk_bytes="16MiB")
    t = torch.randn(4096)
    h = store.put(t)  # over the device budget: spilled by an I/O thread, which copies it down first
    store.settle()
    assert store.where(h) is Tier.DISK
    assert torch.equal(store.get(h), t)  # read back and uploaded by an I/O thread
    sim = _sim(store)
    assert sim.violations == []
    assert any(name.startswith("tiercache-io") for name in sim.bound_threads)


def test_copies_in_flight_stay_bounded_and_the_compute_stream_waits_for_old_ones(sim_store):
    """Note: [bounded in flight] -- a forward faster than the link must not keep every source alive."""
    store = sim_store(
        0, max_delay_s=5e-3, device_bytes="64MiB", host_bytes="64MiB", disk_bytes=0, max_inflight_bytes="128KiB"
    )
    tensors = [torch.full((16 * 1024,), float(i)) for i in range(24)]  # 64 KiB each
    handles = [store.put(t, tier=Tier.HOST) for t in tensors]
    sim = _sim(store)
    assert sim.peak_queued_download_bytes <= 128 * 1024 + 64 * 1024
    assert store.stats()["inflight_waits"] > 0
    store.settle()
    for h, t in zip(handles, tensors, strict=True):
        assert torch.equal(store.get(h), t)


def test_nothing_is_allocated_on_the_device_while_the_store_lock_is_held(sim_store, monkeypatch):
    """Note: [no allocation under the lock] -- an allocation may flush caches or block; others wait meanwhile."""
    store = sim_store(0, device_bytes="8KiB", host_bytes="1MiB", disk_bytes="1MiB")
    sim = _sim(store)
    under_lock = []
    alloc = sim.alloc

    def checked(shape, dtype):
        free = store._lock.acquire(blocking=False)
        if free:
            store._lock.release()
        under_lock.append(not free)
        return alloc(shape, dtype)

    monkeypatch.setattr(sim, "alloc", checked)
    small, big = torch.randn(1024), torch.randn(4096)  # 4 KiB fits the device tier, 16 KiB does not
    hs, hb = store.put(small, tier=Tier.HOST), store.put(big, tier=Tier.HOST)
    store.settle()
    store.prefetch([hs])  # promoted: its device tensor is made first
    store.settle()
    assert torch.equal(store.get(hb), big)  # read through from the host tier: uploaded, not placed
    assert torch.equal(store.get(hs), small)
    assert under_lock and not any(under_lock)


def test_pinned_buffers_are_reused_across_steps_and_pinned_outside_the_store_lock(spill_parent):
    """Note: [pool across steps] -- a step that offloads more than a quarter of the host budget must not pin
    again every step. Note: [no allocation under the lock] -- pinning is a driver call of milliseconds."""
    sim = SimulatedDevice(seed=0)
    pinned_under_lock: list[bool] = []
    host_buffer = sim.host_buffer

    def checked(nbytes, pin):
        free = store._lock.acquire(blocking=False)
        if free:
            store._lock.release()
        pinned_under_lock.append(not free)
        return host_buffer(nbytes, pin)

    sim.host_buffer = checked  # type: ignore[method-assign]
    cfg = TierConfig(device_bytes="1MiB", host_bytes="1MiB", disk_bytes=0, spill_dir=str(spill_parent))
    store = TierStore(cfg, device_ops=sim)
    try:
        for step in range(4):
            tensors = [torch.full((32 * 1024,), float(step * 10 + i)) for i in range(6)]  # 6 x 128 KiB
            handles = []
            for t in tensors:  # one at a time: a fence job holding the lock would look like ours
                handles.append(store.put(t, tier=Tier.HOST))
                store.settle()
            for h, t in zip(handles, tensors, strict=True):
                assert torch.equal(store.get(h), t)
                store.free(h)
            store.settle()
    finally:
        store.close()
        sim.close()
    assert len(pinned_under_lock) == 6  # the first step's buffers, pinned once
    assert not any(pinned_under_lock)
    assert sim.violations == []


@pytest.mark.parametrize("seed", range(4))
def test_a_reload_freed_before_its_upload_ran_is_kept_until_the_copy_finished(sim_store, seed):
    """Note: [reload freed before use] -- its memory belongs to the compute stream, which could reuse it."""
    store = sim_store(seed, max_delay_s=2e-2, device_bytes="1MiB", host_bytes="1MiB", disk_bytes=0)
    h = store.put(torch.randn(1024), tier=Tier.HOST)
    store.settle()
    store.prefetch([h])  # lands on the device at once, its upload still queued
    store.free(h)
    store.settle()
    # The fixture fails the test if the upload ran after the store let its destination go.
