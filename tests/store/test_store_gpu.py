"""CUDA paths of the store: side streams, events, the pinned pool. Run with ``pytest -m gpu``."""

from __future__ import annotations

import time

import pytest
import torch

from lightning_tiercache import Tier, TierConfig, TierStore
from lightning_tiercache.store.tiers.host import PinnedPool

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
    """Note: [stream lifetimes] -- a reloaded tensor is recorded on the consumer's stream.

    The reload is allocated on the store's upload stream; the caching allocator hands a freed block back to
    that stream only. So the next upload (of other bytes) is what would reuse the block while the busy
    consumer stream has not read it yet, unless ``record_stream`` tied the block to the consumer.
    """
    ref = torch.randn(1 << 20, device="cuda")
    h = cuda_store.put(ref.clone(), tier=Tier.HOST)
    h2 = cuda_store.put(torch.full_like(ref, 7.0), tier=Tier.HOST)
    cuda_store.settle()
    out = cuda_store.get(h)
    torch.cuda._sleep(200_000_000)  # the consumer stream is busy; the upload stream is not
    total = out.sum()
    del out
    cuda_store.free(h)
    junk = cuda_store.get(h2)  # uploads on the side stream: would reuse out's block without record_stream
    torch.cuda.synchronize()
    assert torch.equal(total, ref.sum())
    assert torch.equal(junk, torch.full_like(ref, 7.0))


def test_pool_buffer_is_not_reused_while_an_upload_reads_it(tmp_path):
    """Note: [pool reuse] -- a prefetched entry lands on the device at once; its upload is still queued.

    The upload waits for the busy compute stream (it copies into memory allocated there); the next put comes
    from an idle side stream, so its download runs at once, into whichever pool buffer it was given. Had the
    prefetched entry's buffer gone back to the pool before its upload read it, that download overwrites it.
    """
    cfg = TierConfig(device_bytes="64MiB", host_bytes="64MiB", disk_bytes=0, spill_dir=str(tmp_path))
    with TierStore(cfg) as store:
        a = torch.randn(1 << 20, device="cuda")
        h = store.put(a, tier=Tier.HOST)
        store.settle()
        torch.cuda._sleep(500_000_000)  # the compute stream is busy for a while
        store.prefetch([h])
        side = torch.cuda.Stream()
        with torch.cuda.stream(side):
            b = torch.full_like(a, 7.0)
            h2 = store.put(b, tier=Tier.HOST)
        store.settle()
        assert torch.equal(store.get(h), a)
        assert torch.equal(store.get(h2), torch.full_like(a, 7.0))


def test_waiting_for_a_copy_does_not_spin_a_core(cuda_store):
    """Note: [blocking events] -- the fence thread sleeps while a copy it waits for is queued."""
    x = torch.randn(1 << 20, device="cuda")
    torch.cuda._sleep(1_000_000_000)  # the copy below waits for this kernel: about half a second
    start_cpu, start_wall = time.process_time(), time.perf_counter()
    store_h = cuda_store.put(x * 1, tier=Tier.HOST)
    cuda_store.settle()
    cpu, wall = time.process_time() - start_cpu, time.perf_counter() - start_wall
    assert wall > 0.1  # it did wait
    assert cpu < 0.5 * wall
    assert torch.equal(cuda_store.get(store_h), x)


def test_pinned_pool_reuses_buffers_without_power_of_two_rounding():
    pool = PinnedPool(max_idle_bytes=1 << 24)
    a = pool.take(1_000_001)
    assert a.numel() == 1_000_001 and a.is_pinned()
    pool.give(a)
    b = pool.take(1_000_000)
    assert b.data_ptr() == a.data_ptr() and pool.reused == 1
    c = pool.take(3_000_000)
    assert c.numel() == 3_000_000


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
def test_worker_threads_use_the_store_device_not_gpu_0(tmp_path):
    """Note: [worker device] -- on one GPU device 0 is the store's, so only a second device can show this."""
    import threading

    cfg = TierConfig(device="cuda:1", device_bytes="1MiB", host_bytes=0, disk_bytes="64MiB", spill_dir=str(tmp_path))
    seen: list[int] = []
    with TierStore(cfg) as store:
        ops = store.device_ops
        for name in ("download", "upload", "host_buffer", "alloc"):
            real = getattr(ops, name)

            def recorded(*args, _real=real, **kwargs):
                if threading.current_thread().name.startswith("tiercache-"):
                    seen.append(torch.cuda.current_device())
                return _real(*args, **kwargs)

            setattr(ops, name, recorded)
        t = torch.randn(1 << 20, device="cuda:1")
        h = store.put(t)  # over the device budget: an I/O thread copies it down and writes it
        store.settle()
        assert store.where(h) is Tier.DISK
        assert torch.equal(store.get(h), t)
    assert seen and set(seen) == {1}  # the I/O thread's download and its host buffer
