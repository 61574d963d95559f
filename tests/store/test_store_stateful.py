"""A stateful property test: random put/get/free/prefetch/demote against a plain dict model."""

from __future__ import annotations

import tempfile

import hypothesis.strategies as st
import torch
from hypothesis import HealthCheck, settings
from hypothesis.stateful import Bundle, RuleBasedStateMachine, consumes, invariant, rule

from lightning_tiercache import EntryEvictedError, Kind, Tier, TierConfig, TierStore

KiB = 1024
DTYPES = [torch.float32, torch.bfloat16, torch.int64, torch.uint8, torch.bool]


class StoreMachine(RuleBasedStateMachine):
    handles = Bundle("handles")

    def __init__(self) -> None:
        super().__init__()
        self.dir = tempfile.TemporaryDirectory()
        self.store = TierStore(
            TierConfig(
                device_bytes=6 * KiB, host_bytes=6 * KiB, disk_bytes=24 * KiB, spill_dir=self.dir.name,
                device="cpu", policy="s3fifo", codec="auto",
            )
        )  # fmt: skip
        self.model: dict[int, tuple[torch.Tensor, Kind]] = {}
        self.counter = 0

    @rule(
        target=handles,
        n=st.integers(0, 700),
        dtype=st.sampled_from(DTYPES),
        cache=st.booleans(),
        tier=st.sampled_from([None, Tier.HOST, Tier.DISK]),
    )
    def put(self, n, dtype, cache, tier):
        self.counter += 1
        t = (torch.arange(n) * self.counter % 251).to(dtype)
        kind = Kind.CACHE if cache else Kind.REQUIRED
        h = self.store.put(t, kind=kind, tier=tier)
        self.model[h.id] = (t, kind)
        return h

    @rule(h=handles)
    def get(self, h):
        if h.id not in self.model:
            return
        t, kind = self.model[h.id]
        try:
            out = self.store.get(h)
        except EntryEvictedError:
            assert kind is Kind.CACHE, "a required entry was dropped"
            del self.model[h.id]
            return
        assert out.dtype == t.dtype and out.shape == t.shape
        assert torch.equal(out, t)

    @rule(h=consumes(handles))
    def free(self, h):
        self.store.free(h)
        self.model.pop(h.id, None)

    @rule(hs=st.lists(handles, max_size=4))
    def prefetch(self, hs):
        self.store.prefetch(hs)

    @rule()
    def demote(self):
        self.store.demote(Tier.DEVICE, nbytes=2 * KiB, wait=False)

    @rule()
    def settle(self):
        self.store.settle()
        tiers = self.store.stats()["tiers"]
        required = sum(t.numel() * t.element_size() for t, k in self.model.values() if k is Kind.REQUIRED)
        # Budgets hold once moves settle, unless required entries alone overflow what is below the device.
        if required <= 24 * KiB:
            assert tiers["disk"]["bytes"] <= tiers["disk"]["budget"], tiers

    @invariant()
    def required_entries_are_live(self):
        for hid, (_, kind) in self.model.items():
            if kind is Kind.REQUIRED:
                assert any(hid == e for e in self.store._entries), f"required entry {hid} vanished"

    def teardown(self):
        self.store.close()
        self.dir.cleanup()


StoreMachine.TestCase.settings = settings(
    max_examples=100, stateful_step_count=50, deadline=None, suppress_health_check=list(HealthCheck)
)
TestStoreMachine = StoreMachine.TestCase
