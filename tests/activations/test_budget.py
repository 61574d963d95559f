"""The device budget under activation offload: peaks that hold, overcommits that are real, a plan that offloads
only what must go."""

from __future__ import annotations

import copy
import time
import warnings

import pytest
import torch

from lightning_tiercache import ActivationOffloader, Tier, offload_activations
from lightning_tiercache.activations.budget import keep_plan, resident_tail_bytes
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
            assert t["added_over_budget"] == 0, (name, t)  # over it only by the entry that crossed it
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
    assert store.stats()["tiers"]["device"]["added_over_budget"] > 0
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


def _record_placements(store, monkeypatch) -> list[list[list]]:
    """Record where each entry ends up, per forward: ``[nbytes, offloaded, tensor]`` per entry, in forward order.

    Append an empty list to the returned one before each forward."""
    forwards: list[list[list]] = []
    entries: dict[int, list] = {}
    put = store.put

    def recording(tensor, **kw):
        entry = entries.get(id(tensor))  # the tensor is held by its entry, so its id is not reused
        if entry is None:  # a first put: a new entry (a window move puts the same tensor again)
            entry = entries[id(tensor)] = [tensor.nbytes, False, tensor]
            forwards[-1].append(entry)
        entry[1] = kw.get("tier") is not None  # sent down (a resident put names only where it may be evicted)
        return put(tensor, **kw)

    monkeypatch.setattr(store, "put", recording)
    return forwards


def test_a_measured_plan_offloads_the_largest_entries_and_moves_fewer_bytes(make_store, monkeypatch):
    model = GPT(CFG)
    plain = copy.deepcopy(model)
    x, y = model.batch(BATCH)
    with SavedBytes() as saved:
        plain(x, y).loss.backward()
    ref = [p.grad.clone() for p in plain.parameters()]
    tail = saved.nbytes // 3  # a budget that holds a third of the forward: the rest must go
    store = make_store(device_bytes=4 * saved.nbytes, host_bytes=0, disk_bytes="1GiB")
    lead = LARGEST
    off = ActivationOffloader(store, min_bytes=1024, module=model, keep_tail_bytes=tail, lead_bytes=lead)
    forwards = _record_placements(store, monkeypatch)
    steps = []
    for _ in range(2):  # the first forward has no measurement (oldest leave first); the second is planned
        forwards.append([])
        before = off.stats()["bytes_offloaded"]
        grads = _steps(model, x, y, off, steps=1)[0]
        steps.append((forwards[-1], off.stats()["bytes_offloaded"] - before))
        for a, b in zip(ref, grads, strict=True):
            assert torch.equal(a, b)
    (first, moved_first), (planned, moved_planned) = steps
    assert [e[0] for e in first] == [e[0] for e in planned]  # the same forward twice
    after = 0
    hideable = []  # entries with a lead of forward after them: backward work hides their reload
    for nbytes, offloaded, _ in reversed(planned):
        if after >= lead:
            hideable.append((nbytes, offloaded))
        after += nbytes
    kept = [n for n, o in hideable if not o]
    sent = [n for n, o in hideable if o]
    assert kept and sent and max(kept) <= min(sent)  # what left is the largest
    assert sum(n for n, o, _ in planned if not o) <= tail
    assert moved_planned == sum(n for n, o, _ in planned if o)
    assert 0 < moved_planned < moved_first  # oldest-first moved more for the same tail
    assert sum(o for _, o, _ in planned) < sum(o for _, o, _ in first)  # in fewer records


def test_keep_plan_keeps_the_exposed_end_then_the_smallest_within_the_tail():
    # forward order; the last entry has nothing after it, so prefetch cannot hide its reload
    assert keep_plan([4, 1, 1, 4, 2], tail_bytes=5, exposed_bytes=2) == [False, True, True, False, True]
    # an exposed entry that does not fit leaves; equal sizes: the later one (its backward runs sooner) stays
    assert keep_plan([3, 3, 9], tail_bytes=3, exposed_bytes=1) == [False, True, False]
    assert keep_plan([3, 3], tail_bytes=0, exposed_bytes=0) == [False, False]
