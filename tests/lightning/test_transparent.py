"""Adding ``TierCacheCallback()`` changes nothing a Lightning run relies on (one process): Lightning's own tools
(SWA, BatchSizeFinder) behave as without it, a large buffer is never copied per step, the callback copies and
pickles mid-fit."""

from __future__ import annotations

import copy
import pickle
from pathlib import Path
from typing import Any
from unittest import mock

import lightning as L
import torch
from lightning.pytorch.callbacks import BatchSizeFinder, StochasticWeightAveraging
from lightning.pytorch.strategies import Strategy
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.data import DataLoader, TensorDataset

from lightning_tiercache import TierCacheCallback
from lightning_tiercache.lightning.testing import OOMInjector
from tests.recording_logger import Recorder


def _callback(spill: Path, **kw: Any) -> TierCacheCallback:
    return TierCacheCallback(spill_dir=str(spill), **kw)


def _trainer(tmp_path: Path, callbacks: list[Any], **kw: Any) -> L.Trainer:
    kw.setdefault("max_epochs", 1)
    return L.Trainer(
        default_root_dir=tmp_path, callbacks=callbacks, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, accelerator="cpu", **kw,
    )  # fmt: skip


class Net(L.LightningModule):
    def __init__(self, batch_size: int = 8, norm: bool = False) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.batch_size = batch_size
        self.l1 = nn.Linear(8, 16)
        self.norm = nn.BatchNorm1d(16) if norm else nn.Identity()
        self.l2 = nn.Linear(16, 1)
        self.backwards_per_epoch: dict[int, int] = {}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.l2(torch.tanh(self.norm(self.l1(x))))

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        return nn.functional.mse_loss(self(x), y)

    def on_after_backward(self) -> None:
        epoch = self.trainer.current_epoch
        self.backwards_per_epoch[epoch] = self.backwards_per_epoch.get(epoch, 0) + 1

    def train_dataloader(self) -> DataLoader:
        g = torch.Generator().manual_seed(1)
        data = TensorDataset(torch.randn(256, 8, generator=g), torch.randn(256, 1, generator=g))
        return DataLoader(data, batch_size=self.batch_size)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.05)


def test_swa_batchnorm_epoch_runs_no_backward(tmp_path: Path, spill_parent: Path) -> None:
    # SWA adds one epoch that only recomputes BatchNorm statistics: Lightning skips backward there.
    def fit(callbacks: list[Any]) -> Net:
        model = Net(norm=True)
        swa = StochasticWeightAveraging(swa_lrs=0.01, swa_epoch_start=1)
        _trainer(tmp_path, [swa, *callbacks], max_epochs=2).fit(model)
        return model

    plain = fit([])
    model = fit([_callback(spill_parent)])
    assert plain.backwards_per_epoch.get(2, 0) == 0  # the BatchNorm epoch, as Lightning runs it
    assert model.backwards_per_epoch.get(2, 0) == 0
    assert model.backwards_per_epoch == plain.backwards_per_epoch
    for a, b in zip(model.state_dict().values(), plain.state_dict().values(), strict=True):
        assert torch.equal(a, b)


def test_batch_size_finder_finds_the_same_size_with_the_callback(tmp_path: Path, spill_parent: Path) -> None:
    def search(callbacks: list[Any]) -> int:
        model = Net(batch_size=2)
        OOMInjector(above_batch_size=32).attach(model.l1)  # "memory" holds 32 samples
        finder = BatchSizeFinder(mode="power", init_val=2, max_trials=8, steps_per_trial=1)
        _trainer(tmp_path, [finder, *callbacks], max_steps=1).fit(model)
        assert model.batch_size == finder.optimal_batch_size  # the run went on with the size found
        return int(finder.optimal_batch_size or 0)

    plain = search([])
    assert plain == 32
    assert search([_callback(spill_parent)]) == plain


class _CountCopies(TorchDispatchMode):
    """Counts the ops that write a tensor of ``numel`` elements (clones and copies of a buffer that size)."""

    def __init__(self, numel: int) -> None:
        super().__init__()
        self.numel = numel
        self.copies = 0

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        out = func(*args, **(kwargs or {}))
        name = func.__name__
        if name.startswith(("clone", "copy", "_foreach_copy")) and any(
            isinstance(a, torch.Tensor) and a.numel() == self.numel for a in args
        ):
            self.copies += 1
        return out


class Queue(Net):
    """A MoCo-style module: a large queue buffer, changed in place by every training step."""

    QUEUE = 4 * 2**20  # 16 MiB of float32: far over the per-buffer copy limit

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("queue", torch.zeros(self.QUEUE))
        self.register_buffer("ptr", torch.zeros((), dtype=torch.long))

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        loss = super().training_step(batch, batch_idx)
        with torch.no_grad():
            self.queue[int(self.ptr) % self.QUEUE] = loss.detach()
            self.ptr += 1
        return loss


