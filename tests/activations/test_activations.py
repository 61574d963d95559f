"""Activation offload through the TierStore: exactness, memory accounting, lifetimes, policy, planning."""

from __future__ import annotations

import contextlib
import copy
import gc
import warnings

import pytest
import torch
from torch import nn

from lightning_tiercache import ActivationOffloader, Tier, no_offload, offload_activations
from lightning_tiercache.activations.offloader import OffloadConfig
from lightning_tiercache.activations.prefetch_plan import ForwardPass, PrefetchPlanner, measure_pass
from lightning_tiercache.activations.saved_tensors import gc_state
from lightning_tiercache.bench.gpt import GPT, GPTConfig, SavedBytes
from tests.activation_models import TINY, offload_stores

STORES = offload_stores("64KiB", "1GiB", codec="auto")


def _settled_empty(store, off) -> None:
    gc.collect()
    off.flush()
    store.settle()
    assert len(store) == 0
    assert all(t["bytes"] == 0 for t in store.stats()["tiers"].values())


def _train(model, batches, steps, context, autocast):
    """Losses and per-step gradients of ``steps`` AdamW steps, each forward inside ``context()``."""
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    losses, grads = [], []
    for x, y in batches[:steps]:
        opt.zero_grad(set_to_none=True)
        amp = torch.autocast("cpu", dtype=torch.bfloat16) if autocast else contextlib.nullcontext()
        with amp, context():
            loss = model(x, y).loss
        loss.backward()
        losses.append(loss.detach().clone())
        grads.append([p.grad.clone() for p in model.parameters()])
        opt.step()
    return losses, grads


@pytest.mark.parametrize("tiers", ["host", "disk"])
@pytest.mark.parametrize("ckpt", [False, True], ids=["plain", "checkpoint"])
@pytest.mark.parametrize("bf16", [False, True], ids=["fp32", "bf16"])
def test_losses_and_grads_bit_exact_over_optimizer_steps(make_store, tiers, ckpt, bf16):
    cfg = dataclasses_replace(TINY, checkpoint=ckpt)
    plain = GPT(cfg)
    model = copy.deepcopy(plain)
    batches = [plain.batch(4) for _ in range(3)]
    ref_losses, ref_grads = _train(plain, batches, 3, contextlib.nullcontext, bf16)
    store = make_store(**STORES[tiers])
    off = ActivationOffloader(store, min_bytes=512, module=model)
    losses, grads = _train(model, batches, 3, lambda: offload_activations(off), bf16)
    for a, b in zip(ref_losses, losses, strict=True):
        assert torch.equal(a, b)
    for step_a, step_b in zip(ref_grads, grads, strict=True):
        for a, b in zip(step_a, step_b, strict=True):
            assert torch.equal(a, b)
    for a, b in zip(plain.parameters(), model.parameters(), strict=True):
        assert torch.equal(a, b)
    st = off.stats()
    assert st["packed"] > 0 and st["bytes_offloaded"] > 0
    assert st["measured_steps"] >= 1
    if tiers == "disk":
        assert store.stats()["spills"] > 0 and store.stats()["reads"] > 0
    _settled_empty(store, off)


def dataclasses_replace(cfg: GPTConfig, **kw) -> GPTConfig:
    import dataclasses

    return dataclasses.replace(cfg, **kw)


def test_device_tier_stays_within_budget_while_plain_saved_bytes_exceed_it(make_store):
    cfg = dataclasses_replace(TINY, n_layer=4)
    model = GPT(cfg)
    x, y = model.batch(8)
    with SavedBytes() as plain:
        model(x, y).loss.backward()
    budget = 128 * 1024
    assert plain.nbytes > 8 * budget
    store = make_store(device_bytes=budget, host_bytes="256KiB", disk_bytes="1GiB")
    off = ActivationOffloader(store, min_bytes=512)
    seen: list[int] = []
    hooks = [b.register_forward_hook(lambda *_: seen.append(store.stats()["tiers"]["device"]["bytes"]))
             for b in model.blocks]  # fmt: skip
    for _ in range(2):  # the second step runs on the measured plan (a resident tail)
        model.zero_grad()
        with off:
            loss = model(x, y).loss
        seen.append(store.stats()["tiers"]["device"]["bytes"])
        loss.backward()
    for h in hooks:
        h.remove()
    assert len(seen) == 2 * (cfg.n_layer + 1)
    largest = 8 * cfg.seq_len * cfg.mlp_ratio * cfg.d_model * 4  # the MLP's hidden activation
    assert max(seen) <= budget + largest  # Note: [backpressure]: the budget plus the entry being put
    assert off.stats()["packed_bytes"] >= 2 * 0.9 * plain.nbytes  # nearly everything went through the store
    assert store.stats()["spills"] > 0
    _settled_empty(store, off)


