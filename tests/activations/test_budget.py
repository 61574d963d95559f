"""The device budget under activation offload: peaks that hold, overcommits that are real, a plan that offloads
only what must go."""

from __future__ import annotations

import copy
import time
import warnings

import pytest
import torch

from lightning_tiercache import ActivationOffloader, Tier, offload_activations
from lightning_tiercache.activations.budget import resident_tail_bytes
from lightning_tiercache.bench.gpt import GPT, GPTConfig, SavedBytes
from lightning_tiercache.store.codec import AutoCodec
from tests.activation_models import BUDGETED

CFG = BUDGETED
BATCH = 4
LARGEST = BATCH * CFG.seq_len * CFG.mlp_ratio * CFG.d_model * 4  # the MLP's hidden activation, fp32


@pytest.fixture
def slow_disk(monkeypatch):
    """Every spill write takes 5 ms longer: a disk slower than the forward that fills it."""
    encode = AutoCodec.encode

    def slow(self, tensor):
        time.sleep(0.005)
        return encode(self, tensor)

    monkeypatch.setattr(AutoCodec, "encode", slow)


def _steps(model, x, y, off, steps=2):
    grads = []
    for _ in range(steps):
        model.zero_grad(set_to_none=True)
        with offload_activations(off):
            loss = model(x, y).loss
        loss.backward()
        grads.append([p.grad.clone() for p in model.parameters()])
    return grads


@pytest.mark.parametrize(
    ("tier", "budgets"),
    [
        ("disk", {"device_bytes": "256KiB", "host_bytes": 0}),
        ("host", {"device_bytes": "256KiB", "host_bytes": "256KiB"}),
    ],
)
def test_tier_peaks_stay_within_budget_plus_one_entry_while_the_disk_lags(make_store, slow_disk, tier, budgets):
    model = GPT(CFG)
    x, y = model.batch(BATCH)
    store = make_store(disk_bytes="1GiB", codec="auto", **budgets)
    off = ActivationOffloader(store, min_bytes=1024, module=model, tier=tier)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # no overcommit warning: nothing is really overcommitted
        _steps(model, x, y, off)
    st = store.stats()
    assert st["spills"] > 0 and st["overcommits"] == 0
    for name in ("device", "host"):
        t = st["tiers"][name]
        if t["budget"]:
            assert t["peak_bytes"] <= t["budget"] + LARGEST, (name, t)
    assert st["backpressure_waits"] > 0  # forward waited for the disk instead of filling memory


def test_a_real_overcommit_warns_once_naming_the_budgets_and_is_an_event_and_a_count(make_store):
    model = GPT(CFG)
    x, y = model.batch(BATCH)
    store = make_store(device_bytes="128KiB", host_bytes=0, disk_bytes=0)  # required entries: nowhere to go
    off = ActivationOffloader(store, min_bytes=1024, module=model, keep_tail_bytes=0)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _steps(model, x, y, off)
    over = [str(w.message) for w in caught if "over its budget" in str(w.message)]
    assert len(over) == 1 and "raise device_bytes" in over[0] and "device_bytes=131072" in over[0]
    assert store.stats()["overcommits"] > 0
    assert any(e["event"] == "overcommit" for e in store.drain_events())


def test_only_what_the_budget_cannot_hold_is_offloaded(make_store):
    model = GPT(CFG)
    x, y = model.batch(BATCH)
    with SavedBytes() as saved:
        model(x, y).loss.backward()
    roomy = make_store(device_bytes=4 * saved.nbytes, host_bytes=0, disk_bytes="1GiB")
    off = ActivationOffloader(roomy, min_bytes=1024, module=model)
    _steps(model, x, y, off)
    assert off.stats()["packed"] > 0 and off.stats()["bytes_offloaded"] == 0  # it all fits: nothing moves
    assert roomy.stats()["spills"] == 0
    budget = saved.nbytes // 2
    tight = make_store(device_bytes=budget, host_bytes=0, disk_bytes="1GiB")
    off = ActivationOffloader(tight, min_bytes=1024, module=model)
    _steps(model, x, y, off)
    st = off.stats()
    per_step = st["bytes_offloaded"] / st["steps"]
    assert 0 < per_step < saved.nbytes - 0.5 * budget  # most of what fits stayed resident
    assert st["keep_tail_bytes"] == resident_tail_bytes(budget, st["lead_bytes"], LARGEST)


def test_checkpointed_blocks_offload_their_inputs_and_match_plain(make_store):
    cfg = GPTConfig(**{**CFG.__dict__, "checkpoint": True})
    plain = GPT(cfg)
    model = copy.deepcopy(plain)
    x, y = plain.batch(BATCH)
    ref = []
    for _ in range(2):
        plain.zero_grad(set_to_none=True)
        plain(x, y).loss.backward()
        ref.append([p.grad.clone() for p in plain.parameters()])
    block_input = BATCH * cfg.seq_len * cfg.d_model * 4
    store = make_store(device_bytes=2 * block_input, host_bytes=0, disk_bytes="1GiB")
    off = ActivationOffloader(store, min_bytes=1024, module=model)
    grads = _steps(model, x, y, off)
    st = off.stats()
    assert st["bytes_offloaded"] >= (cfg.n_layer - 2) * block_input  # the inputs the budget cannot hold
    assert store.stats()["tiers"][Tier.DEVICE.label]["peak_bytes"] <= 2 * block_input + LARGEST
    for step_a, step_b in zip(ref, grads, strict=True):
        for a, b in zip(step_a, step_b, strict=True):
            assert torch.equal(a, b)
