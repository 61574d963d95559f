"""CUDA: the device budget read from the caching allocator, and a failed pin that is not a device OOM.

Run with ``pytest -m gpu`` (``scripts/gpu_check.sh`` does).
"""

from __future__ import annotations

import pytest
import torch

from lightning_tiercache import PinnedMemoryError, Tier, TierConfig, TierStore
from lightning_tiercache.oom.recovery import is_oom_error
from lightning_tiercache.store.device_budget import HEADROOM_SHARE
from lightning_tiercache.store.tiers.host import PinnedPool, torch_pinned

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
]
MiB = 1 << 20


def test_cuda_memory_reports_the_driver_and_the_allocator_cache():
    store = TierStore(TierConfig(host_bytes="64MiB", disk_bytes=0))
    try:
        block = torch.empty(256 * MiB, dtype=torch.uint8, device="cuda")
        del block  # back in the caching allocator's cache: reserved, not allocated
        mem = store.device_ops.memory()
        free, total = torch.cuda.mem_get_info()
        assert mem is not None and mem.total == total
        assert abs(mem.free - free) < 64 * MiB
        assert mem.cached >= 256 * MiB  # a new tensor can reuse it without the driver
    finally:
        store.close()


def test_memory_taken_after_the_store_opened_shrinks_the_cuda_device_budget():
    """Note: [device budget from the allocator] -- the model moved to the GPU after the store opened."""
    store = TierStore(TierConfig(host_bytes="256MiB", disk_bytes=0))
    try:
        before = store.budgets[Tier.DEVICE]
        free, total = torch.cuda.mem_get_info()
        assert before <= free + torch.cuda.memory_reserved() - int(total * HEADROOM_SHARE) + 64 * MiB
        grow = min(2048 * MiB, before // 2)
        model = torch.empty(grow, dtype=torch.uint8, device="cuda")
        store.settle()  # a batch boundary
        after = store.budgets[Tier.DEVICE]
        assert before - grow - 64 * MiB <= after <= before - grow + 64 * MiB
        del model
    finally:
        store.close()


def test_a_configured_device_bytes_caps_the_cuda_device_budget():
    store = TierStore(TierConfig(device_bytes="8MiB", host_bytes="64MiB", disk_bytes=0))
    try:
        assert store.budgets[Tier.DEVICE] == 8 * MiB
    finally:
        store.close()


def test_a_pin_the_host_cannot_satisfy_is_a_typed_error_not_a_device_oom():
    """Note: [pinned memory is not a device OOM] -- and it leaves no CUDA error behind for the next kernel."""
    with pytest.raises(PinnedMemoryError) as info:
        torch_pinned(1 << 50)  # a pebibyte: cudaHostAlloc fails with cudaErrorMemoryAllocation
    assert not is_oom_error(info.value)
    assert isinstance(info.value.__cause__, torch.AcceleratorError)
    x = torch.ones(1024, device="cuda")
    torch.cuda.synchronize()
    assert float((x * 2).sum()) == 2048.0

    def allocate(nbytes: int, pin: bool) -> torch.Tensor:  # a host with no locked memory left
        return torch_pinned(1 << 50) if pin else torch.empty(nbytes, dtype=torch.uint8)

    pool = PinnedPool(max_idle_bytes=1 << 20, allocate=allocate)
    with pytest.warns(RuntimeWarning, match="could not pin"):
        buf = pool.take(4096)
    assert not buf.is_pinned() and pool.pin_failures == 1
