"""OOM split-and-retry inside Lightning: exact weights, accumulation, AMP, eval outputs and logs, resume.

The hook is installed by a test-local callback until ``TierCacheCallback`` wires it.
"""

from __future__ import annotations

import weakref

import lightning as L
import pytest
import torch
import torchmetrics
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_tiercache import OOMRecoveryError
from lightning_tiercache.lightning.step_hook import StepHook
from lightning_tiercache.lightning.testing import OOMInjector
from lightning_tiercache.oom.recovery import OOMConfig

N_SAMPLES = 32 * 6


class HookCallback(L.Callback):
    """Stand-in for TierCacheCallback: installs the hook and keeps its state."""

    def __init__(self, hook: StepHook) -> None:
        self.hook = hook

    def setup(self, trainer, pl_module, stage):
        self.hook.install(trainer)

    def teardown(self, trainer, pl_module, stage):
        self.hook.uninstall()

    def on_exception(self, trainer, pl_module, exception):
        self.hook.uninstall()

    def state_dict(self):
        return self.hook.state_dict()

    def load_state_dict(self, state_dict):
        self.hook.load_state_dict(state_dict)


class Net(L.LightningModule):
    def __init__(self, optim: str = "sgd", log_train: bool = False) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.l1 = nn.Linear(16, 32)
        self.l2 = nn.Linear(32, 1)
        self.optim = optim
        self.log_train = log_train
        self.val_mean = torchmetrics.MeanMetric()
        self.val_calls = 0
        self.sizes: list[int] = []

    def forward(self, x):
        return self.l2(torch.tanh(self.l1(x)))

    def training_step(self, batch, batch_idx):
        x, y = batch
        self.sizes.append(len(x))
        loss = nn.functional.mse_loss(self(x), y)
        if self.log_train:
            self.log("train_loss", loss, on_step=False, on_epoch=True)
        return loss

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.val_calls += 1
        err = (self.l2(torch.tanh(self.l1(x))) - y).abs()
        self.val_mean.update(err)
        self.log("val_sum", err.sum(), reduce_fx="sum", on_epoch=True)
        self.log("val_mean", self.val_mean, on_epoch=True)
        self.log("val_err", err.mean(), on_epoch=True)
        self.l2(torch.tanh(self.l1(x)))  # a second forward after logging: an OOM here must not double count
        return err

    def predict_step(self, batch, batch_idx):
        return self(batch[0])

    def configure_optimizers(self):
        if self.optim == "adamw":
            return torch.optim.AdamW(self.parameters(), lr=1e-2, weight_decay=0.1)
        return torch.optim.SGD(self.parameters(), lr=0.1, momentum=0.9)


def _data(n: int = N_SAMPLES) -> DataLoader:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(n, 16, generator=g)
    y = torch.randn(n, 1, generator=g)
    return DataLoader(TensorDataset(x, y), batch_size=32, shuffle=False)


def _trainer(callbacks=(), **kw) -> L.Trainer:
    kw.setdefault("max_epochs", 1)
    return L.Trainer(
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=list(callbacks),
        **kw,
    )


def _weights(model: nn.Module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in model.parameters()]


def _assert_close(a: list[torch.Tensor], b: list[torch.Tensor], rtol: float = 1e-6) -> None:
    for x, y in zip(a, b, strict=True):
        rel = (x - y).abs().max() / y.abs().max().clamp_min(1e-12)
        assert rel <= rtol, f"relative difference {rel:.3g}"


@pytest.mark.parametrize("accumulate", [1, 2])
@pytest.mark.parametrize("optim", ["sgd", "adamw"])
@pytest.mark.parametrize("phase", ["forward", "backward"])
def test_fit_with_injected_oom_matches_fault_free_weights(optim, accumulate, phase):
    plain = Net(optim)
    _trainer(accumulate_grad_batches=accumulate).fit(plain, _data())

    model = Net(optim)
    # forward: fails after l1 ran; backward: fails after l2's gradients were accumulated.
    injector = OOMInjector(above_batch_size=8, phase=phase).attach(model.l2 if phase == "forward" else model.l1)
    hook = StepHook(OOMConfig(grow_back_after_steps=0))
    _trainer([HookCallback(hook)], accumulate_grad_batches=accumulate).fit(model, _data())

    _assert_close(_weights(model), _weights(plain))
    assert injector.injected == 2  # 32 and 16 failed once each; then 8 stays
    stats = hook.stats()
    assert stats["current_micro_batches"] == 4
    assert stats["splits"] == 2 and stats["failed_attempts"] == 2
    assert model.sizes.count(8) == 4 * 6
    assert not hook.installed  # teardown restored the strategy


