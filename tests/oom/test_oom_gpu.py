"""Real CUDA out-of-memory errors (no injection), capped with ``torch.cuda.set_per_process_memory_fraction``."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lightning_tiercache.oom.microbatch import MicroBatchRunner
from lightning_tiercache.oom.recovery import MicroBatchPolicy, OOMConfig

pytestmark = pytest.mark.gpu

WIDTH, LAYERS, BATCH = 4096, 4, 8192


def _net(device: torch.device) -> nn.Module:
    torch.manual_seed(0)
    layers: list[nn.Module] = []
    for _ in range(LAYERS):
        layers += [nn.Linear(WIDTH, WIDTH), nn.GELU()]
    return nn.Sequential(*layers, nn.Linear(WIDTH, 1)).to(device)


def _step(net: nn.Module):
    def micro_step(part, scale):
        x, y = part
        loss = nn.functional.mse_loss(net(x), y)
        (loss if scale == 1.0 else loss * scale).backward()
        return loss.detach()

    return micro_step


@pytest.fixture
def capped():
    """Yields a function that caps this process's CUDA memory to `nbytes`; the cap is lifted afterwards."""
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    device = torch.device("cuda", torch.cuda.current_device())
    total = torch.cuda.get_device_properties(device).total_memory
    tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False

    def cap(nbytes: int) -> None:
        torch.cuda.empty_cache()
        torch.cuda.set_per_process_memory_fraction(min(1.0, nbytes / total), device)

    yield device, cap
    torch.backends.cuda.matmul.allow_tf32 = tf32
    torch.cuda.set_per_process_memory_fraction(1.0, device)
    torch.cuda.empty_cache()


def test_real_cuda_oom_is_split_and_gradients_match(capped):
    device, cap = capped
    g = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(BATCH, WIDTH, device=device, generator=g)
    y = torch.randn(BATCH, 1, device=device, generator=g)

    ref = _net(device)
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    _step(ref)((x[: BATCH // 4], y[: BATCH // 4]), 1.0)  # peak of a quarter batch, grads included
    quarter_peak = torch.cuda.max_memory_allocated(device) - base
    ref.zero_grad(set_to_none=True)
    _step(ref)((x, y), 1.0)
    ref_grads = [p.grad.clone() for p in ref.parameters()]
    del ref

    net = _net(device)
    params = list(net.parameters())
    policy = MicroBatchPolicy(OOMConfig(grow_back_after_steps=0))
    runner = MicroBatchRunner(OOMConfig(), policy, device=device)
    before = torch.cuda.memory_allocated(device)
    cap(before + int(quarter_peak * 1.6) + sum(t.numel() * 4 for t in ref_grads))
    result = runner.run_train((x, y), _step(net), params)
    assert result.micro_batches in (4, 8), result
    assert policy.stats()["failed_attempts"] >= 2
    for a, b in zip((p.grad for p in params), ref_grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    del result  # its detached per-micro-batch losses are small CUDA tensors
    # The caching allocator counts blocks rounded up to 512 bytes.
    grads_bytes = sum(-(-p.grad.numel() * p.grad.element_size() // 512) * 512 for p in params)
    assert torch.cuda.memory_allocated(device) == before + grads_bytes  # nothing of the failed attempts is left


def test_lightning_fit_recovers_from_a_real_cuda_oom(capped):
    import lightning as L
    from torch.utils.data import DataLoader, TensorDataset

    from lightning_tiercache.lightning.step_hook import StepHook

    device, cap = capped

    class Net(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = _net(torch.device("cpu"))

        def training_step(self, batch, batch_idx):
            x, y = batch
            return nn.functional.mse_loss(self.net(x), y)

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=1e-4)

    class Install(L.Callback):
        def __init__(self, hook):
            self.hook = hook

        def setup(self, trainer, pl_module, stage):
            self.hook.install(trainer)

        def teardown(self, trainer, pl_module, stage):
            self.hook.uninstall()

    data = TensorDataset(torch.randn(BATCH * 2, WIDTH), torch.randn(BATCH * 2, 1))
    params_bytes = sum(p.numel() * 4 for p in _net(torch.device("cpu")).parameters())
    act_bytes = BATCH * WIDTH * 4 * 2 * LAYERS  # linear output + gelu output per layer
    # room for params, grads, the batch and a quarter of the activations (with slack), not the whole batch
    cap(torch.cuda.memory_allocated(device) + 2 * params_bytes + BATCH * WIDTH * 4 + act_bytes // 2)
    hook = StepHook(OOMConfig(grow_back_after_steps=0))
    trainer = L.Trainer(
        accelerator="cuda",
        devices=1,
        max_steps=2,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[Install(hook)],
    )
    trainer.fit(Net(), DataLoader(data, batch_size=BATCH))
    stats = hook.stats()
    assert stats["current_micro_batches"] >= 2 and stats["failed_attempts"] >= 1
