"""Moves that cannot start: no pinned memory, a copy that fails to launch, an error inside ``put``."""

from __future__ import annotations

import pytest
import torch

from lightning_tiercache import Tier


def test_a_failed_pin_falls_back_to_pageable_memory_instead_of_raising(sim_store):
    store = sim_store(device_bytes="1MiB", host_bytes="1MiB", disk_bytes=0, sim={"pinned_bytes": 0})
    t = torch.randn(1024)
    with pytest.warns(RuntimeWarning, match="could not pin 4096 bytes of host memory"):
        h = store.put(t, tier=Tier.HOST)  # a "CUDA error: out of memory" here would be taken for a device OOM
    store.settle()
    assert store.where(h) is Tier.HOST
    assert torch.equal(store.get(h), t)
    assert store.stats()["pin_failures"] == 1


def test_put_keeps_the_entry_where_it_was_when_its_copy_cannot_start(sim_store, monkeypatch):
    store = sim_store(device_bytes="1MiB", host_bytes="1MiB", disk_bytes=0)

    def broken(*args):
        raise RuntimeError("CUDA error: launch failure (simulated)")

    monkeypatch.setattr(store.device_ops, "download", broken)
    t = torch.randn(1024)
    h = store.put(t, tier=Tier.HOST)
    assert store.where(h) is Tier.DEVICE
    assert torch.equal(store.get(h), t)
    assert store.stats()["move_errors"] == 1
    store.free(h)
    assert store.stats()["tiers"]["device"]["bytes"] == 0


def test_a_put_that_raises_leaves_no_entry_behind(sim_store, monkeypatch):
    store = sim_store(device_bytes="1MiB", host_bytes="1MiB", disk_bytes=0)

    def broken(*args):
        raise KeyError("not an allocation failure")

    monkeypatch.setattr(store.device_ops, "download", broken)
    with pytest.raises(KeyError, match="not an allocation failure"):
        store.put(torch.randn(1024), tier=Tier.HOST)
    assert len(store) == 0
    tiers = store.stats()["tiers"]
    assert tiers["device"]["bytes"] == tiers["host"]["bytes"] == 0
