"""The pinned pool's bookkeeping, exercised with pageable buffers on CPU."""

from __future__ import annotations

import torch

from lightning_tiercache.store.tiers import host
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


class _FakeCudart:
    """Stands in for ``torch.cuda.cudart()``: registration fails, as it does when the locked-memory limit is hit."""

    def __init__(self) -> None:
        self.registered = 0

    def cudaHostRegister(self, ptr, nbytes, flags):
        self.registered += 1
        return 2  # cudaErrorMemoryAllocation


def test_a_failed_registration_clears_the_cuda_error_before_falling_back(monkeypatch):
    """Note: [stale CUDA error] -- left set, the next kernel launch would raise it as its own error."""
    fake, cleared, fallback = _FakeCudart(), [], []
    monkeypatch.setattr(host.torch.cuda, "cudart", lambda: fake)
    monkeypatch.setattr(host, "cuda_error_clearer", lambda: lambda: cleared.append(1))
    monkeypatch.setattr(host, "torch_pinned", lambda n: fallback.append(n) or torch.empty(n, dtype=torch.uint8))
    buf = host.pinned_empty(4096)
    assert buf.numel() == 4096
    assert (fake.registered, len(cleared), fallback) == (1, 1, [4096])


def test_registration_is_not_tried_where_the_error_could_not_be_cleared(monkeypatch):
    fake = _FakeCudart()
    monkeypatch.setattr(host.torch.cuda, "cudart", lambda: fake)
    monkeypatch.setattr(host, "cuda_error_clearer", lambda: None)
    monkeypatch.setattr(host, "torch_pinned", lambda n: torch.empty(n, dtype=torch.uint8))
    assert host.pinned_empty(100).numel() == 100
    assert fake.registered == 0
