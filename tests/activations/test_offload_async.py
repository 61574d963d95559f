"""Activation offload through the asynchronous mover: bit-exact gradients with copies landing late.

The store runs on the simulated device (copies complete on worker threads after random delays, fresh memory
holds poison bytes), so a reload used before its copy landed, or a pool buffer reused under a pending upload,
changes a gradient.
"""

from __future__ import annotations

import copy

import pytest
import torch

from lightning_tiercache import ActivationOffloader, TierConfig, TierStore, offload_activations
from lightning_tiercache.bench.gpt import GPT
from lightning_tiercache.store.tiers.device import DeviceOps
from tests.activation_models import SMALLEST, offload_stores

TINY = SMALLEST
STORES = offload_stores("16KiB", "64MiB", codec="none")


def _steps(model, batches, context, settle=lambda: None):
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    out = []
    for i, (x, y) in enumerate(batches):
        opt.zero_grad(set_to_none=True)
        with context():
            loss = model(x, y).loss
        if i == 0:
            settle()  # every copy down has landed: this backward reloads everything it offloaded
        loss.backward()
        out.append((loss.detach().clone(), [p.grad.clone() for p in model.parameters()]))
        opt.step()
    return out


@pytest.mark.parametrize("seed", range(10))
@pytest.mark.parametrize("tiers", ["host", "disk"])
def test_grads_bit_exact_with_delayed_copies(sim_store, tiers, seed):
    torch.manual_seed(seed)
    plain = GPT(TINY)
    model = copy.deepcopy(plain)
    batches = [plain.batch(2) for _ in range(3)]
    ref = _steps(plain, batches, lambda: torch.autograd.graph.saved_tensors_hooks(lambda t: t, lambda t: t))
    store = sim_store(seed, max_delay_s=1e-3, **STORES[tiers])
    off = ActivationOffloader(store, min_bytes=256, module=model)
    got = _steps(model, batches, lambda: offload_activations(off), store.settle)
    for (loss_a, grads_a), (loss_b, grads_b) in zip(ref, got, strict=True):
        assert torch.equal(loss_a, loss_b)
        for a, b in zip(grads_a, grads_b, strict=True):
            assert torch.equal(a, b)
    store.settle()
    st = store.stats()
    if tiers == "host":
        assert st["bytes_to_host"] > 0 and st["bytes_to_device"] > 0
    else:
        assert st["spills"] > 0 and st["reads"] > 0
    assert store.device_ops.counts["downloads"] > 0 and store.device_ops.counts["uploads"] > 0


class _StallingClock(DeviceOps):
    """A CPU device whose compute-stream clock shows each hand-over stalling 5 ms, as CUDA's stream wait does
    while the host returns at once."""

    STALL_S = 5e-3

    def __init__(self) -> None:
        super().__init__(torch.device("cpu"))
        self.now = 0.0
        self.stamps = 0

    def stamp(self):
        self.stamps += 1
        if self.stamps % 2 == 0:  # the second stamp of an unpack: after the hand-over
            self.now += self.STALL_S
        else:
            self.now += 1e-3  # backward compute between unpacks
        return _Stamp(self.now)

    def seconds_between(self, start, end):
        return end.at - start.at


class _Stamp:
    def __init__(self, at: float) -> None:
        self.at = at

    def query(self) -> bool:
        return True

    def synchronize(self) -> None:
        pass


def test_the_plan_measures_the_stall_on_the_device_clock(spill_parent):
    """Note: [device-timed plan] -- the host sees no wait; the compute stream stalled at every unpack."""
    ops = _StallingClock()
    cfg = TierConfig(device_bytes="16KiB", host_bytes="64MiB", disk_bytes=0, spill_dir=str(spill_parent))
    store = TierStore(cfg, device_ops=ops)
    try:
        model = GPT(TINY)
        off = ActivationOffloader(store, min_bytes=256, module=model)
        for x, y in [model.batch(2) for _ in range(2)]:
            with off:
                loss = model(x, y).loss
            loss.backward()
        with off:  # the next forward plans from the measured backward
            pass
        st = off.stats()
        unpacks = st["unpacks"]
        assert st["measured_steps"] >= 1
        assert st["last_unpack_wait_s"] == pytest.approx(_StallingClock.STALL_S * st["last_unpack_waits"])
        assert st["last_unpack_waits"] > 0 and unpacks > 0
    finally:
        store.close()
