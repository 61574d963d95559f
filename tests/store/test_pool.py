"""The pinned pool's bookkeeping, exercised with pageable buffers on CPU."""

from __future__ import annotations

from lightning_tiercache.store.tiers.host import PinnedPool


def test_pool_reuses_near_sizes_and_allocates_exact_sizes():
    pool = PinnedPool(max_idle_bytes=10_000, pin=False)
    a = pool.take(1000)
    assert a.numel() == 1000
    pool.give(a)
    b = pool.take(900)  # within the slack: reused
    assert b.data_ptr() == a.data_ptr() and pool.reused == 1
    c = pool.take(500)  # a 1000-byte buffer would waste too much: a new exact one
    assert c.numel() == 500 and pool.allocated == 2


def test_pool_keeps_idle_bytes_under_its_cap():
    pool = PinnedPool(max_idle_bytes=2500, pin=False)
    bufs = [pool.take(1000) for _ in range(4)]
    for b in bufs:
        pool.give(b)
    assert pool.idle_bytes <= 2500
    pool.clear()
    assert pool.idle_bytes == 0