def test_accumulation_that_changes_between_epochs_is_followed():
    # The hook reads accumulation once per epoch; the scheduler changes it at epoch 1.
    from lightning.pytorch.callbacks import GradientAccumulationScheduler

    plain = Net("sgd")
    _trainer([GradientAccumulationScheduler({0: 1, 1: 3})], max_epochs=2).fit(plain, _data())
    model = Net("sgd")
    injector = OOMInjector(above_batch_size=16).attach(model.l2)
    hook = StepHook(OOMConfig(grow_back_after_steps=0))
    scheduler = GradientAccumulationScheduler({0: 1, 1: 3})
    _trainer([scheduler, HookCallback(hook)], max_epochs=2).fit(model, _data())
    assert injector.injected == 1  # 32 failed once; split in two from then on
    _assert_close(_weights(model), _weights(plain))


def test_unsplit_steps_are_bit_exact_and_hook_restores_strategy():
    plain = Net("adamw")
    _trainer(accumulate_grad_batches=2).fit(plain, _data())
    model = Net("adamw")
    trainer = _trainer([HookCallback(StepHook())], accumulate_grad_batches=2)
    before = {k: v for k, v in vars(trainer.strategy).items() if k in ("training_step", "backward")}
    trainer.fit(model, _data())
    for a, b in zip(_weights(model), _weights(plain), strict=True):
        assert torch.equal(a, b)
    assert {k: v for k, v in vars(trainer.strategy).items() if k in ("training_step", "backward")} == before


def test_gradient_clipping_and_bf16_mixed_match_fault_free():
    kw = {"gradient_clip_val": 0.05, "precision": "bf16-mixed", "max_steps": 3}
    plain = Net("sgd")
    _trainer(**kw).fit(plain, _data())
    model = Net("sgd")
    OOMInjector(above_batch_size=16).attach(model.l1)
    _trainer([HookCallback(StepHook(OOMConfig(grow_back_after_steps=0)))], **kw).fit(model, _data())
    _assert_close(_weights(model), _weights(plain), rtol=1e-2)  # bf16 autocast rounds per micro-batch


def test_grow_back_tries_half_then_backs_off_exponentially():
    model = Net("sgd")
    injector = OOMInjector(above_batch_size=8).attach(model.l1)
    hook = StepHook(OOMConfig(grow_back_after_steps=2, max_backoff_exponent=3))
    _trainer([HookCallback(hook)], max_epochs=4).fit(model, _data())  # 24 steps
    events = [e["event"] for e in hook.drain_events()]
    # steps 1: split 1->2->4; after 2 good steps try 2 (fails), then waits 4, then 8, then 16 good steps.
    assert events[:2] == ["split", "split"]
    assert events.count("grow_back_failed") == 3
    assert hook.stats()["current_micro_batches"] == 4
    assert hook.train_policy.grow_failures == {2: 3}
    assert injector.injected == 2 + 3


def test_grow_back_returns_to_whole_batches_when_memory_is_back():
    model = Net("sgd")
    injector = OOMInjector(above_batch_size=8, steps={0}).attach(model.l1)
    hook = StepHook(OOMConfig(grow_back_after_steps=2))
    _trainer([HookCallback(hook), injector.callback()], max_epochs=2).fit(model, _data())
    stats = hook.stats()
    assert stats["current_micro_batches"] == 1
    assert stats["grow_backs"] == 2  # 4 -> 2 -> 1
    assert model.sizes[-1] == 32


def _val_metrics(model: Net, hook: StepHook | None) -> dict[str, float]:
    trainer = _trainer([HookCallback(hook)] if hook else [])
    (metrics,) = trainer.validate(model, _data(64), verbose=False)
    return metrics