def test_retain_graph_backward_twice_matches_plain(make_store):
    plain = GPT(TINY)
    model = copy.deepcopy(plain)
    x, y = plain.batch(4)
    loss = plain(x, y).loss
    loss.backward(retain_graph=True)
    loss.backward()
    store = make_store(**STORES["disk"])
    off = ActivationOffloader(store, min_bytes=512)
    with off:
        loss2 = model(x, y).loss
    loss2.backward(retain_graph=True)
    assert len(store) > 0  # the graph is retained, so are its entries
    loss2.backward()
    for a, b in zip(plain.parameters(), model.parameters(), strict=True):
        assert torch.equal(a.grad, b.grad)
    del loss2
    _settled_empty(store, off)


def test_double_backward_matches_plain(make_store):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    def penalized(model, x, y, context):
        with context(), sdpa_kernel(SDPBackend.MATH):  # the CPU flash kernel has no double backward
            loss = model(x, y).loss
        grads = torch.autograd.grad(loss, list(model.parameters()), create_graph=True)
        (loss + sum(g.pow(2).sum() for g in grads)).backward()

    plain = GPT(TINY)
    model = copy.deepcopy(plain)
    x, y = plain.batch(2)
    penalized(plain, x, y, contextlib.nullcontext)
    store = make_store(**STORES["host"])
    off = ActivationOffloader(store, min_bytes=512)
    penalized(model, x, y, lambda: offload_activations(off))
    for a, b in zip(plain.parameters(), model.parameters(), strict=True):
        assert torch.equal(a.grad, b.grad)
    assert off.stats()["unpacks"] > 0
    _settled_empty(store, off)