def test_a_large_buffer_is_never_copied_by_a_step_that_does_not_fail(tmp_path: Path, spill_parent: Path) -> None:
    model = Queue()
    counter = _CountCopies(Queue.QUEUE)
    with counter:
        _trainer(tmp_path, [_callback(spill_parent)], max_steps=6).fit(model)
    assert int(model.ptr) == 6
    assert counter.copies == 0


def test_the_callback_copies_and_pickles_during_fit(tmp_path: Path, spill_parent: Path) -> None:
    copies: list[Any] = []

    class CopyMidFit(L.Callback):
        def on_train_batch_end(self, trainer: L.Trainer, *args: Any) -> None:
            copies.append(copy.deepcopy(trainer.callbacks))
            copies.append(pickle.loads(pickle.dumps(tiercache)))

    tiercache = _callback(spill_parent, oom_initial_micro_batches=2)
    _trainer(tmp_path, [tiercache, CopyMidFit()], max_steps=2).fit(Net())
    copied = copies[-1]
    assert isinstance(copied, TierCacheCallback)
    assert copied.store is None  # live parts stay with the original
    assert copied.state_dict()["oom"]["train"]["micro_batches"] == 2  # learned state travels
    assert any(isinstance(cb, TierCacheCallback) for cb in copies[-2])
    # A copy is a working callback for another Trainer.
    _trainer(tmp_path, [copied], max_steps=2).fit(Net())


class _Logged(Net):
    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        loss = super().training_step(batch, batch_idx)
        self.log("loss", loss, prog_bar=True)
        return loss

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        self.log("val", super().training_step(batch, batch_idx), prog_bar=True)

    def val_dataloader(self) -> DataLoader:
        return self.train_dataloader()


def test_a_run_the_library_does_nothing_for_logs_exactly_what_it_logs_without_it(
    tmp_path: Path, spill_parent: Path
) -> None:
    # Note: [pay for telemetry]: no store traffic, no OOM, no KV: no tiercache row, the bar untouched.
    def fit(callbacks: list[Any]) -> tuple[Recorder, list[dict[str, Any]], bool]:
        recorder, bars, patched = Recorder(), [], []

        class Peek(L.Callback):
            def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
                bar = trainer.progress_bar_callback
                patched.append("get_metrics" in vars(bar))
                bars.append(dict(bar.get_metrics(trainer, pl_module)))

        trainer = L.Trainer(
            default_root_dir=tmp_path, callbacks=[*callbacks, Peek()], logger=recorder, enable_checkpointing=False,
            enable_model_summary=False, accelerator="cpu", max_epochs=2, limit_train_batches=6,
            limit_val_batches=3, log_every_n_steps=1,
        )  # fmt: skip
        trainer.fit(_Logged())
        return recorder, bars, any(patched)

    plain, plain_bars, _ = fit([])
    recorder, bars, patched = fit([_callback(spill_parent)])
    assert len(recorder.calls) == len(plain.calls) > 12
    assert recorder.calls == plain.calls  # the same steps, keys and values
    assert not patched and bars == plain_bars


def test_the_wrapped_strategy_methods_read_as_lightnings_own(tmp_path: Path, spill_parent: Path) -> None:
    # Note: [wrapped methods]: a test that patches Strategy.backward with a Mock reads its count from the strategy.
    seen: dict[str, Any] = {}

    class Peek(L.Callback):
        def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
            strategy = trainer.strategy
            seen["backwards"] = strategy.backward.call_count
            seen["bound_to"] = strategy.training_step.__self__
            seen["name"] = strategy.validation_step.__name__

    trainer = _trainer(tmp_path, [_callback(spill_parent), Peek()], max_steps=5)
    with mock.patch.object(Strategy, "backward", wraps=trainer.strategy.backward):
        trainer.fit(Net())
    assert seen == {"backwards": 5, "bound_to": trainer.strategy, "name": "validation_step"}
    assert "backward" not in vars(trainer.strategy)  # put back at teardown


def test_the_library_never_reads_time_perf_counter(tmp_path: Path, spill_parent: Path) -> None:
    # Note: [own clock]: user code (or a test) that patches time.perf_counter sees only its own and Lightning's calls.
    import time

    def calls(callbacks: list[Any]) -> int:
        with mock.patch("time.perf_counter", wraps=time.perf_counter) as clock:
            _trainer(tmp_path, callbacks, max_steps=6, log_every_n_steps=1).fit(_Logged())
        return clock.call_count

    plain = calls([])
    offloading = _callback(spill_parent, device_bytes=1024, disk_bytes=0, min_offload_bytes=256)
    assert calls([_callback(spill_parent)]) == plain
    assert calls([offloading]) == plain
    assert offloading.stats()["store"]["puts"] > 0  # the store, its moves and telemetry ran
