"""Which freed host memory the store hands back to the OS, and what that costs the steps that follow."""

from __future__ import annotations

import pytest
import torch

from lightning_tiercache import Tier
from lightning_tiercache.store.tiers.trim import Trimmer

MiB = 1 << 20
needs_glibc = pytest.mark.skipif(not Trimmer().available, reason="malloc_trim is glibc's")


@needs_glibc
def test_entries_freed_in_the_device_tier_trim_nothing(make_store):
    # What backward frees in place is what the plain run frees too: handing those pages back only makes the
    # next step fault them in again (with checkpointing and nothing to move, each trim cost about 100k page
    # faults a step on gpt6).
    store = make_store(device_bytes=64 * MiB, host_bytes=0)
    for _ in range(8):
        handles = [store.put(torch.ones(MiB // 4)) for _ in range(16)]
        for h in handles:
            store.free(h)
        assert not store.return_free_memory()
    assert store.stats()["memory_trims"] == 0


@needs_glibc
def test_ram_released_by_spill_writes_is_still_handed_back(make_store):
    store = make_store(device_bytes=2 * MiB, host_bytes=0)
    handles = [store.put(torch.ones(MiB // 4), tier=Tier.DISK) for _ in range(8)]
    store.settle()
    assert store.stats()["spills"] == 8
    assert store.stats()["memory_trims"] >= 1
    for h in handles:
        store.free(h)