class _Boom(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        raise RuntimeError("boom mid-forward")


def test_exception_mid_forward_leaves_store_empty_and_offloader_usable(make_store):
    model = GPT(TINY)
    x, y = model.batch(4)
    store = make_store(**STORES["disk"])
    off = ActivationOffloader(store, min_bytes=512, keep_tail_bytes="8KiB")
    blocks = model.blocks
    model.blocks = nn.ModuleList([blocks[0], _Boom()])
    with pytest.raises(RuntimeError, match="boom mid-forward"), off:
        model(x, y)
    assert off.stats()["packed"] > 0
    _settled_empty(store, off)
    model.blocks = blocks
    with off:  # hooks were popped: a new forward works and is offloaded again
        model(x, y).loss.backward()
    assert torch.is_grad_enabled()
    _settled_empty(store, off)


def test_parameters_views_of_parameters_and_module_buffers_are_not_offloaded(make_store):
    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.w = nn.Parameter(torch.randn(64, 64))
            self.register_buffer("scale", torch.randn(64, 64))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return (x @ self.w.t() * self.scale).sin()

    net = Net()
    store = make_store(**STORES["host"])
    x = torch.randn(64, 64, requires_grad=True)
    # saved: x (a leaf that needs grad), w.t() (a view of a parameter), the buffer, the product (sin's input)
    for module, params, packed in ((net, 3, 1), (None, 2, 2)):
        off = ActivationOffloader(store, min_bytes=1024, module=module)
        with off:
            out = net(x)
        st = off.stats()
        assert (st["skipped_params"], st["packed"]) == (params, packed)
        out.sum().backward()
        del out
        _settled_empty(store, off)


def test_small_tensors_stay_and_views_of_one_storage_share_an_entry(make_store):
    store = make_store(**STORES["host"])
    off = ActivationOffloader(store, min_bytes=4096)
    a = torch.randn(32, 96, requires_grad=True)
    with off:
        q, k, v = (a * 2).split(32, dim=1)  # three views of one storage, each a third of it
        out = (q.sin() + k.cos() + v * v).sum() + (torch.randn(4, requires_grad=True) * 2).sin().sum()
        assert len(store) == 1  # one entry for the product's storage
    st = off.stats()
    assert st["packed"] == 1 and st["skipped_dup"] == 3 and st["skipped_small"] >= 1
    out.backward()
    ref = a.grad.clone()
    a.grad = None
    q, k, v = (a * 2).split(32, dim=1)
    (q.sin() + k.cos() + v * v).sum().backward()
    assert torch.equal(ref, a.grad)
    _settled_empty(store, off)


def test_no_offload_region_stays_resident(make_store):
    def f(x: torch.Tensor, inner) -> torch.Tensor:
        y = x.sin() * 3
        with inner():
            z = (y * 2).exp()  # exp saves its output z
        return (z * 2).cos()

    store = make_store(**STORES["host"])
    off = ActivationOffloader(store, min_bytes=0)
    x = torch.randn(256, requires_grad=True)
    with off:
        w = f(x, no_offload)
    st = off.stats()
    assert st["packed"] == 1 and st["skipped_params"] == 1  # only cos's input; sin's input is a leaf
    w.sum().backward()
    ref = x.grad.clone()
    x.grad = None
    f(x, contextlib.nullcontext).sum().backward()
    assert torch.equal(ref, x.grad)


def test_inplace_change_after_save_raises_like_autograd(make_store):
    store = make_store(**STORES["host"])
    off = ActivationOffloader(store, min_bytes=0)
    x = torch.randn(128, requires_grad=True)
    with off:
        y = x * 2
        z = y.sin()
    with torch.no_grad():
        y.mul_(3)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        z.sum().backward()


def _compiled_steps(model, x, y, context, steps=2):
    grads = []
    for _ in range(steps):
        model.zero_grad(set_to_none=True)
        with context():
            loss = model(x, y).loss
        loss.backward()
        grads.append([p.grad.clone() for p in model.parameters()])
    return grads


def test_whole_model_compile_warns_once_that_its_backward_needs_more_than_the_budget(make_store):
    torch._dynamo.reset()
    cfg = dataclasses_replace(TINY, n_layer=3)
    plain = GPT(cfg)
    model = copy.deepcopy(plain)
    x, y = plain.batch(4)
    ref = _compiled_steps(torch.compile(plain, backend="aot_eager"), x, y, contextlib.nullcontext)
    store = make_store(device_bytes="256KiB", host_bytes=0, disk_bytes="1GiB")
    off = ActivationOffloader(store, min_bytes=1024, module=model)
    compiled = torch.compile(model, backend="aot_eager")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        grads = _compiled_steps(compiled, x, y, lambda: offload_activations(off))
    ours = [w for w in caught if "torch.compile graph" in str(w.message)]
    assert len(ours) == 1 and "Compile per block" in str(ours[0].message)  # once, naming the fix
    st = off.stats()
    assert st["packed"] >= 2 and st["bytes_offloaded"] > 0 and st["compiled_backward_warnings"] == 1
    for step_a, step_b in zip(ref, grads, strict=True):
        for a, b in zip(step_a, step_b, strict=True):
            assert torch.equal(a, b)
    torch._dynamo.reset()


def test_per_block_compile_saves_memory_without_a_warning_and_prefetches_what_a_block_unpacks(make_store):
    torch._dynamo.reset()
    cfg = dataclasses_replace(TINY, n_layer=4)
    plain = GPT(cfg)
    model = copy.deepcopy(plain)
    x, y = plain.batch(4)
    with SavedBytes() as saved:
        plain(x, y).loss.backward()
    for m in (plain, model):
        for block in m.blocks:
            block.compile(backend="aot_eager")
    ref = _compiled_steps(plain, x, y, contextlib.nullcontext, steps=3)
    budget = saved.nbytes // 3
    store = make_store(device_bytes=budget, host_bytes=0, disk_bytes="1GiB")
    off = ActivationOffloader(store, min_bytes=1024, module=model)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        grads = _compiled_steps(model, x, y, lambda: offload_activations(off))
        measured = off.stats()
        grads += _compiled_steps(model, x, y, lambda: offload_activations(off), steps=1)
    # A compiled block's backward unpacks its entries lowest first, all before computing: on a planned step
    # every offloaded one it asks for was fetched ahead (Note: [nodes that unpack upwards]).
    assert off.stats()["unpack_misses"] == measured["unpack_misses"]
    assert not [w for w in caught if "torch.compile graph" in str(w.message)]
    assert off.stats()["bytes_offloaded"] > 0 and off.stats()["compiled_backward_warnings"] == 0
    largest = 4 * cfg.seq_len * cfg.mlp_ratio * cfg.d_model * 4
    assert store.stats()["tiers"]["device"]["peak_bytes"] <= budget + largest < saved.nbytes
    for step_a, step_b in zip(ref, grads, strict=True):
        for a, b in zip(step_a, step_b, strict=True):
            assert torch.equal(a, b)
    torch._dynamo.reset()


def test_saving_while_traced_by_compile_warns_that_offload_is_inactive(make_store, monkeypatch):
    store = make_store(**STORES["host"])
    off = ActivationOffloader(store, min_bytes=0)
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    x = torch.randn(64, requires_grad=True)
    with pytest.warns(RuntimeWarning, match="inactive inside code traced by torch.compile"), off:
        y = x.sin().cos()
    monkeypatch.undo()
    assert off.stats()["packed"] == 0 and len(store) == 0
    y.sum().backward()


def test_plan_is_measured_then_kept_in_state_dict(make_store):
    model = GPT(dataclasses_replace(TINY, n_layer=3))
    x, y = model.batch(4)
    store = make_store(**{**STORES["disk"], "device_bytes": "512KiB"})
    off = ActivationOffloader(store, min_bytes=512)
    for _ in range(3):
        with off:
            loss = model(x, y).loss
        loss.backward()
    st = off.stats()
    assert st["measured_steps"] == 2 and st["lead_bytes"] > 0
    assert 0 < st["keep_tail_bytes"] <= 0.75 * store.budgets[Tier.DEVICE]  # the budget's room less a reserve
    assert st["bytes_kept"] > 0 and st["prefetches"] > 0
    state = off.state_dict()
    fresh = ActivationOffloader(store, min_bytes=512)
    fresh.load_state_dict({})  # nothing saved yet: a no-op
    assert fresh.stats()["lead_bytes"] == 0
    fresh.load_state_dict(state)
    assert fresh.state_dict() == state
    assert fresh.stats()["lead_bytes"] == st["lead_bytes"]
    with pytest.raises(ValueError, match="version=99 is not 1"):
        fresh.load_state_dict({**state, "version": 99})
    with pytest.raises(ValueError, match="planned_lead=-5 must be"):
        fresh.load_state_dict({**state, "planned_lead": -5})


class _Slot:
    pass


def _pass_of_eight() -> tuple[ForwardPass, list[_Slot]]:
    """A forward pass of eight 100-byte entries (the slots must stay referenced: the pass holds weak refs)."""
    p = ForwardPass()
    slots = [_Slot() for _ in range(8)]
    for s in slots:
        p.add(s, 100)
    return p, slots


def test_prefetch_walks_down_in_backward_order_within_the_lead():
    p, slots = _pass_of_eight()
    assert p.due(7, 250) == [slots[6], slots[5], slots[4]]  # ends 700, 600, 500 >= 700 - 250
    assert p.due(6, 250) == [slots[3]]  # 4 and above were already issued; 3 ends at 400 >= 600 - 250
    assert p.due(5, 250) == [slots[2]]
    assert p.due(2, 0) == [slots[1]]  # a jump down: the next entry is always due
    del slots[0]
    gc.collect()
    assert p.due(1, 1000) == []  # dead entries are skipped


def test_a_jump_down_makes_the_entries_it_skipped_due_first_in_forward_order():
    p, slots = _pass_of_eight()
    assert p.due(7, 0) == [slots[6]]
    # a compiled region's node unpacks 3 first, then 4 and 5: those are due before the walk goes on below 3
    assert p.due(3, 0) == [slots[4], slots[5], slots[2]]
    assert p.due(4, 0) == []  # every entry above the cursor was issued once


def test_planner_lead_grows_with_rate_and_load_time_and_is_capped():
    from lightning_tiercache.activations.prefetch_plan import Measurement

    slow = Measurement(10_000_000, 100_000, 100, 1e8, 1.0, 0.0, 0, 1e-8)  # 100 MB/s backward, 100 MB/s loads
    fast = Measurement(10_000_000, 100_000, 100, 1e8, 1.0, 0.0, 0, 1e-10)  # 10 GB/s loads
    a, b = PrefetchPlanner(), PrefetchPlanner()
    a.update(slow)
    b.update(fast)
    assert a.lead_bytes > b.lead_bytes >= 100_000
    assert a.lead_bytes <= 2_000_000  # a fifth of the step's saved bytes
    waited = Measurement(10_000_000, 100_000, 100, 1e8, 1.0, 0.5, 10, 1e-10)
    before = b.boost
    b.update(waited)
    assert b.boost > before
    fixed = PrefetchPlanner(lead_bytes=5, keep_tail_bytes=7)
    fixed.update(slow)
    assert (fixed.lead_bytes, fixed.fixed_tail) == (5, 7)


def test_measure_pass_excludes_waits_from_backward_rate():
    class S:
        pass

    p = ForwardPass()
    keep = [S() for _ in range(4)]
    for s in keep:
        p.add(s, 1000)
    for i, (t, w) in enumerate([(0.0, 0.0), (1.0, 0.5), (2.0, 0.0), (3.0, 0.0)]):
        p.record(t, 3 - i, 1000, w)
    m = measure_pass(p, 0.0, 1e-4)
    assert m is not None and m.waits == 1 and m.wait_s == 0.5
    assert m.peak_rate_bps == pytest.approx(2000.0)  # 1000 bytes in 0.5 s of compute (a wait excluded)


def test_frees_during_garbage_collection_are_deferred_then_flushed(make_store):
    store = make_store(**STORES["host"])
    off = ActivationOffloader(store, min_bytes=0)
    x = torch.randn(256, requires_grad=True)
    with off:
        y = x.sin().cos()
    assert len(store) == 1
    gc.disable()
    gc_state.running = True
    try:
        del y
    finally:
        gc_state.running = False
        gc.enable()
    assert len(store) == 1 and off.stats()["pending_frees"] == 0  # stats() flushes
    assert len(store) == 0


def test_tier_disk_sends_offloaded_tensors_past_the_host_tier(make_store):
    store = make_store(device_bytes="1MiB", host_bytes="1GiB", disk_bytes="1GiB")
    off = ActivationOffloader(store, min_bytes=0, tier="disk", keep_tail_bytes=0)
    x = torch.randn(4096, requires_grad=True)
    with off:
        y = (x * 2).sin()
    store.settle()
    assert store.stats()["tiers"]["disk"]["entries"] == 1
    y.sum().backward()
    assert torch.equal(x.grad, (x * 2).cos() * 2)


def test_offload_activations_accepts_a_store_or_an_offloader(make_store):
    store = make_store(**STORES["host"])
    x = torch.randn(1024, requires_grad=True)
    with offload_activations(store, min_bytes=0) as off:
        y = x.exp().sin()
    assert isinstance(off, ActivationOffloader) and off.stats()["packed"] == 1
    y.sum().backward()
    with offload_activations(off) as same:
        assert same is off
    with pytest.raises(TypeError, match="takes no keyword arguments"), offload_activations(off, min_bytes=0):
        pass
    with pytest.raises(TypeError, match="takes a TierStore or an ActivationOffloader"), offload_activations(3):
        pass


def test_offload_activations_over_a_store_keeps_one_offloader_and_its_plan_across_steps(make_store):
    model = GPT(dataclasses_replace(TINY, n_layer=3))
    x, y = model.batch(4)
    store = make_store(**STORES["disk"])
    seen = []
    for _ in range(3):
        with offload_activations(store, min_bytes=512, module=model) as off:
            loss = model(x, y).loss
        loss.backward()
        seen.append(off)
    assert seen[0] is seen[1] is seen[2]
    assert seen[0].stats()["measured_steps"] == 2  # the later steps ran on the measured plan
    with offload_activations(store, min_bytes=1024, module=model) as other:
        pass
    assert other is not seen[0]  # other arguments, another offloader


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"min_bytes": "lots"}, "min_bytes='lots' is not a size"),
        ({"keep_tail_bytes": -1}, "keep_tail_bytes=-1 must be >= 0"),
        ({"tier": "device"}, "tier='device' is not one of auto, host, disk"),
        ({"prefetch": 1}, "prefetch=1 must be True or False"),
        ({"wait_threshold_s": -1.0}, "wait_threshold_s=-1.0 must be"),
    ],
)
def test_config_errors_name_field_and_value(kwargs, match):
    with pytest.raises(ValueError, match=match):
        OffloadConfig(**kwargs)