def test_eval_split_keeps_succeeded_micro_batches_and_counts_each_sample_once():
    plain = _val_metrics(Net(), None)
    model = Net()
    # Fail the whole batch (after it logged), then the second half: the first half must not run again.
    injector = OOMInjector(phase="forward", when=lambda p: p.call in (1, 5)).attach(model.l1)
    hook = StepHook()
    metrics = _val_metrics(model, hook)
    assert injector.injected == 2
    assert set(metrics) == set(plain)
    for k in plain:
        assert metrics[k] == pytest.approx(plain[k], rel=1e-6), k
    # batch 0: 32 (fail) -> 16 ok, 16 (fail) -> 8, 8; batch 1: 3 more micro-batches of the learned split.
    assert model.val_calls == 1 + 1 + 1 + 2 + 4
    assert hook.stats()["eval_current_micro_batches"] == 4


def test_eval_oom_after_unsplit_batches_counts_each_sample_once():
    trainer = _trainer()
    (plain,) = trainer.validate(Net(), _data(96), verbose=False)
    model = Net()
    # Batches 0 and 1 run whole (their snapshots learned), batch 2 fails whole after logging, then splits.
    injector = OOMInjector(phase="forward", when=lambda p: p.call == 5).attach(model.l1)
    hook = StepHook()
    (metrics,) = _trainer([HookCallback(hook)]).validate(model, _data(96), verbose=False)
    assert injector.injected == 1
    for k in plain:
        assert metrics[k] == pytest.approx(plain[k], rel=1e-6), k
    assert model.val_calls == 2 + 1 + 2
    assert hook.stats()["eval_current_micro_batches"] == 2


