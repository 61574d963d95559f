from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from lightning_tiercache import TierConfig, TierStore

# Subprocesses the tests start import this checkout's package, not whichever one is installed.
_ROOT = str(Path(__file__).resolve().parents[1])
os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (_ROOT, os.environ.get("PYTHONPATH")) if p)


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


@pytest.fixture
def spill_parent(tmp_path):
    d = tmp_path / "spill"
    d.mkdir()
    return d


@pytest.fixture
def make_store(spill_parent):
    """Build stores that spill under the test's temp dir; all are closed after the test."""
    stores: list[TierStore] = []

    def make(**kw) -> TierStore:
        kw.setdefault("spill_dir", str(spill_parent))
        kw.setdefault("device", "cpu")
        s = TierStore(TierConfig(**kw))
        stores.append(s)
        return s

    yield make
    for s in stores:
        s.close()


@pytest.fixture
def sim_store(spill_parent):
    """``sim_store(seed, max_delay_s=..., sim={...}, **config)``: a store on a fresh simulated asynchronous device.

    Stores and devices are closed after the test, which then fails if the device saw a copy run after its
    device-side tensor was released, or a worker thread that was not pointed at the device.
    """
    from lightning_tiercache.store.tiers.simulated import SimulatedDevice

    opened: list[tuple[TierStore, SimulatedDevice]] = []

    def make(seed: int = 0, max_delay_s: float = 2e-3, sim: dict | None = None, **kw) -> TierStore:
        kw.setdefault("spill_dir", str(spill_parent))
        dev = SimulatedDevice(seed=seed, max_delay_s=max_delay_s, **(sim or {}))
        store = TierStore(TierConfig(**kw), device_ops=dev)
        opened.append((store, dev))
        return store

    yield make
    violations = []
    for store, dev in opened:
        store.close()
        dev.close()
        violations += dev.violations
    assert violations == []