def test_config_accepts_tier_enum_and_sizes():
    cfg = OffloadConfig(min_bytes="1KiB", tier=Tier.DISK, lead_bytes="2MiB")
    assert (cfg.min_bytes, cfg.offload_tier(torch.device("cpu")), cfg.lead_bytes) == (1024, Tier.DISK, 2 << 20)
    auto = OffloadConfig()
    assert auto.offload_tier(torch.device("cpu")) is Tier.DISK  # the CPU's host tier is the same RAM
    assert auto.offload_tier(torch.device("cuda", 0)) is Tier.HOST


def test_constructor_rejects_a_non_store_and_mixed_arguments(make_store):
    with pytest.raises(TypeError, match="store must be a TierStore"):
        ActivationOffloader(object())  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="either config or keyword arguments"):
        ActivationOffloader(make_store(), OffloadConfig(), min_bytes=0)


@pytest.mark.parametrize("where", ["device", "disk"])
def test_views_of_a_small_part_of_a_storage_come_back_exactly_from_every_tier(make_store, where):
    def f(a: torch.Tensor) -> torch.Tensor:
        big = (a * 2).view(64, 64)
        part = big[40:48, 3:50].t()  # non-contiguous, offset, a small part of the storage: its span is stored
        return part.sin().sum() + big[1:3].cos().sum()

    a = torch.randn(4096, requires_grad=True)
    f(a).backward()
    ref = a.grad.clone()
    a.grad = None
    store = make_store(device_bytes="1MiB", host_bytes="1KiB", disk_bytes="1GiB")
    tail = "1MiB" if where == "device" else 0
    off = ActivationOffloader(store, min_bytes=0, keep_tail_bytes=tail, tier="disk")
    with off:
        loss = f(a)
    store.settle()
    assert store.stats()["tiers"][where]["entries"] == 2
    loss.backward()
    assert torch.equal(ref, a.grad)
    _settled_empty(store, off)


def test_counts_of_tensors_left_in_place_add_up_per_forward(make_store):
    store = make_store(**STORES["host"])
    lin = nn.Linear(64, 64)  # weight: 16 KiB
    off = ActivationOffloader(store, min_bytes=8192)
    x = torch.randn(8, 64, requires_grad=True)  # 2 KiB
    # saved per forward: x and relu's output (small, 2 KiB each), weight.t() (a view of a parameter, 16 KiB)
    for n in (1, 2):
        with off:
            y = lin(x).relu()
        y.sum().backward()
        st = off.stats()
        assert (st["skipped_small"], st["skipped_bytes"], st["skipped_params"], st["packed"]) == (2 * n, 4096 * n, n, 0)
