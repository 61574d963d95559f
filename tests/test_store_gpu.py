"""CUDA paths of the store: side streams, events, the pinned pool. Run with ``pytest -m gpu``."""

from __future__ import annotations

import pytest
import torch

from lightning_tiercache import Tier, TierConfig, TierStore
from lightning_tiercache.tiers.host import PinnedPool

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
]


@pytest.fixture
def cuda_store(tmp_path):
    with TierStore(
        TierConfig(device_bytes="8MiB", host_bytes="8MiB", disk_bytes="256MiB", spill_dir=str(tmp_path))
    ) as s:
        yield s


@pytest.mark.parametrize("tier", [Tier.DEVICE, Tier.HOST, Tier.DISK])
def test_round_trip_through_each_tier_on_cuda(cuda_store, tier):
    t = torch.randn(512, 512, device="cuda", dtype=torch.bfloat16)
    h = cuda_store.put(t, tier=tier)
    cuda_store.settle()
    assert cuda_store.where(h) is tier
    out = cuda_store.get(h)
    assert out.device == t.device and torch.equal(out, t)


def test_put_waits_for_the_producing_kernel_before_copying_out(cuda_store):
    """Note: [stream lifetimes] -- the side stream must wait for the kernel that writes the tensor."""
    x = torch.zeros(1 << 20, device="cuda")
    torch.cuda._sleep(50_000_000)  # delay the compute stream
    x.add_(1.0)  # still queued when put() runs
    h = cuda_store.put(x, tier=Tier.HOST)
    cuda_store.settle()
    assert torch.equal(cuda_store.get(h), torch.ones_like(x))


def test_reloaded_tensor_survives_allocator_reuse_on_a_slow_stream(cuda_store):
    """Note: [stream lifetimes] -- a reloaded tensor is recorded on the consumer's stream."""
    ref = torch.randn(1 << 20, device="cuda")
    h = cuda_store.put(ref.clone(), tier=Tier.HOST)
    cuda_store.settle()
    out = cuda_store.get(h)
    torch.cuda._sleep(50_000_000)  # the consumer stream is busy; the copy stream is not
    total = out.sum()
    del out
    cuda_store.free(h)
    junk = [torch.full((1 << 20,), 7.0, device="cuda") for _ in range(4)]  # try to reuse the freed block
    torch.cuda.synchronize()
    assert torch.allclose(total, ref.sum())
    del junk


def test_pinned_pool_reuses_buffers_without_power_of_two_rounding():
    pool = PinnedPool(max_idle_bytes=1 << 24)
    a = pool.take(1_000_001)
    assert a.numel() == 1_000_001 and a.is_pinned()
    pool.give(a)
    b = pool.take(1_000_000)
    assert b.data_ptr() == a.data_ptr() and pool.reused == 1
    c = pool.take(3_000_000)
    assert c.numel() == 3_000_000