def test_predict_outputs_are_reassembled_in_order():
    model = Net()
    plain = _trainer().predict(model, _data(64))
    OOMInjector(above_batch_size=8).attach(model.l1)
    split = _trainer([HookCallback(StepHook())]).predict(model, _data(64))
    assert len(split) == len(plain) == 2
    for a, b in zip(split, plain, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


def test_epoch_logged_train_loss_is_weighted_by_micro_batch_size():
    plain = Net(log_train=True)
    t1 = _trainer()
    t1.fit(plain, _data())
    model = Net(log_train=True)
    OOMInjector(above_batch_size=12).attach(model.l1)  # 32 -> 4 micro-batches of 8
    t2 = _trainer([HookCallback(StepHook(OOMConfig(grow_back_after_steps=0)))])
    t2.fit(model, _data())
    assert t2.callback_metrics["train_loss"].item() == pytest.approx(t1.callback_metrics["train_loss"].item(), rel=1e-5)


class Counted(Net):
    """Logs and counts every training sample: a retried step must leave no trace of the failed attempt."""

    def __init__(self) -> None:
        super().__init__(log_train=True)
        self.train_seen = torchmetrics.SumMetric()  # changes its state in place
        self.train_err = torchmetrics.MeanMetric()

    def training_step(self, batch, batch_idx):
        x, y = batch
        self.sizes.append(len(x))
        err = (self(x) - y).square()
        self.train_seen.update(torch.tensor(float(len(x))))
        self.train_err.update(err.detach())
        self.log("train_loss", err.mean(), on_step=False, on_epoch=True)
        self.log("train_sum", err.detach().sum(), on_step=False, on_epoch=True, reduce_fx="sum")
        return err.mean()


@pytest.mark.parametrize("steps", [{0}, {3}], ids=["first-step", "after-learning"])
def test_oom_after_logging_on_an_unsplit_step_counts_every_sample_once(steps):
    plain = Counted()
    t1 = _trainer()
    t1.fit(plain, _data())
    model = Counted()
    injector = OOMInjector(above_batch_size=16, phase="backward", steps=steps).attach(model.l1)
    hook = StepHook(OOMConfig(grow_back_after_steps=1))
    t2 = _trainer([HookCallback(hook), injector.callback()])
    t2.fit(model, _data())
    assert injector.injected == 1
    assert model.sizes.count(32) == 6  # five whole steps and the failed attempt; the retry ran 2 x 16
    assert model.train_seen.compute().item() == N_SAMPLES
    assert model.train_err.compute().item() == pytest.approx(plain.train_err.compute().item(), rel=1e-5)
    for key in ("train_loss", "train_sum"):
        assert t2.callback_metrics[key].item() == pytest.approx(t1.callback_metrics[key].item(), rel=1e-5), key
    _assert_close(_weights(model), _weights(plain))


class Watched(Net):
    """Keeps a weak reference to an activation autograd saves, to see when the failed attempt's graph dies."""

    def __init__(self) -> None:
        super().__init__()
        self.saved: list[weakref.ref[torch.Tensor]] = []
        self.alive_at_retry: list[bool] = []

    def training_step(self, batch, batch_idx):
        x, y = batch
        if len(x) < 32:  # a micro-batch of the retry: is the whole batch's graph gone?
            self.alive_at_retry.append(any(r() is not None for r in self.saved))
        h = torch.tanh(self.l1(x))  # tanh saves its output for backward
        if len(x) == 32:
            self.saved.append(weakref.ref(h))
        return nn.functional.mse_loss(self.l2(h), y)


def test_oom_in_the_closures_backward_frees_the_failed_graph_before_the_retry():
    model = Watched()
    # Fail in l2's backward: tanh's backward has not run yet, so its saved output lives as long as the graph.
    injector = OOMInjector(above_batch_size=16, phase="backward", steps={0}).attach(model.l2)
    _trainer([HookCallback(StepHook(OOMConfig(grow_back_after_steps=0))), injector.callback()], max_steps=1).fit(
        model, _data()
    )
    assert injector.injected == 1
    assert model.alive_at_retry == [False, False]  # the loss was detached: the saved tanh output was freed


def test_resume_from_checkpoint_restores_the_learned_split(tmp_path):
    model = Net()
    OOMInjector(above_batch_size=8).attach(model.l1)
    hook = StepHook(OOMConfig(grow_back_after_steps=1000))
    trainer = L.Trainer(
        accelerator="cpu",
        max_epochs=1,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
        callbacks=[HookCallback(hook)],
    )
    trainer.fit(model, _data())
    ckpt = tmp_path / "last.ckpt"
    trainer.save_checkpoint(ckpt)

    resumed = Net()
    injector = OOMInjector(above_batch_size=8).attach(resumed.l1)
    hook2 = StepHook(OOMConfig(grow_back_after_steps=1000))
    _trainer([HookCallback(hook2)], max_epochs=2).fit(resumed, _data(), ckpt_path=ckpt)
    assert injector.injected == 0  # started at 4 micro-batches: no failed attempt after resume
    assert hook2.stats()["current_micro_batches"] == 4
    assert resumed.sizes == [8] * 4 * 6


def test_oom_at_micro_batch_size_one_raises_with_memory_summary():
    model = Net()
    OOMInjector(above_batch_size=0).attach(model.l1)
    trainer = _trainer([HookCallback(StepHook())], max_steps=1)
    with pytest.raises(OOMRecoveryError, match=r"micro-batch size 1.*Memory: .*RSS.*Try: "):
        trainer.fit(model, _data())


def test_other_errors_propagate_untouched():
    class Broken(Net):
        def training_step(self, batch, batch_idx):
            raise KeyError("not an OOM")

    trainer = _trainer([HookCallback(StepHook())], max_steps=1)
    with pytest.raises(KeyError, match="not an OOM"):
        trainer.fit(Broken(), _data())
    assert "training_step" not in vars(trainer.strategy)


def test_store_demotion_retries_at_the_same_size_before_splitting(make_store):
    store = make_store(device_bytes="1MiB", host_bytes="8MiB", disk_bytes="8MiB")
    store.put(torch.zeros(1000))
    model = Net()
    OOMInjector(max_faults=1).attach(model.l1)
    hook = StepHook(OOMConfig(), store=store)
    _trainer([HookCallback(hook)], max_steps=2).fit(model, _data())
    stats = hook.stats()
    assert stats["demotions"] == 1 and stats["splits"] == 0 and stats["current_micro_batches"] == 1
    assert [e["event"] for e in hook.drain_events()] == ["demote_retry"]
    assert store.stats()["tiers"]["device"]["bytes"] == 0


def test_forward_context_wraps_every_training_forward():
    entered = []

    class Ctx:
        def __init__(self, batch):
            self.size = len(batch[0])

        def __enter__(self):
            entered.append(self.size)

        def __exit__(self, *exc):
            return False

    model = Net()
    OOMInjector(above_batch_size=16).attach(model.l1)
    hook = StepHook(OOMConfig(grow_back_after_steps=0), forward_context=Ctx)
    _trainer([HookCallback(hook)], max_steps=2).fit(model, _data())
    assert entered == [32, 16, 16, 16, 16]  # failed whole batch, then two halves per step, each with its batch
