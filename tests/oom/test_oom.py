"""OOM detection, the ladder policy, the micro-batch runner and the fault injector, with plain PyTorch."""

from __future__ import annotations

import gc
import weakref

import pytest
import torch
from torch import nn

from lightning_tiercache import OOMRecoveryError, Tier
from lightning_tiercache.lightning.testing import OOMInjector
from lightning_tiercache.oom.microbatch import MicroBatchRunner, micro_batches
from lightning_tiercache.oom.recovery import MicroBatchPolicy, OOMConfig, RankAgreement, is_oom_error, memory_summary


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 12), nn.Tanh(), nn.Linear(12, 1))


def _batch(n: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    return torch.randn(n, 6, generator=g), torch.randn(n, 1, generator=g)


def _step(net: nn.Module):
    def micro_step(part, scale):
        x, y = part
        loss = nn.functional.mse_loss(net(x), y)
        (loss if scale == 1.0 else loss * scale).backward()
        return loss.detach()

    return micro_step


def _grads(net: nn.Module) -> list[torch.Tensor]:
    return [p.grad.clone() for p in net.parameters()]


@pytest.mark.parametrize(
    ("kw", "match"),
    [
        ({"max_micro_batches": 0}, r"OOMConfig.max_micro_batches must be an int >= 1, got 0"),
        ({"grow_back_after_steps": -1}, r"grow_back_after_steps must be an int >= 0, got -1"),
        ({"loss_reduction": "avg"}, r"loss_reduction must be one of \('mean', 'sum'\), got 'avg'"),
        ({"initial_micro_batches": 8, "max_micro_batches": 4}, r"initial_micro_batches=8 exceeds max_micro_batches=4"),
        ({"split_fn": 3}, r"OOMConfig.split_fn must be callable or None, got int"),
    ],
)
def test_config_rejects_bad_values_naming_the_field(kw, match):
    with pytest.raises(ValueError, match=match):
        OOMConfig(**kw)


@pytest.mark.parametrize(
    ("exc", "expected"),
    [
        (torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2 GiB"), True),
        (RuntimeError("[enforce fail] DefaultCPUAllocator: can't allocate memory: you tried to allocate 9"), True),
        (RuntimeError("cuDNN error: CUDNN_STATUS_NOT_SUPPORTED. This error may appear if you passed in"), True),
        (RuntimeError("wrapped by a library: CUDA out of memory. Tried to allocate 1 GiB"), True),
        (RuntimeError("CUDA error: out of memory\nCUDA kernel errors might be asynchronously reported"), True),
        (RuntimeError("shape mismatch"), False),
        (ValueError("CUDA out of memory"), False),
        (KeyError("x"), False),
    ],
)
def test_oom_detection_is_precise(exc, expected):
    assert is_oom_error(exc) is expected


def _pinned_oom() -> torch.AcceleratorError:
    # What c10's CUDA check raises when cudaHostAlloc/cudaHostRegister fails in torch's caching host allocator.
    err = torch.AcceleratorError("CUDA error: out of memory\nCUDA kernel errors might be asynchronously reported")
    err.error_code = 2  # cudaErrorMemoryAllocation
    return err


def _raised(fn) -> BaseException:
    try:
        fn()
    except BaseException as exc:  # the test inspects whatever was raised
        return exc
    raise AssertionError("nothing was raised")


def test_a_failed_pinned_host_allocation_is_not_a_device_oom(monkeypatch):
    """Note: [pinned memory is not a device OOM] -- the same "CUDA error: out of memory" from a raw cudaMalloc
    still is one; from a pinning call it is not, whoever pinned."""
    from torch._utils import ExceptionWrapper

    from lightning_tiercache import PinnedMemoryError
    from lightning_tiercache.store.tiers import host

    def raw_malloc():  # an extension's cudaMalloc, checked with C10_CUDA_CHECK
        raise _pinned_oom()

    assert is_oom_error(_raised(raw_malloc))
    assert not is_oom_error(_raised(_PinnedBatch().pin_memory))

    def pin_thread():  # torch's pin-memory thread catches it and the main thread re-raises it
        try:
            raise _pinned_oom()
        except torch.AcceleratorError:
            wrapped = ExceptionWrapper(where="in pin memory thread for device 0")
        wrapped.reraise()

    exc = _raised(pin_thread)
    assert isinstance(exc, torch.AcceleratorError) and "CUDA error: out of memory" in str(exc)
    assert not is_oom_error(exc)

    empty = torch.empty

    def failing_pin(*args, pin_memory=False, **kwargs):
        if pin_memory:
            raise _pinned_oom()
        return empty(*args, **kwargs)

    monkeypatch.setattr(torch, "empty", failing_pin)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    x = torch.randn(3, requires_grad=True)

    def saved_on_cpu():
        with torch.autograd.graph.save_on_cpu(pin_memory=True):
            (x * x).sum()

    assert not is_oom_error(_raised(saved_on_cpu))
    # The store's own pinning raises the typed error (its pool falls back to pageable memory instead).
    exc = _raised(lambda: host.torch_pinned(4096))
    assert isinstance(exc, PinnedMemoryError) and not is_oom_error(exc)


class _PinnedBatch:  # a custom batch type DataLoader(pin_memory=True) pins
    def pin_memory(self):
        raise _pinned_oom()


def test_a_pinned_failure_in_a_step_surfaces_instead_of_splitting_the_batch():
    from lightning_tiercache.oom.microbatch import MicroBatchRunner

    net = _net()
    sizes = []

    def step(part, scale):
        sizes.append(part[0].shape[0])
        _PinnedBatch().pin_memory()  # e.g. a step that pins what it saves for later

    runner = MicroBatchRunner(OOMConfig(), MicroBatchPolicy(OOMConfig()))
    with pytest.raises(torch.AcceleratorError, match="CUDA error: out of memory"):
        runner.run_train(_batch(), step, list(net.parameters()))
    assert sizes == [32]  # tried once at full size: not split


def test_memory_summary_names_rss_and_available_ram():
    assert "process RSS" in memory_summary() and "RAM available" in memory_summary()


def test_policy_walks_the_ladder_then_fails():
    policy = MicroBatchPolicy(OOMConfig(max_micro_batches=4, grow_back_after_steps=0))
    assert policy.begin_step() == 1
    assert policy.on_oom(at_size_one=False, can_retry_same=True, batch_size=32) == "retry"
    assert policy.on_oom(at_size_one=False, can_retry_same=False, batch_size=32) == "split"
    assert policy.on_oom(at_size_one=False, can_retry_same=False, batch_size=32) == "split"
    assert policy.micro_batches == 4
    assert policy.on_oom(at_size_one=False, can_retry_same=False, batch_size=32) == "fail"  # max_micro_batches
    fresh = MicroBatchPolicy(OOMConfig())
    assert fresh.on_oom(at_size_one=True, can_retry_same=False, batch_size=1) == "fail"
    assert policy.stats()["failed_attempts"] == 4 and policy.stats()["demotions"] == 1


def test_grow_back_waits_double_after_each_failed_try_and_state_round_trips():
    policy = MicroBatchPolicy(OOMConfig(grow_back_after_steps=3, max_backoff_exponent=2, initial_micro_batches=4))
    waits = []
    for _ in range(4):
        steps = 0
        while policy.begin_step() == 4:
            policy.on_success()
            steps += 1
        waits.append(steps)
        assert policy.on_oom(at_size_one=False, can_retry_same=False, batch_size=32) == "retry"
        assert policy.micro_batches == 4
    assert waits == [3, 6, 12, 12]  # capped at 2**2
    state = policy.state_dict()
    other = MicroBatchPolicy(OOMConfig(grow_back_after_steps=3, max_backoff_exponent=2))
    other.load_state_dict(state)
    assert other.micro_batches == 4 and other.grow_failures == {2: 4}
    assert other.stats()["failed_grow_backs"] == 4


def test_allocator_pressure_postpones_grow_back():
    policy = MicroBatchPolicy(OOMConfig(grow_back_after_steps=2, initial_micro_batches=2))
    for _ in range(5):
        assert policy.begin_step() == 2
        policy.on_success(pressure=True)
    assert policy.stats()["pressure_steps"] == 5


def test_rank_agreement_is_the_identity_in_one_process():
    assert RankAgreement().max([0, 3, -2]) == [0, 3, -2]


def test_runner_split_gradient_equals_unsplit_gradient():
    x, y = _batch()
    ref = _net()
    nn.functional.mse_loss(ref(x), y).backward()
    net = _net()
    injector = OOMInjector(above_batch_size=8).attach(net[2])
    runner = MicroBatchRunner(OOMConfig(), MicroBatchPolicy(OOMConfig()))
    result = runner.run_train((x, y), _step(net), list(net.parameters()))
    assert result.micro_batches == 4 and result.attempts == 3 and injector.injected == 2
    for a, b in zip(_grads(net), _grads(ref), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
    assert torch.stack(result.outputs).mean().item() == pytest.approx(nn.functional.mse_loss(ref(x), y).item())


def test_failed_backward_leaves_earlier_accumulated_grads_bit_identical():
    """Gradients from earlier batches (accumulation) survive a failed backward untouched, and the step's
    gradient is added to them exactly as autograd would."""
    x, y = _batch()
    ref = _net()
    nn.functional.mse_loss(ref(x[:8]), y[:8]).backward()
    nn.functional.mse_loss(ref(x[8:16]), y[8:16]).backward()
    net = _net()
    nn.functional.mse_loss(net(x[:8]), y[:8]).backward()
    OOMInjector(phase="backward", max_faults=1).attach(net[0])  # after the last layer's grads accumulated
    # A store that freed memory makes the retry run at the same size, so the sums are the same sums.
    runner = MicroBatchRunner(OOMConfig(), MicroBatchPolicy(OOMConfig()), free_memory=lambda: 1)
    result = runner.run_train((x[8:16], y[8:16]), _step(net), list(net.parameters()))
    assert result.micro_batches == 1 and result.attempts == 2
    for a, b in zip(_grads(net), _grads(ref), strict=True):
        assert torch.equal(a, b)


def test_oom_at_size_one_raises_and_restores_grads():
    net = _net()
    x, y = _batch(2)
    nn.functional.mse_loss(net(x), y).backward()
    before = _grads(net)
    OOMInjector(above_batch_size=0).attach(net[0])
    runner = MicroBatchRunner(OOMConfig(), MicroBatchPolicy(OOMConfig()))
    with pytest.raises(OOMRecoveryError, match=r"out of memory even at 2 micro-batches.*injected"):
        runner.run_train((x, y), _step(net), list(net.parameters()))
    for a, b in zip(_grads(net), before, strict=True):
        assert torch.equal(a, b)


def test_store_demotion_retries_once_at_the_same_size(make_store):
    store = make_store(device_bytes="1MiB", host_bytes="8MiB", disk_bytes="8MiB")
    store.put(torch.zeros(1000))
    net = _net()
    OOMInjector(max_faults=1).attach(net[0])
    policy = MicroBatchPolicy(OOMConfig())
    runner = MicroBatchRunner(OOMConfig(), policy, free_memory=lambda: store.clear_cache() + store.demote(Tier.DEVICE))
    result = runner.run_train(_batch(), _step(net), list(net.parameters()))
    assert result.micro_batches == 1 and result.attempts == 2
    assert policy.stats()["demotions"] == 1 and policy.stats()["splits"] == 0
    assert store.stats()["tiers"]["device"]["bytes"] == 0


def test_failed_attempt_activations_are_released_before_retry():
    """Note: [oom references]: nothing keeps the failed attempt's tensors alive once recovery starts."""
    net = _net()
    refs: list[weakref.ref] = []

    def keep(module, args, out):
        refs.append(weakref.ref(out))

    net[0].register_forward_hook(keep)
    OOMInjector(above_batch_size=8).attach(net[2])
    seen_alive = []

    def save():
        return None

    def restore(_):
        gc.collect()
        seen_alive.append(sum(r() is not None for r in refs))

    runner = MicroBatchRunner(OOMConfig(), MicroBatchPolicy(OOMConfig()))
    runner.run_train(_batch(), _step(net), list(net.parameters()), save=save, restore=restore)
    assert seen_alive == [0, 0]


def test_buffers_updated_by_a_failed_attempt_are_restored():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(6, 4), nn.BatchNorm1d(4), nn.Linear(4, 1))
    OOMInjector(max_faults=1).attach(net[2])
    runner = MicroBatchRunner(OOMConfig(), MicroBatchPolicy(OOMConfig()), free_memory=lambda: 1)
    runner.run_train(_batch(), _step(net), list(net.parameters()), buffers=list(net.buffers()))
    assert net[1].num_batches_tracked.item() == 1  # the failed forward's update was rolled back


def test_eval_keeps_succeeded_micro_batches():
    calls = []
    runner = MicroBatchRunner(OOMConfig(), MicroBatchPolicy(OOMConfig(initial_micro_batches=2)))

    def step(part):
        calls.append(len(part))
        if len(calls) == 2:
            raise torch.OutOfMemoryError("CUDA out of memory (test)")
        return part * 2

    result = runner.run_eval(torch.arange(16), step)
    assert calls == [8, 8, 4, 4]
    assert torch.equal(runner.merge(result), torch.arange(16) * 2)


def test_micro_batches_helper_gives_the_unsplit_gradient():
    x, y = _batch(10)
    ref = _net()
    nn.functional.mse_loss(ref(x), y).backward()
    net = _net()
    pieces = micro_batches((x, y), 3)
    assert [round(s, 3) for _, s in pieces] == [0.4, 0.3, 0.3]
    for (mx, my), scale in pieces:
        (nn.functional.mse_loss(net(mx), my) * scale).backward()
    for a, b in zip(_grads(net), _grads(ref), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


def test_injector_filters_by_rank_step_and_count():
    lin = nn.Linear(2, 2)
    inj = OOMInjector(above_batch_size=1, steps={3}, ranks={0}, max_faults=1).attach(lin)
    lin(torch.zeros(4, 2))  # step 0: no fault
    inj.step = 3
    with pytest.raises(torch.OutOfMemoryError, match=r"injected .*forward, batch size 4, rank 0, step 3"):
        lin(torch.zeros(4, 2))
    lin(torch.zeros(4, 2))  # max_faults reached
    inj.detach()
    assert inj.injected == 1 and len(inj.log) == 1
    with pytest.raises(ValueError, match=r"phase must be one of \('forward', 'backward', 'both'\), got 'fwd'"):
        OOMInjector(phase="fwd")
